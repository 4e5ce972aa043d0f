"""``.gjob`` import and export against the file store.

Import checks the archive (:func:`shared.gjob.read_gjob`) and streams each G-code entry straight into
the content-addressed store: nothing from an archive is ever written under a name the archive chose.
Export reads the files back from the store and packs Continuous Print's format.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from node.files.store import FileStore, MiB
from shared.errors import ArchiveError
from shared.gjob import DEFAULT_LIMITS, GjobFile, GjobLimits, Manifest, read_gjob, write_gjob


@dataclass(frozen=True, slots=True)
class ImportedGjob:
    manifest: Manifest
    shas: dict[str, str]  # set path -> sha256 of its file in the store


async def import_gjob(
    source: bytes | Path | str, store: FileStore, *, limits: GjobLimits = DEFAULT_LIMITS
) -> ImportedGjob:
    """Check ``source`` and put its G-code files into ``store``; ArchiveError if it is refused.

    Every entry is inflated exactly once, in a worker thread, straight into the store (which hashes it).
    """
    manifest, files = await asyncio.to_thread(read_gjob, source, limits=limits, verify=False)
    shas: dict[str, str] = {}
    for path, entry in files.items():
        shas[path] = await store.put_stream(_inflate(entry), max_bytes=limits.max_entry_bytes)
    return ImportedGjob(manifest, shas)


async def _inflate(entry: GjobFile) -> AsyncIterator[bytes]:
    """Inflate in a worker thread, one chunk at a time, so the event loop never decompresses."""
    chunks = entry.iter_chunks(4 * MiB)
    sentinel = b""
    try:
        while chunk := await asyncio.to_thread(next, chunks, sentinel):
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
