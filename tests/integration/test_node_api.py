"""Node-addressed commands and the Home Assistant publisher, with real node agents over a real amqtt broker.

Each test runs in-process :class:`node.app.agent.NodeAgent` s (simulated printers, ``broker.url`` set, so no
zeroconf) on 127.0.0.1 and talks to them only through MQTT, as a script or Home Assistant would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from node.app.agent import NodeAgent
from node.app.client import FarmClient
from node.integrations.homeassistant import discovery as D
from node.integrations.homeassistant.publisher import remove_node_entities
from node.link.base import Message
from shared import security
from shared.models import CopyState, Material, WorkerState, job_key
from shared.settings import Settings
from tests.conftest import AmqttServer, amqtt_server_leaks
from tests.waiting import until as _until

pytestmark = pytest.mark.integration

TIMING = {"heartbeat_s": 0.1, "election_timeout_s": 0.5, "lease_s": 60.0, "lock_delay_s": 0.5,
          "node_timeout_s": 2.0, "work_retry_s": 0.3}


async def until(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Wait for ``cond()`` to be truthy (polled), or fail after ``timeout`` seconds."""
    return await _until(cond, what, timeout)


def gcode(seconds: float, tag: str) -> bytes:
    return f";TIME:{seconds}\n; {tag}\nG28\nM104 S200\nG1 X10 Y10\n".encode()


class Farm:
    """Node agents in this process, sharing one broker; plus a client that records every response."""

    def __init__(self, root: Path, broker: tuple[str, int]) -> None:
        self.root = root
        self.broker = broker
        self.agents: dict[str, NodeAgent] = {}
        self.responses: list[Message] = []
        self.client: FarmClient | None = None
        self.key = security.new_farm_key()

    def settings(self, node_id: str, **printer: Any) -> Settings:
        return Settings(node_id=node_id, data_dir=self.root / node_id, farm={"key": self.key},
                        broker={"url": f"mqtt://{self.broker[0]}:{self.broker[1]}"}, timing=TIMING,
                        printer={"driver": "simulated", "time_scale": 600.0, "self_clearing": True, **printer},
                        files={"bind": "127.0.0.1", "port": 0})

    async def start(self, node_id: str, **printer: Any) -> NodeAgent:
        agent = NodeAgent(self.settings(node_id, **printer))
        await agent.start()
        self.agents[node_id] = agent
        return agent

    async def connect(self, members: int) -> FarmClient:
        client = FarmClient(self.broker, state_key=security.state_public_key(security.parse_key(self.key)))
        await client.connect()
        self.client = client
        client.link.subscribe("netq/response/#", self.responses.append)
        await until(lambda: self.arbiter() is not None and len(self.arbiter().consensus.members) == members,
                    f"an arbiter with {members} members")
        await client.request("health_check")  # the response subscription is in place after this round trip
        return client

    def arbiter(self) -> NodeAgent | None:
        return next((a for a in self.agents.values() if a.arbiter.active), None)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        for agent in self.agents.values():
            await agent.stop()

    async def job(self, holder: str, seconds: float = 30, namespace: str = "default", **extra: Any) -> str:
        data = gcode(seconds, f"{holder}-{seconds}-{len(self.responses)}-{extra}")
        sha = await self.agents[holder].store.put_stream(data)
        assert self.client is not None
        answer = await self.client.request("job/add", {"namespace": namespace, "sets": [
            {"file": "part.gcode", "sha256": sha, "holders": [holder]}], **extra}, timeout=15)
        return str(answer["id"])

    def copy(self, job_id: str, namespace: str = "default", index: int = 0) -> Any:
        arbiter = self.arbiter()
        assert arbiter is not None
        job = arbiter.consensus.state.job(job_key(namespace, job_id))
        return None if job is None else job.copies[index]

    async def raw(self, path: str, payload: bytes, timeout: float = 10.0) -> dict[str, Any]:
        """Publish a request as mosquitto_pub would (no transaction) and return the next response to it."""
        assert self.client is not None
        seen = len(self.responses)
        self.client.link.publish(f"netq/request/{path}", payload, qos=1)
        msg = await until(lambda: next((m for m in self.responses[seen:] if m.topic == f"netq/response/{path}"),
                                       None), f"a response on {path}", timeout)
        return dict(json.loads(msg.payload))


@pytest.fixture
async def broker() -> AsyncIterator[tuple[str, int]]:
    """A real amqtt broker on 127.0.0.1 and a free port."""
    server = AmqttServer()
    await server.start()
    try:
        yield server.address
    finally:
        await server.stop()  # collects amqtt's own leaks (tests.conftest.amqtt_server_leaks)


@pytest.fixture
async def farm(tmp_path: Path, broker: tuple[str, int]) -> AsyncIterator[Farm]:
    f = Farm(tmp_path, broker)
    try:
        yield f
    finally:
        await f.stop()


# --- node commands -----------------------------------------------------------------------------------------
async def test_bed_cleared_releases_a_worker_waiting_for_an_operator(farm: Farm) -> None:
    n1 = await farm.start("n1", self_clearing=False)
    client = await farm.connect(1)
    first = await farm.job("n1")
    second = await farm.job("n1")
    assert n1.worker is not None
    await until(lambda: n1.worker.state == WorkerState.CLEARING, "n1 waiting for its bed to be cleared")
    assert farm.copy(first).state == CopyState.DONE
    assert farm.copy(second).state == CopyState.QUEUED  # nothing starts on a bed that is not clear

    answer = await client.request_raw("node/bed_cleared", {"node": "n1"}, transaction="clear-1")
    assert answer["status"] == "ok" and answer["transaction"] == "clear-1" and answer["data"]["node"] == "n1"
    await until(lambda: farm.copy(second).state == CopyState.DONE, "the second job printed after the clear")

    # The bare node id works too (mosquitto_pub -m n1), and so does HA's button payload.
    await until(lambda: n1.worker.state == WorkerState.CLEARING, "n1 waiting again")
    assert (await farm.raw("node/bed_cleared", b"n1"))["status"] == "ok"
    await until(lambda: n1.worker.state != WorkerState.CLEARING, "n1 released by the bare command")


async def test_bed_cleared_when_not_waiting_is_an_error_and_changes_nothing(farm: Farm) -> None:
    n1 = await farm.start("n1", self_clearing=False)
    client = await farm.connect(1)
    assert n1.worker is not None
    await until(lambda: n1.worker.state == WorkerState.REQUESTING, "n1 idle")
    answer = await client.request_raw("node/bed_cleared", {"node": "n1"})
    assert answer["status"] == "error" and answer["data"] == {} and "not waiting" in answer["error"]
    job = await farm.job("n1")
    # An early "cleared" must not count for the print that follows.
    await until(lambda: n1.worker.state == WorkerState.CLEARING, "n1 waiting for a clear after its print")
    assert farm.copy(job).state == CopyState.DONE


async def test_accept_jobs_false_stops_grants_to_that_node(farm: Farm) -> None:
    n1 = await farm.start("n1")
    n2 = await farm.start("n2")
    client = await farm.connect(2)
    assert n1.worker is not None and n2.worker is not None
    await until(lambda: n1.worker.state == WorkerState.REQUESTING, "n1 asking for work")  # a request is on file

    answer = await client.request_raw("node/accept_jobs", {"node": "n1", "accept": False}, transaction="acc")
    assert answer["status"] == "ok" and answer["data"]["accept_jobs"] is False
    assert answer["transaction"] == "acc"
    jobs = [await farm.job("n2", seconds=60) for _ in range(3)]
    await until(lambda: all(farm.copy(j).state == CopyState.DONE for j in jobs), "all jobs printed", 30)
    assert {farm.copy(j).node for j in jobs} == {"n2"}

    # Accepting again: while one node is busy on a long print, the next job goes to the other.
    assert (await client.request("node/accept_jobs", {"node": "n1", "accept": True}))["accept_jobs"] is True
    long = await farm.job("n2", seconds=3600)
    await until(lambda: farm.copy(long).state == CopyState.PRINTING, "a long print started")
    other = await farm.job("n2", seconds=30)
    await until(lambda: farm.copy(other).state == CopyState.DONE, "the next job printed")
    assert farm.copy(other).node != farm.copy(long).node


async def test_bad_node_commands_get_errors_and_change_nothing(farm: Farm) -> None:
    n1 = await farm.start("n1", materials=[{"type": "PLA"}])
    client = await farm.connect(1)
    assert n1.worker is not None
    before = (n1.worker.accept_jobs, n1.worker.paused, n1.worker.capabilities)
    cases: list[tuple[str, Any]] = [
        ("node/accept_jobs", {"node": "n1", "accept": "yes"}),  # answered by n1: wrong type
        ("node/accept_jobs", {"node": "n1"}),  # missing field
        ("node/material", {"node": "n1", "tool": 16, "material": "PLA"}),
        ("node/material", {"node": "n1", "material": ":red"}),
        ("node/pause", {"node": "n1", "extra": 1}),
        ("node/accept_jobs", {"node": "ghost", "accept": False}),  # answered by the arbiter: unknown node
        ("node/bed_cleared", {"accept": True}),  # no node given
        ("node/pause", {"node": "../x"}),
    ]
    for i, (path, body) in enumerate(cases):
        answer = await client.request_raw(path, body, transaction=f"bad-{i}")
        assert answer["status"] == "error", (path, body, answer)
        assert answer["data"] == {} and answer["error"] and answer["transaction"] == f"bad-{i}"
    for payload in (b"{not json", b"[1, 2]", b"ghost"):
        answer = await farm.raw("node/pause", payload)
        assert answer["status"] == "error", (payload, answer)
    assert "no node 'ghost'" in (await farm.raw("node/release", b"ghost"))["error"]
    assert (n1.worker.accept_jobs, n1.worker.paused, n1.worker.capabilities) == before


async def test_pause_resume_and_materials_survive_a_restart(farm: Farm) -> None:
    n1 = await farm.start("n1", materials=[{"type": "PLA"}])
    client = await farm.connect(1)
    assert n1.worker is not None
    answer = await client.request("node/material", {"node": "n1", "tool": 1, "material": "PETG:black"})
    assert answer["materials"] == ["PLA", "PETG:black"]
    assert (await client.request("node/pause", {"node": "n1"}))["paused"] is True
    assert n1.worker.state == WorkerState.PAUSED  # answered once the worker shows it
    await until(lambda: farm.arbiter().nodes.get("n1", {}).get("worker") == "paused", "the state published")
    job = await farm.job("n1")
    with amqtt_server_leaks():
        await n1.stop()
    n1 = await farm.start("n1", materials=[{"type": "PLA"}])
    assert n1.worker is not None
    await until(farm.arbiter, "n1 serving again")
    assert n1.worker.paused is True
    assert list(n1.worker.capabilities.materials) == [Material(type="PLA"), Material(type="PETG", color="black")]
    await until(lambda: n1.worker.state == WorkerState.PAUSED, "n1 paused after its restart")
    assert farm.copy(job).state == CopyState.QUEUED
    assert (await client.request("node/resume", {"node": "n1"}))["paused"] is False
    await until(lambda: farm.copy(job).state == CopyState.DONE, "the job printed after resume")


async def test_release_gives_back_a_claimed_copy_and_pauses(farm: Farm) -> None:
    n1 = await farm.start("n1")
    client = await farm.connect(1)
    assert n1.worker is not None
    nothing = await client.request_raw("node/release", {"node": "n1"})
    assert nothing["status"] == "error" and "no claim" in nothing["error"]

    # The job's only holder serves its file only when the test says so: n1 holds a claim it cannot start.
    data = gcode(30, "slow")
    sha = hashlib.sha256(data).hexdigest()
    serve = asyncio.Event()

    async def slow_file(_request: web.Request) -> web.Response:
        await serve.wait()
        return web.Response(body=data)

    async def policy(_request: web.Request) -> web.Response:
        # What a holder answers the arbiter's check of a job/add: its scan of the file, at once.
        return web.Response(body=n1.settings.gcode.policy().scan_chunks([data]).model_dump_json(),
                            content_type="application/json")

    app = web.Application()
    app.router.add_get(f"/files/{sha}", slow_file)
    app.router.add_get(f"/files/{sha}/policy", policy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        topic = "netq/nodes/slowpoke/state"  # a holder that is no node agent: its state signed as a member's
        signed = security.StateSigner(security.parse_key(farm.key)).sign(
            topic, {"node_id": "slowpoke", "state": "online", "files_url": url})
        client.link.publish(topic, json.dumps(signed).encode(), retain=True)
        await until(lambda: "slowpoke" in n1.nodes, "n1 knowing the holder")
        answer = await client.request("job/add", {"sets": [{"file": "slow.gcode", "sha256": sha,
                                                            "holders": ["slowpoke"]}]}, timeout=20)
        job = answer["id"]
        await until(lambda: (c := farm.copy(job)) and c.state == CopyState.CLAIMED and c.node == "n1", "a claim")

        answer = await farm.raw("node/release", b"n1")
        assert answer["status"] == "ok", answer
        assert answer["data"]["released"] == {"namespace": "default", "job": job, "copy": 0}
        assert answer["data"]["paused"] is True
        assert farm.copy(job).state == CopyState.QUEUED and farm.copy(job).node is None
        serve.set()  # the fetch completes; the worker finds the copy no longer its own
        await until(lambda: n1.worker.state == WorkerState.PAUSED, "n1 paused, not taking the copy back")
        assert farm.copy(job).state == CopyState.QUEUED
        assert (await client.request("node/resume", {"node": "n1"}))["paused"] is False
        await until(lambda: farm.copy(job).state == CopyState.DONE, "printed after resume")
    finally:
        client.link.publish("netq/nodes/slowpoke/state", b"", retain=True)
        serve.set()
        await runner.cleanup()


# --- Home Assistant ----------------------------------------------------------------------------------------
def _configs(retained: dict[str, bytes], disc_node: str) -> dict[str, dict[str, Any]]:
    return {t: json.loads(p) for t, p in retained.items() if t.endswith("/config") and t.split("/")[2] == disc_node}


async def test_home_assistant_online_makes_every_node_republish(farm: Farm) -> None:
    for node in ("n1", "n2", "n3"):
        await farm.start(node)
    client = await farm.connect(3)
    seen: list[Message] = []
    client.watch("homeassistant/#", seen.append)
    client.watch("netq/nodes/+/summary", seen.append)
    client.watch("netq/bridge/summary", seen.append)
    expected = [D.config_topic(client.topics, "sensor", f"netq_{n}", "state") for n in ("n1", "n2", "n3")]
    expected += [f"netq/nodes/{n}/summary" for n in ("n1", "n2", "n3")]
    expected += ["homeassistant/sensor/netq/arbiter/config", "netq/bridge/summary"]
    await until(lambda: all(t in client.retained for t in expected), "every node's discovery and summaries")
    farm_id = farm.arbiter().consensus.farm
    assert all(a.consensus.farm == farm_id for a in farm.agents.values())
    counts = {n: a.homeassistant.republished for n, a in farm.agents.items()}

    seen.clear()
    client.link.publish("homeassistant/status", b"online", qos=1)
    await until(lambda: all(any(m.topic == t and m.payload for m in seen) for t in expected),
                "every node republishing its configs and summaries", 10)
    assert all(a.homeassistant.republished == counts[n] + 1 for n, a in farm.agents.items())
    state_cfg = json.loads(client.retained[expected[0]])
    assert state_cfg["uniq_id"] == f"netq.{farm_id}.node.n1.state"


async def test_discovery_is_stable_across_restarts_and_retired_nodes_are_removed(farm: Farm) -> None:
    await farm.start("n1")
    n2 = await farm.start("n2", materials=[{"type": "PLA"}, None])
    client = await farm.connect(2)
    client.watch("homeassistant/#")
    # 4 sensors, 4 buttons, a switch, an event and a select per tool. They arrive one by one, in no set order.
    await until(lambda: len(_configs(client.retained, "netq_n2")) >= 12, "n2's discovery")
    before = _configs(client.retained, "netq_n2")
    assert len(before) == 12
    assert "homeassistant/select/netq_n2/material_1/config" in before

    with amqtt_server_leaks():
        await n2.stop()
    n2 = await farm.start("n2", materials=[{"type": "PLA"}, None])
    summary = "netq/nodes/n2/summary"
    client.watch(summary)
    await until(lambda: json.loads(client.retained.get(summary, b"{}")).get("state") == "idle", "n2 back")
    assert _configs(client.retained, "netq_n2") == before  # the same entities: updated in place

    # One tool fewer in its config: that select is removed with an empty retained config.
    with amqtt_server_leaks():
        await n2.stop()
    n2 = await farm.start("n2", materials=[{"type": "PLA"}])
    await until(lambda: "homeassistant/select/netq_n2/material_1/config" not in client.retained, "tool 2 gone")

    with amqtt_server_leaks():
        await n2.stop()
    cleared = remove_node_entities(client.link, client.topics, "n2")
    assert set(before) <= set(cleared)
    await until(lambda: not _configs(client.retained, "netq_n2") and summary not in client.retained,
                "n2's entities removed")
    assert _configs(client.retained, "netq_n1")  # the others stay


def _netq(broker: tuple[str, int], *args: str) -> Any:
    """Run the ``netq`` command line, as a person would, against the broker; its --json output."""
    proc = subprocess.run([sys.executable, "-m", "node.app.cli", *args, "--broker", f"mqtt://{broker[0]}:{broker[1]}",
                           "--json"], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"netq {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


async def test_netq_node_retire_removes_the_member_its_entities_and_its_state(farm: Farm) -> None:
    for node in ("n1", "n2", "n3"):
        await farm.start(node)
    client = await farm.connect(3)
    client.watch("homeassistant/#")
    client.watch("netq/nodes/+/summary")
    client.watch(client.topics.node_state_filter)
    arbiter = farm.arbiter()
    assert arbiter is not None
    victim = next(n for n in ("n3", "n2") if n != arbiter.node_id)
    disc, summary, state = f"netq_{victim}", f"netq/nodes/{victim}/summary", f"netq/nodes/{victim}/state"
    await until(lambda: D.config_topic(client.topics, "sensor", disc, "state") in client.retained
                and summary in client.retained, f"{victim}'s discovery")
    await until(lambda: not arbiter.arbiter.requests.member_change_pending, "the last enrollment committed")

    out = await asyncio.to_thread(_netq, farm.broker, "node", "retire", victim, "--yes")
    assert out["node"] == victim and victim not in out["members"] and len(out["members"]) == 2
    await until(lambda: not _configs(client.retained, disc) and summary not in client.retained,
                f"{victim}'s Home Assistant entities removed")
    assert _configs(client.retained, f"netq_{arbiter.node_id}")  # the others stay

    # Home Assistant comes online: every node republishes, but the retired one (still running) has no entities.
    retired = farm.agents[victim]
    count = retired.homeassistant.republished
    client.link.publish("homeassistant/status", b"online", qos=1)
    await until(lambda: retired.homeassistant.republished > count, f"{victim} republishing")
    assert not [t for t in retired.homeassistant._published if t.split("/")[2] == disc or t == summary]
    assert not _configs(client.retained, disc)

    listed = await asyncio.to_thread(_netq, farm.broker, "nodes")
    assert victim not in listed["members"] and listed["retired"] == [victim]
    nodes = {n["node_id"]: n for n in listed["nodes"]}
    assert nodes[victim]["enrolled"] is False and nodes[victim]["retired"] is True  # it still runs
    assert victim not in arbiter.consensus.members

    # Stopped, it leaves no record behind, and is no longer listed at all. (Stopping a node mid-test leaks
    # amqtt's server side of its connection: amqtt_server_leaks says why.)
    with amqtt_server_leaks():
        await retired.stop()
        del farm.agents[victim]
        await until(lambda: state not in client.retained, f"{victim}'s retained state cleared")
        listed = await asyncio.to_thread(_netq, farm.broker, "nodes")
    assert victim not in {n["node_id"] for n in listed["nodes"]}
    assert sum(1 for n in listed["nodes"] if n["enrolled"]) == 2


async def test_job_events_are_forwarded_to_the_printers_event_topic(farm: Farm) -> None:
    await farm.start("n1")
    client = await farm.connect(1)
    events: list[dict[str, Any]] = []
    client.link.subscribe("netq/nodes/n1/events", lambda m: events.append(json.loads(m.payload)))
    await client.request("health_check")
    job = await farm.job("n1")
    await until(lambda: [e["event_type"] for e in events] == ["started", "finished"], "started, finished")
    assert all(e["job"] == job and e["namespace"] == "default" for e in events)
