"""Internal protocol messages (``<base>/_proto/...``) and their codec.

Every message is one JSON object with a ``kind``; decoding validates it strictly against a discriminated union,
so an unknown kind, a wrong type or an oversized payload is a :class:`~shared.errors.ProtocolError`, never a
half-read dict.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from shared.errors import ProtocolError
from shared.merge import MergeRecord
from shared.models import Capabilities, Model, NodeId, Stamp, StoredObject

MAX_PROTO_PAYLOAD = 64 * 1024 * 1024  # snapshots of large farms; API requests have their own, smaller bound


class Entry(Model):
    """A committed-to-be change from the arbiter: writes applied atomically, stamped ``(term, seq)``.

    ``snapshot`` entries replace the whole state (the first entry of every term, and resyncs)."""

    kind: Literal["entry"] = "entry"
    farm: str
    term: int
    seq: int
    commit: int  # highest committed seq of this term, as the arbiter knows it when sending
    writes: list[StoredObject]
    snapshot: bool = False
    # Who sent it: a member learns its new arbiter from the term's first entry, before any heartbeat, so that
    # its acknowledgement goes to the right inbox at once (a new arbiter's takeover waits for them).
    arbiter: NodeId | None = None
    # Safety mode ``available``: the arbiter did not hear every enrolled member follow it when it made this
    # entry, so another side may change the same objects; members keep records of it (shared.merge).
    partial: bool = False

    @property
    def stamp(self) -> Stamp:
        return (self.term, self.seq)


class Heartbeat(Model):
    kind: Literal["heartbeat"] = "heartbeat"
    farm: str
    term: int
    arbiter: NodeId
    seq: int  # last seq sent in this term
    commit: int
    serving: bool  # False while the new arbiter's takeover snapshot is not yet committed
    partial: bool = False  # safety mode ``available``: not every enrolled member follows this arbiter
    degraded: bool = False  # safety mode ``available``: this arbiter does not hear a quorum


class VoteRequest(Model):
    kind: Literal["vote_request"] = "vote_request"
    farm: str
    term: int
    candidate: NodeId
    last: Stamp  # the candidate's highest applied stamp: voters send back what is newer
    pre: bool = False  # a pre-vote: "would you vote for me?" (changes no state)


class VoteReply(Model):
    kind: Literal["vote"] = "vote"
    farm: str
    term: int
    voter: NodeId
    candidate: NodeId
    granted: bool
    last: Stamp
    base: Stamp = (0, 0)  # stamp of the voter's last snapshot: every live object it holds is stamped >= base
    objects: list[StoredObject] = []  # the voter's objects stamped after the candidate's ``last``
    pre: bool = False


class Ack(Model):
    kind: Literal["ack"] = "ack"
    node: NodeId
    term: int
    seq: int  # highest seq of ``term`` this node holds durably with no gap (cumulative)


class SyncRequest(Model):
    kind: Literal["sync"] = "sync"
    node: NodeId
    term: int
    last: Stamp
    # Safety mode ``available``: what this node changed while the farm was split, for the arbiter to merge
    # before it sends the snapshot (shared.merge).
    offer: list[MergeRecord] = Field(default_factory=list)


class Snapshot(Model):
    kind: Literal["snapshot"] = "snapshot"
    farm: str
    term: int
    seq: int
    commit: int
    objects: list[StoredObject]
    partial: bool = False  # as in Entry
    merged: list[NodeId] = Field(default_factory=list)  # nodes whose offered records this state includes (safety mode ``available``)


class Join(Model):
    kind: Literal["join"] = "join"
    node: NodeId
    weight: int = 1
    witness: bool = False


class WorkRequest(Model):
    kind: Literal["work"] = "work"
    node: NodeId
    capabilities: Capabilities
    namespaces: list[str]  # in the order this printer serves them; empty = all
    # Ready to print at once: a copy whose files this node already holds may be granted and started in one
    # committed change (shared.claims.grant). Off for nodes of an older version, which ask to start.
    start_now: bool = False


class StartRequest(Model):
    kind: Literal["start"] = "start"
    node: NodeId
    namespace: str
    job: str
    copy_index: int
    grant: Stamp


class Outcome(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"  # give up on this copy
    REQUEUE = "requeue"  # the print did not complete; return the copy to the queue


class FinishReport(Model):
    kind: Literal["finish"] = "finish"
    node: NodeId
    namespace: str
    job: str
    copy_index: int
    grant: Stamp
    outcome: Outcome
    reason: str | None = None


class Release(Model):
    """A node gives back a claimed copy it has not started (e.g. file unavailable, material mismatch)."""

    kind: Literal["release"] = "release"
    node: NodeId
    namespace: str
    job: str
    copy_index: int
    grant: Stamp
    reason: str


class Replicate(Model):
    """Arbiter → node: fetch this file from its holders, so that it survives the loss of one node."""

    kind: Literal["replicate"] = "replicate"
    sha256: str
    holders: list[NodeId]


class Holding(Model):
    """Node → arbiter: this node now holds (and serves) the file."""

    kind: Literal["holding"] = "holding"
    node: NodeId
    sha256: str


ProtoMessage = Annotated[
    Entry | Heartbeat | VoteRequest | VoteReply | Ack | SyncRequest | Snapshot | Join | WorkRequest
    | StartRequest | FinishReport | Release | Replicate | Holding,
    Field(discriminator="kind"),
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(ProtoMessage)


def encode(msg: Model) -> bytes:
    return msg.model_dump_json().encode()


def decode(payload: bytes, max_size: int = MAX_PROTO_PAYLOAD) -> Any:
    """Decode and validate one protocol message; raise ProtocolError on anything malformed."""
    if len(payload) > max_size:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {max_size}")
    try:
        # Strict models validated from JSON still accept arrays for tuples (stamps).
        return _ADAPTER.validate_json(payload)
    except (ValueError, ValidationError) as exc:
        raise ProtocolError(f"invalid protocol message: {str(exc)[:300]}") from exc
