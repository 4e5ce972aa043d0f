"""HTTP access to a node's file store.

    GET  /files/<sha256>    the file; single ``Range`` requests (RFC 9110 §14) for resuming; sendfile
    HEAD /files/<sha256>    its size, without the body
    POST /files[?sha256=…]  upload (streamed into the store); 201 ``{"sha256": …, "size": …}``
    GET  /files/<sha256>/policy   the node's G-code policy scan of the file (node/files/holder_check.py)

With a farm key, every request needs ``Authorization: Bearer <token>``, the token being
:func:`shared.security.file_token` of a role (:data:`ACCESS`): downloads for ``node``, ``operator`` and
``viewer``, uploads for ``node`` and ``operator``. No token or a wrong one is 401, a role that may not do it
403; a token in the URL's query is refused (400), since URLs end up in logs and proxies (RFC 6750 §2.3, §5.3).
Without a key (an open farm) anyone who reaches the server may download and upload.

Missing files are 404, malformed hashes 400, an upload larger than ``max_upload_bytes`` 413, one that would
take the store past ``quota_bytes`` 507, one whose bytes do not hash to the given ``sha256`` 422; in each case
nothing is stored.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final, Self

from aiohttp import web

from node.files.store import FileStore, MiB, check_sha, is_hash_mismatch
from shared import security
from shared.errors import FileStoreError
from shared.gcode_policy import Scan, summary
from shared.security import Role

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD = 256 * MiB  # FilesSettings.max_upload_mb
# Which roles' tokens may do what; a role not named (homeassistant) may do nothing here.
ACCESS: Final[dict[str, frozenset[Role]]] = {
    "GET": frozenset({Role.NODE, Role.OPERATOR, Role.VIEWER}),
    "HEAD": frozenset({Role.NODE, Role.OPERATOR, Role.VIEWER}),
    "POST": frozenset({Role.NODE, Role.OPERATOR}),
}
_QUERY_TOKENS: Final = ("access_token", "token")  # RFC 6750 §2.3's name, and the obvious one
_STORE_KEY = web.AppKey("file_store", FileStore)
_WARNED_MAX = 1000


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


def bearer_header(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def may(role: Role, method: str) -> bool:
    """Whether a token of ``role`` may make a request with ``method``."""
    return role in ACCESS.get(method, frozenset())


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class FileServer:
    """Serves one :class:`FileStore` on ``host:port`` (port 0 picks a free one; see :attr:`port`).

    ``key``: the farm key's bytes, from which the role tokens are derived; None serves an open farm.
    ``quota_bytes``: the most the store may hold after an upload (None: no quota)."""

    def __init__(
        self,
        store: FileStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        key: bytes | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
        quota_bytes: int | None = None,
        chunk_size: int = MiB,
        check: Callable[[str], Awaitable[Scan]] | None = None,
    ) -> None:
        self.store = store
        # The G-code policy (node/files/analysis.py Verdicts.scan): an upload that breaks it is deleted and
        # refused (422); GET /files/<sha>/policy answers the scan to an arbiter checking a job/add.
        self._check = check
        self.host = host
        self._port = port
        self._key = key
        self.max_upload_bytes = max_upload_bytes
        self.quota_bytes = quota_bytes
        self._chunk_size = chunk_size
        # Quota accounting between uploads that overlap: bytes in flight (not yet in the store) and bytes
        # stored by uploads since (a counter that only grows), beside the store's usage when one began.
        self._receiving = 0
        self._stored = 0
        self._runner: web.AppRunner | None = None
        self._state = _State.NEW
        self._warned: set[tuple[str, str]] = set()

    @property
    def port(self) -> int:
        if self._state is not _State.RUNNING:
            raise FileStoreError("file server is not running")
        return self._port

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def make_app(self) -> web.Application:
        """The aiohttp application, for mounting into a node's own web server."""
        app = web.Application()
        app[_STORE_KEY] = self.store
        app.router.add_get("/files/{sha}", self._get)  # also answers HEAD
        app.router.add_post("/files", self._post)
        app.router.add_get("/files/{sha}/policy", self._policy)
        return app

    async def start(self) -> int:
        """Bind and serve; return the port actually bound."""
        if self._state is not _State.NEW:
            raise FileStoreError(f"file server cannot start: it is {self._state.value}")
        runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._port, reuse_address=False)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise FileStoreError(f"cannot listen on {self.host}:{self._port}: {exc}") from exc
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._state = _State.RUNNING
        log.info("serving files from %s on %s", self.store.root, self.base_url)
        if self._key is None:
            log.warning("file server %s is open (no farm key): anyone who reaches it can download and upload "
                        "files", self.base_url)
        return self._port

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        if self._state is not _State.RUNNING:
            self._state = _State.STOPPED
            return
        self._state = _State.STOPPED
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- handlers ----

    def _peer_warning(self, request: web.Request, kind: str, msg: str, *args: Any) -> None:
        """A peer's fault: warn once per peer and kind, then only at debug level."""
        key = (request.remote or "?", kind)
        if key in self._warned or len(self._warned) >= _WARNED_MAX:
            log.debug(msg, *args)
        else:
            self._warned.add(key)
            log.warning(msg + " (further such messages from this peer at debug level)", *args)

    def _refusal(self, request: web.Request) -> web.Response | None:
        """None if the request may go ahead, else the answer that refuses it."""
        if any(name in request.query for name in _QUERY_TOKENS):
            self._peer_warning(request, "query", "file request from %s with a token in its URL", request.remote)
            return _error(400, "a token in the URL is not accepted (URLs end up in logs): send it as "
                               "'Authorization: Bearer <token>'")
        if self._key is None:
            return None
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        role = security.token_role(self._key, token.strip()) if scheme.lower() == "bearer" else None
        if role is None:
            self._peer_warning(request, "auth", "file request from %s without a valid token", request.remote)
            return _error(401, "a valid bearer token is required ('netq credentials operator' prints one)",
                          **{"WWW-Authenticate": 'Bearer realm="netqueues"'})
        if not may(role, request.method):
            self._peer_warning(request, "role", "file request from %s: %s may not %s", request.remote,
                               role.value, request.method)
            return _error(403, f"the {role.value} token may not {request.method} files")
        return None

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        sha = request.match_info["sha"]
        if not _valid(sha):
            return _error(400, "not a sha256 hex digest")
        try:
            path = self.store.path(sha)
        except FileStoreError:
            return _error(404, f"no file {sha}")
        digest = base64.b64encode(bytes.fromhex(sha)).decode()
        headers = {
            "Repr-Digest": f"sha-256=:{digest}:",  # RFC 9530: the hash of the whole file, for any range
            # Content-addressed, so never stale; but with a token only the asker may keep it: a shared cache
            # must not serve it to others (RFC 9111 §3.5: "public" would allow exactly that).
            "Cache-Control": f"{'public' if self._key is None else 'private'}, max-age=31536000, immutable",
            "Content-Type": "application/octet-stream",
        }
        # FileResponse handles HEAD, Range/If-Range (206, 416) and uses sendfile where it can.
        return web.FileResponse(path, chunk_size=self._chunk_size, headers=headers)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        expected = request.query.get("sha256")
        if expected is not None and not _valid(expected):
            return _error(400, "sha256 must be 64 lowercase hex digits")
        room = await self._room(expected)
        length = request.content_length
        if length is not None and (answer := self._too_much(length, room(0))) is not None:
            return answer
        refusal: web.Response | None = None
        received = 0

        async def body() -> AsyncIterator[bytes]:
            nonlocal refusal, received
            async for chunk in request.content.iter_chunked(self._chunk_size):
                received += len(chunk)
                self._receiving += len(chunk)
                if (refusal := self._too_much(received, room(received))) is not None:
                    raise FileStoreError(f"refused with HTTP {refusal.status} after {received} bytes")
                yield chunk

        try:
            sha = await self.store.put_stream(body(), expected_sha=expected)
            self._stored += received
        except FileStoreError as exc:
            if refusal is not None:
                self._peer_warning(request, "limit", "upload from %s refused: %s", request.remote, exc)
                return refusal
            if is_hash_mismatch(exc):
                self._peer_warning(request, "hash", "upload from %s: %s", request.remote, exc)
                return _error(422, str(exc))
            log.error("upload failed: %s", exc)
            return _error(500, str(exc))
        finally:
            self._receiving -= received
        if self._check is not None and (answer := await self._policy_refusal(request, sha)) is not None:
            return answer
        return web.json_response({"sha256": sha, "size": self.store.size(sha)}, status=201)

    async def _policy_refusal(self, request: web.Request, sha: str) -> web.Response | None:
        """None if the stored upload passes the G-code policy; else it is deleted, and this refuses it (422)."""
        assert self._check is not None
        try:
            violations = (await self._check(sha)).violations()
        except FileStoreError as exc:
            log.error("upload %s could not be checked: %s", sha[:12], exc)
            violations = None
        if violations == []:
            return None
        self.store.remove(sha)  # never served: nothing that breaks the policy stays in a store
        if violations is None:
            return _error(500, f"the upload could not be checked against the G-code policy; try again ({sha})")
        self._peer_warning(request, "policy", "upload from %s breaks the G-code policy: %s", request.remote,
                           violations[0].message)
        return web.json_response({
            "error": f"the file breaks the G-code policy: {summary(violations)}",
            "violations": [{**v.model_dump(mode="json"), "message": v.message} for v in violations[:20]],
        }, status=422)

    async def _policy(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._refusal(request)) is not None:
            return refused
        sha = request.match_info["sha"]
        if not _valid(sha):
            return _error(400, "not a sha256 hex digest")
        if self._check is None:
            return _error(404, "this file server does not check G-code")
        try:
            scan = await self._check(sha)
        except FileStoreError:
            return _error(404, f"no file {sha}")
        return web.json_response(scan.model_dump(mode="json"))

    async def _room(self, expected: str | None) -> Callable[[int], int | None]:
        """For an upload that begins now: given the bytes it has received, how many it may hold in all
        before the store passes its quota (None: no bound)."""
        if self.quota_bytes is None or (expected is not None and self.store.has(expected)):
            return lambda _mine: None  # no quota, or bytes the store already holds (dropped once verified)
        quota, stored_before = self.quota_bytes, self._stored
        used = await asyncio.to_thread(self.store.usage)
        # Uploads that finish meanwhile are counted by ``_stored`` (and may be in ``used`` too: erring on
        # the side of refusing), those still streaming by ``_receiving``.
        return lambda mine: quota - used - (self._stored - stored_before) - (self._receiving - mine)

    def _too_much(self, size: int, room: int | None) -> web.Response | None:
        """The refusal of an upload that has reached ``size`` bytes, or None while it is within bounds."""
        if size > self.max_upload_bytes:
            return _error(413, f"file larger than the upload limit of {_mib(self.max_upload_bytes)} "
                               "(files.max_upload_mb)")
        if room is not None and size > room:
            assert self.quota_bytes is not None
            return _error(507, f"the node's file store is full: this upload would take it past its quota of "
                               f"{_mib(self.quota_bytes)} (files.quota_mb); files no job references are "
                               "collected after files.collect_grace_s, or remove finished jobs")
        return None


def _mib(n: int) -> str:
    return f"{n / MiB:g} MiB"


def _valid(sha: str) -> bool:
    try:
        check_sha(sha)
    except FileStoreError:
        return False
    return True
