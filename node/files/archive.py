"""``.gjob`` import and export against the file store.

Import checks the archive (:func:`shared.gjob.read_gjob`) and streams each G-code entry straight into
the content-addressed store: nothing from an archive is ever written under a name the archive chose. With a
G-code policy, each entry is checked as it streams; one that breaks it is deleted again and the import refused.
Export reads the files back from the store and packs Continuous Print's format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from node.files.store import FileStore, MiB
from shared.errors import ArchiveError
from shared.gcode_policy import GcodePolicy, Scanner, summary
from shared.gjob import DEFAULT_LIMITS, GjobFile, GjobLimits, Manifest, read_gjob, write_gjob


@dataclass(frozen=True, slots=True)
class ImportedGjob:
    manifest: Manifest
    shas: dict[str, str]  # set path -> sha256 of its file in the store


async def import_gjob(
    source: bytes | Path | str, store: FileStore, *, limits: GjobLimits = DEFAULT_LIMITS,
    policy: GcodePolicy | None = None,
) -> ImportedGjob:
    """Check ``source`` and put its G-code files into ``store``; ArchiveError if it is refused.

    Every entry is inflated exactly once, in a worker thread, straight into the store (which hashes it), and
    checked against ``policy`` (the farm's: ``GcodeSettings.policy()``) on the way: an entry that breaks it is
    removed from the store again, and the error names the entry, the line and the rule.
    """
    manifest, files = await asyncio.to_thread(read_gjob, source, limits=limits, verify=False)
    shas: dict[str, str] = {}
    for path, entry in files.items():
        scanner = None if policy is None else policy.scanner()
        sha = await store.put_stream(_inflate(entry, scanner), max_bytes=limits.max_entry_bytes)
        if scanner is not None and (violations := scanner.result().violations()):
            store.remove(sha)  # never served
            raise ArchiveError(f"{path}: breaks the G-code policy: {summary(violations)}")
        shas[path] = sha
    return ImportedGjob(manifest, shas)


async def _inflate(entry: GjobFile, scanner: Scanner | None = None) -> AsyncIterator[bytes]:
    """Inflate in a worker thread, one chunk at a time, so the event loop never decompresses (nor scans)."""
    chunks = entry.iter_chunks(4 * MiB)

    def step() -> bytes:
        chunk = next(chunks, b"")
        if scanner is not None and chunk:
            scanner.feed_bytes(chunk)
        return chunk

    try:
        while chunk := await asyncio.to_thread(step):
            yield chunk
    finally:
        chunks.close()


async def export_gjob(manifest: Manifest, store: FileStore, shas: Mapping[str, str]) -> bytes:
    """Pack ``manifest`` with the stored files named by ``shas`` (set path -> sha256) into ``.gjob`` bytes."""
    missing = [p for p in {s.path for s in manifest.sets} if p not in shas]
    if missing:
        raise ArchiveError(f"no file for set path(s): {', '.join(sorted(missing))}")
    for sha in shas.values():
        store.path(sha)  # FileStoreError now rather than halfway through packing

    def pack() -> bytes:
        files: dict[str, Iterator[bytes]] = {p: store.iter_chunks(sha) for p, sha in shas.items()}
        return write_gjob(manifest, files)

    return await asyncio.to_thread(pack)
