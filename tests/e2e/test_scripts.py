"""The shell scripts of deploy/scripts/, run with the real mosquitto clients against a farm of node processes
over a real mosquitto broker; results checked in the farm's state through the API.

One farm serves the whole module: n1 prints only the ``bed`` queue and waits for an operator to clear its
bed; n2 prints everything else, clearing its own bed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from node.app.client import FarmClient
from node.demo.farm import NodeProc, ProcessFarm, gcode_for, mosquitto_broker
from node.demo.run import DEMO_TIMING
from shared import security
from shared.security import Role
from tests.mosquitto_fixture import require_tool
from tests.waiting import until as _until

pytestmark = pytest.mark.e2e

SCRIPTS = Path(__file__).resolve().parents[2] / "deploy" / "scripts"
N2_QUEUES = ["a-paused", "scripts", "urls", "default"]
URL_HOST = "127.0.0.2"  # a loopback address of its own for the test's file server (Linux routes 127/8 to lo)


class ScriptFarm(ProcessFarm):
    """A process farm whose nodes take any config section from ``node.extra``."""

    def config(self, node: NodeProc) -> dict[str, Any]:
        cfg = super().config(node)
        for section, values in node.extra.items():
            if section != "printer":
                cfg.setdefault(section, {}).update(values)
        return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


KEY = security.new_farm_key()  # the module's farm: mosquitto admits its roles only


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    exe = require_tool("mosquitto")
    for tool in ("mosquitto_pub", "mosquitto_sub"):
        require_tool(tool)
    with mosquitto_broker(tmp_path_factory.mktemp("mosquitto"), exe, key=KEY) as address:
        yield address


@pytest.fixture(scope="module")
def farm(broker: tuple[str, int]) -> Iterator[ScriptFarm]:
    f = ScriptFarm(2, time_scale=300, timing=DEMO_TIMING, broker_url=f"mqtt://{broker[0]}:{broker[1]}", key=KEY)
    n1, n2 = f.nodes
    # URL jobs fetch from this test's web server on 127.0.0.2 (the farm's own nodes, on 127.0.0.1, are refused
    # whatever url_allow says; loopback is refused unless allowed exactly).
    allow = {"url_allow": [f"{URL_HOST}/32"]}
    n1.extra = {"printer": {"self_clearing": False}, "worker": {"namespaces": ["bed"]}, "files": allow}
    n2.extra = {"worker": {"namespaces": N2_QUEUES}, "files": allow}
    f.start()
    try:
        yield f
    finally:
        f.stop()


@pytest.fixture
async def client(farm: ScriptFarm) -> AsyncIterator[FarmClient]:
    c = await farm.client(timeout=30)
    try:
        await farm.wait_ready(c, 2)
        c.watch(c.topics.node_state_filter)
        yield c
    finally:
        await c.close()


Script = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def sh(broker: tuple[str, int]) -> Script:
    """``await sh("netq-add-job.sh", *args, env={...})``: run a script of deploy/scripts with /bin/sh against
    the farm's broker; returns (exit status, stdout, stderr)."""

    async def run(script: str, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 90) -> tuple[int, str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("NETQ_")}
        # A script runs as the farm's operator (`netq credentials operator`).
        login = {"NETQ_USER": Role.OPERATOR.value,
                 "NETQ_PASSWORD": security.broker_password(security.parse_key(KEY), Role.OPERATOR)}
        environ.update({"NETQ_HOST": broker[0], "NETQ_PORT": str(broker[1]), **login, **(env or {})})
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", str(SCRIPTS / script), *args, env=environ, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    return run


async def until(cond: Any, what: str, timeout: float = 30.0) -> Any:
    return await _until(cond, what, timeout, interval=0.05)


async def jobs(client: FarmClient, namespace: str) -> dict[str, dict[str, Any]]:
    data = await client.request("queue/list", {"namespace": namespace})
    return {j["id"]: j for j in data["jobs"]}


# --- add, list, wait ---------------------------------------------------------------------------------------
async def test_add_by_sha256_and_holder_list_the_queue_and_wait_for_it(farm: ScriptFarm, client: FarmClient,
                                                                        sh: Script) -> None:
    sha = await farm.upload(farm.nodes[1], gcode_for(60, "by-sha"))
    rc, out, err = await sh("netq-add-job.sh", "--sha256", sha, "--holder", "n2", "--file", "part one.gcode",
                             "-n", "scripts", "--count", "2", "--name", 'the "first" job', "-m", "PLA:red")
    assert rc == 0, err
    job_id = out.strip()
    job = (await jobs(client, "scripts"))[job_id]
    assert job["count"] == 2 and job["name"] == 'the "first" job'
    assert job["sets"][0]["sha256"] == sha and "n2" in job["sets"][0]["holders"]
    assert job["sets"][0]["file"] == "part one.gcode"
    assert job["sets"][0]["materials"] == [{"type": "PLA", "color": "red"}]

    rc, out, err = await sh("netq-wait-job.sh", "-n", "scripts", "-t", "60", job_id)
    assert (rc, out.strip()) == (0, "done"), err
    assert all(c["state"] == "done" for c in (await jobs(client, "scripts"))[job_id]["copies"])

    rc, with_jq, err = await sh("netq-list-queue.sh", "-n", "scripts")
    assert rc == 0, err
    assert f"scripts\t{job_id}\tdone\t0\t2\tthe \"first\" job" in with_jq.splitlines()
    rc, without_jq, err = await sh("netq-list-queue.sh", "-n", "scripts", env={"NETQ_NO_JQ": "1"})
    assert rc == 0 and without_jq.splitlines()[0].split("\t")[:5] == with_jq.splitlines()[0].split("\t")[:5]
    rc, raw, _ = await sh("netq-list-queue.sh", "--json", "-n", "scripts")
    assert rc == 0 and json.loads(raw)["status"] == "ok"


async def test_add_by_url_downloads_into_the_arbiter_and_checks_the_hash(farm: ScriptFarm, client: FarmClient,
                                                                         sh: Script) -> None:
    data = gcode_for(60, "by-url")
    sha = hashlib.sha256(data).hexdigest()

    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=data)

    app = web.Application()
    app.router.add_get("/parts/benchy.gcode", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, URL_HOST, 0)
    await site.start()
    port = runner.addresses[0][1]
    url = f"http://{URL_HOST}:{port}/parts/benchy.gcode"
    try:
        for env in ({}, {"NETQ_NO_JQ": "1"}):
            rc, out, err = await sh("netq-add-job.sh", "--url", url, "--sha256", sha, "-n", "urls", env=env)
            assert rc == 0, err
            job_id = out.strip()
            job = (await jobs(client, "urls"))[job_id]
            arbiter = (await client.request("node/list"))["arbiter"]
            assert job["sets"][0]["sha256"] == sha and job["sets"][0]["file"] == "benchy.gcode"
            assert arbiter in job["sets"][0]["holders"]
            rc, out, err = await sh("netq-wait-job.sh", "-n", "urls", "-t", "60", job_id)
            assert (rc, out.strip()) == (0, "done"), err

        before = await jobs(client, "urls")
        rc, _, err = await sh("netq-add-job.sh", "--url", url, "--sha256", "0" * 64, "-n", "urls")
        assert rc == 1 and "does not match" in err
        rc, _, err = await sh("netq-add-job.sh", "--url", url.replace("benchy", "missing"), "-n", "urls")
        assert rc == 1 and "404" in err
        rc, _, err = await sh("netq-add-job.sh", "--url", "ftp://127.0.0.1/x.gcode", "-n", "urls")
        assert rc == 1 and "http" in err
        assert await jobs(client, "urls") == before
    finally:
        await runner.cleanup()


# --- beds, queues ------------------------------------------------------------------------------------------
async def _worker(client: FarmClient, node: str) -> str:
    return str(client.node_states().get(node, {}).get("worker"))


async def test_mark_a_bed_cleared(farm: ScriptFarm, client: FarmClient, sh: Script) -> None:
    sha = await farm.upload(farm.nodes[0], gcode_for(30, "bed"))
    rc, out, err = await sh("netq-add-job.sh", "-S", sha, "-H", "n1", "-n", "bed", "--count", "2")
    assert rc == 0, err
    job_id = out.strip()

    async def first_done_and_waiting() -> bool:
        copies = (await jobs(client, "bed"))[job_id]["copies"]
        return [c["state"] for c in copies] == ["done", "queued"] and await _worker(client, "n1") == "clearing"

    await until(first_done_and_waiting, "n1 waiting for its bed to be cleared")
    rc, out, err = await sh("netq-bed-cleared.sh", "n1")
    assert (rc, out.strip()) == (0, "n1: bed cleared"), err
    rc, out, err = await sh("netq-wait-job.sh", "-n", "bed", "-t", "60", job_id)
    assert (rc, out.strip()) == (0, "done"), err

    await until(lambda: _is(client, "n1", "clearing"), "n1 waiting after its second print")
    rc, out, err = await sh("netq-bed-cleared.sh", "n1")
    assert rc == 0, err
    await until(lambda: _not(client, "n1", "clearing"), "n1 idle")
    rc, out, err = await sh("netq-bed-cleared.sh", "n1")  # nothing to clear now
    assert rc == 1 and "not waiting" in err
    rc, out, err = await sh("netq-bed-cleared.sh", "nobody")
    assert rc == 1 and "no node 'nobody'" in err


async def _is(client: FarmClient, node: str, state: str) -> bool:
    return await _worker(client, node) == state


async def _not(client: FarmClient, node: str, state: str) -> bool:
    return await _worker(client, node) not in (state, "None")


async def test_a_paused_queue_is_skipped_until_resumed(farm: ScriptFarm, client: FarmClient, sh: Script,
                                                       broker: tuple[str, int]) -> None:
    rc, out, err = await sh("netq-request.sh", "queue/pause", '{"namespace": "a-paused"}')
    assert rc == 0 and json.loads(out)["data"]["paused"] is True, err
    sha_a = await farm.upload(farm.nodes[1], gcode_for(60, "paused-a"))
    sha_b = await farm.upload(farm.nodes[1], gcode_for(60, "paused-b"))
    rc, a, err = await sh("netq-add-job.sh", "-S", sha_a, "-H", "n2", "-n", "a-paused")
    assert rc == 0, err
    rc, b, err = await sh("netq-add-job.sh", "-S", sha_b, "-H", "n2", "-n", "scripts")
    assert rc == 0, err
    # n2 serves a-paused first, and A is older: only the pause lets B go first.
    rc, out, err = await sh("netq-wait-job.sh", "-n", "scripts", "-t", "60", b.strip())
    assert rc == 0, err
    job_a = (await jobs(client, "a-paused"))[a.strip()]
    assert job_a["state"] == "queued" and job_a["waiting"] == "queue paused"

    # Resume with a bare value, as the docs show: mosquitto_pub -m a-paused.
    host, port = broker
    login = ["-u", Role.OPERATOR.value, "-P", security.broker_password(security.parse_key(KEY), Role.OPERATOR)]
    pub = [require_tool("mosquitto_pub"), "-h", host, "-p", str(port), *login, "-q", "1"]
    proc = await asyncio.create_subprocess_exec(*pub, "-t", "netq/request/queue/resume", "-m", "a-paused")
    assert await proc.wait() == 0
    rc, out, err = await sh("netq-wait-job.sh", "-n", "a-paused", "-t", "60", a.strip())
    assert (rc, out.strip()) == (0, "done"), err


async def test_errors_and_no_answer(farm: ScriptFarm, client: FarmClient, sh: Script) -> None:
    rc, out, err = await sh("netq-request.sh", "job/frobnicate", "{}")
    assert rc == 1 and json.loads(out)["status"] == "error" and "unknown request" in out
    rc, out, err = await sh("netq-add-job.sh", "--sha256", "1" * 64, "--holder", "n2", "--count", "0")
    assert rc == 1 and "count" in err
    rc, out, err = await sh("netq-add-job.sh", "--count", "many", "--sha256", "1" * 64, "--holder", "n2")
    assert rc == 2 and "whole number" in err
    rc, out, err = await sh("netq-request.sh", "health_check", env={"NETQ_PORT": str(_free_port()),
                                                                     "NETQ_TIMEOUT": "2"})
    assert rc == 2 and "no answer" in err
    rc, out, err = await sh("netq-wait-job.sh", "-t", "1", "no-such-job")
    assert rc == 3 and "timed out" in err
