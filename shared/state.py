"""The replicated farm state as a pure value: objects with stamps, and the rules that read and merge them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from shared.models import (
    ACTIVE_COPY_STATES,
    ZERO_STAMP,
    CopyState,
    Job,
    Member,
    QueueSettings,
    Stamp,
    StoredObject,
    member_key,
)

MEMBER_WEIGHT = 1
"""Every member's vote weight (printer or witness): the arbiter enrolls with it (shared.membership)."""


def _queue_order(job: Job) -> tuple[str, float, float, str]:
    return (job.namespace, job.rank, job.created, job.id)


def _clamped(member: Member) -> Member:
    """A member record as it counts. No honest arbiter ever enrolled a weight above MEMBER_WEIGHT; one that a
    forged ``join`` got committed before joins stopped carrying a weight (one such join with weight 10 stopped
    a farm for good) counts as MEMBER_WEIGHT, so a replica that stored it is not stuck."""
    if member.weight > MEMBER_WEIGHT:
        return member.model_copy(update={"weight": MEMBER_WEIGHT})
    return member


class FarmState:
    """Objects by key, plus parsed caches. Mutated only through :meth:`apply` / :meth:`replace`.

    The arbiter reads the queue after every commit (to hand out work), so the queue order, the jobs with a queued
    copy and each node's held jobs are kept as indexes, updated per written job, rather than found by a scan."""

    def __init__(self, objects: Iterable[StoredObject] = ()) -> None:
        self.objects: dict[str, StoredObject] = {}
        self._jobs: dict[str, Job] = {}
        self._members: dict[str, Member] = {}  # every member record, retired ones included
        self._order: list[Job] | None = None  # every job in queue order; None once a job changed
        self._queued: set[str] = set()  # keys of jobs with a queued copy
        self._held: dict[str, set[str]] = {}  # node -> keys of jobs with a copy it claimed, prints or orphaned
        self.replace(objects)

    # --- mutation ----------------------------------------------------------------------------------------
    def replace(self, objects: Iterable[StoredObject]) -> None:
        self.objects = {}
        self._jobs = {}
        self._members = {}
        self._order = None
        self._queued = set()
        self._held = {}
        self.apply(objects)

    def apply(self, writes: Iterable[StoredObject]) -> None:
        for obj in writes:
            self.objects[obj.key] = obj
            if obj.key.startswith("job/"):
                self._unindex(obj.key)
                if obj.value is None:
                    self._jobs.pop(obj.key, None)
                else:
                    self._jobs[obj.key] = Job.model_validate(obj.value, strict=False)
                    self._index(obj.key)
            elif obj.key.startswith("member/"):
                if obj.value is None:
                    self._members.pop(obj.key, None)
                else:
                    self._members[obj.key] = _clamped(Member.model_validate(obj.value, strict=False))

    def _unindex(self, key: str) -> None:
        old = self._jobs.get(key)
        self._order = None
        self._queued.discard(key)
        if old is None:
            return
        for copy in old.copies:
            if copy.node is not None and copy.state in ACTIVE_COPY_STATES:
                held = self._held.get(copy.node)
                if held is not None:
                    held.discard(key)
                    if not held:
                        del self._held[copy.node]

    def _index(self, key: str) -> None:
        for copy in self._jobs[key].copies:
            if copy.state == CopyState.QUEUED:
                self._queued.add(key)
            elif copy.node is not None and copy.state in ACTIVE_COPY_STATES:
                self._held.setdefault(copy.node, set()).add(key)

    # --- reads -------------------------------------------------------------------------------------------
    def get(self, key: str) -> dict[str, Any] | None:
        obj = self.objects.get(key)
        return None if obj is None else obj.value

    def job(self, key: str) -> Job | None:
        return self._jobs.get(key)

    def jobs(self, namespace: str | None = None) -> list[Job]:
        """Live jobs, in queue order (namespace, then rank, then creation)."""
        if self._order is None:
            self._order = sorted(self._jobs.values(), key=_queue_order)
        if namespace is None:
            return list(self._order)
        return [j for j in self._order if j.namespace == namespace]

    def has_queued(self) -> bool:
        """Whether any job has a copy waiting to be granted."""
        return bool(self._queued)

    def held_jobs(self, node: str) -> list[Job]:
        """The jobs in which ``node`` holds a copy (claimed, printing or orphaned), in queue order."""
        keys = self._held.get(node)
        if not keys:
            return []
        return sorted((self._jobs[k] for k in keys), key=_queue_order)

    def namespaces(self) -> list[str]:
        return sorted({j.namespace for j in self._jobs.values()})

    def member(self, node: str) -> Member | None:
        """``node``'s member record, retired or not (None: never enrolled)."""
        return self._members.get(member_key(node))

    def is_member(self, node: str | None) -> bool:
        """Whether ``node`` is an enrolled member now (retired ones are not)."""
        m = self._members.get(member_key(node)) if node is not None else None
        return m is not None and m.retired_at is None

    def has_members(self) -> bool:
        """Whether this state knows any member (an empty replica, a node never enrolled anywhere: no)."""
        return bool(self._members)

    def members(self) -> dict[str, Member]:
        """The enrolled members: the ones whose weight counts towards quorums (retired ones excluded)."""
        return {m.node_id: m for m in self._members.values() if m.retired_at is None}

    def retired(self) -> dict[str, Member]:
        """Members retired with ``node/retire``: their records stay, so that they are never enrolled again."""
        return {m.node_id: m for m in self._members.values() if m.retired_at is not None}

    def queue(self, namespace: str) -> QueueSettings:
        raw = self.get(f"queue/{namespace}")
        if raw is None:
            return QueueSettings(namespace=namespace)
        return QueueSettings.model_validate(raw, strict=False)

    def meta(self, name: str) -> dict[str, Any] | None:
        return self.get(f"meta/{name}")

    def last_stamp(self) -> Stamp:
        return max((o.stamp for o in self.objects.values()), default=ZERO_STAMP)

    def newer_than(self, stamp: Stamp) -> list[StoredObject]:
        return [o for o in self.objects.values() if o.stamp > stamp]


def merge_newest(sources: Iterable[tuple[Stamp, Iterable[StoredObject]]]) -> dict[str, StoredObject]:
    """Merge replicas read from a quorum: for every key keep the object with the highest stamp.

    Each source comes with its *base*: the stamp of the snapshot it was last rebuilt from. A snapshot holds every
    live object re-stamped at its base, so an object stamped below the highest base seen is superseded (by its
    re-stamped self or by its deletion) and is dropped. Stamps are unique: one arbiter per term.
    """
    sources = list(sources)
    floor = max((base for base, _ in sources), default=ZERO_STAMP)
    out: dict[str, StoredObject] = {}
    for _, objects in sources:
        for obj in objects:
            if obj.stamp < floor:
                continue
            have = out.get(obj.key)
            if have is None or obj.stamp > have.stamp:
                out[obj.key] = obj
    return out


def quorum_weight(members: Mapping[str, Member]) -> int:
    """Weight needed for a quorum: a strict majority of the enrolled weight (a one-node farm needs itself)."""
    total = sum(m.weight for m in members.values())
    return total // 2 + 1


def has_quorum(voters: Iterable[str], members: Mapping[str, Member]) -> bool:
    weight = sum(members[v].weight for v in set(voters) if v in members)
    return weight >= quorum_weight(members)


def committed_seq(acked: Mapping[str, int], members: Mapping[str, Member]) -> int:
    """Highest seq held by members of quorum weight, given each member's cumulative ack."""
    need = quorum_weight(members)
    weight = 0
    for node, seq in sorted(acked.items(), key=lambda kv: kv[1], reverse=True):
        member = members.get(node)
        if member is None:
            continue
        weight += member.weight
        if weight >= need:
            return seq
    return 0
