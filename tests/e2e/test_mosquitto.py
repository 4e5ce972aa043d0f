"""Real mosquitto tools against a real farm: a script needs only mosquitto_pub and mosquitto_sub."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.demo.farm import ProcessFarm, gcode_for, mosquitto_broker
from node.demo.run import DEMO_TIMING
from shared import security
from shared.security import Role
from tests.mosquitto_fixture import require_tool

pytestmark = pytest.mark.e2e


@pytest.fixture
async def farm3() -> AsyncIterator[ProcessFarm]:
    farm = ProcessFarm(3, time_scale=300, timing=DEMO_TIMING)
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


async def _sub_then_pub(host: str, port: int, path: str, payload: str, login: list[str]) -> dict[str, object]:
    """Start mosquitto_sub on the response topic, publish the request with mosquitto_pub, read one answer.
    ``login``: ``-u ROLE -P PASSWORD``, as a script of the farm's operator gives them."""
    sub = await asyncio.create_subprocess_exec(
        require_tool("mosquitto_sub"), "-h", host, "-p", str(port), *login, "-t", f"netq/response/{path}",
        "-C", "1", "-W", "10", "-v", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # mosquitto_sub gives no sign that its SUBSCRIBE is acknowledged: publish (the same transaction, so the
    # request is applied once) until it has an answer.
    pub = require_tool("mosquitto_pub")
    reading = asyncio.ensure_future(sub.communicate())
    for _ in range(50):
        proc = await asyncio.create_subprocess_exec(
            pub, "-h", host, "-p", str(port), *login, "-q", "1", "-t", f"netq/request/{path}", "-m", payload,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, perr = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0, perr.decode()
        done, _ = await asyncio.wait({reading}, timeout=0.3)
        if done:
            break
    else:
        sub.kill()
        await reading
        raise AssertionError("no response from the farm")
    out, err = reading.result()
    assert sub.returncode == 0, err.decode()
    topic, _, body = out.decode().partition(" ")
    assert topic == f"netq/response/{path}"
    return dict(json.loads(body))


async def test_add_a_job_with_mosquitto_pub_and_read_the_answer_with_mosquitto_sub(farm3: ProcessFarm) -> None:
    client = await farm3.client(timeout=60)
    try:
        await farm3.wait_ready(client, 3)
        sha = await farm3.upload(farm3.nodes[1], gcode_for(60, "pub"))
        host, port = client.address
        creds = farm3.credentials(Role.OPERATOR)
        login = ["-u", creds["username"], "-P", creds["password"]]
        request = {"namespace": "scripts", "name": "from-a-shell", "count": 2, "transaction": "sh-1",
                   "sets": [{"file": "part.gcode", "sha256": sha, "holders": [farm3.nodes[1].node_id]}]}
        answer = await _sub_then_pub(host, port, "job/add", json.dumps(request), login)
        assert answer["status"] == "ok" and answer["transaction"] == "sh-1"
        job_id = answer["data"]["id"]  # type: ignore[index]
        jobs = await client.request("queue/list", {"namespace": "scripts"})
        assert [j["id"] for j in jobs["jobs"]] == [job_id]
        assert jobs["jobs"][0]["count"] == 2

        # Bad input: a clear error, the transaction echoed, and nothing changes.
        bad = await _sub_then_pub(host, port, "job/add", '{"namespace": "scripts", "count": "two", '
                                                         '"transaction": "sh-2"}', login)
        assert bad["status"] == "error" and bad["data"] == {} and bad["transaction"] == "sh-2"
        assert "count" in str(bad["error"]) or "sets" in str(bad["error"])
        garbage = await _sub_then_pub(host, port, "job/add", "{not json", login)
        assert garbage["status"] == "error" and "JSON" in str(garbage["error"])
        jobs = await client.request("queue/list", {"namespace": "scripts"})
        assert len(jobs["jobs"]) == 1
    finally:
        await client.close()


async def test_a_farm_runs_unchanged_over_an_existing_mosquitto_broker(tmp_path: Path) -> None:
    key = security.new_farm_key()  # mosquitto admits the farm's roles only (`netq credentials mosquitto`)
    with mosquitto_broker(tmp_path, require_tool("mosquitto"), key=key) as (host, port):
        await _farm_over(host, port, key)


async def _farm_over(host: str, port: int, key: str) -> None:
    farm = ProcessFarm(3, time_scale=300, timing=DEMO_TIMING, broker_url=f"mqtt://{host}:{port}", key=key)
    farm.start()
    try:
        client = await farm.client(timeout=30)
        try:
            await farm.wait_ready(client, 3)
            await farm.add_jobs(client, 6, min_s=60, max_s=300)
            deadline = asyncio.get_running_loop().time() + 60
            while (summary := await farm.summary(client))["unfinished"]:
                assert asyncio.get_running_loop().time() < deadline, farm.logs()
                await asyncio.sleep(0.2)
            assert summary["completed"] == 6 and summary["lost"] == 0 and summary["double_starts"] == 0
        finally:
            await client.close()
    finally:
        farm.stop()
