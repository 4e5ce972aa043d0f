"""Internal protocol messages (``<base>/_proto/...``) and their codec.

Every message is one JSON object with a ``kind``; decoding validates it strictly against a discriminated union,
so an unknown kind, a wrong type or an oversized payload is a :class:`~shared.errors.ProtocolError`, never a
half-read dict. Beyond types, a message no honest node sends is refused here too: every term, seq, commit and
stamp is below 2**63 (SQLite's INTEGER), a commit is never past the seq it comes with, and an entry's writes
carry the entry's own stamp.

On the wire every message is sealed by its sender (``shared.security``, trailer after the JSON); which sender a
message must come from, which kinds each topic carries and how far a term may jump are also defined here, and
``node/consensus/consensus.py`` applies them (docs/protocol.md, "Seals and what the protocol refuses").
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationError, model_validator

from shared.errors import ProtocolError
from shared.merge import TERM_SLOTS, MergeRecord
from shared.models import Capabilities, Model, NodeId, Stamp, StoredObject

MAX_PROTO_PAYLOAD = 64 * 1024 * 1024  # snapshots of large farms; API requests have their own, smaller bound
MAX_COUNT: Final = 2**63 - 1  # terms, seqs and stamps are SQLite INTEGERs wherever they are stored
# How far above our own term a message may take us in one step. An honest farm moves its term by 1 per election
# in safety mode quorum (pre-votes keep a cut-off node from bumping it) and by at most TERM_SLOTS per candidacy
# in available mode (owned terms, shared.merge): this is a thousand candidacies of available mode, more than
# an honest farm makes while a node is away for a long time, and still 9e13 steps from the ceiling. A node
# further behind catches up by asking (docs/protocol.md, "Catching up").
MAX_TERM_JUMP: Final = 1000 * TERM_SLOTS
MAX_REASON: Final = 500  # characters of a report's reason kept (a longer one is cut, never refused)


def _stamps_bounded(objects: list[StoredObject]) -> list[StoredObject]:
    for o in objects:
        if not (0 <= o.stamp[0] <= MAX_COUNT and 0 <= o.stamp[1] <= MAX_COUNT):
            raise ValueError(f"stamp of {o.key} out of range")
    return objects


def _cut(value: Any) -> Any:
    return value[:MAX_REASON] if isinstance(value, str) else value


Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
BStamp = tuple[Count, Count]  # a stamp whose parts are bounded (shared.models.Stamp is not, for stored ones)
Objects = Annotated[list[StoredObject], AfterValidator(_stamps_bounded)]
Reason = Annotated[str, BeforeValidator(_cut)]


class Entry(Model):
    """A committed-to-be change from the arbiter: writes applied atomically, stamped ``(term, seq)``.

    ``snapshot`` entries replace the whole state (the first entry of every term, and resyncs)."""

    kind: Literal["entry"] = "entry"
    farm: str
    term: Count
    seq: Count
    commit: Count  # highest committed seq of this term, as the arbiter knows it when sending
    writes: Objects
    snapshot: bool = False
    # Who sent it: a member learns its new arbiter from the term's first entry, before any heartbeat, so that
    # its acknowledgement goes to the right inbox at once (a new arbiter's takeover waits for them).
    arbiter: NodeId | None = None
    # Safety mode ``available``: the arbiter did not hear every enrolled member follow it when it made this
    # entry, so another side may change the same objects; members keep records of it (shared.merge).
    partial: bool = False

    @model_validator(mode="after")
    def _honest_shape(self) -> Entry:
        if self.commit > self.seq:
            raise ValueError("commit past the entry's seq")
        if any(o.stamp != (self.term, self.seq) for o in self.writes):
            raise ValueError("an entry's writes carry its own stamp")
        return self

    @property
    def stamp(self) -> Stamp:
        return (self.term, self.seq)


class Heartbeat(Model):
    kind: Literal["heartbeat"] = "heartbeat"
    farm: str
    term: Count
    arbiter: NodeId
    seq: Count  # last seq sent in this term
    commit: Count
    serving: bool  # False while the new arbiter's takeover snapshot is not yet committed
    partial: bool = False  # safety mode ``available``: not every enrolled member follows this arbiter
    degraded: bool = False  # safety mode ``available``: this arbiter does not hear a quorum

    @model_validator(mode="after")
    def _honest_shape(self) -> Heartbeat:
        if self.commit > self.seq:
            raise ValueError("commit past the heartbeat's seq")
        return self


class VoteRequest(Model):
    kind: Literal["vote_request"] = "vote_request"
    farm: str
    term: Count
    candidate: NodeId
    last: BStamp  # the candidate's highest applied stamp: voters send back what is newer
    pre: bool = False  # a pre-vote: "would you vote for me?" (changes no state)

    @model_validator(mode="after")
    def _honest_shape(self) -> VoteRequest:
        if self.last[0] > self.term:
            raise ValueError("a candidate's log is never of a term past the one it stands for")
        return self


class VoteReply(Model):
    kind: Literal["vote"] = "vote"
    farm: str
    term: Count
    voter: NodeId
    candidate: NodeId
    granted: bool
    last: BStamp
    base: BStamp = (0, 0)  # stamp of the voter's last snapshot: every live object it holds is stamped >= base
    objects: Objects = Field(default_factory=list)  # the voter's objects stamped after the candidate's ``last``
    pre: bool = False


class Ack(Model):
    kind: Literal["ack"] = "ack"
    node: NodeId
    term: Count
    seq: Count  # highest seq of ``term`` this node holds durably with no gap (cumulative)


class SyncRequest(Model):
    kind: Literal["sync"] = "sync"
    node: NodeId
    term: Count
    last: BStamp
    # Safety mode ``available``: what this node changed while the farm was split, for the arbiter to merge
    # before it sends the snapshot (shared.merge).
    offer: list[MergeRecord] = Field(default_factory=list)


class Snapshot(Model):
    kind: Literal["snapshot"] = "snapshot"
    farm: str
    term: Count
    seq: Count
    commit: Count
    objects: Objects
    partial: bool = False  # as in Entry
    merged: list[NodeId] = Field(default_factory=list)  # nodes whose offered records this state includes (safety mode ``available``)

    @model_validator(mode="after")
    def _honest_shape(self) -> Snapshot:
        if self.commit > self.seq:
            raise ValueError("commit past the snapshot's seq")
        if any(o.stamp > (self.term, self.seq) for o in self.objects):
            raise ValueError("an object stamped past the snapshot")
        return self


class Join(Model):
    """A node that follows the arbiter but is not a member asks to be enrolled. Its weight is the arbiter's to
    decide (shared.membership.enrollment), so a join carries none."""

    kind: Literal["join"] = "join"
    node: NodeId
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
    copy_index: Count
    grant: BStamp


class Outcome(enum.StrEnum):
    DONE = "done"
    FAILED = "failed"  # give up on this copy
    REQUEUE = "requeue"  # the print did not complete; return the copy to the queue


class FinishReport(Model):
    kind: Literal["finish"] = "finish"
    node: NodeId
    namespace: str
    job: str
    copy_index: Count
    grant: BStamp
    outcome: Outcome
    reason: Reason | None = None


class Release(Model):
    """A node gives back a claimed copy it has not started (e.g. file unavailable, material mismatch)."""

    kind: Literal["release"] = "release"
    node: NodeId
    namespace: str
    job: str
    copy_index: Count
    grant: BStamp
    reason: Reason


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

# The field that names a message's sender: the seal must name the same node (Snapshot and Replicate name none:
# they must come from the arbiter of the term, node/consensus/consensus.py checks that).
SENDER_FIELD: Final[dict[type[Model], str]] = {
    Entry: "arbiter", Heartbeat: "arbiter", VoteRequest: "candidate", VoteReply: "voter", Ack: "node",
    SyncRequest: "node", Join: "node", WorkRequest: "node", StartRequest: "node", FinishReport: "node",
    Release: "node", Holding: "node",
}
# What each topic carries (an honest node sends nothing else there).
ON_LOG: Final = (Entry, Heartbeat)
ON_ELECTION: Final = (VoteRequest,)
TO_NODE: Final = (VoteReply, Snapshot, Replicate)
TO_ARBITER: Final = (Ack, SyncRequest, Join, WorkRequest, StartRequest, FinishReport, Release, Holding)


def claimed_sender(msg: Model) -> str | None:
    """The node ``msg`` says sent it (None for the kinds that do not say; an entry may omit it, and is then
    refused from a sealed sender)."""
    name = SENDER_FIELD.get(type(msg))
    return None if name is None else getattr(msg, name)


def needs_sender(msg: Model) -> bool:
    return type(msg) in SENDER_FIELD


def term_reachable(ours: int, theirs: int, since: int = 0) -> bool:
    """Whether an honest farm can be at term ``theirs`` while we are at ``ours``: at most MAX_TERM_JUMP above
    the higher of ours and ``since`` (a term the message shows its sender already holds, e.g. a candidate's
    log)."""
    return theirs <= max(ours, since) + MAX_TERM_JUMP


def encode(msg: Model) -> bytes:
    return msg.model_dump_json().encode()


def decode(payload: bytes, max_size: int = MAX_PROTO_PAYLOAD) -> Any:
    """Decode and validate one protocol message; raise ProtocolError on anything malformed."""
    if len(payload) > max_size:
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {max_size}")
    try:
        # Strict models validated from JSON still accept arrays for tuples (stamps).
        return _ADAPTER.validate_json(payload)
    except (ValueError, ValidationError, RecursionError) as exc:  # RecursionError: no input may escape
        raise ProtocolError(f"invalid protocol message: {str(exc)[:300]}") from exc
