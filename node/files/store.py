"""The content-addressed G-code store of one node.

Layout under ``root``::

    <aa>/<sha256>        a complete file, named by the sha256 of its bytes (``aa`` = first two hex digits)
    tmp/<random>.tmp     an upload being written; renamed into place once hashed and fsynced
    partial/<sha>.part   a download in progress, kept across interruptions so it can resume

A file only ever appears under its final name complete, fsynced and verified (atomic rename, then the
directory is fsynced). Hashing and disk writes run in worker threads, one batch in flight while the next
one arrives, so the event loop never blocks on the disk. Every ``OSError`` becomes
:class:`shared.errors.FileStoreError` here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import time
import uuid
import weakref
from collections.abc import AsyncIterable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from node.files.collect import StoreEntry, unreferenced
from shared.errors import FileStoreError

log = logging.getLogger(__name__)

MiB = 1 << 20
BATCH = 1 * MiB  # bytes handed to the worker threads at a time (measured: 1 MiB beats 4 and 16)
DEFAULT_GRACE_S = 24 * 3600.0  # FilesSettings.collect_grace_s
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

ByteSource = bytes | AsyncIterable[bytes] | Iterable[bytes]


def check_sha(sha: str) -> str:
    """Return ``sha`` if it is 64 lowercase hex digits, else raise FileStoreError."""
    if not isinstance(sha, str) or not _SHA_RE.match(sha):
        raise FileStoreError(f"not a sha256 hex digest: {str(sha)[:80]!r}")
    return sha


def _hash_mismatch(message: str) -> FileStoreError:
    err = FileStoreError(message)
    err.hash_mismatch = True  # type: ignore[attr-defined]
    return err


def is_hash_mismatch(exc: BaseException) -> bool:
    """True for the FileStoreError raised when bytes do not hash to the sha256 they were meant to have."""
    return bool(getattr(exc, "hash_mismatch", False))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingFile:
    """Appends to an open file and hashes what it writes, in worker threads, one batch in flight."""

    def __init__(self, path: Path, mode: str, hasher: Any, size: int = 0) -> None:
        self.path = path
        self._f = open(path, mode, buffering=0)  # noqa: SIM115 - closed by close()
        self._hasher = hasher
        self.size = size
        self._buf: list[bytes] = []
        self._buffered = 0
        self._pending: asyncio.Future[Any] | None = None

    def _write_sync(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._f.write(view)
            if n is None or n <= 0:  # pragma: no cover - regular files always make progress
                raise OSError("short write")
            view = view[n:]

    async def write(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._buf.append(chunk)
        self._buffered += len(chunk)
        self.size += len(chunk)
        if self._buffered >= BATCH:
            await self._submit()

    async def _submit(self) -> None:
        data = self._buf[0] if len(self._buf) == 1 else b"".join(self._buf)
        self._buf = []
        self._buffered = 0
        await self._wait_pending()
        # Writing and hashing both release the GIL: run them side by side.
        loop = asyncio.get_running_loop()
        self._pending = asyncio.gather(
            loop.run_in_executor(None, self._write_sync, data),
            loop.run_in_executor(None, self._hasher.update, data),
        )

    async def _wait_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                await pending
            except OSError as exc:
                raise FileStoreError(f"cannot write {self.path.name}: {exc}") from exc

    async def flush(self, fsync: bool = True) -> None:
        if self._buf:
            await self._submit()
        await self._wait_pending()
        if fsync:
            try:
                await asyncio.to_thread(os.fsync, self._f.fileno())
            except OSError as exc:
                raise FileStoreError(f"cannot fsync {self.path.name}: {exc}") from exc

    async def truncate(self) -> None:
        """Empty the file and restart the hash."""
        await self._wait_pending()
        self._buf = []
        self._buffered = 0
        self._f.seek(0)
        self._f.truncate()
        self._hasher = hashlib.sha256()
        self.size = 0

    @property
    def closed(self) -> bool:
        return bool(self._f.closed)

    def hexdigest(self) -> str:
        return str(self._hasher.hexdigest())

    async def close(self) -> None:
        """Close once any write in flight has finished; if we are cancelled meanwhile, it still closes then."""
        pending, self._pending = self._pending, None
        if pending is None or pending.done():
            self._close_now(pending)
            return
        pending.add_done_callback(self._close_now)  # runs before wait() below returns
        await asyncio.wait([pending])

    def _close_now(self, pending: asyncio.Future[Any] | None) -> None:
        if pending is not None and not pending.cancelled():
            pending.exception()  # the caller is already failing or discarding the file
        self._f.close()


class PartialDownload:
    """A resumable download into ``partial/<sha>.part``; use through :meth:`FileStore.open_part`.

    ``offset`` is how many bytes the part already held when opened (already hashed). :meth:`finish`
    verifies the whole file against the expected sha256 and moves it into the store, or deletes the part.
    Leaving the context without finishing keeps the part for a later resume.
    """

    def __init__(self, store: FileStore, sha: str) -> None:
        self._store = store
        self.sha = sha
        self.path = store.part_path(sha)
        self.offset = 0
        self._file: _HashingFile | None = None

    async def __aenter__(self) -> Self:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            hasher, self.offset = await asyncio.to_thread(self._hash_existing)
            self._file = _HashingFile(self.path, "ab", hasher, self.offset)
        except OSError as exc:
            raise FileStoreError(f"cannot open partial download of {self.sha}: {exc}") from exc
        return self

    def _hash_existing(self) -> tuple[Any, int]:
        hasher = hashlib.sha256()
        size = 0
        try:
            with open(self.path, "rb", buffering=0) as f:
                while chunk := f.read(BATCH):
                    hasher.update(chunk)
                    size += len(chunk)
        except FileNotFoundError:
            pass
        return hasher, size

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._file is not None and not self._file.closed:
            try:
                await self._file.flush(fsync=False)  # keep what arrived, for the resume
            finally:
                await self._file.close()

    @property
    def size(self) -> int:
        """Bytes held so far (``offset`` plus what was written since)."""
        return self._file.size if self._file is not None else self.offset

    async def write(self, chunk: bytes) -> None:
        assert self._file is not None, "use PartialDownload inside 'async with'"
        await self._file.write(chunk)

    async def restart(self) -> None:
        """Drop what the part holds and start again from byte 0 (a server that ignored our Range)."""
        assert self._file is not None
        await self._file.truncate()
        self.offset = 0

    async def finish(self) -> bool:
        """Verify and move into the store. False (and the part deleted) when the hash does not match."""
        assert self._file is not None
        await self._file.flush(fsync=True)
        if self._file.hexdigest() != self.sha:
            await self.discard()
            return False
        await self._file.close()
        self._store._install(self.path, self.sha)
        return True

    async def discard(self) -> None:
        if self._file is not None:
            await self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class FileStore:
    """Content-addressed files under ``root``; see the module docstring for the layout."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._tmp = self.root / "tmp"
        self._partial = self.root / "partial"
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._partial.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FileStoreError(f"cannot create file store at {self.root}: {exc}") from exc

    # ---- lookups ----

    def _final(self, sha: str) -> Path:
        check_sha(sha)
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return self._final(sha).is_file()

    def path(self, sha: str) -> Path:
        """Path of a stored file; FileStoreError when the store does not hold it."""
        p = self._final(sha)
        if not p.is_file():
            raise FileStoreError(f"file {sha} is not in the store")
        return p

    def size(self, sha: str) -> int:
        try:
            return self._final(sha).stat().st_size
        except OSError as exc:
            raise FileStoreError(f"file {sha} is not in the store") from exc

    def shas(self) -> Iterator[str]:
        """Every complete file in the store."""
        for sub in self.root.iterdir():
            if len(sub.name) == 2 and sub.is_dir():
                for f in sub.iterdir():
                    if _SHA_RE.match(f.name) and f.name[:2] == sub.name:
                        yield f.name

    def iter_chunks(self, sha: str, chunk_size: int = MiB) -> Iterator[bytes]:
        """Read a stored file in chunks (blocking: call from a worker thread for big files)."""
        try:
            with open(self.path(sha), "rb") as f:
                while chunk := f.read(chunk_size):
                    yield chunk
        except OSError as exc:
            raise FileStoreError(f"cannot read {sha}: {exc}") from exc

    def verify(self, sha: str) -> bool:
        """Re-hash a stored file (blocking); False if its bytes no longer match its name."""
        h = hashlib.sha256()
        for chunk in self.iter_chunks(sha, BATCH):
            h.update(chunk)
        return h.hexdigest() == sha

    def lock(self, sha: str) -> asyncio.Lock:
        """The in-process lock for one sha: held while it is being fetched, so two fetches never share a part."""
        check_sha(sha)
        lock = self._locks.get(sha)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[sha] = lock
        return lock

    # ---- writing ----

    async def put_stream(
        self, source: ByteSource, *, expected_sha: str | None = None, max_bytes: int | None = None
    ) -> str:
        """Store bytes from ``source`` and return their sha256.

        Raises FileStoreError if ``source`` yields more than ``max_bytes`` or its hash is not
        ``expected_sha``; nothing is stored then.
        """
        if expected_sha is not None:
            check_sha(expected_sha)
        tmp = self._tmp / f"{uuid.uuid4().hex}.tmp"
        try:
            out = _HashingFile(tmp, "xb", hashlib.sha256())
        except OSError as exc:
            raise FileStoreError(f"cannot create a temporary file in {self._tmp}: {exc}") from exc
        installed = False
        try:
            async for chunk in _aiter(source):
                if max_bytes is not None and out.size + len(chunk) > max_bytes:
                    raise FileStoreError(f"file is larger than {max_bytes} bytes")
                await out.write(chunk)
            await out.flush(fsync=True)
            sha = out.hexdigest()
            if expected_sha is not None and sha != expected_sha:
                raise _hash_mismatch(f"content hash {sha} does not match the expected {expected_sha}")
            await out.close()
            self._install(tmp, sha)
            installed = True
            return sha
        finally:
            await out.close()
            if not installed:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _install(self, src: Path, sha: str) -> None:
        """Atomically move a verified file into place (or drop it if the store already holds it)."""
        final = self._final(sha)
        try:
            if final.is_file():
                try:
                    os.utime(final)  # restart its grace period: it was just added again
                    src.unlink()
                    return
                except FileNotFoundError:
                    pass  # collected meanwhile: install ours
            final.parent.mkdir(exist_ok=True)
            os.replace(src, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise FileStoreError(f"cannot store {sha}: {exc}") from exc

    def part_path(self, sha: str) -> Path:
        return self._partial / f"{check_sha(sha)}.part"

    def part_size(self, sha: str) -> int:
        try:
            return self.part_path(sha).stat().st_size
        except FileNotFoundError:
            return 0

    def open_part(self, sha: str) -> PartialDownload:
        """``async with store.open_part(sha) as part``: resume (or start) a download of ``sha``."""
        check_sha(sha)
        return PartialDownload(self, sha)

    # ---- removal ----

    def remove(self, sha: str) -> bool:
        """Delete a stored file (and any partial download of it). True if a file was removed."""
        removed = False
        try:
            self._final(sha).unlink()
            removed = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise FileStoreError(f"cannot remove {sha}: {exc}") from exc
        with contextlib.suppress(FileNotFoundError):
            self.part_path(sha).unlink()
        return removed

    def entries(self) -> list[StoreEntry]:
        """Every complete file and partial download, with its age and size (blocking: a directory walk)."""
        out: list[StoreEntry] = []
        try:
            for sha in self.shas():
                with contextlib.suppress(FileNotFoundError):  # removed concurrently
                    st = self._final(sha).stat()
                    out.append(StoreEntry(sha, st.st_mtime, st.st_size))
            for p in self._partial.iterdir():
                sha = p.name.removesuffix(".part")
                if p.name.endswith(".part") and _SHA_RE.match(sha):
                    with contextlib.suppress(FileNotFoundError):
                        st = p.stat()
                        out.append(StoreEntry(sha, st.st_mtime, st.st_size, partial=True))
        except OSError as exc:
            raise FileStoreError(f"cannot list the file store at {self.root}: {exc}") from exc
        return out

    def usage(self) -> int:
        """Bytes the store holds: complete files and partial downloads (blocking). Uploads being written are
        not counted: the file server counts those itself."""
        return sum(e.size for e in self.entries())

    def gc(
        self, referenced: set[str], *, now: float | None = None, grace_s: float = DEFAULT_GRACE_S
    ) -> list[str]:
        """Remove files and partial downloads no job references (:func:`node.files.collect.unreferenced`),
        and temporary files left by interrupted uploads. Blocking.

        Anything modified less than ``grace_s`` ago is kept, so a file being added (uploaded, but its job
        not yet committed) is not collected; so is a file being fetched right now. Returns the shas removed.
        """
        now = time.time() if now is None else now
        entries = self.entries()
        removed: list[str] = []
        freed = 0
        for sha in unreferenced(entries, referenced, now, grace_s):
            lock = self._locks.get(sha)
            if lock is not None and lock.locked():  # being fetched: its part is in use
                continue
            self.remove(sha)
            removed.append(sha)
            freed += sum(e.size for e in entries if e.sha == sha)
        cutoff = now - grace_s
        try:
            for p in list(self._tmp.iterdir()):
                with contextlib.suppress(FileNotFoundError):
                    if p.stat().st_mtime <= cutoff:
                        p.unlink()
        except OSError as exc:
            raise FileStoreError(f"cannot clean {self._tmp}: {exc}") from exc
        if removed:
            log.info("collected %d file(s) no job references (%.1f MiB)", len(removed), freed / MiB)
        return removed


async def _aiter(source: ByteSource) -> AsyncIterable[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        if source:
            yield bytes(source)
    elif isinstance(source, AsyncIterable):
        async for chunk in source:
            yield chunk
    else:
        for chunk in source:
            yield chunk
