"""Safety mode ``available``: the pure rules for working without a quorum and merging the sides after a heal.

* **Owned terms.** In ``available`` mode a node stands only for terms it owns (``term % TERM_SLOTS`` is its
  slot), so two sides of a partition can never elect two arbiters of one term: stamps stay unique, and a term's
  entries are one arbiter's log.
* **Records.** While its arbiter does not hear every enrolled member follow it (an entry marked ``partial``),
  a node keeps, for every object such an entry changed, a :class:`MergeRecord`: the value before the first such
  change (the *ancestor*) and the value now. These are the changes another side may not have.
* **The three-way merge.** After a heal a node offers its records to the arbiter it now hears; the arbiter
  merges each record into its own state with :func:`merge_offer`: an object only one side changed takes that
  side's value; an object both sides changed is merged by :func:`merge_values` (per job copy the most advanced
  state wins; a copy both sides started is kept once, marked ``conflict``, and reported by a ``conflict``
  event — never hidden).

No I/O here: the node (``node/consensus/consensus.py``) carries the decisions out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import StringConstraints

from shared.models import RESOLVED_BY_OPERATOR, CopyState, Job, JobCopy, Member, Model

TERM_SLOTS = 100
"""Terms are owned by slot in ``available`` mode: node of slot ``k`` stands only for terms ``t`` with
``t % TERM_SLOTS == k``. More members than slots: the ones beyond never stand (logged), they still vote."""

Value = dict[str, Any] | None


class MergeRecord(Model):
    """One object changed while the farm was split: its value before the first such change, and now."""

    key: Annotated[str, StringConstraints(max_length=300)]
    ancestor: dict[str, Any] | None
    value: dict[str, Any] | None


# --- owned terms ---------------------------------------------------------------------------------------------
def term_slot(node: str, members: Iterable[Member]) -> int | None:
    """The node's slot: its position among every member record (retired ones included) in order of
    enrollment. Enrollment only appends, so both sides of a split agree on the slots they both know."""
    order = sorted(members, key=lambda m: (m.enrolled_at, m.node_id))
    for i, m in enumerate(order):
        if m.node_id == node:
            return i if i < TERM_SLOTS else None
    return None


def next_owned_term(term: int, slot: int) -> int:
    """The smallest term above ``term`` that ``slot`` owns."""
    t = (term // TERM_SLOTS) * TERM_SLOTS + slot
    return t if t > term else t + TERM_SLOTS


# --- records -------------------------------------------------------------------------------------------------
def record_changes(records: Mapping[str, MergeRecord], before: Mapping[str, Value],
                   after: Mapping[str, Value]) -> dict[str, MergeRecord]:
    """``records`` updated for the objects whose value went from ``before[key]`` to ``after[key]``.

    The first change of a key keeps its old value as the ancestor; a key changed back to its ancestor needs no
    record any more."""
    out = dict(records)
    for key, new in after.items():
        have = out.get(key)
        ancestor = have.ancestor if have is not None else before.get(key)
        if have is None and new == ancestor:
            continue
        if new == ancestor:
            out.pop(key, None)
        else:
            out[key] = MergeRecord(key=key, ancestor=ancestor, value=new)
    return out


# --- the merge -----------------------------------------------------------------------------------------------
_RANK = {
    CopyState.QUEUED: 0, CopyState.CLAIMED: 1, CopyState.PRINTING: 2, CopyState.ORPHANED: 2,
    CopyState.FAILED: 3, CopyState.DONE: 4, CopyState.CANCELLED: 5,
}
_STARTED = frozenset({CopyState.PRINTING, CopyState.ORPHANED, CopyState.DONE, CopyState.FAILED})


def _started_since(copy: JobCopy, ancestor: JobCopy | None) -> bool:
    """Started on this side since the split: a start counts an attempt (``claims.start``)."""
    base = ancestor.attempts if ancestor is not None else 0
    return copy.attempts > base or (copy.state in _STARTED and (ancestor is None or ancestor.grant != copy.grant))


def _same_start(a: JobCopy, b: JobCopy) -> bool:
    return a.grant is not None and a.grant == b.grant and a.node == b.node


def _later_of_one_start(a: JobCopy, b: JobCopy) -> JobCopy | None:
    """Two values of one start (same grant, same node) at different points of its life: the later one.

    A start only moves forward (claimed, printing or orphaned, then an end; an operator's resolution ends it
    again, later), so whatever the ancestor says, neither side may take the other back. The ancestor of a record
    is the value its node had when its own side's changes began, which the other side need not share: a node
    that has followed arbiters of two sides offers an ancestor from the second one. Found by the LAN tests: an
    arbiter that had been cut off since before a copy's failure was reported took the copy's older, printing
    value back, and its node printed it again.

    Of two ends, the later one (an operator's resolution, or the same end reported again). A reported conflict
    stays, unless the later value is an operator's resolution, which cleared it."""
    if not _same_start(a, b):
        return None
    if a.finished_at is not None and b.finished_at is not None and a.finished_at != b.finished_at:
        later = a if a.finished_at > b.finished_at else b
    elif _RANK[a.state] != _RANK[b.state]:
        later = a if _RANK[a.state] > _RANK[b.state] else b
    else:
        return None
    if later.reason == RESOLVED_BY_OPERATOR:
        return later
    return later.model_copy(update={"conflict": a.conflict or b.conflict})


def merge_copy(mine: JobCopy, theirs: JobCopy, ancestor: JobCopy | None) -> tuple[JobCopy, list[str] | None]:
    """One copy both sides changed: the most advanced state wins (``mine`` on a tie). Returns the copy and,
    when both sides started it under different grants, the nodes that started it (a double start)."""
    if mine == theirs:
        return mine, None
    later = _later_of_one_start(mine, theirs)
    if later is not None:
        return later, None
    if ancestor is not None and mine == ancestor:
        return theirs, None
    if ancestor is not None and theirs == ancestor:
        return mine, None
    keep = theirs if _RANK[theirs.state] > _RANK[mine.state] else mine
    update: dict[str, Any] = {"attempts": max(mine.attempts, theirs.attempts),
                              "conflict": mine.conflict or theirs.conflict}
    doubled = None
    if _started_since(mine, ancestor) and _started_since(theirs, ancestor) and not _same_start(mine, theirs):
        update["conflict"] = True
        doubled = sorted({n for n in (mine.node, theirs.node) if n is not None})
    return keep.model_copy(update=update), doubled


def merge_job(mine: Value, theirs: Value, ancestor: Value) -> tuple[Value, list[dict[str, Any]]]:
    """A job both sides changed. A removal (tombstone) wins over edits; otherwise ``mine``'s fields with the
    copies merged one by one. Events: one ``conflict`` per copy both sides started."""
    if mine is None or theirs is None:
        return None, []
    a = Job.model_validate(mine, strict=False)
    b = Job.model_validate(theirs, strict=False)
    anc = Job.model_validate(ancestor, strict=False) if ancestor is not None else None
    anc_copies = {c.index: c for c in anc.copies} if anc is not None else {}
    theirs_copies = {c.index: c for c in b.copies}
    copies: list[JobCopy] = []
    events: list[dict[str, Any]] = []
    for copy in a.copies:
        other = theirs_copies.pop(copy.index, None)
        if other is None:
            copies.append(copy)
            continue
        merged, doubled = merge_copy(copy, other, anc_copies.get(copy.index))
        copies.append(merged)
        if doubled is not None and not (copy.conflict and other.conflict):
            events.append({"event": "conflict", "namespace": a.namespace, "job": a.id, "copy": copy.index,
                           "node": merged.node, "nodes": doubled,
                           "reason": "started on both sides of a partition (safety mode available)"})
    copies.extend(theirs_copies.values())
    copies.sort(key=lambda c: c.index)
    return a.model_copy(update={"copies": copies}).model_dump(mode="json"), events


def merge_values(key: str, mine: Value, theirs: Value, ancestor: Value) -> tuple[Value, list[dict[str, Any]]]:
    """An object both sides changed since ``ancestor``."""
    if key.startswith("job/"):
        return merge_job(mine, theirs, ancestor)
    if key.startswith("member/") and mine is not None and theirs is not None:
        # A retirement on either side stands: the node must not be enrolled again.
        return (theirs if theirs.get("retired_at") is not None and mine.get("retired_at") is None else mine), []
    return (mine if mine is not None else theirs), []


def merge_record(mine: Value, record: MergeRecord) -> tuple[bool, Value, list[dict[str, Any]]]:
    """Merge one offered record into our value ``mine``: (changed, new value, events)."""
    theirs, ancestor = record.value, record.ancestor
    if theirs == mine or theirs == ancestor:
        return False, mine, []  # nothing new from their side
    if mine == ancestor:
        return True, theirs, []  # only their side changed it
    merged, events = merge_values(record.key, mine, theirs, ancestor)
    return merged != mine, merged, events


def merge_offer(objects: Mapping[str, Value], records: Iterable[MergeRecord]
                ) -> tuple[list[tuple[str, Value]], list[dict[str, Any]]]:
    """Merge a node's offered records into ``objects`` (key -> value): the writes to commit, and the events."""
    writes: list[tuple[str, Value]] = []
    events: list[dict[str, Any]] = []
    for rec in records:
        changed, value, evs = merge_record(objects.get(rec.key), rec)
        if changed:
            writes.append((rec.key, value))
        events += evs
    return writes, events
