"""Pure claim logic: grant, start, finish, release, lease expiry, a node gone or back.

Each function takes the farm state (and ``now``) and returns the object writes the arbiter should commit,
plus events to report; none of them touches the network or the clock. The safety rule they keep: a copy is
started (``printing``) only from ``claimed`` by the node that holds the grant, so once a grant is released
its node can no longer get a start committed for it. A finish or release, too, is taken only from the node that
holds the copy under the grant it names; that the node named is the node that sent it is the protocol seal's
part (``node/consensus/consensus.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import RequestError
from shared.models import ACTIVE_COPY_STATES, Capabilities, CopyState, Job, JobCopy, Stamp, job_key
from shared.state import FarmState

Write = tuple[str, dict[str, Any] | None]


@dataclass
class Change:
    writes: list[Write] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Pick:
    namespace: str
    job: str
    copy_index: int


Chooser = Callable[[FarmState, str, Capabilities, Sequence[str], float], Pick | None]


def _put(job: Job, index: int, copy: JobCopy) -> Write:
    copies = list(job.copies)
    copies[index] = copy
    return (job_key(job.namespace, job.id), job.model_copy(update={"copies": copies}).model_dump(mode="json"))


def _event(kind: str, job: Job, copy: JobCopy, **extra: Any) -> dict[str, Any]:
    return {"event": kind, "namespace": job.namespace, "job": job.id, "copy": copy.index, "node": copy.node,
            **extra}


def _held(state: FarmState, node: str, namespace: str, job_id: str, index: int, grant: Stamp,
          allowed: set[CopyState]) -> tuple[Job, JobCopy]:
    job = state.job(job_key(namespace, job_id))
    if job is None or not 0 <= index < len(job.copies):  # a negative index would name another copy
        raise RequestError(f"no copy {index} of job {job_id!r} in {namespace!r}")
    copy = job.copies[index]
    if copy.node != node or copy.grant != grant or copy.state not in allowed:
        raise RequestError(
            f"copy {index} of {job_id!r} is {copy.state.value} for {copy.node} (grant {copy.grant}), "
            f"not held by {node} with grant {grant}"
        )
    return job, copy


def holding(state: FarmState, node: str) -> list[tuple[Job, JobCopy]]:
    """Copies claimed, printing or orphaned by ``node``."""
    out = []
    for job in state.held_jobs(node):
        for copy in job.copies:
            if copy.node == node and copy.state in ACTIVE_COPY_STATES:
                out.append((job, copy))
    return out


def grant(state: FarmState, node: str, caps: Capabilities, namespaces: Sequence[str], now: float,
          stamp: Stamp, choose: Chooser, start_if: Callable[[Job], bool] | None = None
          ) -> tuple[Change, Pick, bool] | None:
    """Give ``node`` one queued copy, chosen by ``choose``; ``stamp`` is the stamp the grant will carry.

    When ``start_if(job)`` holds (the node asked to start at once and already holds every file of the job) the
    grant is also the start: the copy goes straight to ``printing`` in the same committed change, which saves the
    node a round of asking. The fence is unchanged: the node calls its printer only once it sees that commit.
    The third item of the result says whether the grant started the copy."""
    if holding(state, node):
        return None  # one whole copy at a time
    pick = choose(state, node, caps, namespaces, now)
    if pick is None:
        return None
    job = state.job(job_key(pick.namespace, pick.job))
    if job is None or job.copies[pick.copy_index].state != CopyState.QUEUED:
        raise AssertionError(f"scheduler chose a copy that is not queued: {pick}")
    copy = job.copies[pick.copy_index].model_copy(
        update={"state": CopyState.CLAIMED, "node": node, "grant": stamp, "claimed_at": now, "reason": None}
    )
    events = [_event("claimed", job, copy)]
    started = start_if is not None and start_if(job)
    if started:
        copy = copy.model_copy(update={"state": CopyState.PRINTING, "started_at": now,
                                       "attempts": copy.attempts + 1})
        events.append(_event("started", job, copy))
    return Change([_put(job, copy.index, copy)], events), pick, started


def start(state: FarmState, node: str, namespace: str, job_id: str, index: int, grant_: Stamp,
          now: float) -> Change:
    """Commit the start of a claimed copy: only after this is committed may the node call its printer."""
    job, copy = _held(state, node, namespace, job_id, index, grant_, {CopyState.CLAIMED})
    copy = copy.model_copy(update={"state": CopyState.PRINTING, "started_at": now,
                                   "attempts": copy.attempts + 1})
    return Change([_put(job, index, copy)], [_event("started", job, copy)])


def finish(state: FarmState, node: str, namespace: str, job_id: str, index: int, grant_: Stamp,
           outcome: str, reason: str | None, now: float, max_attempts: int = 3) -> Change:
    job, copy = _held(state, node, namespace, job_id, index, grant_, {CopyState.PRINTING, CopyState.ORPHANED})
    if outcome == "done":
        new = copy.model_copy(update={"state": CopyState.DONE, "finished_at": now, "reason": None})
        return Change([_put(job, index, new)], [_event("finished", job, new)])
    if outcome == "requeue" and copy.attempts < max_attempts:
        new = JobCopy(index=index, attempts=copy.attempts, reason=reason)
        return Change([_put(job, index, new)], [_event("failed", job, copy, reason=reason, requeued=True)])
    new = copy.model_copy(update={"state": CopyState.FAILED, "finished_at": now, "reason": reason})
    return Change([_put(job, index, new)], [_event("failed", job, new, reason=reason, requeued=False)])


def release(state: FarmState, node: str, namespace: str, job_id: str, index: int, grant_: Stamp,
            reason: str) -> Change:
    """A claimed, never-started copy goes back to the queue (lease expired, node gone, node gave it back)."""
    job, copy = _held(state, node, namespace, job_id, index, grant_, {CopyState.CLAIMED})
    new = JobCopy(index=index, attempts=copy.attempts, reason=reason)
    return Change([_put(job, index, new)], [_event("released", job, copy, reason=reason)])


def node_gone(state: FarmState, node: str, now: float, reason: str | None = None) -> Change:
    """Claimed copies return to the queue; started ones become orphaned (a print outlives its node).

    ``reason`` (default "<node> is gone") is recorded on each copy."""
    reason = reason or f"{node} is gone"
    change = Change()
    for job, copy in holding(state, node):
        if copy.state == CopyState.CLAIMED:
            assert copy.grant is not None
            sub = release(state, node, job.namespace, job.id, copy.index, copy.grant, reason)
        elif copy.state == CopyState.PRINTING:
            new = copy.model_copy(update={"state": CopyState.ORPHANED, "reason": reason})
            sub = Change([_put(job, copy.index, new)], [_event("orphaned", job, new)])
        else:
            continue
        change.writes += sub.writes
        change.events += sub.events
        state = _peek(state, sub)
    return change


def node_back(state: FarmState, node: str, printing: tuple[str, str, int] | None) -> Change:
    """``node`` is back: an orphaned copy it says it is still printing returns to ``printing``."""
    change = Change()
    for job, copy in holding(state, node):
        if copy.state == CopyState.ORPHANED and printing == (job.namespace, job.id, copy.index):
            new = copy.model_copy(update={"state": CopyState.PRINTING, "reason": None})
            change.writes.append(_put(job, copy.index, new))
            change.events.append(_event("recovered", job, new))
    return change


def _peek(state: FarmState, change: Change) -> FarmState:
    """A copy of ``state`` with ``change`` applied (stamps irrelevant): for chained pure decisions."""
    from shared.models import StoredObject

    view = FarmState(state.objects.values())
    view.apply(StoredObject(key=k, stamp=(0, 0), value=v) for k, v in change.writes)
    return view
