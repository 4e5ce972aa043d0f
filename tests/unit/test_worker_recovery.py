"""A node that restarts holding a start its arbiter never got committed must not print it on its own word.

Found by the LAN chaos tests (seed 11): the arbiter granted a copy to its own node and proposed its start; it was
killed before a quorum held the start. Its replica said "printing, by me", and with no record of having called
the printer the restarted worker printed it at once. The next arbiter had the copy (rightly) as only granted, so
the node took the grant again and printed it a second time.
"""

from __future__ import annotations

from pathlib import Path

from node.consensus.replica import Replica
from node.worker.worker import ENDED, EndedCopy, WorkerState
from shared import protocol as P
from shared.models import CopyState, Job, JobCopy, JobSet, Member, Stamp, StoredObject, job_key, member_key
from tests.memfarm import MemFarm, gcode

FARM = "f0000000000000001"


def _seed_replica(node_dir: Path, copy: JobCopy, job_stamp: Stamp, applied: Stamp, sha: str) -> None:
    node_dir.mkdir(parents=True, exist_ok=True)
    replica = Replica(node_dir / "replica.db")
    members = [StoredObject(key=member_key(n), stamp=(4, 1), value=Member(node_id=n, weight=1).model_dump(
        mode="json")) for n in ("n1", "n2", "n3")]
    job = Job(id="j1", namespace="default", name="j1", count=1, copies=[copy],
              sets=[JobSet(file="j1.gcode", sha256=sha, holders=["n1", "n2"])])
    objects = [*members, StoredObject(key=job_key("default", "j1"), stamp=job_stamp, value=job.model_dump(mode="json"))]
    replica.apply(applied, objects, snapshot=True, base=(4, 1))
    replica.set_farm(FARM)
    replica.set_term(applied[0])
    replica.close()


async def test_a_restarted_node_prints_an_uncommitted_start_only_once_the_farm_confirms_it(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 3)
    sha = farm.add_file(gcode(30, "j1"))
    granted = JobCopy(index=0, state=CopyState.CLAIMED, node="n1", grant=(4, 8))
    started = granted.model_copy(update={"state": CopyState.PRINTING, "started_at": 1.0})
    # n1 proposed the start (4, 11) and was killed before anyone else held it; n2 and n3 hold up to (4, 9).
    _seed_replica(tmp_path / "n1", started, (4, 11), (4, 11), sha)
    _seed_replica(tmp_path / "n2", granted, (4, 8), (4, 9), sha)
    _seed_replica(tmp_path / "n3", granted, (4, 8), (4, 9), sha)
    n1, n2, n3 = farm.nodes
    try:
        await n1.start()  # alone: no quorum, so nothing it holds can be confirmed
        assert n1.worker is not None and n1.printer is not None
        await farm.wait_for(lambda: n1.worker.reason == "waiting for the farm to confirm the start", 5.0,
                            "n1 to wait for the farm before printing")
        assert n1.worker.state == WorkerState.FETCHING
        assert n1.printer.starts == []

        await n2.start()
        await n3.start()

        def done() -> bool:
            arbiter = farm.arbiter()
            job = arbiter.consensus.state.job(job_key("default", "j1")) if arbiter else None
            return job is not None and job.copies[0].state == CopyState.DONE

        await farm.wait_for(done, 20.0, "the copy to be printed")
        starts = [name for name in farm.starts() if name.startswith("j1-c0-")]
        assert len(starts) == 1, f"copy started {len(starts)} times: {starts}"
    finally:
        await farm.stop()


async def test_a_copy_brought_back_by_a_merge_is_reported_again_never_printed_twice(tmp_path: Path) -> None:
    """Safety mode ``available`` can bring back an older value of a copy: a side that never saw its end merges
    it as still printing (found by the LAN chaos tests, seed 204: the node printed it a second time). The node
    remembers the ends it reported, per grant, and reports that end again."""
    farm = MemFarm(tmp_path, 3)
    sha = farm.add_file(gcode(30, "j1"))
    started = JobCopy(index=0, state=CopyState.PRINTING, node="n1", grant=(4, 8), started_at=1.0, attempts=1)
    for n in ("n1", "n2", "n3"):
        _seed_replica(tmp_path / n, started, (4, 9), (4, 9), sha)
    replica = Replica(tmp_path / "n1" / "replica.db")
    reason = "the node restarted during this print and its outcome is unknown"
    replica.write(ENDED.of((EndedCopy(key=job_key("default", "j1"), copy_index=0, grant=(4, 8),
                                      outcome=P.Outcome.FAILED, reason=reason),)))
    replica.close()
    try:
        await farm.start()

        def copy() -> JobCopy | None:
            arbiter = farm.arbiter()
            job = arbiter.consensus.state.job(job_key("default", "j1")) if arbiter else None
            return job.copies[0] if job is not None else None

        await farm.wait_for(lambda: (c := copy()) is not None and c.state == CopyState.FAILED, 20.0,
                            "n1 to report the end it had reported before")
        c = copy()
        assert c is not None and c.reason == reason and c.grant == (4, 8)
        assert [name for name in farm.starts() if name.startswith("j1-c0-")] == []
    finally:
        await farm.stop()
