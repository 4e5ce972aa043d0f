"""Getting a file from the nodes that hold it.

:func:`fetch` tries each holder in turn. Bytes go to ``partial/<sha>.part``; an interrupted transfer
resumes from there with ``Range: bytes=<offset>-`` (from the same holder while it makes progress, else
from the next), and the whole file must hash to its sha256 before it enters the store. A mismatch
deletes the part and moves on: a holder serving corrupt bytes never gets them used. With a farm key the
requests carry the ``node`` role's file token (``token``), and redirects are not followed, so the token goes
only to the holders named. aiohttp errors are converted to :class:`shared.errors.FileStoreError` here.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

from node.files.http import bearer_header
from node.files.store import FileStore, MiB, PartialDownload, check_sha
from node.files.url_guard import DEFAULT_LIMITS, UrlLimits, UrlPolicy, ip_of
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
            # No redirects: a holder's answer is the file, and our node token must go nowhere else.
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
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


@dataclass(frozen=True)
class UrlDownload:
    """A file downloaded for a URL job: its sha256, whether the store did not hold it before (only then may
    a caller that refuses it delete it), and the URL it finally came from (after redirects)."""

    sha: str
    fresh: bool
    url: str


class _Refused(OSError):
    """A connection the URL policy refuses (raised in the socket factory, so aiohttp never connects)."""


class _Gate:
    """The socket factory of one URL download: every address aiohttp is about to connect to is checked
    against the policy for the host of the current hop. Refusals are kept to tell the caller why."""

    def __init__(self, policy: UrlPolicy) -> None:
        self.policy = policy
        self.host = ""
        self.refused: list[str] = []

    def socket(self, addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _, address = addr_info
        ip = ip_of(str(address[0]))
        why = "not an IP address" if ip is None else self.policy.refusal(ip, self.host)
        if why is not None:
            self.refused.append(why)
            raise _Refused(why)
        return socket.socket(family=family, type=type_, proto=proto)


async def download_url(
    url: str,
    store: FileStore,
    expected_sha: str | None = None,
    *,
    policy: UrlPolicy | None = None,
    limits: UrlLimits = DEFAULT_LIMITS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> UrlDownload:
    """Download ``url`` into ``store`` under ``policy`` (default: nothing but public addresses) and ``limits``.

    Raises FileStoreError when a rule refuses it (an address, a redirect, the size, the total time, the rate
    floor, the hash); what was received is then deleted, never stored. No credentials are sent.
    """
    shown = url[:200]
    if not url.startswith(("http://", "https://")):
        raise FileStoreError(f"only http(s) URLs can be fetched: {shown!r}")
    try:
        URL(url)
    except ValueError as exc:
        raise FileStoreError(f"not a valid URL: {shown!r}") from exc
    if expected_sha is not None:
        check_sha(expected_sha)
        if store.has(expected_sha):
            return UrlDownload(expected_sha, False, url)
    policy = UrlPolicy() if policy is None else policy
    policy = policy.with_own(await _addresses(policy.own_names()))
    gate = _Gate(policy)
    # A connector of our own, so that every connection of this download passes the gate; no proxies from the
    # environment (trust_env is off), no cookies kept, no pooled connections shared with anything else.
    connector = aiohttp.TCPConnector(socket_factory=gate.socket, use_dns_cache=False, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=None)
    session = aiohttp.ClientSession(connector=connector, timeout=timeout, read_bufsize=READ_CHUNK,
                                    auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar())
    deadline = asyncio.timeout(limits.total_s)
    try:
        async with deadline:
            return await _download(session, gate, url, store, expected_sha, limits, max_bytes)
    except TimeoutError as exc:
        if deadline.expired():
            raise FileStoreError(f"{shown}: not downloaded within {limits.total_s:g} s") from exc
        raise FileStoreError(f"cannot download {shown}: {exc!r}") from exc
    except aiohttp.ClientError as exc:
        if isinstance(exc, aiohttp.ClientConnectorError) and gate.refused:  # no address it may connect to
            raise FileStoreError(f"{shown}: refused: {gate.refused[-1]}") from exc
        raise FileStoreError(f"cannot download {shown}: {exc!r}") from exc
    finally:
        await session.close()


async def _addresses(names: set[str]) -> set[str]:
    """What the farm's own host names resolve to (names that do not resolve are skipped)."""
    loop = asyncio.get_running_loop()
    out: set[str] = set()
    for name in names:
        try:
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            continue
        out |= {str(info[4][0]) for info in infos}
    return out


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def _download(session: aiohttp.ClientSession, gate: _Gate, url: str, store: FileStore,
                    expected_sha: str | None, limits: UrlLimits, max_bytes: int) -> UrlDownload:
    current = URL(url)
    for _ in range(limits.max_redirects + 1):
        shown = str(current)[:200]
        if current.scheme not in ("http", "https"):
            raise FileStoreError(f"{shown}: only http(s) URLs can be fetched (a redirect led here)")
        why = gate.policy.check_host(current.host or "")
        if why is not None:
            raise FileStoreError(f"{shown}: refused: {why}")
        gate.host, gate.refused = current.host or "", []
        async with session.get(current, allow_redirects=False) as resp:
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                if not location:
                    raise FileStoreError(f"GET {shown} answered HTTP {resp.status} without a Location")
                try:
                    current = current.join(URL(location))
                except ValueError as exc:
                    raise FileStoreError(f"GET {shown} redirected to a malformed URL") from exc
                continue
            if resp.status != 200:
                raise FileStoreError(f"GET {shown} answered HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise FileStoreError(f"{shown} is {resp.content_length} bytes, more than {max_bytes}")
            return await _store_body(resp, store, expected_sha, limits, max_bytes, str(current))
    raise FileStoreError(f"{url[:200]}: more than {limits.max_redirects} redirects")


async def _store_body(resp: aiohttp.ClientResponse, store: FileStore, expected_sha: str | None,
                      limits: UrlLimits, max_bytes: int, url: str) -> UrlDownload:
    """Stream the body into the store, enforcing the rate floor: in every window of ``rate_window_s`` at
    least ``min_rate`` bytes per second must arrive (a server that trickles or stalls is dropped)."""
    loop = asyncio.get_running_loop()
    hasher = hashlib.sha256()
    held_before = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal held_before
        window = limits.rate_window_s
        floor = limits.min_rate * window
        window_end = loop.time() + window
        got = 0
        while True:
            chunk: bytes | None
            try:
                async with asyncio.timeout_at(window_end):
                    chunk = await resp.content.read(READ_CHUNK)
            except TimeoutError:
                chunk = None
            if chunk == b"":
                # The end: did the store hold these bytes already? (Only a fresh file may be deleted later.)
                held_before = store.has(hasher.hexdigest())
                return
            if chunk:
                got += len(chunk)
                hasher.update(chunk)
                yield chunk
            if loop.time() >= window_end:
                if got < floor:
                    raise FileStoreError(f"{url[:200]}: fewer than {limits.min_rate:g} bytes per second over "
                                         f"{window:g} s ({got} bytes)")
                window_end, got = loop.time() + window, 0

    sha = await store.put_stream(body(), expected_sha=expected_sha, max_bytes=max_bytes)
    return UrlDownload(sha, not held_before, url)
