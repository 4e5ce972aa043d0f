""".gjob archives: Continuous Print compatibility, round trips, and hostile archives refused.

Hostile archives go through the real import path (archive -> checks -> file store) with the working
directory and the store both inside ``tmp_path``; afterwards nothing may exist outside the store.
"""

from __future__ import annotations

import io
import json
import random
import stat
import struct
import warnings
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from node.files.archive import export_gjob, import_gjob
from node.files.store import FileStore
from shared.errors import ArchiveError
from shared.gjob import (
    GJOB_VERSION,
    GjobLimits,
    GjobSet,
    Manifest,
    MaterialKey,
    check_archive_path,
    read_gjob,
    write_gjob,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "gcode"
PRUSA = (DATA / "prusaslicer_mk3s.gcode").read_bytes()
CURA = (DATA / "cura_ender3.gcode").read_bytes()
MiB = 1 << 20


def continuous_print_manifest() -> dict[str, object]:
    """A manifest as Continuous Print 2.x exports it: ``JobView.as_dict()`` minus ``acquired``, ``id``
    and ``queue``, sets without ``sd``, plus PeerPrint's ``version``."""
    return {
        "name": "Calibration cubes",
        "count": 3,
        "draft": False,
        "sets": [
            {
                "path": "prusaslicer_mk3s.gcode",
                "count": 2,
                "estimatedPrintTime": 3723.0,
                "materials": ["PLA_orange_#ff8000"],
                "profiles": ["Prusa MK3S"],
                "id": 11,
                "rank": 1667502353.17,
                "remaining": 1,
                "completed": 1,
            },
            {
                "path": "cura_ender3.gcode",
                "count": 1,
                "estimatedPrintTime": None,
                "materials": ["", "PETG_black_#000000"],
                "profiles": [],
                "id": 12,
                "rank": 1667502360.5,
                "remaining": 1,
                "completed": 0,
            },
        ],
        "created": 1667502353,
        "remaining": 3,
        "version": "0.0.8",
    }


def zip_like_continuous_print(manifest: dict[str, object], files: dict[str, bytes]) -> bytes:
    """Pack the way PeerPrint's ``pack_job`` does: deflated G-code at the root, then ``manifest.json``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, mode="w") as zf:
        for name, content in files.items():
            zf.writestr(name, content, compress_type=zipfile.ZIP_DEFLATED)
        zf.writestr("manifest.json", json.dumps(manifest))
    return buf.getvalue()


def make_zip(entries: list[tuple[str | zipfile.ZipInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in entries:
            zf.writestr(name, content)
    return buf.getvalue()


def manifest_for(*paths: str) -> bytes:
    return json.dumps({"name": "j", "count": 1, "sets": [{"path": p, "count": 1} for p in paths]}).encode()


@cache
def zip_bomb(declared_size: int | None) -> bytes:
    """A 200 MB run of G-code-ish bytes deflated to ~0.2 MB, written in 1 MB chunks (little memory).

    With ``declared_size`` the local and central headers are patched to claim that many bytes.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        info = zipfile.ZipInfo("bomb.gcode", date_time=(2024, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        chunk = b"G1 X0 Y0\n" * (MiB // 9)
        with zf.open(info, "w") as out:
            for _ in range(200):
                out.write(chunk)
        zf.writestr("manifest.json", manifest_for("bomb.gcode"))
    data = bytearray(buf.getvalue())
    assert len(data) < 2 * MiB
    if declared_size is not None:
        local = data.find(b"PK\x03\x04")
        struct.pack_into("<I", data, local + 22, declared_size)  # local header: uncompressed size
        central = data.find(b"PK\x01\x02")
        struct.pack_into("<I", data, central + 24, declared_size)  # central directory: uncompressed size
    return bytes(data)


def symlink_entry() -> bytes:
    link = zipfile.ZipInfo("prusaslicer_mk3s.gcode")
    link.create_system = 3
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    return make_zip([(link, b"/etc/passwd"), ("manifest.json", manifest_for("prusaslicer_mk3s.gcode"))])


def encrypted_entry() -> bytes:
    data = bytearray(make_zip([("a.gcode", b"G28\n"), ("manifest.json", manifest_for("a.gcode"))]))
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = data.find(sig)
        struct.pack_into("<H", data, pos + flag_at, 0x1)  # general purpose flag bit 0: encrypted
    return bytes(data)


def duplicate_entries() -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns "Duplicate name", then writes it
        return make_zip(
            [("a.gcode", b"G28\n"), ("a.gcode", b"M500\n"), ("manifest.json", manifest_for("a.gcode"))]
        )


def overlapping_entries() -> bytes:
    data = bytearray(make_zip([("a.gcode", PRUSA), ("manifest.json", manifest_for("a.gcode"))]))
    central = data.find(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 20, 50 * MiB)  # compressed size far beyond the archive
    return bytes(data)


# ---- Continuous Print compatibility -----------------------------------------------------------


def test_continuous_print_archive_imports_sets_counts_materials_profiles() -> None:
    archive = zip_like_continuous_print(
        continuous_print_manifest(), {"prusaslicer_mk3s.gcode": PRUSA, "cura_ender3.gcode": CURA}
    )
    manifest, files = read_gjob(archive)

    assert manifest.name == "Calibration cubes"
    assert manifest.count == 3
    assert manifest.created == 1667502353
    assert manifest.version == "0.0.8"
    first, second = manifest.sets
    assert (first.path, first.count, second.path, second.count) == (
        "prusaslicer_mk3s.gcode",
        2,
        "cura_ender3.gcode",
        1,
    )
    assert first.materials == ("PLA_orange_#ff8000",)
    assert second.materials == (None, "PETG_black_#000000")  # "" means any material in that tool
    assert first.profiles == ("Prusa MK3S",)
    assert second.profiles == ()
    assert first.estimated_print_time == 3723.0
    assert files["prusaslicer_mk3s.gcode"].read() == PRUSA
    assert b"".join(files["cura_ender3.gcode"].iter_chunks(100)) == CURA


def test_material_key_of_continuous_print() -> None:
    assert MaterialKey.parse("PLA_orange_#ff8000") == MaterialKey("PLA", "orange", "#ff8000")
    assert MaterialKey.parse("PETG") == MaterialKey("PETG")


def test_written_manifest_is_what_continuous_print_reads() -> None:
    manifest = Manifest(
        name="j", count=2, sets=[GjobSet(path="a.gcode", count=3, materials=["PLA_red_#ff0000", None])]
    )
    with zipfile.ZipFile(io.BytesIO(write_gjob(manifest, {"a.gcode": b"G28\n"}))) as zf:
        raw = json.loads(zf.read("manifest.json"))
        assert zf.read("a.gcode") == b"G28\n"
    # Continuous Print's importJob needs name/count and per set path/count/materials/profiles.
    assert raw["name"] == "j" and raw["count"] == 2 and raw["remaining"] == 2
    assert raw["sets"] == [
        {
            "path": "a.gcode",
            "count": 3,
            "materials": ["PLA_red_#ff0000", ""],
            "profiles": [],
            "estimatedPrintTime": None,
            "remaining": 3,
            "completed": 0,
        }
    ]
    assert raw["version"] == GJOB_VERSION


def test_round_trip_write_then_read() -> None:
    manifest = Manifest(
        name="round trip",
        count=4,
        created=1700000000,
        metadata={"source": "test", "tags": ["a", "b"]},
        version=GJOB_VERSION,
        sets=[
            GjobSet(path="parts/a.gcode", count=2, materials=["PLA_red_#ff0000"], profiles=["MK3S"]),
            GjobSet(path="b.gcode", count=1, estimated_print_time=12.5, metadata={"k": 1}),
            GjobSet(path="b.gcode", count=5, materials=[None, "PETG"]),  # same file, other materials
        ],
    )
    files = {"parts/a.gcode": PRUSA, "b.gcode": iter([CURA[:100], CURA[100:]])}
    archive = write_gjob(manifest, files)
    assert write_gjob(manifest, {"parts/a.gcode": PRUSA, "b.gcode": CURA}) == archive  # deterministic

    back, got = read_gjob(archive)
    assert back == manifest
    assert got["parts/a.gcode"].read() == PRUSA
    assert got["b.gcode"].read() == CURA
    assert set(got) == {"parts/a.gcode", "b.gcode"}


def test_read_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "job.gjob"
    path.write_bytes(write_gjob(Manifest(sets=[GjobSet(path="a.gcode", count=1)]), {"a.gcode": CURA}))
    manifest, files = read_gjob(path)
    assert manifest.sets[0].path == "a.gcode"
    assert files["a.gcode"].read() == CURA


def test_write_refuses_a_set_without_its_file() -> None:
    with pytest.raises(ArchiveError, match="no file given"):
        write_gjob(Manifest(sets=[GjobSet(path="a.gcode", count=1)]), {})


async def test_import_into_store_and_export_back(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    archive = zip_like_continuous_print(
        continuous_print_manifest(), {"prusaslicer_mk3s.gcode": PRUSA, "cura_ender3.gcode": CURA}
    )
    imported = await import_gjob(archive, store)
    assert store.path(imported.shas["prusaslicer_mk3s.gcode"]).read_bytes() == PRUSA
    assert store.path(imported.shas["cura_ender3.gcode"]).read_bytes() == CURA

    exported = await export_gjob(imported.manifest, store, imported.shas)
    manifest, files = read_gjob(exported)
    assert [(s.path, s.count, s.materials) for s in manifest.sets] == [
        (s.path, s.count, s.materials) for s in imported.manifest.sets
    ]
    assert files["cura_ender3.gcode"].read() == CURA


@pytest.mark.parametrize(
    "name",
    ["../../etc/x", "/etc/x", "a/../../x", "..\\..\\x", "C:/x", "c:x", "a//b", "./a", "a\x00b", ""],
)
def test_unsafe_paths_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        check_archive_path(name)


# ---- hostile archives ------------------------------------------------------------------------

SMALL = GjobLimits(max_archive_bytes=64 * 1024)

HOSTILE: dict[str, tuple[Callable[[], bytes], GjobLimits | None, str]] = {
    "zip-slip": (
        lambda: make_zip([("../../etc/x", b"G28\n"), ("manifest.json", manifest_for("../../etc/x"))]),
        None,
        "unsafe entry name",
    ),
    "zip-slip-unreferenced": (
        lambda: make_zip(
            [("a.gcode", b"G28\n"), ("../../etc/x", b"x"), ("manifest.json", manifest_for("a.gcode"))]
        ),
        None,
        "unsafe entry name",
    ),
    "absolute-path": (
        lambda: make_zip([("/etc/x", b"G28\n"), ("manifest.json", manifest_for("a.gcode"))]),
        None,
        "unsafe entry name",
    ),
    "backslash": (
        lambda: make_zip([("..\\..\\x", b"G28\n"), ("manifest.json", manifest_for("a.gcode"))]),
        None,
        "unsafe entry name",
    ),
    "drive-letter": (
        lambda: make_zip([("C:/x.gcode", b"G28\n"), ("manifest.json", manifest_for("a.gcode"))]),
        None,
        "unsafe entry name",
    ),
    "manifest-names-itself": (
        lambda: make_zip([("manifest.json", manifest_for("manifest.json"))]),
        None,
        "a set cannot be manifest.json",
    ),
    "manifest-traversal": (
        lambda: make_zip([("x", b"G28\n"), ("manifest.json", manifest_for("../x"))]),
        None,
        "manifest.json is invalid",
    ),
    "symlink": (lambda: symlink_entry(), None, "symbolic link"),
    "encrypted": (lambda: encrypted_entry(), None, "encrypted"),
    "duplicate-entry": (duplicate_entries, None, "duplicate entry"),
    "overlapping-entries": (lambda: overlapping_entries(), None, "overlap"),
    "too-many-entries": (
        lambda: make_zip(
            [(f"f{i}.gcode", b"") for i in range(300)] + [("manifest.json", manifest_for("f0.gcode"))]
        ),
        None,
        "300 entries|301 entries",
    ),
    "oversized-archive": (
        lambda: make_zip(
            [("a.gcode", random.Random(1).randbytes(8192)), ("manifest.json", manifest_for("a.gcode"))]
        ),
        GjobLimits(max_archive_bytes=4096),
        "more than 4096",
    ),
    "oversized-entry": (
        lambda: make_zip([("a.gcode", PRUSA), ("manifest.json", manifest_for("a.gcode"))]),
        GjobLimits(max_entry_bytes=1000),
        "declares 3199 bytes",
    ),
    "zip-bomb-declared": (lambda: zip_bomb(None), None, "compression ratio"),
    "zip-bomb-lying-header": (lambda: zip_bomb(1000), None, "bomb.gcode"),
    "missing-manifest": (lambda: make_zip([("a.gcode", b"G28\n")]), None, "no manifest.json"),
    "manifest-names-missing-file": (
        lambda: make_zip([("a.gcode", b"G28\n"), ("manifest.json", manifest_for("a.gcode", "b.gcode"))]),
        None,
        "'b.gcode', which is not a file",
    ),
    "manifest-names-a-directory": (
        lambda: make_zip([("d/", b""), ("manifest.json", manifest_for("d"))]),
        None,
        "not a file",
    ),
    "bad-json": (
        lambda: make_zip([("a.gcode", b"G28\n"), ("manifest.json", b"{not json")]),
        None,
        "not valid JSON",
    ),
    "json-nan": (
        lambda: make_zip([("a", b""), ("manifest.json", b'{"sets":[{"path":"a","count":NaN}]}')]),
        None,
        "not valid JSON",
    ),
    "json-duplicate-key": (
        lambda: make_zip([("a", b""), ("manifest.json", b'{"sets":[{"path":"a","count":1,"count":2}]}')]),
        None,
        "duplicate key",
    ),
    "json-deeply-nested": (
        lambda: make_zip([("manifest.json", b"[" * 100_000 + b"]" * 100_000)]),
        None,
        "not valid JSON",
    ),
    "wrong-types": (
        lambda: make_zip([("a", b""), ("manifest.json", b'{"name":"j","sets":[{"path":"a","count":"2"}]}')]),
        None,
        r"sets\.0\.count",
    ),
    "no-sets": (
        lambda: make_zip([("manifest.json", b'{"name":"j","sets":[]}')]),
        None,
        "manifest.json is invalid",
    ),
    "not-an-object": (lambda: make_zip([("manifest.json", b"[1, 2]")]), None, "manifest.json is invalid"),
    "not-utf8": (lambda: make_zip([("manifest.json", b'{"name":"\xff"}')]), None, "not valid JSON"),
    "huge-manifest": (
        lambda: make_zip([("manifest.json", json.dumps({"name": "x" * 200_000}).encode())]),
        GjobLimits(max_manifest_bytes=100_000),
        "larger than 100000",
    ),
    "not-a-zip": (lambda: b"PK\x03\x04 this is not really a zip archive" * 10, None, "not a zip archive"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
async def test_hostile_archive_is_refused_and_nothing_written_outside_the_store(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build, limits, message = HOSTILE[case]
    archive = build()
    source = tmp_path / "in" / "hostile.gjob"
    source.parent.mkdir()
    source.write_bytes(archive)
    workdir = tmp_path / "cwd" / "deep"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    store = FileStore(tmp_path / "store")

    with pytest.raises(ArchiveError, match=message):
        await import_gjob(source, store, limits=limits or GjobLimits())
    with pytest.raises(ArchiveError, match=message):
        read_gjob(archive, limits=limits or GjobLimits())

    outside = sorted(
        str(p.relative_to(tmp_path))
        for p in tmp_path.rglob("*")
        if p.is_file() and not p.is_relative_to(tmp_path / "store")
    )
    assert outside == ["in/hostile.gjob"]
    assert list(store.shas()) == []  # nothing from a refused archive's refused entry is stored
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
    assert not (tmp_path / "etc").exists()
    assert not (tmp_path.parent / "etc").exists()


def test_bomb_is_refused_without_inflating_it() -> None:
    # The lying header makes zipfile stop at the declared 1000 bytes; the CRC then fails.
    with pytest.raises(ArchiveError, match="corrupt|declares"):
        read_gjob(zip_bomb(1000))


def test_files_stream_lazily_with_limits_checked_again() -> None:
    archive = zip_like_continuous_print(
        continuous_print_manifest(), {"prusaslicer_mk3s.gcode": PRUSA, "cura_ender3.gcode": CURA}
    )
    _, files = read_gjob(archive, verify=False)
    entry = files["prusaslicer_mk3s.gcode"]
    assert entry.size == len(PRUSA)
    assert sum(len(c) for c in entry.iter_chunks(1000)) == len(PRUSA)


def test_directory_entries_and_nested_paths_are_fine() -> None:
    archive = make_zip([("sub/", b""), ("sub/a.gcode", CURA), ("manifest.json", manifest_for("sub/a.gcode"))])
    manifest, files = read_gjob(archive)
    assert files["sub/a.gcode"].read() == CURA
    assert manifest.sets[0].path == "sub/a.gcode"
