"""``node/retire`` end to end over the in-memory broker: what happens to the retired node's copies, to the
quorums, and to a retired node that keeps running."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared import protocol as P
from shared.models import CopyState, JobCopy, job_key
from shared.settings import WorkerSettings
from tests.memfarm import FAST, MemFarm, MemNode, gcode

LONG_LEASE = FAST.model_copy(update={"lease_s": 60.0})


def _job(farm: MemFarm, seconds: float, tag: str) -> dict[str, object]:
    sha = farm.add_file(gcode(seconds, tag))
    return {"namespace": "default", "sets": [{"file": f"{tag}.gcode", "sha256": sha, "holders": ["n1"]}]}


def _no_jobs_for(node: MemNode) -> None:
    """``node`` (the farm's first, so its arbiter) takes no work: the copies go to the members we retire."""
    node.settings = node.settings.model_copy(update={"worker": WorkerSettings(accept_jobs=False)})


def _copy(farm: MemFarm, job_id: str) -> Callable[[], JobCopy | None]:
    def get() -> JobCopy | None:
        arbiter = farm.arbiter()
        job = arbiter.consensus.state.job(job_key("default", job_id)) if arbiter else None
        return job.copies[0] if job else None

    return get


async def test_a_claimed_copy_goes_back_to_the_queue_and_the_retired_node_cannot_rejoin(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="node.arbiter.services")
    farm = MemFarm(tmp_path, 3, timing=LONG_LEASE)
    _no_jobs_for(farm.nodes[0])
    fetched = asyncio.Event()  # until set, a granted copy stays claimed: its files never arrive
    ensure = farm.ensure_file

    async def slow_fetch(sha: str, holders: list[str], progress: Any) -> Path:
        await fetched.wait()
        return await ensure(sha, holders, progress)

    farm.ensure_file = slow_fetch  # type: ignore[method-assign]
    await farm.start()
    try:
        arbiter = await farm.ready(3)
        r = await farm.request("job/add", _job(farm, 30, "claimed"), "add")
        assert r["status"] == "ok", r
        job_id = r["data"]["id"]
        copy = _copy(farm, job_id)
        held = await farm.wait_for(lambda: (c := copy()) and c.state == CopyState.CLAIMED and c, 10, "a claim")
        victim, other = held.node, ({"n2", "n3"} - {held.node}).pop()

        r = await farm.request("node/retire", {"node": victim}, "retire")
        assert r["status"] == "ok", r
        assert r["data"] == {"node": victim, "members": sorted(["n1", other]), "orphaned": [],
                             "released": [{"namespace": "default", "job": job_id, "copy": 0}]}
        assert set(arbiter.consensus.members) == {"n1", other}
        after = copy()
        assert after is not None and after.node != victim  # back in the queue, or already claimed by the other
        released = [e for e in farm.events if e["event"] == "released"]
        assert released and released[0]["reason"] == f"{victim} was retired"
        assert any(e["event"] == "retired" and e["node"] == victim for e in farm.events)

        # The other printer gets the copy, and prints it once; the retired one never starts it.
        await farm.wait_for(lambda: (c := copy()) and c.node == other, 10, f"the copy claimed by {other}")
        fetched.set()
        await farm.wait_for(lambda: (c := copy()) and c.state == CopyState.DONE, 20, "the copy printed")
        assert len(farm.starts()) == 1
        by_node = {n.node_id: len(n.printer.starts) for n in farm.nodes if n.printer}
        assert by_node[victim] == 0 and by_node[other] == 1

        # Still running, the retired node knows it and does not ask to join; its worker says why it idles.
        retired_node = next(n for n in farm.nodes if n.node_id == victim)
        assert retired_node.worker is not None
        await farm.wait_for(lambda: "retired from the farm" in (retired_node.worker.reason or ""), 10,
                            "the retired node's worker to say it was retired")

        # A join from that id (an older node, or a copy of its data directory) is refused each time, said once.
        def refusals() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage().startswith(f"not enrolling {victim}")]

        for _ in range(2):
            retired_node.consensus.send_to_arbiter(P.Join(node=victim, witness=False))
        await farm.wait_for(lambda: len(refusals()) >= 2, 10, "two join requests of the retired node refused")
        assert [r.levelno for r in refusals()].count(logging.WARNING) == 1
        assert victim not in arbiter.consensus.members and victim in arbiter.consensus.state.retired()
        assert all(victim not in n.consensus.members for n in farm.nodes)

        r = await farm.request("node/retire", {"node": victim}, "again")
        assert r["status"] == "error" and r["error"] == f"{victim} is already retired"
    finally:
        await farm.stop()


async def test_a_copy_printing_on_a_retired_node_is_orphaned_and_never_printed_again(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3)
    _no_jobs_for(farm.nodes[0])
    await farm.start()
    try:
        arbiter = await farm.ready(3)
        r = await farm.request("job/add", _job(farm, 600, "long"), "add")  # 6 s at the farm's time scale
        assert r["status"] == "ok", r
        job_id = r["data"]["id"]
        copy = _copy(farm, job_id)
        printing = await farm.wait_for(lambda: (c := copy()) and c.state == CopyState.PRINTING and c, 10,
                                       "a print")
        r = await farm.request("node/retire", {"node": printing.node}, "retire")
        assert r["status"] == "ok", r
        assert r["data"]["orphaned"] == [{"namespace": "default", "job": job_id, "copy": 0}]
        orphaned = copy()
        assert orphaned is not None and orphaned.state == CopyState.ORPHANED and orphaned.node == printing.node
        assert orphaned.reason == f"{printing.node} was retired"
        # Longer than node_timeout_s: no timeout hands a started copy to another printer.
        await asyncio.sleep(3 * FAST.node_timeout_s)
        still = copy()
        assert still is not None and still.state == CopyState.ORPHANED and len(farm.starts()) == 1
        # The retired node, still running, finishes its print and reports it: nothing is lost.
        await farm.wait_for(lambda: (c := copy()) and c.state == CopyState.DONE, 20, "the print's finish")
        assert farm.starts() == [farm.starts()[0]]
        assert printing.node not in arbiter.consensus.members
    finally:
        await farm.stop()


async def test_after_a_retirement_the_remaining_members_make_the_quorum(tmp_path: Path) -> None:
    """Four members need three for a quorum. Once n4 is retired, n1 and n2 commit alone (2 of 3) with n3 and n4
    both down, which they could not do as 2 of the 4."""
    farm = MemFarm(tmp_path, 4)
    await farm.start()
    try:
        arbiter = await farm.ready(4)
        assert arbiter.node_id == "n1"
        r = await farm.request("node/retire", {"node": "n4"}, "retire")
        assert r["status"] == "ok", r
        await farm.nodes[3].stop(crash=True)
        await farm.nodes[2].stop(crash=True)
        r = await farm.request("job/add", _job(farm, 30, "after"), "add", timeout=10)
        assert r["status"] == "ok", r
        assert farm.arbiter() is arbiter and set(arbiter.consensus.members) == {"n1", "n2", "n3"}
        n2 = farm.nodes[1]
        assert n2.consensus.state.job(job_key("default", r["data"]["id"])) is not None  # held by the quorum
    finally:
        await farm.stop()


async def test_refused_retirements_change_nothing(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3)
    await farm.start()
    try:
        arbiter = await farm.ready(3)
        assert arbiter.node_id == "n1"
        before = dict(arbiter.consensus.state.objects)
        r = await farm.request("node/retire", {"node": "n9"}, "unknown")
        assert r["status"] == "error" and r["error"] == "no member 'n9' in this farm; members: n1, n2, n3"
        r = await farm.request("node/retire", {"node": "n1"}, "arbiter")
        assert r["status"] == "error" and "n1 is the arbiter" in r["error"]
        r = await farm.request("node/retire", {"nod": "n2"}, "typo")
        assert r["status"] == "error" and "invalid request" in r["error"]
        # With n3 down, retiring n2 would leave {n1, n3}, which needs n3: the change could never commit.
        await farm.nodes[2].stop(crash=True)
        await farm.wait_for(lambda: "n3" in arbiter.arbiter.gone, 10, "the arbiter to notice n3 is gone")
        r = await farm.request("node/retire", {"node": "n2"}, "unsafe")
        assert r["status"] == "error" and "n3 is unreachable" in r["error"], r
        assert arbiter.consensus.state.objects == before
        assert not any(e["event"] == "retired" for e in farm.events)
    finally:
        await farm.stop()
