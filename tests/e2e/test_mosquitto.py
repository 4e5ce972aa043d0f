"""Real mosquitto tools against a real farm: a script needs only mosquitto_pub and mosquitto_sub."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator

import pytest

from node.demo import DEMO_TIMING
from node.farm import ProcessFarm, gcode_for
from tests.mosquitto_fixture import mosquitto, require_tool  # noqa: F401  (fixture)

pytestmark = pytest.mark.e2e


@pytest.fixture
async def farm3() -> AsyncIterator[ProcessFarm]:
    farm = ProcessFarm(3, time_scale=300, timing=DEMO_TIMING)
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


async def _sub_then_pub(host: str, port: int, path: str, payload: str) -> dict[str, object]:
    """Start mosquitto_sub on the response topic, publish the request with mosquitto_pub, read one answer."""
    sub = await asyncio.create_subprocess_exec(
        require_tool("mosquitto_sub"), "-h", host, "-p", str(port), "-t", f"netq/response/{path}",
        "-C", "1", "-W", "10", "-v", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # mosquitto_sub gives no sign that its SUBSCRIBE is acknowledged: publish (the same transaction, so the
    # request is applied once) until it has an answer.
    pub = require_tool("mosquitto_pub")
    reading = asyncio.ensure_future(sub.communicate())
    for _ in range(50):
        rc = subprocess.run([pub, "-h", host, "-p", str(port), "-q", "1", "-t", f"netq/request/{path}",
                             "-m", payload], capture_output=True, timeout=10).returncode
        assert rc == 0
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
        request = {"namespace": "scripts", "name": "from-a-shell", "count": 2, "transaction": "sh-1",
                   "sets": [{"file": "part.gcode", "sha256": sha, "holders": [farm3.nodes[1].node_id]}]}
        answer = await _sub_then_pub(host, port, "job/add", json.dumps(request))
        assert answer["status"] == "ok" and answer["transaction"] == "sh-1"
        job_id = answer["data"]["id"]  # type: ignore[index]
        jobs = await client.request("queue/list", {"namespace": "scripts"})
        assert [j["id"] for j in jobs["jobs"]] == [job_id]
        assert jobs["jobs"][0]["count"] == 2

        # Bad input: a clear error, the transaction echoed, and nothing changes.
        bad = await _sub_then_pub(host, port, "job/add", '{"namespace": "scripts", "count": "two", '
                                                         '"transaction": "sh-2"}')
        assert bad["status"] == "error" and bad["data"] == {} and bad["transaction"] == "sh-2"
        assert "count" in str(bad["error"]) or "sets" in str(bad["error"])
        garbage = await _sub_then_pub(host, port, "job/add", "{not json")
        assert garbage["status"] == "error" and "JSON" in str(garbage["error"])
        jobs = await client.request("queue/list", {"namespace": "scripts"})
        assert len(jobs["jobs"]) == 1
    finally:
        await client.close()


async def test_a_farm_runs_unchanged_over_an_existing_mosquitto_broker(mosquitto: tuple[str, int]) -> None:
    host, port = mosquitto
    farm = ProcessFarm(3, time_scale=300, timing=DEMO_TIMING, broker_url=f"mqtt://{host}:{port}")
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
