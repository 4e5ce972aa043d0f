"""Getting a file from the nodes that hold it.

:func:`fetch` tries each holder in turn. Bytes go to ``partial/<sha>.part``; an interrupted transfer
resumes from there with ``Range: bytes=<offset>-`` (from the same holder while it makes progress, else
from the next), and the whole file must hash to its sha256 before it enters the store. A mismatch
deletes the part and moves on: a holder serving corrupt bytes never gets them used. aiohttp errors are
converted to :class:`shared.errors.FileStoreError` here.
"""

from __future__ import annotations

import enum
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp

from node.files.http import bearer_header
from node.files.store import FileStore, MiB, PartialDownload, check_sha
from shared.errors import FileStoreError

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int | None], None]  # (bytes held, total size if known)
DEFAULT_MAX_BYTES = 2048 * MiB
READ_CHUNK = 4 * MiB
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def client_session(*, connect_timeout: float = 10.0, read_timeout: float = 30.0) -> aiohttp.ClientSession:
    """A session tuned for bulk transfers: large read buffer, no total timeout, a stall timeout."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
    return aiohttp.ClientSession(timeout=timeout, read_bufsize=READ_CHUNK, auto_decompress=False)


class _Interrupted(Exception):
    """The transfer stopped partway; the part is kept."""


class _HolderFailed(Exception):
    """This holder cannot serve the file; try the next. ``faulty``: it misbehaved, not merely lacked it."""

    def __init__(self, message: str, *, faulty: bool = False) -> None:
        super().__init__(message)
        self.faulty = faulty


class _Outcome(enum.Enum):
    STORED = "stored"
    MISMATCH_FRESH = "mismatch"  # every byte of the part came from this request
    MISMATCH_MIXED = "mismatch-mixed"  # the part resumed from bytes fetched earlier


async def fetch(
    sha: str,
    holders: Sequence[str],
    store: FileStore,
    *,
    token: str | None = None,
    progress_cb: ProgressCallback | None = None,
    session: aiohttp.ClientSession | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    attempts_per_holder: int = 3,
) -> Path:
    """Make sure ``store`` holds ``sha``, fetching it from ``holders`` (base URLs) if needed.

    Returns the stored path; raises FileStoreError when no holder can serve bytes with that hash.
    """
    check_sha(sha)
    if store.has(sha):
        return store.path(sha)
    async with store.lock(sha):
        if store.has(sha):
            return store.path(sha)
        own = session is None
        sess = client_session() if session is None else session
        failures: list[str] = []
        try:
            for base in holders:
                url = f"{base.rstrip('/')}/files/{sha}"
                clean_retry = True
                for attempt in range(1, attempts_per_holder + 1):
                    try:
                        outcome = await _attempt(sess, url, sha, store, token, progress_cb, max_bytes)
                        if outcome is _Outcome.STORED:
                            return store.path(sha)
                        # Hash mismatch (the part is gone). If the part mixed bytes fetched earlier
                        # with this holder's, give this holder one clean try before blaming it.
                        if outcome is _Outcome.MISMATCH_FRESH or not clean_retry:
                            raise _HolderFailed("served bytes that do not match the hash", faulty=True)
                        clean_retry = False
                        log.info(
                            "resumed part of %s did not verify; fetching it whole from %s", sha[:12], base
                        )
                    except _Interrupted as exc:
                        log.info("fetch of %s from %s interrupted (%s)", sha[:12], base, exc)
                        if attempt == attempts_per_holder:
                            failures.append(f"{base}: {exc}")
                    except _HolderFailed as exc:
                        level = logging.WARNING if exc.faulty else logging.INFO
                        log.log(level, "holder %s cannot serve %s: %s", base, sha[:12], exc)
                        failures.append(f"{base}: {exc}")
                        break
        finally:
            if own:
                await sess.close()
    detail = "; ".join(failures) or "no holders given"
    raise FileStoreError(f"no holder could serve {sha}: {detail}")


async def _attempt(
    session: aiohttp.ClientSession,
    url: str,
    sha: str,
    store: FileStore,
    token: str | None,
    progress_cb: ProgressCallback | None,
    max_bytes: int,
) -> _Outcome:
    """One request, resuming the part if there is one. Raises _Interrupted or _HolderFailed."""
    async with store.open_part(sha) as part:
        offset = part.offset
        headers = bearer_header(token)
        if offset:
            headers["Range"] = f"bytes={offset}-"
        received_now = 0
        try:
            async with session.get(url, headers=headers) as resp:
                total = _check_response(resp, offset)
                if resp.status == 416:
                    # The part already holds at least the whole file: let the hash decide.
                    return await _finish(part, mixed=True)
                if resp.status == 200 and offset:
                    await part.restart()  # the holder ignored our Range: start over
                    offset = 0
                if total is not None and total > max_bytes:
                    raise _HolderFailed(f"file is {total} bytes, more than {max_bytes}")
                if progress_cb is not None:
                    progress_cb(part.size, total)
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    await part.write(chunk)
                    received_now += len(chunk)
                    if part.size > max_bytes:
                        await part.discard()
                        raise _HolderFailed(f"sent more than {max_bytes} bytes", faulty=True)
                    if progress_cb is not None:
                        progress_cb(part.size, total)
                if total is not None and part.size != total:
                    raise _Interrupted(f"got {part.size} of {total} bytes")
        except (TimeoutError, aiohttp.ClientError) as exc:
            if received_now == 0:
                raise _HolderFailed(f"request failed: {exc!r}") from exc
            raise _Interrupted(f"{exc!r} after {part.size} bytes") from exc
        return await _finish(part, mixed=offset > 0)


async def _finish(part: PartialDownload, *, mixed: bool) -> _Outcome:
    if await part.finish():
        return _Outcome.STORED
    return _Outcome.MISMATCH_MIXED if mixed else _Outcome.MISMATCH_FRESH


def _check_response(resp: aiohttp.ClientResponse, offset: int) -> int | None:
    """Return the full size of the file, or raise _HolderFailed/_Interrupted for unusable answers."""
    if resp.status == 200:
        return resp.content_length
    if resp.status == 206:
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if m is None or int(m.group(1)) != offset:
            bad = resp.headers.get("Content-Range")
            raise _HolderFailed(f"bad Content-Range {bad!r} for offset {offset}", faulty=True)
        return None if m.group(3) == "*" else int(m.group(3))
    if resp.status == 416 and offset:
        return None
    if resp.status == 404:
        raise _HolderFailed("does not hold it (404)")
    if resp.status in (401, 403):
        raise _HolderFailed(f"refused our token ({resp.status})")
    raise _HolderFailed(f"HTTP {resp.status}")


async def fetch_url(
    url: str,
    store: FileStore,
    expected_sha: str | None = None,
    *,
    token: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    session: aiohttp.ClientSession | None = None,
) -> str:
    """Download ``url`` into ``store`` (for adding a job from a URL) and return its sha256."""
    if not url.startswith(("http://", "https://")):
        raise FileStoreError(f"only http(s) URLs can be fetched: {url[:200]!r}")
    if expected_sha is not None:
        check_sha(expected_sha)
        if store.has(expected_sha):
            return expected_sha
    own = session is None
    sess = client_session() if session is None else session
    try:
        async with sess.get(url, headers=bearer_header(token)) as resp:
            if resp.status != 200:
                raise FileStoreError(f"GET {url} answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise FileStoreError(f"{url} is {resp.content_length} bytes, more than {max_bytes}")

            async def body() -> AsyncIterator[bytes]:
                async for chunk in resp.content.iter_chunked(READ_CHUNK):
                    yield chunk

            return await store.put_stream(body(), expected_sha=expected_sha, max_bytes=max_bytes)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise FileStoreError(f"cannot download {url}: {exc!r}") from exc
    finally:
        if own:
            await sess.close()
