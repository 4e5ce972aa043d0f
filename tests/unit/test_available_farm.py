"""Safety mode ``available`` end to end over the in-memory broker: a split farm keeps printing on both sides,
and after the heal every acknowledged job is there, replicas agree, and a double start is reported.
The same split in ``quorum`` mode: the minority side gets no acknowledgement and starts nothing."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from node.consensus.consensus import Role
from node.link.base import LinkOptions, Message
from node.link.memory import MemoryLink
from shared.settings import SafetyMode
from tests.memfarm import MemFarm, MemNode, gcode


class SideClient:
    """A client on one side of a partition (the farm's own client sits with the other nodes' group)."""

    def __init__(self, farm: MemFarm, client_id: str) -> None:
        self.farm = farm
        self.link = MemoryLink(farm.broker, LinkOptions(client_id=client_id))
        self.responses: dict[str, dict[str, Any]] = {}
        self.link.subscribe("netq/response/#", self._on_response)

    def _on_response(self, msg: Message) -> None:
        body = json.loads(msg.payload)
        if "transaction" in body:
            self.responses[body["transaction"]] = body

    async def request(self, path: str, body: dict[str, Any], txn: str, timeout: float = 5.0) -> dict[str, Any] | None:
        """The response, or None if none came within ``timeout``."""
        self.link.publish(f"netq/request/{path}", json.dumps(dict(body, transaction=txn)).encode(), qos=1)
        try:
            return await self.farm.wait_for(lambda: self.responses.get(txn), timeout, f"{path} {txn}")  # type: ignore[no-any-return]
        except (TimeoutError, AssertionError):
            return None

    async def ok(self, path: str, body: dict[str, Any], txn: str) -> dict[str, Any]:
        """Retry (same transaction) until the farm answers ok: an arbiter may be changing."""
        for _ in range(10):
            r = await self.request(path, body, txn, timeout=2.0)
            if r is not None and r["status"] == "ok":
                return r
            self.responses.pop(txn, None)
        raise AssertionError(f"{path} {txn}: no ok answer")


def _farm(tmp_path: Path, safety: SafetyMode) -> MemFarm:
    farm = MemFarm(tmp_path, 3, time_scale=300)
    for node in farm.nodes:
        node.settings = node.settings.model_copy(
            update={"farm": node.settings.farm.model_copy(update={"safety": safety})})
    return farm


def _job(farm: MemFarm, tag: str, namespace: str = "default", seconds: float = 30) -> dict[str, Any]:
    sha = farm.add_file(gcode(seconds, tag))
    return {"namespace": namespace, "id": tag, "name": tag, "count": 1,
            "sets": [{"file": f"{tag}.gcode", "sha256": sha, "count": 1, "holders": ["n1", "n2", "n3"]}]}


def _serving(nodes: list[MemNode]) -> MemNode | None:
    return next((n for n in nodes if n.consensus.role == Role.ARBITER and n.consensus.serving), None)


def _live(node: MemNode) -> dict[str, Any]:
    return {k: o.value for k, o in node.consensus.state.objects.items() if o.value is not None}


def _copy(node: MemNode, key: str, index: int = 0) -> dict[str, Any] | None:
    job = node.consensus.state.get(key)
    return None if job is None else dict(job["copies"][index])


async def _split(farm: MemFarm, tmp_path: Path) -> tuple[SideClient, SideClient]:
    """A ready farm with job ``both`` queued in a paused queue, split {n1} | {n2, n3}."""
    await farm.start()
    await farm.ready(3)
    side_b = SideClient(farm, "client-b")
    side_a = SideClient(farm, "client-a")
    await side_a.link.start()
    await side_b.link.start()
    await side_b.ok("queue/pause", {"namespace": "shared"}, "pause")
    await side_b.ok("job/add", _job(farm, "both", "shared"), "add-both")
    await farm.wait_for(lambda: all("job/shared/both" in n.consensus.state.objects for n in farm.nodes), 5,
                        "every replica holds the shared job")
    farm.broker.partition({"n1", "client-a"}, {"n2", "n3", "client-b", "client"})
    return side_a, side_b


async def test_available_mode_both_sides_print_and_the_heal_reports_the_double_start(tmp_path: Path) -> None:
    farm = _farm(tmp_path, SafetyMode.AVAILABLE)
    try:
        side_a, side_b = await _split(farm, tmp_path)
        n1, n2, n3 = farm.nodes
        # Both sides elect (or keep) an arbiter: the lone n1 without a quorum, marked degraded.
        await farm.wait_for(lambda: _serving([n1]) and n1.consensus.degraded, 10, "n1 serving alone, degraded")
        await farm.wait_for(lambda: _serving([n2, n3]), 10, "an arbiter on the n2/n3 side")
        info = n1.arbiter.info()
        assert info["safety"] == "available" and "no quorum" in info["warning"]
        # Both sides acknowledge adds, and both print the shared job.
        ra = await side_a.ok("job/add", _job(farm, "a1"), "add-a1")
        rb = await side_b.ok("job/add", _job(farm, "b1"), "add-b1")
        assert ra["data"]["id"] == "a1" and rb["data"]["id"] == "b1"
        await side_a.ok("queue/resume", {"namespace": "shared"}, "resume-a")
        await side_b.ok("queue/resume", {"namespace": "shared"}, "resume-b")
        side_b_arbiter = _serving([n2, n3])
        assert side_b_arbiter is not None
        await farm.wait_for(lambda: (c := _copy(n1, "job/shared/both")) and c["state"] == "done", 15,
                            "n1 printed the shared job")
        await farm.wait_for(lambda: (a := _serving([n2, n3])) and (c := _copy(a, "job/shared/both"))
                            and c["state"] == "done", 15, "n2 or n3 printed the shared job")
        starts = Counter(farm.starts())
        assert sum(v for k, v in starts.items() if k.startswith("both")) == 2  # started on both sides

        farm.broker.heal()
        # One arbiter; the other side's records merged; every replica the same; the copy marked in conflict.
        await farm.wait_for(lambda: sum(1 for n in farm.nodes if n.consensus.role == Role.ARBITER) == 1
                            and all(not n.consensus.records for n in farm.nodes)
                            and _live(n1) == _live(n2) == _live(n3), 20, "the sides merged and converged")
        for node in farm.nodes:
            keys = set(_live(node))
            assert {"job/default/a1", "job/default/b1", "job/shared/both"} <= keys
            copy = _copy(node, "job/shared/both")
            assert copy is not None and copy["state"] == "done" and copy["conflict"] is True
        conflicts = [e for e in farm.events if e.get("event") == "conflict"]
        assert len(conflicts) == 1 and conflicts[0]["job"] == "both" and len(conflicts[0]["nodes"]) == 2
        # Nothing acknowledged is lost: both sides' jobs print, once each.
        arbiter = await farm.wait_for(lambda: farm.arbiter(), 10, "a serving arbiter")
        await farm.wait_for(lambda: all(j.done for j in arbiter.consensus.state.jobs()), 20, "all printed")
        starts = Counter(farm.starts())
        assert sum(v for k, v in starts.items() if k.startswith("a1")) == 1
        assert sum(v for k, v in starts.items() if k.startswith("b1")) == 1
        # `netq jobs` reads queue/list: the conflict is in the answer.
        farm.responses.clear()
        listing = await farm.request("queue/list", {"include_done": True}, "list")
        both = next(j for j in listing["data"]["jobs"] if j["id"] == "both")
        assert both["copies"][0]["conflict"] is True
        await side_a.link.stop()
        await side_b.link.stop()
    finally:
        await farm.stop()


async def test_quorum_mode_minority_side_gets_no_acknowledgement_and_starts_nothing(tmp_path: Path) -> None:
    farm = _farm(tmp_path, SafetyMode.QUORUM)
    try:
        side_a, side_b = await _split(farm, tmp_path)
        n1, n2, n3 = farm.nodes
        await farm.wait_for(lambda: _serving([n2, n3]) and not _serving([n1]), 10,
                            "an arbiter on the majority side only")
        started_by_n1 = len(n1.printer.starts) if n1.printer else 0
        ra = await side_a.request("job/add", _job(farm, "a1"), "add-a1", timeout=3.0)
        assert ra is None or ra["status"] == "error"
        rr = await side_a.request("queue/resume", {"namespace": "shared"}, "resume-a", timeout=2.0)
        assert rr is None or rr["status"] == "error"
        rb = await side_b.ok("job/add", _job(farm, "b1"), "add-b1")
        assert rb["status"] == "ok"
        await side_b.ok("queue/resume", {"namespace": "shared"}, "resume-b")
        await farm.wait_for(lambda: (a := _serving([n2, n3])) and all(j.done for j in a.consensus.state.jobs()),
                            15, "the majority side printed its jobs")
        assert n1.consensus.role != Role.ARBITER
        assert (len(n1.printer.starts) if n1.printer else 0) == started_by_n1
        farm.broker.heal()
        await farm.wait_for(lambda: _live(n1) == _live(n2) == _live(n3), 10, "n1 catches up")
        assert "job/default/a1" not in _live(n1)  # never acknowledged, never applied
        assert max(Counter(farm.starts()).values()) == 1
        assert not any(e.get("event") == "conflict" for e in farm.events)
        await side_a.link.stop()
        await side_b.link.stop()
    finally:
        await farm.stop()
