"""Safety mode ``available``: the pure rules of shared.merge (owned terms, records, the three-way merge), and
when a node lets its records go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.consensus.consensus import Consensus
from node.consensus.replica import Replica
from node.link.base import LinkOptions, Message
from node.link.memory import MemoryBroker, MemoryLink
from shared import merge as M
from shared import protocol as P
from shared import security
from shared.models import CopyState, Member, StoredObject
from shared.settings import Settings
from shared.topics import Topics

SHA = "a" * 64


def _job(*copies: dict[str, Any], name: str = "j") -> dict[str, Any]:
    return {"id": "j1", "namespace": "default", "name": name, "sets": [{"file": "x.gcode", "sha256": SHA}],
            "count": len(copies), "copies": [{"index": i, **c} for i, c in enumerate(copies)]}


QUEUED: dict[str, Any] = {"state": "queued"}


def _printing(node: str, grant: list[int], attempts: int = 1) -> dict[str, Any]:
    return {"state": "printing", "node": node, "grant": grant, "attempts": attempts}


def _done(node: str, grant: list[int], attempts: int = 1) -> dict[str, Any]:
    return {"state": "done", "node": node, "grant": grant, "attempts": attempts}


def _rec(key: str, ancestor: Any, value: Any) -> M.MergeRecord:
    return M.MergeRecord(key=key, ancestor=ancestor, value=value)


def _copies(value: dict[str, Any] | None) -> list[dict[str, Any]]:
    assert value is not None
    return list(value["copies"])


# --- owned terms ---------------------------------------------------------------------------------------------
def test_owned_terms_are_unique_per_slot_and_increasing() -> None:
    members = [Member(node_id="n2", enrolled_at=2.0), Member(node_id="n1", enrolled_at=0.0),
               Member(node_id="n3", enrolled_at=2.0)]
    assert [M.term_slot(n, members) for n in ("n1", "n2", "n3")] == [0, 1, 2]
    assert M.term_slot("n9", members) is None
    assert M.next_owned_term(5, 1) == 101
    assert M.next_owned_term(100, 1) == 101
    assert M.next_owned_term(101, 1) == 201
    assert M.next_owned_term(0, 0) == 100


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=M.TERM_SLOTS - 1),
       st.integers(min_value=0, max_value=M.TERM_SLOTS - 1))
def test_two_slots_never_stand_for_one_term(term: int, a: int, b: int) -> None:
    ta, tb = M.next_owned_term(term, a), M.next_owned_term(term, b)
    assert ta > term and tb > term and ta % M.TERM_SLOTS == a
    assert (ta == tb) == (a == b)


# --- records -------------------------------------------------------------------------------------------------
def test_records_keep_the_first_ancestor_and_vanish_when_changed_back() -> None:
    recs = M.record_changes({}, {"k": {"v": 1}}, {"k": {"v": 2}})
    recs = M.record_changes(recs, {"k": {"v": 2}}, {"k": {"v": 3}})
    assert recs["k"].ancestor == {"v": 1} and recs["k"].value == {"v": 3}
    assert M.record_changes(recs, {"k": {"v": 3}}, {"k": {"v": 1}}) == {}
    assert M.record_changes({}, {"k": {"v": 1}}, {"k": {"v": 1}}) == {}  # no change, no record


# --- the three-way merge -------------------------------------------------------------------------------------
def test_a_job_only_one_side_has_is_kept() -> None:
    writes, events = M.merge_offer({}, [_rec("job/default/j1", None, _job(QUEUED))])
    assert writes == [("job/default/j1", _job(QUEUED))] and events == []


def test_a_change_only_their_side_made_is_taken_even_backwards() -> None:
    # Their side requeued a copy that was printing at the split: only they changed it, so theirs stands.
    ancestor = _job(_printing("n1", [3, 4]))
    theirs = _job({"state": "queued", "attempts": 1, "reason": "requeued"})
    writes, events = M.merge_offer({"job/default/j1": ancestor}, [_rec("job/default/j1", ancestor, theirs)])
    assert writes == [("job/default/j1", theirs)] and not events


def test_a_change_only_our_side_made_stays() -> None:
    ancestor = _job(QUEUED)
    mine = _job(_done("n2", [5, 2]))
    writes, events = M.merge_offer({"job/default/j1": mine}, [_rec("job/default/j1", ancestor, ancestor)])
    assert writes == [] and events == []


def test_most_advanced_copy_state_wins_without_conflict_when_one_side_started() -> None:
    ancestor = _job(QUEUED, QUEUED)
    mine = _job(_done("n2", [5, 2]), QUEUED)
    theirs = _job({"state": "claimed", "node": "n1", "grant": [7, 3]}, _printing("n1", [7, 4]))
    writes, events = M.merge_offer({"job/default/j1": mine}, [_rec("job/default/j1", ancestor, theirs)])
    (_, value), = writes
    copies = _copies(value)
    assert copies[0]["state"] == "done" and copies[0]["node"] == "n2" and not copies[0]["conflict"]
    assert copies[1]["state"] == "printing" and copies[1]["node"] == "n1"
    assert events == []


def test_a_copy_started_on_both_sides_is_kept_once_marked_and_reported() -> None:
    ancestor = _job(QUEUED)
    mine = _job(_printing("n2", [5, 2]))
    theirs = _job(_done("n1", [7, 3]))
    writes, events = M.merge_offer({"job/default/j1": mine}, [_rec("job/default/j1", ancestor, theirs)])
    (_, value), = writes
    copy = _copies(value)[0]
    assert copy["state"] == "done" and copy["node"] == "n1" and copy["conflict"] is True
    assert events == [{"event": "conflict", "namespace": "default", "job": "j1", "copy": 0, "node": "n1",
                       "nodes": ["n1", "n2"], "reason": events[0]["reason"]}]


def test_a_double_start_is_reported_even_when_one_side_requeued_it() -> None:
    ancestor = _job(QUEUED)
    mine = _job({"state": "queued", "attempts": 1, "reason": "print failed"})
    theirs = _job(_printing("n1", [7, 3]))
    _, events = M.merge_offer({"job/default/j1": mine}, [_rec("job/default/j1", ancestor, theirs)])
    assert [e["event"] for e in events] == ["conflict"]


def test_the_same_start_seen_from_both_sides_is_no_conflict() -> None:
    # Started before the split; one side saw it orphaned, the other finished it.
    ancestor = _job(_printing("n1", [3, 4]))
    mine = _job({**_printing("n1", [3, 4]), "state": "orphaned", "reason": "n1 is gone"})
    theirs = _job(_done("n1", [3, 4]))
    writes, events = M.merge_offer({"job/default/j1": mine}, [_rec("job/default/j1", ancestor, theirs)])
    assert _copies(writes[0][1])[0]["state"] == "done" and not _copies(writes[0][1])[0]["conflict"]
    assert events == []


def test_one_start_never_goes_back_whatever_the_records_ancestor_says() -> None:
    # The offering node's ancestor is from a side this arbiter never followed: at the job level it looks as if
    # only our side changed copy 0 (theirs equals the ancestor there), but ours is an older point of the same
    # start (grant and node). Found by the LAN tests (seed 204): the failed copy went back to printing.
    failed = {**_printing("n1", [4, 8]), "state": "failed", "finished_at": 9.0, "reason": "outcome unknown"}
    ancestor = _job(failed, QUEUED)
    theirs = _job(failed, _done("n3", [4, 12]))
    mine = _job(_printing("n1", [4, 8]), QUEUED)
    writes, events = M.merge_offer({"job/default/j1": mine}, [_rec("job/default/j1", ancestor, theirs)])
    copies = _copies(writes[0][1])
    assert copies[0]["state"] == "failed" and copies[0]["reason"] == "outcome unknown"
    assert copies[1]["state"] == "done" and events == []
    # Both ended: the later end (an operator's resolution) stands, with the conflict it cleared.
    conflicted = {**_done("n1", [4, 8]), "finished_at": 9.0, "conflict": True}
    resolved = {**failed, "finished_at": 20.0, "reason": "resolved by an operator", "conflict": False}
    writes, _ = M.merge_offer({"job/default/j1": _job(conflicted)},
                              [_rec("job/default/j1", _job(conflicted), _job(resolved))])
    (_, value), = writes
    got = _copies(value)[0]
    assert (got["state"], got["reason"], got["conflict"]) == ("failed", "resolved by an operator", False)
    writes, _ = M.merge_offer({"job/default/j1": _job(resolved)},
                              [_rec("job/default/j1", _job(QUEUED), _job(conflicted))])
    got = _copies(writes[0][1])[0] if writes else resolved  # ours is the later end: it stays
    assert (got["state"], got["reason"], got["conflict"]) == ("failed", "resolved by an operator", False)
    # The same end reported again later (a node reports what it knows after a merge) keeps the conflict.
    again = {**conflicted, "finished_at": 30.0, "conflict": False}
    writes, _ = M.merge_offer({"job/default/j1": _job(conflicted)},
                              [_rec("job/default/j1", _job(QUEUED), _job(again))])
    got = _copies(writes[0][1])[0]
    assert (got["state"], got["finished_at"], got["conflict"]) == ("done", 30.0, True)


def test_a_removal_wins_over_edits_and_a_conflict_is_never_cleared() -> None:
    ancestor = _job(QUEUED)
    writes, _ = M.merge_offer({"job/default/j1": None}, [_rec("job/default/j1", ancestor, _job(QUEUED, name="x"))])
    assert writes == []  # we removed it, they edited it: removed
    writes, _ = M.merge_offer({"job/default/j1": _job(QUEUED, name="y")}, [_rec("job/default/j1", ancestor, None)])
    assert writes == [("job/default/j1", None)]
    marked = _job({**_done("n1", [7, 3]), "conflict": True})
    writes, events = M.merge_offer({"job/default/j1": marked},
                                   [_rec("job/default/j1", ancestor, _job({**_done("n2", [5, 1]), "conflict": True}))])
    assert _copies(writes[0][1])[0]["conflict"] is True and events == []  # already reported on both sides


def test_a_retirement_on_either_side_stands() -> None:
    live = {"node_id": "n3", "weight": 1, "witness": False, "enrolled_at": 1.0, "retired_at": None}
    retired = {**live, "retired_at": 9.0}
    ancestor = {**live, "weight": 2}
    writes, _ = M.merge_offer({"member/n3": live}, [_rec("member/n3", ancestor, retired)])
    assert writes == [("member/n3", retired)]


copy_states = st.sampled_from([
    QUEUED, {"state": "claimed", "node": "n1", "grant": [7, 1]}, _printing("n1", [7, 2]), _done("n1", [7, 2]),
    _printing("n2", [5, 2]), _done("n2", [5, 2]), {"state": "cancelled"},
])


@given(copy_states, copy_states)
def test_merging_is_symmetric_in_outcome_state_and_never_hides_a_double_start(a: dict[str, Any],
                                                                              b: dict[str, Any]) -> None:
    ancestor = _job(QUEUED)
    ab, ev_ab = M.merge_offer({"job/default/j1": _job(a)}, [_rec("job/default/j1", ancestor, _job(b))])
    ba, ev_ba = M.merge_offer({"job/default/j1": _job(b)}, [_rec("job/default/j1", ancestor, _job(a))])
    state_ab = _copies(ab[0][1])[0] if ab else {**a, "index": 0}
    state_ba = _copies(ba[0][1])[0] if ba else {**b, "index": 0}
    assert CopyState(state_ab.get("state", "queued")) == CopyState(state_ba.get("state", "queued"))
    both_started = all(c.get("attempts", 0) > 0 and c.get("grant") is not None for c in (a, b)) \
        and a.get("grant") != b.get("grant")
    assert bool(ev_ab) == bool(ev_ba) == both_started


# --- records and merges, in the node ------------------------------------------------------------------------
KEY = security.new_farm_key()


def _follower(tmp_path: Path) -> Consensus:
    settings = Settings(node_id="n1", data_dir=str(tmp_path), farm={"safety": "available", "key": KEY})
    c = Consensus(settings, MemoryLink(MemoryBroker(), LinkOptions(client_id="n1")), Replica(tmp_path / "r.db"),
                  clock=lambda: 100.0)
    c.farm = "f1"
    changed = _job(_done("n1", [4, 8]))
    c._apply((4, 2), [StoredObject(key="job/default/j1", stamp=(4, 2), value=changed)], snapshot=False,
             partial=True)
    assert set(c.records) == {"job/default/j1"}
    return c


def _merged_snapshot(c: Consensus, *, partial: bool, seq: int, commit: int) -> Message:
    """The snapshot the arbiter of term 7 (n2) sends n1, sealed by n2 as it would be on the wire."""
    objects = list(c.state.objects.values())
    snap = P.Snapshot(farm="f1", term=7, seq=seq, commit=commit, objects=objects, partial=partial,
                      merged=["n1"])
    topic = Topics().to_node("n1")
    sealer = security.Sealer(security.parse_key(KEY), "n2", boot=1)
    return Message(topic=topic, payload=sealer.seal(topic, P.encode(snap)))


@pytest.mark.parametrize("partial", [False, True])
async def test_a_merge_settles_records_only_when_every_member_follows_its_arbiter(tmp_path: Path, partial: bool) -> None:
    """Records merged by an arbiter that some member does not follow stay, with their ancestors: the member it
    lacks may be the next arbiter, and must get them (found by the LAN tests, seed 204)."""
    c = _follower(tmp_path)
    c._on_direct(_merged_snapshot(c, partial=partial, seq=3, commit=2))
    assert set(c.records) == {"job/default/j1"}  # proposed, not committed: kept either way
    c._learn_commit(7, 3)
    assert bool(c.records) is partial
    assert bool(c.replica.hard_state().unconfirmed) is partial  # durably so
