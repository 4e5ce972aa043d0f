"""Continuous Print's ``.gjob`` archive: a zip of G-code files plus ``manifest.json``.

The manifest is Continuous Print's job dictionary (``JobView.as_dict`` as packed by PeerPrint's
``pack_job``): ``name``, ``count``, ``sets`` (each ``path``, ``count``, ``materials``, ``profiles``,
``estimatedPrintTime``, optional ``metadata``), ``created``, ``version``. Set paths name entries at
the archive root. A material key is ``TYPE_colourname_#rrggbb`` per tool; ``""`` or ``null`` means "any".

Reading never extracts to disk: :func:`read_gjob` returns the manifest and, for every set path, a
:class:`GjobFile` that streams its bytes with every limit enforced, so the caller hands them to the
content-addressed store. Everything hostile raises :class:`shared.errors.ArchiveError`: path traversal
(``..``, absolute paths, backslashes, drive letters), symlinks and other special entries, encrypted or
exotic compression, duplicate or overlapping entries, too many entries, oversized archives, zip bombs
(declared sizes, declared and actual compression ratio, actual streamed size), a missing or invalid
manifest, and a manifest naming a file the archive does not hold.

No I/O here beyond reading the archive path the caller gives, and no clock: zip timestamps are fixed,
so the same job always packs to the same bytes.
"""

from __future__ import annotations

import io
import json
import re
import stat
import struct
import zipfile
import zlib
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, BinaryIO

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, JsonValue, ValidationError

from shared.errors import ArchiveError
from shared.gcode_policy import GcodePolicy, summary

MANIFEST_NAME = "manifest.json"
GJOB_VERSION = "netqueues-1"  # written to "version"; Continuous Print writes PeerPrint's version there
MiB = 1 << 20

_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # earliest zip date; keeps output deterministic
_MAX_METADATA_JSON = 16 * 1024


def check_archive_path(name: str) -> str:
    """Return ``name`` if it is a safe relative archive path; raise ValueError saying why not."""
    if not name:
        raise ValueError("empty path")
    if len(name) > 1024:
        raise ValueError("path longer than 1024 characters")
    if _CONTROL.search(name):
        raise ValueError("control character in path")
    if "\\" in name:
        raise ValueError("backslash in path")
    if name.startswith("/"):
        raise ValueError("absolute path")
    if _DRIVE.match(name):
        raise ValueError("drive letter in path")
    for part in name.split("/"):
        if part in ("", ".", ".."):
            raise ValueError("empty, '.' or '..' path segment")
        if len(part) > 255:
            raise ValueError("path segment longer than 255 characters")
    return name


def _check_metadata(value: JsonValue) -> JsonValue:
    if len(json.dumps(value)) > _MAX_METADATA_JSON:
        raise ValueError(f"metadata larger than {_MAX_METADATA_JSON} bytes of JSON")
    return value


def _any_material(value: tuple[str | None, ...]) -> tuple[str | None, ...]:
    return tuple(m or None for m in value)


def _gcode_path(name: str) -> str:
    if check_archive_path(name) == MANIFEST_NAME:
        raise ValueError(f"a set cannot be {MANIFEST_NAME}")
    return name


ArchivePath = Annotated[str, AfterValidator(_gcode_path)]
Key = Annotated[str, Field(max_length=128)]
Metadata = Annotated[JsonValue, AfterValidator(_check_metadata)]


class GjobSet(BaseModel):
    """One set: a G-code file printed ``count`` times per job copy, with per-tool materials."""

    model_config = ConfigDict(
        strict=True, frozen=True, extra="ignore", validate_by_name=True, validate_by_alias=True
    )

    path: ArchivePath
    count: int = Field(ge=0, le=100_000)
    # ``None`` and ``""`` both mean "any material" for that tool; kept as None.
    materials: Annotated[tuple[Key | None, ...], AfterValidator(_any_material)] = Field(
        default=(), max_length=32, strict=False
    )
    profiles: tuple[Key, ...] = Field(default=(), max_length=64, strict=False)
    estimated_print_time: float | None = Field(default=None, alias="estimatedPrintTime", ge=0)
    metadata: Metadata | None = None


class Manifest(BaseModel):
    """Continuous Print's ``manifest.json``; unknown keys (``id``, ``queue``, run state) are ignored."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    name: str = Field(default="", max_length=256)
    count: int = Field(default=1, ge=0, le=100_000)
    sets: tuple[GjobSet, ...] = Field(min_length=1, max_length=256, strict=False)
    created: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None
    version: str | None = Field(default=None, max_length=64)

    def to_json_bytes(self) -> bytes:
        """The manifest as Continuous Print writes it (fresh run state: remaining = count, not a draft)."""
        sets = []
        for s in self.sets:
            d: dict[str, Any] = {
                "path": s.path,
                "count": s.count,
                "materials": ["" if m is None else m for m in s.materials],
                "profiles": list(s.profiles),
                "estimatedPrintTime": s.estimated_print_time,
                "remaining": s.count,
                "completed": 0,
            }
            if s.metadata is not None:
                d["metadata"] = s.metadata
            sets.append(d)
        out: dict[str, Any] = {
            "name": self.name,
            "count": self.count,
            "remaining": self.count,
            "draft": False,
            "sets": sets,
            "version": self.version or GJOB_VERSION,
        }
        if self.created is not None:
            out["created"] = self.created
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return json.dumps(out, indent=2).encode()


@dataclass(frozen=True, slots=True)
class MaterialKey:
    """A Continuous Print material key, ``TYPE_colourname_#rrggbb`` (SpoolManager's material, colour)."""

    type: str
    colour_name: str | None = None
    colour: str | None = None

    @classmethod
    def parse(cls, key: str) -> MaterialKey:
        parts = key.split("_")
        colour = parts[2] if len(parts) > 2 and parts[2] else None
        return cls(
            type=parts[0], colour_name=parts[1] if len(parts) > 1 and parts[1] else None, colour=colour
        )


class GjobLimits(BaseModel):
    """Bounds on what an archive may declare and actually inflate to."""

    model_config = ConfigDict(strict=True, frozen=True)

    max_archive_bytes: int = Field(default=1024 * MiB, gt=0)
    max_entries: int = Field(default=256, gt=0)
    max_entry_bytes: int = Field(default=1024 * MiB, gt=0)
    max_total_bytes: int = Field(default=2048 * MiB, gt=0)
    # Real G-code deflates 3-10x; a zip bomb inflates hundreds to millions of times.
    max_ratio: float = Field(default=100.0, gt=1)
    ratio_floor_bytes: int = Field(default=1 * MiB, ge=0)  # entries smaller than this skip the ratio test
    max_manifest_bytes: int = Field(default=1 * MiB, gt=0)


DEFAULT_LIMITS = GjobLimits()
_ALLOWED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zlib.error,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    ValueError,
)


@dataclass(frozen=True, slots=True)
class GjobFile:
    """One G-code entry of a checked archive, streamed on demand with the limits enforced again."""

    name: str
    size: int  # declared uncompressed size
    compressed_size: int
    crc: int
    _source: bytes | Path
    _limits: GjobLimits

    def iter_chunks(self, chunk_size: int = MiB) -> Generator[bytes, None, None]:
        """Yield the entry's bytes; raise ArchiveError if it inflates past its limits or fails its CRC."""
        with _open_zip(self._source, self._limits) as zf:
            info = _lookup(zf, self.name)
            if (info.file_size, info.compress_size, info.CRC) != (self.size, self.compressed_size, self.crc):
                raise ArchiveError(f"{self.name}: archive changed since it was checked")
            yield from _stream_entry(zf, info, self._limits, chunk_size)

    def read(self) -> bytes:
        return b"".join(self.iter_chunks())


def read_gjob(
    source: bytes | Path | str, *, limits: GjobLimits = DEFAULT_LIMITS, verify: bool = True,
    policy: GcodePolicy | None = None,
) -> tuple[Manifest, dict[str, GjobFile]]:
    """Check a ``.gjob`` and return its manifest and a streamable file per set path.

    With ``verify`` (the default) every referenced entry is inflated once, discarding the output, so
    a lying header or a bomb is refused here rather than halfway into the store. With ``policy`` every
    referenced entry is inflated and checked against the G-code policy too (ArchiveError naming the entry,
    the line and the rule).
    """
    src: bytes | Path = source if isinstance(source, bytes) else Path(source)
    with _open_zip(src, limits) as zf:
        infos = _check_entries(zf, limits)
        minfo = infos.get(MANIFEST_NAME)
        if minfo is None:
            raise ArchiveError(f"no {MANIFEST_NAME} at the root of the archive")
        if minfo.file_size > limits.max_manifest_bytes:
            raise ArchiveError(f"{MANIFEST_NAME} is larger than {limits.max_manifest_bytes} bytes")
        raw = b"".join(_stream_entry(zf, minfo, limits, MiB))
        manifest = parse_manifest(raw)
        files: dict[str, GjobFile] = {}
        for s in manifest.sets:
            info = infos.get(s.path)
            if info is None or info.is_dir():
                raise ArchiveError(f"manifest names {s.path!r}, which is not a file in the archive")
            if s.path not in files:
                if verify or policy is not None:
                    scanner = None if policy is None else policy.scanner()
                    for chunk in _stream_entry(zf, info, limits, MiB):
                        if scanner is not None:
                            scanner.feed_bytes(chunk)
                    if scanner is not None and (violations := scanner.result().violations()):
                        raise ArchiveError(f"{s.path}: breaks the G-code policy: {summary(violations)}")
                files[s.path] = GjobFile(s.path, info.file_size, info.compress_size, info.CRC, src, limits)
    return manifest, files


def parse_manifest(raw: bytes) -> Manifest:
    """Validate ``manifest.json`` bytes: UTF-8, plain JSON (no NaN, no duplicate keys), the model."""
    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ArchiveError(f"{MANIFEST_NAME} is not valid JSON: {exc}") from exc
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as exc:
        raise ArchiveError(f"{MANIFEST_NAME} is invalid: {_summarise(exc)}") from exc


def write_gjob(
    manifest: Manifest, files: Mapping[str, bytes | Iterable[bytes]], *, compresslevel: int = 6
) -> bytes:
    """Pack ``manifest`` and one file per set path into ``.gjob`` bytes, readable by Continuous Print."""
    needed = {s.path for s in manifest.sets}
    missing = needed - files.keys()
    if missing:
        raise ArchiveError(f"no file given for set path(s): {', '.join(sorted(missing))}")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=compresslevel) as zf:
        for path in sorted(needed):
            info = zipfile.ZipInfo(path, date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            content = files[path]
            with zf.open(info, "w") as out:
                if isinstance(content, bytes):
                    out.write(content)
                else:
                    for chunk in content:
                        out.write(chunk)
        minfo = zipfile.ZipInfo(MANIFEST_NAME, date_time=_FIXED_DATE)
        minfo.compress_type = zipfile.ZIP_DEFLATED
        minfo.external_attr = (stat.S_IFREG | 0o644) << 16
        zf.writestr(minfo, manifest.to_json_bytes())
    return buf.getvalue()


# ---- internals ----------------------------------------------------------------------------------


class _open_zip:
    """Context manager: size and central-directory checks, then a ZipFile over bytes or the path."""

    def __init__(self, source: bytes | Path, limits: GjobLimits) -> None:
        self._source = source
        self._limits = limits
        self._fp: BinaryIO | None = None
        self._zf: zipfile.ZipFile | None = None

    def __enter__(self) -> zipfile.ZipFile:
        try:
            if isinstance(self._source, bytes):
                self._fp = io.BytesIO(self._source)
            else:
                self._fp = open(self._source, "rb")
            size = self._fp.seek(0, io.SEEK_END)
            if size > self._limits.max_archive_bytes:
                raise ArchiveError(f"archive is {size} bytes, more than {self._limits.max_archive_bytes}")
            _check_end_record(self._fp, size, self._limits)
            self._fp.seek(0)
            self._zf = zipfile.ZipFile(self._fp)
            return self._zf
        except ArchiveError:
            self.__exit__()
            raise
        except _ZIP_ERRORS as exc:
            self.__exit__()
            raise ArchiveError(f"not a readable zip archive: {exc}") from exc

    def __exit__(self, *exc: object) -> None:
        if self._zf is not None:
            self._zf.close()
        if self._fp is not None:
            self._fp.close()


def _check_end_record(fp: BinaryIO, size: int, limits: GjobLimits) -> None:
    """Bound the entry count and central directory size before zipfile reads the directory into memory."""
    tail_len = min(size, 22 + 0xFFFF)
    fp.seek(size - tail_len)
    tail = fp.read(tail_len)
    pos = tail.rfind(b"PK\x05\x06")
    if pos < 0 or len(tail) - pos < 22:
        raise ArchiveError("not a zip archive (no end of central directory record)")
    entries, cd_size = struct.unpack("<HI", tail[pos + 10 : pos + 16])
    if (entries == 0xFFFF or cd_size == 0xFFFFFFFF) and pos >= 20:
        locator = tail[pos - 20 : pos]
        if locator[:4] == b"PK\x06\x07":
            (z64_offset,) = struct.unpack("<Q", locator[8:16])
            if z64_offset + 56 > size:
                raise ArchiveError("zip64 end record points outside the archive")
            fp.seek(z64_offset)
            record = fp.read(56)
            if record[:4] != b"PK\x06\x06":
                raise ArchiveError("bad zip64 end of central directory record")
            entries, cd_size = struct.unpack("<QQ", record[32:48])
    if entries > limits.max_entries:
        raise ArchiveError(f"archive has {entries} entries, more than {limits.max_entries}")
    if cd_size > limits.max_entries * 4096:
        raise ArchiveError(f"central directory of {cd_size} bytes is too large")


def _check_entries(zf: zipfile.ZipFile, limits: GjobLimits) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise ArchiveError(f"archive has {len(infos)} entries, more than {limits.max_entries}")
    by_name: dict[str, zipfile.ZipInfo] = {}
    total = 0
    compressed_total = 0
    for info in infos:
        name = info.filename
        is_dir = name.endswith("/")
        try:
            check_archive_path(name[:-1] if is_dir else name)
        except ValueError as exc:
            raise ArchiveError(f"unsafe entry name {name!r}: {exc}") from exc
        if name in by_name:
            raise ArchiveError(f"duplicate entry {name!r}")
        # Unix attributes: regular files and directories only (no type bits at all counts as regular).
        ftype = stat.S_IFMT(info.external_attr >> 16) if info.create_system == 3 else 0
        if ftype == stat.S_IFLNK:
            raise ArchiveError(f"entry {name!r} is a symbolic link")
        if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise ArchiveError(f"entry {name!r} is not a regular file")
        if info.flag_bits & 0x1:
            raise ArchiveError(f"entry {name!r} is encrypted")
        if info.compress_type not in _ALLOWED_COMPRESSION:
            raise ArchiveError(f"entry {name!r} uses unsupported compression method {info.compress_type}")
        if info.file_size > limits.max_entry_bytes:
            raise ArchiveError(
                f"entry {name!r} declares {info.file_size} bytes, more than {limits.max_entry_bytes}"
            )
        if info.file_size > limits.ratio_floor_bytes and (
            info.file_size > limits.max_ratio * max(info.compress_size, 1)
        ):
            raise ArchiveError(
                f"entry {name!r} declares a compression ratio above {limits.max_ratio:g} (zip bomb?)"
            )
        total += info.file_size
        compressed_total += info.compress_size
        if total > limits.max_total_bytes:
            raise ArchiveError(f"archive declares more than {limits.max_total_bytes} uncompressed bytes")
        by_name[name] = info
    if zf.fp is not None:
        archive_size = zf.fp.seek(0, io.SEEK_END)
        if compressed_total > archive_size:
            raise ArchiveError("entries overlap (their compressed sizes exceed the archive)")
    return by_name


def _lookup(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    try:
        return zf.getinfo(name)
    except KeyError as exc:
        raise ArchiveError(f"{name!r} is not in the archive") from exc


def _stream_entry(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, limits: GjobLimits, chunk_size: int
) -> Iterator[bytes]:
    """Inflate one entry in chunks, stopping at its declared size, its entry limit and the ratio limit."""
    cap = min(info.file_size, limits.max_entry_bytes)
    ratio_cap = max(limits.max_ratio * max(info.compress_size, 1), limits.ratio_floor_bytes)
    done = 0
    try:
        with zf.open(info) as src:
            while True:
                chunk = src.read(chunk_size)
                if not chunk:
                    break
                done += len(chunk)
                if done > cap:
                    raise ArchiveError(f"entry {info.filename!r} inflates past its declared size")
                if done > ratio_cap:
                    raise ArchiveError(
                        f"entry {info.filename!r} inflates more than {limits.max_ratio:g}x (zip bomb?)"
                    )
                yield chunk
    except ArchiveError:
        raise
    except _ZIP_ERRORS as exc:
        raise ArchiveError(
            f"entry {info.filename!r} is corrupt or not what its header declares: {exc}"
        ) from exc
    if done != info.file_size:
        raise ArchiveError(f"entry {info.filename!r} is {done} bytes, but declares {info.file_size}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors()
    # A bad set also fails the "at least one set" rule; say only what is wrong with the set.
    specific = [e for e in errors if e["type"] != "too_short"] or errors
    parts = []
    for err in specific[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "manifest"
        parts.append(f"{loc}: {err['msg']}")
    more = len(specific) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
