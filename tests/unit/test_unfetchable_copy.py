"""A copy whose file cannot be fetched goes back to the queue with the reason instead of looping, and the
arbiter does not hand it straight back to the node that gave it back (node/arbiter/grant_backoff.py).

Found as: a job whose only holder was gone looped at ~80 log lines a second, the commit index climbing by
thousands and the arbiter at 69 % of a core; the job could not be removed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from node.arbiter.grant_backoff import GrantBackoff
from shared.errors import FileStoreError
from shared.models import CopyState
from tests.memfarm import MemFarm, gcode

pytestmark = pytest.mark.security

OBSERVE_S = 3.0  # a window over which a loop would show (it ran at one grant and release per ~0.2 s)


class LostFiles(MemFarm):
    """A memory farm where the files in ``lost`` cannot be fetched (their holders are gone or never had them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: set[str] = set()
        self.fetches: list[str] = []

    async def ensure_file(self, sha: str, holders: list[str], progress: Callable[[int, int | None], None]) -> Path:
        self.fetches.append(sha)
        if sha in self.lost or sha not in self.files:
            raise FileStoreError(f"no reachable holder of {sha[:12]} (holders: {', '.join(holders)})")
        return self.files[sha]


def _copy0(farm: MemFarm, job_id: str) -> Any:
    arb = farm.arbiter()
    job = arb.consensus.state.job(f"job/default/{job_id}") if arb else None
    return job.copies[0] if job else None


async def test_a_copy_its_holder_lost_fails_after_max_attempts_and_stops(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The holder named is a member, so the arbiter grants and starts the copy there at once (it "holds" the
    file); the printer is never called, the copy ends with requeue each time, and fails after
    ``farm.max_attempts`` with the reason. The other node, which is no holder, gives it back."""
    farm = LostFiles(tmp_path, 2)
    await farm.start()
    try:
        await farm.ready(2)
        sha = farm.add_file(gcode(30, "lost"))
        farm.lost.add(sha)  # its holder lost it after the job was acknowledged
        r = await farm.request("job/add", {"id": "lost", "sets": [{"file": "a.gcode", "sha256": sha,
                                                                   "holders": ["n1"]}]}, "t1")
        assert r["status"] == "ok", r
        await farm.wait_for(lambda: (c := _copy0(farm, "lost")) is not None and c.state == CopyState.FAILED,
                            15, "the copy failed")
        copy = _copy0(farm, "lost")
        assert "could not fetch a.gcode" in copy.reason and "3 tries" in copy.reason, copy.reason
        assert copy.attempts == 3 and not farm.starts()
        arb = farm.arbiter()
        assert arb is not None
        commit, fetches = arb.consensus.commit[1], len(farm.fetches)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            await asyncio.sleep(OBSERVE_S)  # an observation window, not a synchronisation
        assert arb.consensus.commit[1] - commit <= 1, "the copy is still granted in a loop"
        assert len(farm.fetches) == fetches
        loud = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("node.", "shared."))]
        assert len(loud) <= 2, [r.getMessage() for r in loud]

        # An operator settles it (or removes the job).
        r = await farm.request("job/resolve", {"id": "lost", "copy": 0, "outcome": "failed"}, "t2")
        assert r["status"] == "ok", r
        r = await farm.request("job/remove", {"id": "lost"}, "t3")
        assert r["status"] == "ok", r
        assert arb.consensus.state.job("job/default/lost") is None
    finally:
        await farm.stop()


async def test_a_job_whose_holder_is_no_node_is_refused_or_given_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``holders: ["n9"]`` (no such node): refused at submission with the reason, or acknowledged and then
    queued with the reason once the nodes gave it back, and kept from them; either way no loop, nothing
    printed, and the job can be removed."""
    farm = LostFiles(tmp_path, 2)
    await farm.start()
    try:
        await farm.ready(2)
        r = await farm.request("job/add", {"id": "n9", "sets": [{"file": "b.gcode", "sha256": "ab" * 32,
                                                                 "holders": ["n9"]}]}, "t1", timeout=15)
        if r["status"] == "error":
            assert "n9" in r["error"] or "hold" in r["error"], r
            return

        def given_back() -> bool:
            c = _copy0(farm, "n9")
            return c is not None and c.state == CopyState.QUEUED and "could not fetch b.gcode" in (c.reason or "")

        arb = farm.arbiter()
        assert arb is not None

        def kept_from_both() -> bool:
            assert arb is not None
            return all(("default", "n9", 0) in arb.arbiter.backoff.excluded(n, arb.arbiter.clock())
                       for n in ("n1", "n2"))

        # Each node tries (three times), gives it back, is given it again, gives it back again: then it is
        # kept from it for a while.
        await farm.wait_for(lambda: given_back() and kept_from_both(), 15, "both nodes kept from the copy")
        assert "3 tries" in _copy0(farm, "n9").reason
        commit, fetches = arb.consensus.commit[1], len(farm.fetches)
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            await asyncio.sleep(OBSERVE_S)  # an observation window, not a synchronisation
        assert arb.consensus.commit[1] - commit <= 2, "the copy is still granted and given back in a loop"
        assert len(farm.fetches) - fetches <= 3
        loud = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("node.", "shared."))]
        assert len(loud) <= 2, [r.getMessage() for r in loud]
        assert given_back() and not farm.starts()
        # A queued copy has nothing to resolve (a clear error, nothing changed); the job can be removed.
        r = await farm.request("job/resolve", {"id": "n9", "copy": 0, "outcome": "failed"}, "t2")
        assert r["status"] == "error" and "queued" in r["error"], r
        assert (await farm.request("job/remove", {"id": "n9"}, "t3"))["status"] == "ok"
        assert arb.consensus.state.job("job/default/n9") is None
    finally:
        await farm.stop()


async def test_a_copy_one_node_cannot_fetch_is_printed_by_another(tmp_path: Path) -> None:
    farm = LostFiles(tmp_path, 2, time_scale=300)
    await farm.start()
    try:
        await farm.ready(2)
        n1, n2 = (next(n for n in farm.nodes if n.node_id == i) for i in ("n1", "n2"))
        assert n1.worker is not None and n2.worker is not None and n2.printer is not None
        tries: list[str] = []

        async def unreachable(sha: str, holders: list[str], progress: Callable[[int, int | None], None]) -> Path:
            tries.append(sha)
            raise FileStoreError("holders unreachable from n1")

        n1.worker.ensure_file = unreachable
        # n1 is granted the copy first: n2's worker stops, and its standing request for work is dropped.
        await n2.worker.stop()
        arb = farm.arbiter()
        assert arb is not None
        await farm.wait_for(lambda: "n1" in arb.arbiter.waiting, 5, "n1 asking for work")
        arb.arbiter.waiting.pop("n2", None)
        sha = farm.add_file(gcode(5, "one"))
        r = await farm.request("job/add", {"id": "one", "sets": [{"file": "c.gcode", "sha256": sha,
                                                                  "holders": ["n2"]}]}, "t1", timeout=15)
        assert r["status"] == "ok", r
        await farm.wait_for(lambda: (c := _copy0(farm, "one")) is not None and c.state == CopyState.QUEUED
                            and "n1 could not fetch" in (c.reason or "")
                            and ("default", "one", 0) in arb.arbiter.backoff.excluded("n1", arb.arbiter.clock()),
                            10, "n1 gave the copy back twice, and is kept from it")
        await n2.worker.start()
        await farm.wait_for(lambda: (c := _copy0(farm, "one")) is not None and c.state == CopyState.DONE, 20,
                            "the copy printed")
        assert len(tries) == 6  # two grants of three tries each; then n1 was not given it again
        assert [s.split("-")[0] for s in farm.starts()] == ["one"] and len(n2.printer.starts) == 1
    finally:
        await farm.stop()


def test_backoff_is_per_copy_and_node_and_doubles_to_a_cap() -> None:
    b = GrantBackoff(base_s=10, cap_s=40)
    c, d = ("default", "j", 0), ("default", "j", 1)
    assert b.excluded("n1", 0) == frozenset()
    assert b.gave_back("n1", c, 0) == 0  # once: not kept (an operator's release, a printer back at once)
    assert b.excluded("n1", 0) == frozenset()
    assert b.gave_back("n1", c, 1) == 11  # twice in a row: kept 10 s
    assert b.excluded("n1", 5) == {c} and b.excluded("n2", 5) == frozenset()
    assert b.excluded("n1", 11) == frozenset()
    assert b.gave_back("n1", c, 11) == 31  # 20 s
    assert b.gave_back("n1", c, 31) == 71  # 40 s
    assert b.gave_back("n1", c, 71) == 111  # capped at 40 s
    b.gave_back("n1", d, 71)
    b.gave_back("n1", d, 72)
    assert b.excluded("n1", 75) == {c, d}
    assert b.gave_back("n1", c, 500) == 500  # long after: starts over
    assert b.excluded("n1", 1000) == frozenset()
