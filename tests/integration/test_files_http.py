"""File store, its HTTP server and fetching between nodes, over real sockets on 127.0.0.1 (port 0)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import io
import os
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from node.app.agent import NodeAgent
from node.app.client import FarmClient
from node.files.analysis import analyse
from node.files.fetch import download_url, fetch
from node.files.http import FileServer
from node.files.store import FileStore
from node.files.url_guard import UrlPolicy
from shared import security
from shared.errors import FileStoreError
from shared.security import Role
from shared.settings import Settings
from tests.conftest import AmqttServer
from tests.waiting import until

pytestmark = pytest.mark.integration

MiB = 1 << 20
DATA = os.urandom(3 * MiB + 12345)
SHA = hashlib.sha256(DATA).hexdigest()
MISSING = "0" * 64


@pytest.fixture
def stores(tmp_path: Path) -> tuple[FileStore, FileStore]:
    return FileStore(tmp_path / "a"), FileStore(tmp_path / "b")


@asynccontextmanager
async def serving(store: FileStore, **kwargs: object) -> AsyncIterator[FileServer]:
    server = FileServer(store, host="127.0.0.1", port=0, **kwargs)  # type: ignore[arg-type]
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def plant(store: FileStore, sha: str, content: bytes) -> None:
    """Put ``content`` under the name ``sha`` behind the store's back: a holder with a corrupt copy."""
    path = store.root / sha[:2] / sha
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)


@asynccontextmanager
async def raw_server(
    respond: Callable[[dict[str, str], asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A hand-written HTTP/1.1 server on 127.0.0.1:0; records each request's headers."""
    requests: list[dict[str, str]] = []
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {
                k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)
            }
            headers[":path"] = lines[0].split()[1]
            requests.append(headers)
            await respond(headers, writer)
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", requests
    finally:
        server.close()
        await server.wait_closed()
        if handlers:
            await asyncio.wait(handlers, timeout=5)


async def send_half_then_drop(headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
    """Claims the whole file, sends half, closes: a holder switched off mid-transfer."""
    writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode())
    writer.write(DATA[: len(DATA) // 2])
    await writer.drain()


async def drop_first_then_serve_ranges(headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
    """First request: half the file, then the connection drops. Later requests: honour the Range."""
    if "range" not in headers:
        await send_half_then_drop(headers, writer)
        return
    start = int(headers["range"].removeprefix("bytes=").rstrip("-"))
    body = DATA[start:]
    writer.write(
        f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
        f"Content-Range: bytes {start}-{len(DATA) - 1}/{len(DATA)}\r\n\r\n".encode()
    )
    writer.write(body)
    await writer.drain()


# ---- store ----------------------------------------------------------------------------------------


async def test_store_puts_streams_atomically_and_content_addressed(
    stores: tuple[FileStore, FileStore],
) -> None:
    store, _ = stores

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(DATA), 100_000):
            yield DATA[i : i + 100_000]

    assert await store.put_stream(pieces()) == SHA
    assert store.has(SHA) and store.size(SHA) == len(DATA)
    assert store.path(SHA) == store.root / SHA[:2] / SHA
    assert store.path(SHA).read_bytes() == DATA
    assert await store.put_stream(DATA) == SHA  # same bytes again: deduplicated
    assert list(store.shas()) == [SHA]
    assert list((store.root / "tmp").iterdir()) == []
    assert store.verify(SHA)


async def test_store_refuses_wrong_hash_oversize_and_bad_names(stores: tuple[FileStore, FileStore]) -> None:
    store, _ = stores
    with pytest.raises(FileStoreError, match="does not match"):
        await store.put_stream(b"abc", expected_sha=SHA)
    with pytest.raises(FileStoreError, match="larger than 10 bytes"):
        await store.put_stream([b"0123456", b"789abc"], max_bytes=10)
    assert list(store.shas()) == [] and list((store.root / "tmp").iterdir()) == []
    for bad in ("../" + "a" * 61, "A" * 64, "abc", SHA + "0"):
        with pytest.raises(FileStoreError, match="not a sha256"):
            store.has(bad)
    with pytest.raises(FileStoreError, match="not in the store"):
        store.path(MISSING)


async def test_gc_keeps_referenced_and_recent_files(stores: tuple[FileStore, FileStore]) -> None:
    store, _ = stores
    keep = await store.put_stream(b"referenced")
    young = await store.put_stream(b"just uploaded")
    old = await store.put_stream(b"nobody wants me")
    past = store.path(old).stat().st_mtime - 7200
    os.utime(store.path(old), (past, past))
    os.utime(store.path(keep), (past, past))
    async with store.open_part(MISSING) as part:  # an abandoned partial download
        await part.write(b"partial")
    os.utime(store.part_path(MISSING), (past, past))
    now = store.path(young).stat().st_mtime + 1

    assert store.gc({keep}, now=now, grace_s=3600) == sorted([old, MISSING])  # the partial counts too
    assert store.has(keep) and store.has(young) and not store.has(old)
    assert store.part_size(MISSING) == 0
    assert sorted(store.gc({keep}, now=now + 7200, grace_s=3600)) == [young]
    assert store.remove(keep) and not store.remove(keep)


# ---- server -------------------------------------------------------------------------------------


async def test_get_head_range_404_and_bad_names(stores: tuple[FileStore, FileStore]) -> None:
    store, _ = stores
    await store.put_stream(DATA)
    async with serving(store) as server, aiohttp.ClientSession() as http:
        url = f"{server.base_url}/files/{SHA}"
        async with http.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == DATA
            assert resp.headers["Accept-Ranges"] == "bytes"
            assert resp.headers["Repr-Digest"].startswith("sha-256=:")
        async with http.head(url) as resp:
            assert resp.status == 200
            assert int(resp.headers["Content-Length"]) == len(DATA)
            assert await resp.read() == b""
        async with http.get(url, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes 10-19/{len(DATA)}"
            assert await resp.read() == DATA[10:20]
        async with http.get(url, headers={"Range": f"bytes={len(DATA) - 5}-"}) as resp:
            assert resp.status == 206
            assert await resp.read() == DATA[-5:]
        async with http.get(url, headers={"Range": f"bytes={len(DATA) + 10}-"}) as resp:
            assert resp.status == 416
        async with http.get(f"{server.base_url}/files/{MISSING}") as resp:
            assert resp.status == 404
        async with http.get(f"{server.base_url}/files/not-a-hash") as resp:
            assert resp.status == 400
        async with http.get(f"{server.base_url}/files/..%2F..%2Fetc%2Fpasswd") as resp:
            assert resp.status in (400, 404)


async def test_token_is_required_with_a_farm_key(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores
    await a.put_stream(DATA)
    key = security.parse_key(security.new_farm_key())
    node_token = security.file_token(key, Role.NODE)
    async with serving(a, key=key) as server, aiohttp.ClientSession() as http:
        url = f"{server.base_url}/files/{SHA}"
        async with http.get(url) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(url, headers={"Authorization": "Bearer wrong"}) as resp:
            assert resp.status == 401
        async with http.post(f"{server.base_url}/files", data=b"x") as resp:
            assert resp.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer {node_token}"}) as resp:
            assert resp.status == 200

        with pytest.raises(FileStoreError, match="refused our token"):
            await fetch(SHA, [server.base_url], b, token="node.wrong")
        assert not b.has(SHA)
        await fetch(SHA, [server.base_url], b, token=node_token)
        assert b.has(SHA)


async def test_upload_streams_into_the_store(stores: tuple[FileStore, FileStore]) -> None:
    store, _ = stores
    async with serving(store, max_upload_bytes=4 * MiB) as server, aiohttp.ClientSession() as http:
        async with http.post(f"{server.base_url}/files", data=io.BytesIO(DATA)) as resp:
            assert resp.status == 201
            assert await resp.json() == {"sha256": SHA, "size": len(DATA)}
        assert store.path(SHA).read_bytes() == DATA

        other = b"G28\nG1 X10\n"
        async with http.post(f"{server.base_url}/files", params={"sha256": MISSING}, data=other) as resp:
            assert resp.status == 422
        async with http.post(f"{server.base_url}/files", params={"sha256": "nope"}, data=other) as resp:
            assert resp.status == 400
        async with http.post(f"{server.base_url}/files", data=io.BytesIO(os.urandom(5 * MiB))) as resp:
            assert resp.status == 413

        async def unsized() -> AsyncIterator[bytes]:  # chunked: no Content-Length to refuse up front
            for _ in range(5):
                yield b"\0" * MiB

        async with http.post(f"{server.base_url}/files", data=unsized()) as resp:
            assert resp.status == 413
        good = hashlib.sha256(other).hexdigest()
        async with http.post(f"{server.base_url}/files", params={"sha256": good}, data=other) as resp:
            assert resp.status == 201
        assert sorted(store.shas()) == sorted([SHA, good])
        assert list((store.root / "tmp").iterdir()) == []


async def test_server_lifecycle(stores: tuple[FileStore, FileStore]) -> None:
    store, _ = stores
    server = FileServer(store, host="127.0.0.1", port=0)
    with pytest.raises(FileStoreError, match="not running"):
        _ = server.port
    port = await server.start()
    assert port > 0 and server.port == port
    with pytest.raises(FileStoreError, match="cannot start"):
        await server.start()
    await server.stop()
    await server.stop()


# ---- fetch ----------------------------------------------------------------------------------------


async def test_fetch_verifies_and_reports_progress(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores
    await a.put_stream(DATA)
    progress: list[tuple[int, int | None]] = []
    async with serving(a) as server:
        path = await fetch(
            SHA, [server.base_url], b, progress_cb=lambda done, total: progress.append((done, total))
        )
    assert path.read_bytes() == DATA and path == b.path(SHA)
    assert progress[0] == (0, len(DATA)) and progress[-1] == (len(DATA), len(DATA))
    assert b.part_size(SHA) == 0
    # Already held: no holder needed.
    assert await fetch(SHA, [], b) == path


async def test_corrupt_holder_is_rejected_and_the_next_one_used(
    stores: tuple[FileStore, FileStore], tmp_path: Path
) -> None:
    a, b = stores
    bad = FileStore(tmp_path / "bad")
    plant(bad, SHA, DATA[:-1] + b"!")  # same size, one byte differs
    await a.put_stream(DATA)
    async with serving(bad) as corrupt, serving(a) as good:
        with pytest.raises(FileStoreError, match="do not match the hash"):
            await fetch(SHA, [corrupt.base_url], b)
        assert not b.has(SHA) and b.part_size(SHA) == 0 and list(b.shas()) == []

        path = await fetch(SHA, [corrupt.base_url, good.base_url], b)
        assert path.read_bytes() == DATA


async def test_no_holder_can_serve(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores

    async def hang_up(headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        pass  # closes without answering

    async with serving(a) as empty, raw_server(hang_up) as (dead_url, _):
        with pytest.raises(FileStoreError, match=r"does not hold it \(404\).*request failed"):
            await fetch(SHA, [empty.base_url, dead_url], b)
    with pytest.raises(FileStoreError, match="no holders given"):
        await fetch(SHA, [], b)
    assert b.part_size(SHA) == 0


async def test_interrupted_transfer_resumes_with_a_range_request(stores: tuple[FileStore, FileStore]) -> None:
    _, b = stores
    async with raw_server(drop_first_then_serve_ranges) as (url, requests):
        path = await fetch(SHA, [url], b)
    assert path.read_bytes() == DATA
    assert "range" not in requests[0]
    assert requests[1]["range"] == f"bytes={len(DATA) // 2}-"
    assert len(requests) == 2


async def test_holder_gone_midway_next_holder_continues_the_part(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores
    await a.put_stream(DATA)
    ranges: list[str | None] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        ranges.append(request.headers.get("Range"))

    good = FileServer(a)
    app = good.make_app()
    app.on_response_prepare.append(record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    good_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with raw_server(send_half_then_drop) as (flaky_url, requests):
            path = await fetch(SHA, [flaky_url, good_url], b, attempts_per_holder=2)
    finally:
        await runner.cleanup()
    assert path.read_bytes() == DATA
    assert len(requests) == 2  # the flaky holder got its attempts
    assert ranges == [f"bytes={len(DATA) // 2}-"]  # the good holder only sent the second half


@pytest.mark.parametrize(
    "stale",
    [
        pytest.param(DATA, id="complete-but-not-renamed"),  # crash after the download, before the rename
        pytest.param(b"\xff" * (len(DATA) // 3), id="corrupt-prefix"),  # bytes of a bad earlier holder
        pytest.param(DATA + b"tail", id="longer-than-the-file"),
    ],
)
async def test_a_stale_part_is_resumed_or_replaced(stores: tuple[FileStore, FileStore], stale: bytes) -> None:
    a, b = stores
    await a.put_stream(DATA)
    b.part_path(SHA).write_bytes(stale)
    async with serving(a) as server:
        path = await fetch(SHA, [server.base_url], b)
    assert path.read_bytes() == DATA
    assert b.part_size(SHA) == 0


async def test_cancelled_fetch_keeps_its_part_for_a_resume(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores
    await a.put_stream(DATA)
    half = len(DATA) // 2
    release = asyncio.Event()
    got_half = asyncio.Event()

    async def stall(headers: dict[str, str], writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\n\r\n".encode())
        writer.write(DATA[:half])
        await writer.drain()
        await release.wait()

    def progress(done: int, total: int | None) -> None:
        if done >= half:
            got_half.set()

    async with raw_server(stall) as (url, _):
        task = asyncio.create_task(fetch(SHA, [url], b, progress_cb=progress))
        await asyncio.wait_for(got_half.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
    assert b.part_size(SHA) == half and not b.has(SHA)
    async with serving(a) as server:
        path = await fetch(SHA, [server.base_url], b)
    assert path.read_bytes() == DATA


async def test_concurrent_fetches_of_one_file_share_the_download(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores
    await a.put_stream(DATA)
    async with serving(a) as server:
        paths = await asyncio.gather(*(fetch(SHA, [server.base_url], b) for _ in range(4)))
    assert len(set(paths)) == 1 and paths[0].read_bytes() == DATA


async def test_fetch_url_from_loopback_when_allowed(stores: tuple[FileStore, FileStore]) -> None:
    a, b = stores
    await a.put_stream(DATA)
    allow = UrlPolicy.from_allow(["127.0.0.1/32"])  # loopback is refused unless [files] url_allow names it
    async with serving(a) as server:
        url = f"{server.base_url}/files/{SHA}"
        with pytest.raises(FileStoreError, match="loopback"):
            await download_url(url, b)
        assert (await download_url(url, b, policy=allow)).sha == SHA
        assert b.path(SHA).read_bytes() == DATA
        b.remove(SHA)
        with pytest.raises(FileStoreError, match="does not match"):
            await download_url(url, b, expected_sha=MISSING, policy=allow)
        assert not b.has(SHA)
        with pytest.raises(FileStoreError, match="HTTP 404"):
            await download_url(f"{server.base_url}/files/{MISSING}", b, policy=allow)
        with pytest.raises(FileStoreError, match="too big|more than"):
            await download_url(url, b, max_bytes=1000, policy=allow)
    with pytest.raises(FileStoreError, match="only http"):
        await download_url("file:///etc/passwd", b)


async def test_uploaded_gcode_is_analysed_and_policy_checked(stores: tuple[FileStore, FileStore]) -> None:
    store, _ = stores
    gcode_dir = Path(__file__).resolve().parents[1] / "data" / "gcode"
    good = await store.put_stream((gcode_dir / "prusaslicer_mk3s.gcode").read_bytes())
    bad = await store.put_stream((gcode_dir / "policy_violations.gcode").read_bytes())

    result = await analyse(store, good)
    assert result.violations == []
    assert result.meta.printer_model == "MK3S" and result.meta.nozzle_mm == 0.4
    assert result.meta.extents is not None and result.meta.extents.z_max == 10.2  # from the footer

    flagged = await analyse(store, bad)
    assert [v.command for v in flagged.violations] == ["M500", "M502", "M997", "M109", "M190"]


# ---- collection by the node agent -----------------------------------------------------------------------


async def test_the_agent_collects_what_no_job_references(tmp_path: Path) -> None:
    """A one-node farm: a file named by a job stays, an old one nobody names goes, a fresh one waits."""
    broker = AmqttServer()
    await broker.start()
    settings = Settings(node_id="solo", data_dir=tmp_path / "solo", farm={"open": True},
                        broker={"url": f"mqtt://{broker.host}:{broker.port}"}, printer={"driver": "none"},
                        timing={"heartbeat_s": 0.1, "election_timeout_s": 0.5, "lease_s": 60.0},
                        files={"collect_every_s": 0.05, "collect_grace_s": 3600})
    agent = NodeAgent(settings)
    client = FarmClient(broker.address)
    try:
        await agent.start()
        await client.connect()
        store = agent.store
        queued = await store.put_stream(b"G28 ; queued\n")
        junk = await store.put_stream(b"G28 ; never queued\n")
        fresh = await store.put_stream(b"G28 ; its job/add is on the way\n")
        await until(lambda: agent.consensus.serving, "the node to serve as arbiter")
        await client.request("job/add", {"namespace": "default", "sets": [
            {"file": "q.gcode", "sha256": queued, "holders": ["solo"]}]}, timeout=15)
        for sha in (queued, junk):  # both past their grace once the job names one of them
            past = store.path(sha).stat().st_mtime - 7200
            os.utime(store.path(sha), (past, past))
        await until(lambda: not store.has(junk), "the unreferenced old file to be collected")
        assert store.has(queued) and store.has(fresh)
    finally:
        await client.close()
        await agent.stop()
        await broker.stop()
        with warnings.catch_warnings():  # amqtt 0.12.1's unclosed server sockets (test_node_api.py says why)
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
