"""URL jobs against real HTTP servers on 127.0.0.1 (port 0): what they may not reach, how long they may take,
and that bytes breaking a rule are deleted, never stored (node/files/fetch.py ``download_url``,
node/arbiter/url_jobs.py). Only loopback is reachable here, so the allow path puts 127.0.0.1/32 in url_allow.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from node.arbiter.url_jobs import resolve
from node.files.fetch import download_url
from node.files.store import FileStore
from node.files.url_guard import UrlLimits, UrlPolicy
from shared.errors import FileStoreError, RequestError
from tests.memfarm import MemFarm

pytestmark = [pytest.mark.integration, pytest.mark.security]

GCODE = b";TIME:60\nG28\nG1 X10 Y10\n" * 50
LOOPBACK = UrlPolicy.from_allow(["127.0.0.1/32"])
QUICK = UrlLimits(total_s=10.0, min_rate=16 * 1024, rate_window_s=0.5)


@dataclass
class Server:
    base: str
    hits: list[str] = field(default_factory=list)


@asynccontextmanager
async def serving(host: str = "127.0.0.1") -> AsyncIterator[Server]:
    """An aiohttp server on ``host``:0 with a route per misbehaviour; records every path asked for."""
    server = Server("")

    async def record(request: web.Request) -> None:
        server.hits.append(request.path_qs)

    async def file(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(body=GCODE)

    async def bad(request: web.Request) -> web.StreamResponse:
        await record(request)
        return web.Response(body=b"G28\nM997 ; firmware update\n")

    async def redirect(request: web.Request) -> web.StreamResponse:
        await record(request)
        raise web.HTTPFound(request.query["to"])

    async def loop(request: web.Request) -> web.StreamResponse:
        await record(request)
        raise web.HTTPFound(f"/loop?n={int(request.query.get('n', '0')) + 1}")

    async def trickle(request: web.Request) -> web.StreamResponse:
        """One byte a second: far below any rate floor."""
        await record(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(120):
            await resp.write(b";")
            await asyncio.sleep(1.0)
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        """64 KiB every 20 ms, for ever: above the rate floor, past any total time limit."""
        await record(request)
        resp = web.StreamResponse()
        await resp.prepare(request)
        while True:
            await resp.write(b";" * 65536)
            await asyncio.sleep(0.02)

    app = web.Application()
    for path, handler in (("/file.gcode", file), ("/bad.gcode", bad), ("/redirect", redirect), ("/loop", loop),
                          ("/trickle", trickle), ("/endless", endless)):
        app.router.add_get(path, handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = runner.addresses[0][1]
    server.base = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


def nothing_stored(store: FileStore) -> bool:
    return not list(store.shas()) and not list((store.root / "tmp").iterdir()) \
        and not list((store.root / "partial").iterdir())


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


async def test_loopback_is_refused_before_any_connection(store: FileStore) -> None:
    async with serving() as server:
        with pytest.raises(FileStoreError, match="127.0.0.1 is a loopback address"):
            await download_url(f"{server.base}/file.gcode", store)
        port = server.base.rsplit(":", 1)[1]
        # A name resolving to loopback is refused on the socket: aiohttp never connects.
        with pytest.raises(FileStoreError, match="refused: .*loopback"):
            await download_url(f"http://localhost:{port}/file.gcode", store)
        with pytest.raises(FileStoreError, match="refused"):
            await download_url(f"http://[::ffff:127.0.0.1]:{port}/file.gcode", store)
        for other_form in ("2130706433", "127.1", "0x7f.0.0.1", "0"):  # forms a resolver maps to loopback
            with pytest.raises(FileStoreError):
                await download_url(f"http://{other_form}:{port}/file.gcode", store)
        assert server.hits == []
    assert nothing_stored(store)


async def test_allowed_explicitly_it_is_fetched(store: FileStore) -> None:
    async with serving() as server:
        got = await download_url(f"{server.base}/file.gcode", store, policy=LOOPBACK)
        assert got.fresh and store.path(got.sha).read_bytes() == GCODE
        again = await download_url(f"{server.base}/file.gcode", store, policy=LOOPBACK)
        assert again.sha == got.sha and not again.fresh  # the store held it: not ours to delete


async def test_no_redirect_to_a_refused_address(store: FileStore) -> None:
    async with serving() as server:
        # To a cloud metadata address: refused before connecting (nothing listens there in a test anyway).
        with pytest.raises(FileStoreError, match="169.254.169.254 is a link-local"):
            await download_url(f"{server.base}/redirect?to=http://169.254.169.254/latest/meta-data/", store,
                            policy=LOOPBACK)
        with pytest.raises(FileStoreError, match="127.0.0.2 is a loopback address"):
            await download_url(f"{server.base}/redirect?to=http://127.0.0.2/", store, policy=LOOPBACK)
        with pytest.raises(FileStoreError, match="only http"):
            await download_url(f"{server.base}/redirect?to=file:///etc/passwd", store, policy=LOOPBACK)
        assert server.hits.count("/file.gcode") == 0
        # Redirects are followed a bounded number of times, each hop checked.
        with pytest.raises(FileStoreError, match="more than 5 redirects"):
            await download_url(f"{server.base}/loop", store, policy=LOOPBACK)
        assert len(server.hits) == 3 + 6
        got = await download_url(f"{server.base}/redirect?to=/file.gcode", store, policy=LOOPBACK)
        assert store.path(got.sha).read_bytes() == GCODE


async def test_a_redirect_to_a_name_is_checked_on_the_address_connected_to(store: FileStore) -> None:
    """The first server (127.0.0.2) is allowed; it redirects to ``localhost``, which resolves to loopback
    addresses that are not: refused on the socket, so the server behind them never sees a request."""
    async with serving() as target, serving("127.0.0.2") as server:
        port = target.base.rsplit(":", 1)[1]
        with pytest.raises(FileStoreError, match=r"refused: (127\.0\.0\.1|::1) is a loopback address"):
            await download_url(f"{server.base}/redirect?to=http://localhost:{port}/file.gcode", store,
                            policy=UrlPolicy.from_allow(["127.0.0.2/32"]))
        assert server.hits and target.hits == []
    assert nothing_stored(store)


async def test_no_redirect_to_a_farm_node_even_in_an_allowed_range(store: FileStore) -> None:
    policy = UrlPolicy.from_allow(["127.0.0.0/8"], own=["127.0.0.2"])
    async with serving() as server, serving("127.0.0.2") as node:
        with pytest.raises(FileStoreError, match="127.0.0.2 is a node of this farm"):
            await download_url(f"{server.base}/redirect?to={node.base}/file.gcode", store, policy=policy)
        with pytest.raises(FileStoreError, match="node of this farm"):
            await download_url(f"{node.base}/file.gcode", store, policy=policy)
        assert node.hits == []
    assert nothing_stored(store)


async def test_a_trickling_server_is_dropped_by_the_rate_floor(store: FileStore) -> None:
    async with serving() as server:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(FileStoreError, match="fewer than 16384 bytes per second"):
            await download_url(f"{server.base}/trickle", store, policy=LOOPBACK, limits=QUICK)
        assert loop.time() - began < 3.0
    assert nothing_stored(store)


async def test_a_download_past_the_total_time_limit_is_dropped(store: FileStore) -> None:
    limits = UrlLimits(total_s=1.0, min_rate=1024, rate_window_s=0.5)
    async with serving() as server:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(FileStoreError, match="not downloaded within 1 s"):
            await download_url(f"{server.base}/endless", store, policy=LOOPBACK, limits=limits)
        assert loop.time() - began < 3.0
    assert nothing_stored(store)


async def test_too_large_or_wrong_hash_leaves_nothing(store: FileStore) -> None:
    async with serving() as server:
        with pytest.raises(FileStoreError, match="larger than 100 bytes|more than 100"):
            await download_url(f"{server.base}/file.gcode", store, policy=LOOPBACK, max_bytes=100)
        with pytest.raises(FileStoreError, match="does not match"):
            await download_url(f"{server.base}/file.gcode", store, "0" * 64, policy=LOOPBACK)
    assert nothing_stored(store)


async def test_a_url_job_breaking_the_gcode_policy_is_deleted_never_served(store: FileStore) -> None:
    async with serving() as server:
        body = {"sets": [{"url": f"{server.base}/bad.gcode"}]}
        with pytest.raises(RequestError, match="M997"):
            await resolve(body, store, "n1", policy=LOOPBACK, limits=QUICK)
        assert nothing_stored(store)
        ok = await resolve({"sets": [{"url": f"{server.base}/file.gcode"}]}, store, "n1", policy=LOOPBACK)
        s = ok["sets"][0]
        assert s["holders"] == ["n1"] and s["file"] == "file.gcode" and store.has(s["sha256"])
        with pytest.raises(RequestError, match=r"sets\.0: .*loopback"):
            await resolve({"sets": [{"url": f"{server.base}/file.gcode"}]}, store, "n1")


async def test_job_add_by_url_to_loopback_is_answered_with_an_error(tmp_path: Path) -> None:
    """Through the arbiter (in-memory farm, the real download path): refused, answered, nothing queued."""
    farm = MemFarm(tmp_path / "farm", 1)
    await farm.start()
    try:
        arb = await farm.ready(1)
        arb.arbiter.requests.store = FileStore(tmp_path / "arbiter-files")
        async with serving() as server:
            r = await farm.request("job/add", {"sets": [{"url": f"{server.base}/file.gcode"}]}, "u1")
            assert r["status"] == "error" and "loopback" in r["error"], r
            assert server.hits == []
        assert arb.consensus.state.jobs() == [] and nothing_stored(arb.arbiter.requests.store)
    finally:
        await farm.stop()
