"""Records of the replicated farm state, and the node state every node publishes.

Every record is a pydantic model, validated strictly at the edge. The farm state is a map of *objects*
(``job/<ns>/<id>``, ``member/<node_id>``, ``queue/<ns>``, ``txn/<transaction>``), each carrying the stamp of the
change that last wrote it; deletes are tombstones (``value is None``).
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

NAMESPACE_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$"
NODE_ID_RE = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"
SHA256_RE = r"^[0-9a-f]{64}$"

Namespace = Annotated[str, StringConstraints(pattern=NAMESPACE_RE)]
NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_RE)]
JobId = Annotated[str, StringConstraints(pattern=ID_RE)]
Sha256 = Annotated[str, StringConstraints(pattern=SHA256_RE)]
ShortText = Annotated[str, StringConstraints(max_length=200)]

Stamp = tuple[int, int]
"""``(term, seq)``: the arbiter term and the sequence number within it of the change that wrote an object."""

ZERO_STAMP: Stamp = (0, 0)


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class Material(Model):
    type: Annotated[str, StringConstraints(min_length=1, max_length=32)]
    color: Annotated[str, StringConstraints(max_length=32)] | None = None

    def __str__(self) -> str:
        return f"{self.type} {self.color}" if self.color else self.type


class JobSet(Model):
    """One G-code file printed ``count`` times within each copy of its job."""

    file: ShortText  # display name of the G-code file
    sha256: Sha256
    count: Annotated[int, Field(ge=1, le=10_000)] = 1
    materials: Annotated[list[Material | None], Field(max_length=16)] = []  # per tool
    profiles: Annotated[list[ShortText], Field(max_length=64)] = []  # empty: any printer
    nozzle_mm: Annotated[float, Field(gt=0, le=5)] | None = None
    extents_mm: tuple[float, float, float] | None = None
    duration_s: Annotated[float, Field(ge=0, le=30 * 86400)] | None = None
    holders: Annotated[list[NodeId], Field(max_length=64)] = []  # nodes that serve this file


class CopyState(enum.StrEnum):
    QUEUED = "queued"
    CLAIMED = "claimed"  # granted to a node, not yet started
    PRINTING = "printing"  # start committed: the node may call its printer
    DONE = "done"
    FAILED = "failed"
    ORPHANED = "orphaned"  # started on a node that is gone
    CANCELLED = "cancelled"


ACTIVE_COPY_STATES = frozenset({CopyState.CLAIMED, CopyState.PRINTING, CopyState.ORPHANED})
FINAL_COPY_STATES = frozenset({CopyState.DONE, CopyState.FAILED, CopyState.CANCELLED})


RESOLVED_BY_OPERATOR = "resolved by an operator"  # the reason on a copy an operator settled (job/resolve)


class JobCopy(Model):
    index: int
    state: CopyState = CopyState.QUEUED
    node: NodeId | None = None
    grant: Stamp | None = None  # stamp of the grant that gave this copy to ``node``
    claimed_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    attempts: int = 0
    reason: str | None = None
    conflict: bool = False  # reported double start (safety mode ``available`` only)


class Job(Model):
    id: JobId
    namespace: Namespace
    name: ShortText
    sets: Annotated[list[JobSet], Field(min_length=1, max_length=64)]
    count: Annotated[int, Field(ge=1, le=10_000)] = 1  # copies
    priority: Annotated[int, Field(ge=-1000, le=1000)] = 0
    rank: float = 0.0  # position within its namespace (lower first); moves insert between neighbours
    created: float = 0.0
    created_by: NodeId | None = None
    tags: Annotated[list[ShortText], Field(max_length=32)] = []  # required printer tags
    copies: list[JobCopy] = []

    @property
    def remaining(self) -> int:
        return sum(1 for c in self.copies if c.state not in FINAL_COPY_STATES)

    @property
    def done(self) -> bool:
        return all(c.state in FINAL_COPY_STATES for c in self.copies)


class Member(Model):
    """An enrolled member of the farm: its vote weight counts towards quorums.

    A retired member keeps its record, marked with ``retired_at``: it counts towards no quorum, and the arbiter
    refuses to enroll that node id again (``node/retire``)."""

    node_id: NodeId
    weight: Annotated[int, Field(ge=0, le=10)] = 1
    witness: bool = False
    enrolled_at: float = 0.0
    retired_at: float | None = None


class QueueSettings(Model):
    namespace: Namespace
    paused: bool = False


class Capabilities(Model):
    """What a printer can print; reported by its node with every request for work."""

    profile: ShortText | None = None
    model: ShortText | None = None
    nozzle_mm: float | None = None
    bed_mm: tuple[float, float, float] | None = None
    materials: Annotated[list[Material | None], Field(max_length=16)] = []  # loaded, per tool
    tags: Annotated[list[ShortText], Field(max_length=32)] = []
    self_clearing: bool = False


class WorkerState(enum.StrEnum):
    IDLE = "idle"
    REQUESTING = "requesting"
    FETCHING = "fetching"
    PRINTING = "printing"
    CLEARING = "clearing"  # awaiting bed clear (script running or operator confirmation)
    PAUSED = "paused"
    AWAITING_MATERIAL = "awaiting_material"
    ERROR = "error"
    OFFLINE = "offline"


class NodeState(BaseModel):
    """Retained on ``netq/nodes/<node_id>/state``; ``state: offline`` is also the node's last will."""

    model_config = ConfigDict(extra="ignore")

    node_id: str
    state: str  # "online" | "offline"
    farm: str | None = None  # id of the farm this node belongs to (None: not yet enrolled anywhere)
    arbiter: bool = False
    broker_host: bool = False
    worker: WorkerState = WorkerState.OFFLINE
    printer: str | None = None
    reason: str | None = None
    namespace: str | None = None
    job: str | None = None
    copy_index: int | None = None
    progress: float | None = None
    capabilities: Capabilities | None = None
    namespaces: list[str] = []
    accept_jobs: bool = True
    witness: bool = False
    files_url: str | None = None
    ts: float = 0.0
    # Protocol messages this node dropped, by reason (unsigned, forged, replayed, stale, malformed, refused):
    # docs/security.md, "Signed protocol".
    dropped: dict[str, int] | None = None


class StoredObject(Model):
    """One object of the replicated state, with the stamp of the change that last wrote it."""

    key: Annotated[str, StringConstraints(max_length=300)]
    stamp: Stamp
    value: dict[str, Any] | None  # None: tombstone

    @field_validator("key")
    @classmethod
    def _key_shape(cls, key: str) -> str:
        if not re.fullmatch(r"(job/[^/]+/[^/]+|member/[^/]+|queue/[^/]+|txn/[^/]+|meta/[^/]+)", key):
            raise ValueError(f"invalid object key {key!r}")
        return key


def job_key(namespace: str, job_id: str) -> str:
    return f"job/{namespace}/{job_id}"


def member_key(node_id: str) -> str:
    return f"member/{node_id}"


def queue_key(namespace: str) -> str:
    return f"queue/{namespace}"


def txn_key(transaction: str) -> str:
    return f"txn/{transaction}"
