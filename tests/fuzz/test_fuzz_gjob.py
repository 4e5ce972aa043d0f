"""``.gjob`` archives fuzzed (shared/gjob.py, node/files/archive.py): random bytes, random zips, zip-slip
names, special entries, bombs and bad manifests. Nothing but ArchiveError escapes; what is accepted names only
safe paths, inflates within the limits, and enters the store only under its hash."""

from __future__ import annotations

import asyncio
import io
import json
import stat
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.files.archive import import_gjob
from node.files.store import FileStore
from shared.errors import ArchiveError
from shared.gjob import MANIFEST_NAME, GjobLimits, check_archive_path, read_gjob
from tests.fuzz.conftest import FUZZ, ran
from tests.fuzz.strategies import hostile_values, json_values

pytestmark = pytest.mark.security

LIMITS = GjobLimits(max_archive_bytes=256 * 1024, max_entries=16, max_entry_bytes=64 * 1024,
                    max_total_bytes=128 * 1024, max_ratio=20.0, ratio_floor_bytes=4096,
                    max_manifest_bytes=16 * 1024)
NAMES = st.sampled_from([
    "a.gcode", "b.gcode", "dir/c.gcode", "../evil.gcode", "../../etc/passwd", "/abs.gcode", "a\\b.gcode",
    "C:evil.gcode", "a/../../b.gcode", "./a.gcode", "a//b.gcode", "a\x00b", "dir/", MANIFEST_NAME,
    "x" * 300, "é.gcode", "A.GCODE",
]) | st.text(min_size=1, max_size=30)


@st.composite
def manifests(draw: st.DrawFn, paths: list[str]) -> bytes:
    kind = draw(st.sampled_from(["valid", "mutated", "json", "bytes", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    if kind == "deep":
        return b'{"sets":' + b"[" * 5000 + b"]" * 5000 + b"}"
    sets = [{"path": p, "count": 1, "materials": [], "profiles": [], "estimatedPrintTime": 10.0}
            for p in (paths or ["a.gcode"])]
    manifest: dict[str, Any] = {"name": "job", "count": 1, "sets": sets, "version": "fz"}
    if kind == "mutated":
        target: dict[str, Any] = draw(st.sampled_from([manifest, sets[0]]))
        target[draw(st.sampled_from(sorted(target) + ["metadata", "x"]))] = draw(hostile_values)
    return json.dumps(manifest).encode()


@st.composite
def archives(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=2000))
    buf = io.BytesIO()
    entries = draw(st.lists(st.tuples(NAMES, st.sampled_from(["gcode", "zeros", "random", "empty"]),
                                      st.sampled_from(["file", "dir", "symlink", "fifo"]),
                                      st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])),
                            max_size=6))
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as zf:
        warnings.simplefilter("ignore")  # duplicate names are one of the hostile cases wanted here
        for name, content, kind, method in entries:
            data = {"gcode": b"G28\nG1 X1 Y1\n" * 20, "zeros": b"\0" * draw(st.sampled_from([10, 200_000])),
                    "random": draw(st.binary(max_size=500)), "empty": b""}[content]
            info = zipfile.ZipInfo(name)
            info.compress_type = method
            mode = {"file": stat.S_IFREG, "dir": stat.S_IFDIR, "symlink": stat.S_IFLNK, "fifo": stat.S_IFIFO}[kind]
            info.external_attr = (mode | 0o644) << 16
            zf.writestr(info, data)
        if draw(st.integers(0, 5)):
            zf.writestr(MANIFEST_NAME, draw(manifests([e[0] for e in entries])))
    raw = buf.getvalue()
    how = draw(st.sampled_from(["as is", "as is", "truncate", "flip"]))
    if how == "truncate" and raw:
        raw = raw[:draw(st.integers(0, len(raw) - 1))]
    elif how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    return raw


@FUZZ
@given(archive=archives())
def test_read_gjob_accepts_only_safe_bounded_archives(archive: bytes) -> None:
    ran("gjob read")
    try:
        manifest, files = read_gjob(archive, limits=LIMITS)
    except ArchiveError:
        return
    total = 0
    for path, entry in files.items():
        assert check_archive_path(path) == path and path != MANIFEST_NAME
        try:
            data = entry.read()
        except ArchiveError:
            continue
        assert len(data) <= LIMITS.max_entry_bytes
        total += len(data)
    assert total <= LIMITS.max_total_bytes
    assert {s.path for s in manifest.sets} == set(files)


@FUZZ
@given(archive=archives())
def test_import_gjob_stores_by_hash_or_refuses(archive: bytes) -> None:
    ran("gjob import")
    with tempfile.TemporaryDirectory() as d:
        store = FileStore(Path(d) / "store")
        try:
            imported = asyncio.run(import_gjob(archive, store, limits=LIMITS))
        except ArchiveError:
            imported = None
        stored = set(store.shas())
        if imported is not None:
            assert set(imported.shas.values()) <= stored
        # Only hashes in the store, nothing under a name the archive chose, nothing left in tmp/.
        names = {p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file()}
        assert names == {f"{sha[:2]}/{sha}" for sha in stored}, names
