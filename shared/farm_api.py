"""The MQTT API: request validation and the pure handlers that turn a request into writes.

``<base>/request/<path>`` carries a JSON object (or, for single-parameter requests, a bare value); the answer
goes to ``<base>/response/<path>`` as ``{"status": "ok", "data": {...}, "transaction": ...}`` or
``{"status": "error", "data": {}, "error": "...", "transaction": ...}``. Handlers are pure functions of the farm
state and ``now``; the arbiter stamps and commits their writes before it answers ``ok``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from shared import membership
from shared.errors import RequestError
from shared.models import (
    ACTIVE_COPY_STATES,
    RESOLVED_BY_OPERATOR,
    CopyState,
    Job,
    JobCopy,
    JobId,
    JobSet,
    Namespace,
    NodeId,
    QueueSettings,
    ShortText,
    job_key,
    queue_key,
)
from shared.state import FarmState

MAX_REQUEST_BYTES = 256 * 1024
MAX_DEPTH = 32  # nesting of arrays and objects in a request; a job/add needs 5
Transaction = Annotated[str, StringConstraints(min_length=1, max_length=100, pattern=r"^[\x21-\x7e]+$")]

Write = tuple[str, dict[str, Any] | None]


class Req(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class JobAdd(Req):
    namespace: Namespace = "default"
    id: JobId | None = None
    name: ShortText | None = None
    sets: Annotated[list[JobSet], Field(min_length=1, max_length=64)]
    count: Annotated[int, Field(ge=1, le=10_000)] = 1
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    tags: Annotated[list[ShortText], Field(max_length=32)] = []


class JobRef(Req):
    namespace: Namespace = "default"
    id: JobId


class JobUpdate(JobRef):
    count: Annotated[int, Field(ge=1, le=10_000)] | None = None
    priority: Annotated[int, Field(ge=-1000, le=1000)] | None = None
    name: ShortText | None = None


class JobMove(JobRef):
    before: JobId | None = None  # place before this job
    after: JobId | None = None  # place after this job
    position: Annotated[int, Field(ge=0)] | None = None  # 0 = top


class JobResolve(JobRef):
    copy_index: Annotated[int, Field(ge=0)] = Field(alias="copy")
    outcome: Literal["requeue", "done", "failed"]

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class QueueRef(Req):
    namespace: Namespace = "default"


class QueueList(Req):
    namespace: Namespace | None = None
    include_done: bool = True


class Empty(Req):
    pass


class NodeRetire(Req):
    node: NodeId


@dataclass
class Context:
    """What a handler may know beyond the state: the time, who asks, a fresh id, the live nodes."""

    now: float
    new_id: Callable[[], str]
    nodes: dict[str, dict[str, Any]] = field(default_factory=dict)  # node_id -> NodeState dump
    info: dict[str, Any] = field(default_factory=dict)  # arbiter, term, commit, safety, ...
    # Why no *enrolled* printer can print a job (refused at submission), and why no *online* one can (it
    # waits, and says so); None when one can, or when no printer is known.
    unprintable: Callable[[Job], str | None] = lambda job: None
    waiting_reason: Callable[[Job], str | None] = lambda job: None
    reachable: frozenset[str] = frozenset()  # members the arbiter hears from now (itself included)


@dataclass
class Outcome:
    data: dict[str, Any]
    writes: list[Write] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


# Single-parameter requests accept a bare value in place of the object: path -> the field it fills.
# (job/remove also takes an optional namespace, default "default".) Requests without parameters (node/list,
# health_check) take an empty payload.
_BARE: dict[str, str] = {
    "queue/list": "namespace",
    "queue/pause": "namespace",
    "queue/resume": "namespace",
    "job/remove": "id",
    "node/retire": "node",
    # answered by the addressed node (node/app/node_commands.py)
    "node/bed_cleared": "node",
    "node/pause": "node",
    "node/resume": "node",
    "node/release": "node",
}


_NOT_STRUCTURAL = bytes(b for b in range(256) if b not in b'"[]{}')
_SAME_BRACKETS = bytes.maketrans(b"{}", b"[]")
_STRING = re.compile(rb'"[^"]*"')  # after escapes are gone: linear, no backtracking


def nesting_exceeds(payload: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether arrays and objects in ``payload`` (JSON, perhaps malformed) nest deeper than ``limit``.

    Checked before parsing, without recursion and in time linear in the payload: Python's json recurses once
    per level, and a payload nested 100,000 deep raised RecursionError instead of getting an answer.
    Brackets inside strings do not count; in malformed JSON they may, which only refuses it sooner."""
    if payload.count(b"[") + payload.count(b"{") <= limit:
        return False
    # Escaped backslashes, then escaped quotes, go first (JSON pairs backslashes left to right); then all but
    # quotes and brackets, then whole strings: what is left is the bracket structure.
    s = payload.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_STRUCTURAL)
    s = _STRING.sub(b"", s).translate(_SAME_BRACKETS)
    if _deeper(s[:4096], limit):  # a hostile payload is usually deep from the start
        return True
    reduced = s
    for _ in range(limit):  # each pass removes the innermost level of every balanced part (in C)
        reduced, before = reduced.replace(b"[]", b""), reduced
        if not reduced:
            return False
        if reduced == before:
            break
    return _deeper(s, limit)


def _deeper(brackets: bytes, limit: int) -> bool:
    depth = 0
    for c in brackets:
        if c == 0x5B:
            depth += 1
            if depth > limit:
                return True
        elif c == 0x5D and depth:
            depth -= 1
    return False


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads(payload: bytes) -> Any:
    # NaN and Infinity, which Python's json accepts, are not JSON (RFC 8259 §6).
    return json.loads(payload, parse_constant=_no_constant)


def loads_bounded(payload: bytes, *, max_bytes: int, max_depth: int = MAX_DEPTH, what: str = "payload") -> Any:
    """Parse JSON with its size and nesting bounded; RequestError on anything else (never RecursionError)."""
    if len(payload) > max_bytes:
        raise RequestError(f"{what} of {len(payload)} bytes exceeds the limit of {max_bytes}")
    if nesting_exceeds(payload, max_depth):
        raise RequestError(f"{what} nests deeper than {max_depth} levels")
    try:
        return _loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(f"{what} is not valid JSON: {exc}") from exc


def parse_envelope(path: str, payload: bytes) -> tuple[dict[str, Any], str | None]:
    """Split a request payload into its body and its ``transaction``. Raise RequestError if malformed: too
    large (:data:`MAX_REQUEST_BYTES`), nested too deeply (:data:`MAX_DEPTH`), not JSON, not an object."""
    if len(payload) > MAX_REQUEST_BYTES:
        raise RequestError(f"request of {len(payload)} bytes exceeds the limit of {MAX_REQUEST_BYTES}")
    if nesting_exceeds(payload):
        raise RequestError(f"request nests deeper than {MAX_DEPTH} levels")
    if not payload.strip():
        raw: Any = {}
    else:
        try:
            raw = _loads(payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: see nesting_exceeds
            if path in _BARE:  # a bare unquoted value, e.g. `mosquitto_pub -m default`
                try:
                    raw = payload.decode().strip()
                except UnicodeDecodeError:
                    raise RequestError(f"payload is not valid JSON: {exc}") from exc
            else:
                raise RequestError(f"payload is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        if path in _BARE and not isinstance(raw, list):
            # A bare value is text: `-m 42` names job "42", not the number 42.
            raw = {_BARE[path]: raw if isinstance(raw, str) else payload.decode(errors="replace").strip()}
        else:
            raise RequestError("payload must be a JSON object")
    txn = raw.pop("transaction", None)
    if txn is not None and (not isinstance(txn, str) or not txn or len(txn) > 100):
        raise RequestError("transaction must be a non-empty string of at most 100 characters")
    return raw, txn


def _model(cls: type[Req], body: dict[str, Any]) -> Any:
    try:
        return cls.model_validate_json(json.dumps(body))
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "payload"
            parts.append(f"{loc}: {err['msg']}")
        raise RequestError("invalid request: " + "; ".join(parts)) from exc


def _job(state: FarmState, ref: JobRef) -> Job:
    job = state.job(job_key(ref.namespace, ref.id))
    if job is None:
        raise RequestError(f"no job {ref.id!r} in namespace {ref.namespace!r}")
    return job


def job_view(job: Job) -> dict[str, Any]:
    """The public form of a job: what the retained topic, ``queue/list`` and ``netq jobs`` show."""
    d = job.model_dump(mode="json")
    d["remaining"] = job.remaining
    d["state"] = _summary_state(job)
    return d


def _summary_state(job: Job) -> str:
    states = {c.state for c in job.copies}
    for s in (CopyState.ORPHANED, CopyState.PRINTING, CopyState.CLAIMED, CopyState.QUEUED):
        if s in states:
            return s.value
    if states == {CopyState.CANCELLED}:
        return "cancelled"
    return CopyState.FAILED.value if CopyState.FAILED in states else CopyState.DONE.value


# --- handlers ------------------------------------------------------------------------------------------------


def job_add(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    req: JobAdd = _model(JobAdd, body)
    job_id = req.id or ctx.new_id()
    key = job_key(req.namespace, job_id)
    if key in state.objects:
        raise RequestError(f"job id {job_id!r} already exists (or was removed) in {req.namespace!r}")
    for s in req.sets:
        if not s.holders:
            raise RequestError(f"set {s.file!r}: no node holds file {s.sha256[:12]}; upload it first")
    ranks = [j.rank for j in state.jobs(req.namespace)]
    job = Job(
        id=job_id,
        namespace=req.namespace,
        name=req.name or req.sets[0].file,
        sets=req.sets,
        count=req.count,
        priority=req.priority,
        rank=(max(ranks) + 1.0) if ranks else 0.0,
        created=ctx.now,
        tags=req.tags,
        copies=[JobCopy(index=i) for i in range(req.count)],
    )
    reason = ctx.unprintable(job)
    if reason is not None:
        raise RequestError(f"no printer of the farm can print this job: {reason}")
    return Outcome(
        data={"id": job_id, "namespace": req.namespace, "copies": req.count},
        writes=[(key, job.model_dump(mode="json"))],
        events=[{"event": "added", "namespace": req.namespace, "job": job_id}],
    )


def job_remove(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    req: JobRef = _model(JobRef, body)
    job = _job(state, req)
    active = [c for c in job.copies if c.state in ACTIVE_COPY_STATES - {CopyState.CLAIMED}]
    if active:
        raise RequestError(
            f"job {req.id!r} has {len(active)} copies printing or orphaned; resolve them before removing it"
        )
    return Outcome(
        data={"id": req.id, "namespace": req.namespace, "removed": True},
        writes=[(job_key(req.namespace, req.id), None)],
        events=[{"event": "removed", "namespace": req.namespace, "job": req.id}],
    )


def job_update(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    req: JobUpdate = _model(JobUpdate, body)
    job = _job(state, req)
    update: dict[str, Any] = {}
    if req.name is not None:
        update["name"] = req.name
    if req.priority is not None:
        update["priority"] = req.priority
    if req.count is not None and req.count != job.count:
        copies = list(job.copies)
        if req.count > len(copies):
            copies += [JobCopy(index=i) for i in range(len(copies), req.count)]
        else:
            keep = copies[: req.count]
            dropped = copies[req.count:]
            if any(c.state != CopyState.QUEUED for c in dropped):
                started = sum(1 for c in copies if c.state != CopyState.QUEUED)
                raise RequestError(f"count cannot go below {started}: that many copies are taken or done")
            copies = keep
        update["count"] = req.count
        update["copies"] = copies
    if not update:
        raise RequestError("nothing to update: give count, priority or name")
    new = job.model_copy(update=update)
    return Outcome(data=job_view(new), writes=[(job_key(req.namespace, req.id), new.model_dump(mode="json"))])


def job_move(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    req: JobMove = _model(JobMove, body)
    given = [x for x in (req.before, req.after, req.position) if x is not None]
    if len(given) != 1:
        raise RequestError("give exactly one of before, after or position")
    job = _job(state, req)
    others = [j for j in state.jobs(req.namespace) if j.id != job.id]
    if req.position is not None:
        index = min(req.position, len(others))
    else:
        anchor_id = req.before if req.before is not None else req.after
        ids = [j.id for j in others]
        if anchor_id not in ids:
            raise RequestError(f"no job {anchor_id!r} in namespace {req.namespace!r} to move next to")
        index = ids.index(anchor_id) + (0 if req.before is not None else 1)
    lo = others[index - 1].rank if index > 0 else (others[0].rank - 2.0 if others else 0.0)
    hi = others[index].rank if index < len(others) else lo + 2.0
    new = job.model_copy(update={"rank": (lo + hi) / 2.0})
    return Outcome(
        data={"id": req.id, "namespace": req.namespace, "position": index},
        writes=[(job_key(req.namespace, req.id), new.model_dump(mode="json"))],
    )


def job_resolve(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    """An operator settles an orphaned (or conflicting) copy: it printed, it failed, or print it again."""
    req: JobResolve = _model(JobResolve, body)
    job = _job(state, req)
    if req.copy_index >= len(job.copies):
        raise RequestError(f"job {req.id!r} has no copy {req.copy_index}")
    copy = job.copies[req.copy_index]
    if copy.state not in (CopyState.ORPHANED, CopyState.FAILED) and not copy.conflict:
        raise RequestError(f"copy {req.copy_index} is {copy.state.value}: only orphaned, failed or conflicting "
                           "copies are resolved by an operator")
    if req.outcome == "requeue":
        new_copy = JobCopy(index=copy.index, attempts=copy.attempts)
    else:
        new_copy = copy.model_copy(update={
            "state": CopyState.DONE if req.outcome == "done" else CopyState.FAILED,
            "finished_at": ctx.now, "reason": RESOLVED_BY_OPERATOR, "conflict": False,
        })
    copies = list(job.copies)
    copies[req.copy_index] = new_copy
    new = job.model_copy(update={"copies": copies})
    return Outcome(
        data=job_view(new),
        writes=[(job_key(req.namespace, req.id), new.model_dump(mode="json"))],
        events=[{"event": "resolved", "namespace": req.namespace, "job": req.id, "copy": req.copy_index,
                 "outcome": req.outcome}],
    )


def queue_list(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    req: QueueList = _model(QueueList, body)
    jobs = []
    for j in state.jobs(req.namespace):
        if not req.include_done and j.done:
            continue
        view = job_view(j)
        if view["state"] == CopyState.QUEUED.value:
            view["waiting"] = "queue paused" if state.queue(j.namespace).paused else ctx.waiting_reason(j)
        jobs.append(view)
    queues = {ns: state.queue(ns).model_dump(mode="json") for ns in state.namespaces()}
    return Outcome(data={"jobs": jobs, "queues": queues})


def _queue_pause(paused: bool) -> Callable[[FarmState, dict[str, Any], Context], Outcome]:
    def handler(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
        req: QueueRef = _model(QueueRef, body)
        settings = QueueSettings(namespace=req.namespace, paused=paused)
        return Outcome(
            data=settings.model_dump(mode="json"),
            writes=[(queue_key(req.namespace), settings.model_dump(mode="json"))],
            events=[{"event": "queue_paused" if paused else "queue_resumed", "namespace": req.namespace}],
        )

    return handler


def node_list(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    _model(Empty, body)
    members = state.members()
    retired = state.retired()
    nodes = []
    for node_id in sorted(set(members) | set(ctx.nodes)):
        m = members.get(node_id)
        entry: dict[str, Any] = dict(ctx.nodes.get(node_id, {"node_id": node_id, "state": "unknown"}))
        if node_id in retired and entry.get("state") != "online":
            continue  # gone for good; a retired node still running is listed, as retired
        entry["enrolled"] = m is not None
        entry["retired"] = node_id in retired
        entry["weight"] = m.weight if m else 0
        entry["witness"] = m.witness if m else entry.get("witness", False)
        nodes.append(entry)
    return Outcome(data={"nodes": nodes, **ctx.info})


def node_retire(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    """Retire an enrolled member for good (see :func:`shared.membership.retire` for what is refused)."""
    req: NodeRetire = _model(NodeRetire, body)
    change = membership.retire(state, req.node, arbiter=ctx.info.get("arbiter"), reachable=ctx.reachable,
                               now=ctx.now)
    members = sorted(n for n in state.members() if n != req.node)
    return Outcome(data={"node": req.node, "members": members, **membership.summary(change)},
                   writes=change.writes, events=change.events)


def health_check(state: FarmState, body: dict[str, Any], ctx: Context) -> Outcome:
    _model(Empty, body)
    return Outcome(data={"healthy": True, **ctx.info})


Handler = Callable[[FarmState, dict[str, Any], Context], Outcome]

MUTATING: dict[str, Handler] = {
    "job/add": job_add,
    "job/remove": job_remove,
    "job/update": job_update,
    "job/move": job_move,
    "job/resolve": job_resolve,
    "queue/pause": _queue_pause(True),
    "queue/resume": _queue_pause(False),
    "node/retire": node_retire,
}
# Membership changes: the arbiter commits them one at a time, so consecutive quorums overlap.
MEMBERSHIP = frozenset({"node/retire"})
READING: dict[str, Handler] = {
    "queue/list": queue_list,
    "node/list": node_list,
    "health_check": health_check,
}


def response(status: str, data: dict[str, Any], transaction: str | None, error: str | None = None) -> bytes:
    body: dict[str, Any] = {"status": status, "data": data}
    if error is not None:
        body["error"] = error
    if transaction is not None:
        body["transaction"] = transaction
    return json.dumps(body).encode()
