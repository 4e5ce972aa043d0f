"""A farm of real node agent processes on 127.0.0.1: zeroconf on loopback, the elected embedded amqtt broker,
paho clients, SQLite replicas and simulated printers that journal every start."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from node.app.client import FarmClient
from node.demo.farm import ProcessFarm
from node.demo.run import DEMO_TIMING
from shared.errors import NetqError
from tests.waiting import until as _until

pytestmark = pytest.mark.integration


async def until(cond: Callable[[], Any], timeout: float, what: str, farm: ProcessFarm) -> Any:
    # NetqError: no arbiter at this instant (an election, or the broker moving): ask again.
    return await _until(cond, what, timeout, interval=0.1, retry_on=(NetqError,), context=farm.logs)


@pytest.fixture
async def farm4() -> AsyncIterator[ProcessFarm]:
    farm = ProcessFarm(4, time_scale=200, timing=DEMO_TIMING)
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


async def _roles(client: FarmClient) -> dict[str, dict[str, Any]]:
    data = await client.request("node/list", timeout=3)
    return {n["node_id"]: n for n in data["nodes"]}


async def test_four_nodes_share_one_broker_one_arbiter_and_print_each_copy_once(farm4: ProcessFarm) -> None:
    client = await farm4.client(timeout=60)
    try:
        await farm4.wait_ready(client, 4)
        brokers = {tuple(n.runtime()["broker"]) for n in farm4.nodes}  # type: ignore[index]
        assert len(brokers) == 1, brokers
        client.watch(client.topics.node_state_filter)
        states = await until(lambda: len(client.node_states()) == 4 and client.node_states(), 10, "node states",
                             farm4)
        assert sum(1 for s in states.values() if s["broker_host"]) == 1
        roles = await _roles(client)
        assert sum(1 for n in roles.values() if n.get("arbiter")) == 1
        await farm4.add_jobs(client, 8, copies=2, min_s=60, max_s=240)

        async def drained() -> bool:
            return (await farm4.summary(client))["unfinished"] == 0

        await until(drained, 90, "the queue to drain", farm4)
        summary = await farm4.summary(client)
        assert summary["completed"] == 16
        assert summary["lost"] == 0
        assert summary["double_starts"] == 0
        assert summary["starts"] == 16
        # Work was shared: more than one printer printed.
        printers = Counter(name for n in farm4.nodes for name in [n.node_id] * len(
            [line for line in n.journal.read_text().splitlines() if line]) if n.journal.exists())
        assert len(printers) >= 2
    finally:
        await client.close()


@pytest.mark.timeout(240)
async def test_killing_broker_host_and_arbiter_keeps_every_acknowledged_job(farm4: ProcessFarm) -> None:
    client = await farm4.client(timeout=60)
    try:
        await farm4.wait_ready(client, 4)
        client.watch(client.topics.node_state_filter)
        # Prints of 5-10 s at this time scale, so that the victim is mid-print when it dies.
        await farm4.add_jobs(client, 6, min_s=1000, max_s=2000)
        states = await until(lambda: [s for s in client.node_states().values()
                                      if s.get("arbiter") and s.get("broker_host") and s.get("job")], 20,
                             "a node that is arbiter and broker host, printing", farm4)
        victim = next(n for n in farm4.nodes if n.node_id == states[0]["node_id"])
        old_broker = client.address
        roles = await _roles(client)
        old_term = next(n for n in roles.values() if n.get("arbiter")).get("term") or 0
        farm4.kill(victim)
        await client.close()

        client = await farm4.client(timeout=30, exclude=old_broker)
        assert client.address != old_broker

        async def new_arbiter() -> Any:
            data = await client.request("node/list", timeout=2)  # NetqError: asked again by until()
            return data if data["arbiter"] != victim.node_id else None

        data = await until(new_arbiter, 30, "a new arbiter", farm4)
        assert data["term"] > old_term
        assert data["arbiter"] != victim.node_id

        # Every acknowledged job is still there.
        jobs = {(j["namespace"], j["id"]): j for j in await farm4.queue(client)}
        assert set(farm4.acknowledged) <= set(jobs)

        # The victim's started copy is orphaned (a print outlives its node), never handed to another printer.
        async def orphans_settled() -> list[dict[str, Any]] | None:
            q = await farm4.queue(client)
            held = [(j, c) for j in q for c in j["copies"] if c["node"] == victim.node_id
                    and c["state"] in ("claimed", "printing")]
            if held:
                return None
            return [{"job": j, "copy": c} for j in q for c in j["copies"] if c["state"] == "orphaned"]

        orphans = await until(orphans_settled, 20, "the victim's copies to be orphaned or requeued", farm4)
        assert all(o["copy"]["node"] == victim.node_id for o in orphans)
        # An operator who checked the dead printer puts its copy back in the queue.
        for o in orphans:
            await client.request("job/resolve", {"namespace": o["job"]["namespace"], "id": o["job"]["id"],
                                                 "copy": o["copy"]["index"], "outcome": "requeue"})

        async def drained() -> bool:
            return (await farm4.summary(client))["unfinished"] == 0

        await until(drained, 120, "the queue to drain after the failover", farm4)
        summary = await farm4.summary(client)
        assert summary["lost"] == 0 and summary["completed"] == 6
        # A requeued orphan is printed again by design (an operator said so); nothing else twice.
        assert summary["double_starts"] == len(orphans)
    finally:
        await client.close()
