"""HTTP access to a node's file store.

    GET  /files/<sha256>    the file; single ``Range`` requests (RFC 9110 §14) for resuming; sendfile
    HEAD /files/<sha256>    its size, without the body
    POST /files[?sha256=…]  upload (streamed into the store); 201 ``{"sha256": …, "size": …}``

Missing files are 404, malformed hashes 400, oversized uploads 413, an upload whose bytes do not hash to
the given ``sha256`` 422 (and nothing is stored). When the token provider returns a token, every request
needs ``Authorization: Bearer <token>`` (401 otherwise); the provider is called per request, so the
token can be derived from the farm key and change without a restart.
"""

from __future__ import annotations

import base64
import enum
import hmac
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Self

from aiohttp import web

from node.files.store import FileStore, MiB, check_sha, is_hash_mismatch
from shared.errors import FileStoreError

log = logging.getLogger(__name__)

TokenProvider = Callable[[], str | None]
DEFAULT_MAX_UPLOAD = 2048 * MiB
_STORE_KEY = web.AppKey("file_store", FileStore)
_WARNED_MAX = 1000


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


def bearer_header(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


class FileServer:
    """Serves one :class:`FileStore` on ``host:port`` (port 0 picks a free one; see :attr:`port`)."""

    def __init__(
        self,
        store: FileStore,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        token: TokenProvider | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
        chunk_size: int = MiB,
    ) -> None:
        self.store = store
        self.host = host
        self._port = port
        self._token = token
        self.max_upload_bytes = max_upload_bytes
        self._chunk_size = chunk_size
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

    def _authorised(self, request: web.Request) -> bool:
        expected = self._token() if self._token is not None else None
        if not expected:
            return True
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())
        if not ok:
            self._peer_warning(request, "auth", "file request from %s without a valid token", request.remote)
        return ok

    def _unauthorised(self) -> web.Response:
        return _error(
            401, "a valid bearer token is required", **{"WWW-Authenticate": 'Bearer realm="netqueues"'}
        )

    async def _get(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return self._unauthorised()
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
            "Cache-Control": "public, max-age=31536000, immutable",
            "Content-Type": "application/octet-stream",
        }
        # FileResponse handles HEAD, Range/If-Range (206, 416) and uses sendfile where it can.
        return web.FileResponse(path, chunk_size=self._chunk_size, headers=headers)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return self._unauthorised()
        expected = request.query.get("sha256")
        if expected is not None and not _valid(expected):
            return _error(400, "sha256 must be 64 lowercase hex digits")
        length = request.content_length
        if length is not None and length > self.max_upload_bytes:
            return _error(413, f"file larger than {self.max_upload_bytes} bytes")
        too_big = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal too_big
            received = 0
            async for chunk in request.content.iter_chunked(self._chunk_size):
                received += len(chunk)
                if received > self.max_upload_bytes:
                    too_big = True
                    raise FileStoreError(f"file larger than {self.max_upload_bytes} bytes")
                yield chunk

        try:
            sha = await self.store.put_stream(body(), expected_sha=expected)
        except FileStoreError as exc:
            if too_big:
                return _error(413, str(exc))
            if is_hash_mismatch(exc):
                self._peer_warning(request, "hash", "upload from %s: %s", request.remote, exc)
                return _error(422, str(exc))
            log.error("upload failed: %s", exc)
            return _error(500, str(exc))
        return web.json_response({"sha256": sha, "size": self.store.size(sha)}, status=201)


def _valid(sha: str) -> bool:
    try:
        check_sha(sha)
    except FileStoreError:
        return False
    return True
