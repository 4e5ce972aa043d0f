"""Uploads to a node's file server over 127.0.0.1 fuzzed (node/files/http.py): random bodies, headers, tokens,
paths and methods, and raw bytes on the socket. Every request gets an answer that is never a server error;
only an upload with a valid token is stored, and only under the hash of its bytes; nothing else is left."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.files.http import FileServer
from node.files.store import FileStore
from shared import security
from tests.fuzz.conftest import FUZZ, ran

pytestmark = pytest.mark.security

KEY = security.parse_key(security.new_farm_key())
OTHER = security.parse_key(security.new_farm_key())
MAX_UPLOAD = 64 * 1024
PRINTABLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
TOKENS = st.sampled_from([
    None, security.file_token(KEY, "operator"), security.file_token(KEY, "node"),
    security.file_token(KEY, "viewer"), security.file_token(KEY, "homeassistant"),
    security.file_token(OTHER, "operator"), "operator.", "operator", "", "x" * 500,
]) | PRINTABLE
AUTH_SCHEMES = st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Bearer  "])
VALID_UPLOADERS = {security.file_token(KEY, "operator"), security.file_token(KEY, "node")}


@contextmanager
def _serving(tmp: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, FileServer, aiohttp.ClientSession]]:
    loop = asyncio.new_event_loop()
    store = FileStore(tmp / "store")
    server = FileServer(store, host="127.0.0.1", port=0, key=KEY, max_upload_bytes=MAX_UPLOAD,
                        quota_bytes=4 * MAX_UPLOAD)
    loop.run_until_complete(server.start())

    async def session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(auto_decompress=False)

    sess = loop.run_until_complete(session())
    try:
        yield loop, server, sess
    finally:
        loop.run_until_complete(sess.close())
        loop.run_until_complete(server.stop())
        loop.close()


def _left_over(store: FileStore) -> list[str]:
    return [p.name for d in ("tmp", "partial") for p in (store.root / d).iterdir()]


def test_uploads_and_requests_with_hostile_bodies_and_headers(tmp_path: Path) -> None:
    with _serving(tmp_path) as (loop, server, sess):
        store = server.store

        @FUZZ
        @given(method=st.sampled_from(["POST", "POST", "POST", "GET", "HEAD", "PUT", "DELETE"]),
               path=st.sampled_from(["/files", "/files?sha256=", "/files?sha256=ab", "/files?token=x",
                                     "/files/../x", "/files/" + "ab" * 32, "/x", "/files?access_token=y"]),
               sha_query=st.booleans(), scheme=AUTH_SCHEMES, token=TOKENS,
               body=st.binary(max_size=2000) | st.sampled_from([b"G28\n" * (MAX_UPLOAD // 4 + 1), b""]),
               headers=st.dictionaries(st.sampled_from(["Content-Type", "Content-Encoding", "Range", "Expect",
                                                        "X-Forwarded-For", "If-Range", "Content-Range"]),
                                       PRINTABLE, max_size=3))
        def request(method: str, path: str, sha_query: bool, scheme: str, token: str | None, body: bytes,
                    headers: dict[str, str]) -> None:
            ran("file server requests")
            sha = hashlib.sha256(body).hexdigest()
            if sha_query and path == "/files":
                path = f"/files?sha256={sha}"
            if token is not None:
                headers = {**headers, "Authorization": scheme + token}
            before = set(store.shas())

            async def send() -> tuple[int, Any]:
                async with sess.request(method, server.base_url + path, data=body, headers=headers) as resp:
                    payload = await resp.read()
                    return resp.status, payload

            status, _ = loop.run_until_complete(send())
            assert status in (200, 201, 206) or 400 <= status < 500 or status == 507, status  # 507: the quota
            after = set(store.shas())
            uploader = token in VALID_UPLOADERS and scheme.strip().lower() == "bearer"
            if status == 201:
                assert method == "POST" and uploader and sha in after and len(body) <= MAX_UPLOAD
                assert store.path(sha).read_bytes() == body
            else:
                assert after == before
            if not uploader:
                assert after == before
            assert _left_over(store) == []

        request()


def test_raw_bytes_on_the_socket_never_stop_the_server(tmp_path: Path) -> None:
    with _serving(tmp_path) as (loop, server, sess):

        @FUZZ
        @given(raw=st.binary(max_size=600) | st.sampled_from([
            b"POST /files HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\nabc",
            b"POST /files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET /files/" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
            b"POST /files HTTP/1.1\r\n" + b"X: y\r\n" * 2000 + b"\r\n",
        ]))
        def garbage(raw: bytes) -> None:
            ran("file server raw bytes")

            async def send() -> bytes:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                try:
                    writer.write(raw)
                    await writer.drain()
                    writer.write_eof()
                    return await asyncio.wait_for(reader.read(4096), 10)
                except (ConnectionError, OSError):
                    return b""
                finally:
                    writer.close()
                    try:
                        await writer.wait_closed()
                    except (ConnectionError, OSError):
                        pass

            answer = loop.run_until_complete(send())
            assert not answer.startswith(b"HTTP/1.1 5"), answer[:200]
            assert _left_over(server.store) == []

        garbage()

        async def still_serving() -> int:
            headers = {"Authorization": "Bearer " + security.file_token(KEY, "operator")}
            async with sess.post(server.base_url + "/files", data=b"G28\n", headers=headers) as resp:
                return resp.status

        assert loop.run_until_complete(still_serving()) == 201
