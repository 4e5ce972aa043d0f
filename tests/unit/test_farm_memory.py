"""The protocol end to end over the in-memory broker: election, enrollment, commit, grants, failover."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

from tests.memfarm import MemFarm, gcode


def _job(farm: MemFarm, seconds: float = 30, count: int = 1, sets: int = 1, **kw: object) -> dict[str, object]:
    out = []
    for i in range(sets):
        sha = farm.add_file(gcode(seconds, f"set{i}"))
        out.append({"file": f"part{i}.gcode", "sha256": sha, "count": 1, "holders": ["n1"]})
    return {"namespace": "default", "sets": out, "count": count, **kw}


async def test_three_nodes_elect_one_arbiter_and_enroll_all(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3)
    await farm.start()
    try:
        await farm.ready(3)
        arbiters = [n for n in farm.nodes if n.consensus.role.value == "arbiter"]
        assert len(arbiters) == 1
        assert {n.consensus.farm for n in farm.nodes} == {arbiters[0].consensus.farm}
    finally:
        await farm.stop()


async def test_jobs_are_printed_once_each_and_acknowledged_after_commit(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3, time_scale=300)
    await farm.start()
    try:
        await farm.ready(3)
        for i in range(6):
            r = await farm.request("job/add", _job(farm, count=2), f"t{i}")
            assert r["status"] == "ok", r
        arb = farm.arbiter()
        assert arb is not None
        # acknowledged means held by a quorum: at least two replicas have every job
        holders = sum(1 for n in farm.nodes if len(n.consensus.state.jobs()) == 6)
        assert holders >= 2
        await farm.wait_for(lambda: all(j.done for j in arb.consensus.state.jobs()), 30, "all copies done")
        names = farm.starts()
        assert len(names) == 12
        assert max(Counter(names).values()) == 1
    finally:
        await farm.stop()


async def test_retried_transaction_is_applied_once(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3)
    await farm.start()
    try:
        await farm.ready(3)
        body = _job(farm, seconds=3600)
        first = await farm.request("job/add", body, "same")
        farm.responses.clear()
        again = await farm.request("job/add", body, "same")
        assert first["data"] == again["data"]
        arb = farm.arbiter()
        assert arb is not None and len(arb.consensus.state.jobs()) == 1
    finally:
        await farm.stop()


async def test_bad_requests_get_errors_and_change_nothing(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 1)
    await farm.start()
    try:
        await farm.ready(1)
        arb = farm.arbiter()
        assert arb is not None
        before = dict(arb.consensus.state.objects)
        r = await farm.request("job/add", {"namespace": "default", "sets": [], "count": 1}, "e1")
        assert r["status"] == "error" and "sets" in r["error"] and r["data"] == {}
        r = await farm.request("job/add", {"sets": [{"file": "x", "sha256": "zz"}], "count": "2"}, "e2")
        assert r["status"] == "error"
        r = await farm.request("job/frobnicate", {}, "e3")
        assert r["status"] == "error" and "unknown request" in r["error"]
        r = await farm.request("job/add", {**_job(farm), "namespace": "../etc"}, "e4")
        assert r["status"] == "error"
        assert arb.consensus.state.objects == before
    finally:
        await farm.stop()


async def test_arbiter_crash_elects_new_arbiter_and_keeps_acknowledged_jobs(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3, time_scale=200)
    await farm.start()
    try:
        await farm.ready(3)
        ids = []
        for i in range(5):
            r = await farm.request("job/add", _job(farm, seconds=3600 * 4), f"a{i}")
            assert r["status"] == "ok"
            ids.append(r["data"]["id"])
        old = farm.arbiter()
        assert old is not None
        old_term = old.consensus.term
        await old.stop(crash=True)
        new = await farm.wait_for(lambda: farm.arbiter(), 10, "a new arbiter")
        assert new is not old and new.consensus.term > old_term
        assert {j.id for j in new.consensus.state.jobs()} == set(ids)
        # Copies that were printing on the dead node are orphaned, not handed out again.
        await farm.wait_for(lambda: any(c.state.value == "orphaned" for j in new.consensus.state.jobs()
                                        for c in j.copies) or not any(
            c.node == old.node_id for j in new.consensus.state.jobs() for c in j.copies), 10, "orphans")
        names = farm.starts()
        assert max(Counter(names).values()) == 1
    finally:
        await farm.stop()


async def test_a_member_whose_link_is_up_but_deaf_reconnects_and_catches_up(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3, time_scale=200)
    await farm.start()
    try:
        await farm.ready(3)
        arbiter = farm.arbiter()
        assert arbiter is not None
        deaf = next(n for n in farm.nodes if n is not arbiter)
        # Every delivery to it is lost while its connection stays up, until the node reconnects.
        stop_dropping = farm.broker.drop(lambda d: d.receiver == deaf.node_id)
        reconnects: list[float] = []

        def reconnect() -> None:
            reconnects.append(asyncio.get_running_loop().time())
            stop_dropping()
            farm.broker.disconnect(deaf.node_id, will=False)

        deaf.consensus.on_deaf.append(reconnect)
        r = await farm.request("job/add", _job(farm, seconds=3600), "deaf-1")
        assert r["status"] == "ok"
        job_key = f"job/default/{r['data']['id']}"
        assert deaf.link.connected and job_key not in deaf.consensus.state.objects
        await farm.wait_for(lambda: job_key in deaf.consensus.state.objects, 10,
                            "the deaf member to reconnect and receive the job")
        assert len(reconnects) == 1
    finally:
        await farm.stop()


async def test_a_member_past_the_arbiters_term_gets_it_to_step_down_and_follows_again(tmp_path: Path) -> None:
    """A member whose term is past the serving arbiter's (it stood alone in safety mode available, or voted in
    an election the arbiter never saw) tells that arbiter, which steps down; an election past that term follows
    and the member follows the new arbiter. Ignored, as before, it followed no one: its pre-votes are refused
    while the others hear an arbiter."""
    farm = MemFarm(tmp_path, 3)
    await farm.start()
    try:
        arb = await farm.ready(3)
        old_term = arb.consensus.term
        member = next(n for n in farm.nodes if n is not arb)
        member.consensus.term = old_term + 50  # as if it had stood alone for that term
        member.consensus.replica.set_term(old_term + 50)
        new = await farm.wait_for(lambda: (a := farm.arbiter()) and a.consensus.term > old_term + 50 and a, 15,
                                  "an arbiter past the member's term")
        await farm.wait_for(lambda: member.consensus.applied[0] == new.consensus.term, 10,
                            "the member following the new arbiter")
    finally:
        await farm.stop()
