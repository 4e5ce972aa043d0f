"""Replication and election over MQTT: terms, persisted votes, an ordered log, quorum commit, takeover.

One :class:`Consensus` per node. As a *member* it stores the arbiter's entries durably in order, acknowledges the
highest seq it holds without a gap, asks for a snapshot when it sees one, and votes at most once per term (the
vote written to SQLite before it is sent). When it hears no heartbeat for its election timeout it stands as a
candidate; with votes of quorum weight it becomes the arbiter: it merges the newer objects its voters sent
(a quorum read), re-stamps everything with its own term, sends that as the term's first entry, and serves only
once that entry is committed. The arbiter's services (requests, claims, leases) live in :mod:`node.arbiter.services`
and change state only through :meth:`Consensus.propose`.

Every message it publishes on ``_proto/`` is sealed (``shared.security``: an HMAC with this node's key, its boot
number and a counter), and every message it receives there is opened before its JSON is read: unsealed, forged,
stale and replayed messages are dropped and counted (:attr:`Consensus.drops`, in the node's state). Then the
protocol refuses what no honest member sends — a message naming another sender than its seal, entries and
heartbeats from anyone but the arbiter of their term, votes from non-members, terms out of reach — before any
state (the term first) changes. Only a farm with ``[farm] open = true`` sends and takes messages unsealed.

See docs/protocol.md for the argument of why this keeps every committed change, and its "Seals and what the
protocol refuses" for the checks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.consensus.replica import Replica
from node.link.base import Link, Message
from node.tasks import cancel_and_wait
from shared import merge as M
from shared import protocol as P
from shared.errors import ConfigError, ProtocolError
from shared.models import ZERO_STAMP, Member, Model, Stamp, StoredObject, member_key
from shared.security import Drop, Opener, Sealer, SealError
from shared.settings import SafetyMode, Settings
from shared.state import FarmState, committed_seq, has_quorum, merge_newest
from shared.topics import Topics

log = logging.getLogger(__name__)

SYNC_RETRY_S = 0.5
# Safety mode ``available``: a candidate without a quorum counts the members heard within this many election
# timeouts; a member heard longer ago is taken to be on the other side of a partition.
HEARD_MEMORY_TIMEOUTS = 3.0
NO_KEY = ("this node has no farm key: run `netq init` to make a new farm, or `netq join CODE` to join one (or set "
          "farm.key to the farm's key); `farm.open = true` runs an open farm, unsealed, that anyone on the network "
          "can read, join and steer")
_SEAL_TAG = b"NQS1"  # the first word of a seal's trailer (shared.security, docs/protocol.md)
_WARN_ONCE_LIMIT = 1024  # (reason, sender) pairs warned about; beyond that, every drop is logged at debug


class _From(enum.Enum):
    """What to make of an entry, heartbeat or snapshot, judged by its sender and term."""

    ARBITER = "arbiter"  # the arbiter of a term we may follow
    OLDER = "older"  # a member serving an older term than ours
    REFUSED = "refused"  # no honest node sends it
    ASK = "ask"  # not enough to follow, but we may be the one behind: ask the sender for its state


class Role(enum.StrEnum):
    FOLLOWER = "follower"
    CANDIDATE = "candidate"
    ARBITER = "arbiter"


@dataclass
class Proposal:
    seq: int
    future: asyncio.Future[None]


@dataclass
class Leadership:
    """What only the arbiter of a term keeps."""

    term: int
    next_seq: int = 1
    acked: dict[str, int] = field(default_factory=dict)
    last_heard: dict[str, float] = field(default_factory=dict)
    commit: int = 0
    proposals: list[Proposal] = field(default_factory=list)
    serving: bool = False
    quorum_lost_since: float | None = None
    degraded: bool = False  # safety mode ``available``: serving without hearing a quorum


class Consensus:
    def __init__(
        self,
        settings: Settings,
        link: Link,
        replica: Replica,
        *,
        is_broker_host: Callable[[], bool] = lambda: False,
        may_bootstrap: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        key = settings.farm.key_bytes
        if key is None and not settings.farm.open:
            raise ConfigError(NO_KEY)
        self.settings = settings
        self.node_id = settings.node_id
        self.link = link
        self.replica = replica
        self.topics = Topics(settings.farm.base_topic)
        self.is_broker_host = is_broker_host
        self.may_bootstrap = may_bootstrap
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._rng = rng or random.Random()

        self.state = FarmState(replica.load())
        hard = replica.hard_state()
        self.farm: str | None = hard.farm
        self.term = hard.term
        self.applied: Stamp = hard.applied
        self.base: Stamp = hard.base
        self.commit: Stamp = ZERO_STAMP  # (term, seq) known committed; only meaningful for our applied term
        self.role = Role.FOLLOWER
        self.arbiter: str | None = None
        self.arbiter_serving = False
        self.leader: Leadership | None = None
        self._buffer: dict[int, P.Entry] = {}
        self._votes: dict[str, P.VoteReply] = {}
        self._pre = False
        self._last_heard = 0.0
        self._deadline = 0.0
        self._last_sync = -1e9
        self._last_join = -1e9
        self._last_stale_notice = -1e9
        self._ack_scheduled = False
        self._last_ack = -1e9
        self._hb_scheduled = False
        self._last_rx = 0.0  # when a protocol message last came in (or the link was last down)
        self._tasks: list[asyncio.Task[None]] = []
        # Seals (shared.security). The boot number is stored above every earlier one before anything is sent,
        # at least the wall clock's seconds, so that a node whose replica was lost and made anew under the same
        # id is not taken for a replay of its old self.
        self.drops: dict[str, int] = {}  # protocol messages dropped, by reason (shared.security.Drop)
        self.boot = replica.next_boot(at_least=int(wall()))
        self._sealer = None if key is None else Sealer(key, self.node_id, self.boot)
        self._opener = None if key is None else Opener(
            key, boots=dict(hard.peer_boots), on_boot=replica.set_peer_boots, drops=self.drops)
        self._own_mark = b" ".join((_SEAL_TAG, self.node_id.encode(), b""))
        self._warned: set[tuple[str, str | None]] = set()
        self._term_arbiter: tuple[int, str] | None = None  # the arbiter we know of the current term
        self._catch_up: tuple[str, int] | None = None  # (arbiter, term) whose state we asked for
        self._last_catch_up = -1e9
        # Observers: called after state, commit or role changed (the worker, the arbiter services, the view).
        self.listeners: list[Callable[[], None]] = []
        self.on_applied: list[Callable[[list[StoredObject], bool], None]] = []
        self.on_role: list[Callable[[Role], None]] = []
        self.to_arbiter_handlers: list[Callable[[Any], None]] = []
        self.direct_handlers: list[Callable[[Any], None]] = []  # other messages addressed to this node
        # Called when the link says connected but nothing comes in (see tick): the agent reconnects.
        self.on_deaf: list[Callable[[], None]] = []

        # Safety mode ``available`` (docs/protocol.md, "Safety mode available"); all of it idle in ``quorum``.
        self.available = settings.farm.safety == SafetyMode.AVAILABLE
        self._heard: dict[str, float] = {}  # member -> when a protocol message from it last came in
        self._pre_term = 0  # the term our current pre-vote asks about
        self._degraded_set: frozenset[str] | None = None  # standing without a quorum: the members heard
        self._merging: set[str] = set()  # arbiter: nodes whose offered records are being committed
        self.records: dict[str, M.MergeRecord] = {}  # what we changed while the farm was split
        # An arbiter merged our records: they settle once its entry (this stamp) is committed; keys written by
        # entries applied since then keep their records (those changes are this term's, not yet settled).
        self._settle_at: Stamp | None = None
        self._touched_since: set[str] = set()
        if self.available:
            self.records = {r.key: r for r in hard.unconfirmed}
        # Set by the arbiter services: commits an offer's merge and publishes its writes and events.
        self.merge_commit: Callable[[list[tuple[str, dict[str, Any] | None]], list[dict[str, Any]],
                                     Callable[[BaseException | None], None]], None] | None = None
        self.on_availability: list[Callable[[], None]] = []  # the arbiter's degraded flag changed

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.link.subscribe(self.topics.log, self._on_log)
        self.link.subscribe(self.topics.election, self._on_election)
        self.link.subscribe(self.topics.to_node(self.node_id), self._on_direct)
        self.link.subscribe(self.topics.to_arbiter(self.node_id), self._on_to_arbiter)
        self._last_heard = self._last_rx = self._clock()
        self._reset_deadline()
        self._tasks.append(asyncio.create_task(self._ticker(), name=f"consensus-{self.node_id}"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        self._step_down("stopping")

    # --- helpers -----------------------------------------------------------------------------------------
    @property
    def members(self) -> dict[str, Member]:
        return self.state.members()

    @property
    def is_member(self) -> bool:
        return self.node_id in self.members

    @property
    def serving(self) -> bool:
        return self.leader is not None and self.leader.serving

    @property
    def arbiter_key(self) -> tuple[int, str | None, bool]:
        """Changes whenever the arbiter we report to changes or starts serving: a request sent before may
        have gone to a node that is gone, or been ignored by one not serving yet, so it is sent again."""
        return (self.term, self.arbiter, self.arbiter_serving or self.serving)

    def is_committed(self, stamp: Stamp) -> bool:
        """True when the object stamped ``stamp`` in our replica is known committed in the current term."""
        return self.applied[0] == self.commit[0] and stamp <= self.commit

    def _notify(self) -> None:
        for cb in list(self.listeners):
            cb()

    def _reset_deadline(self) -> None:
        base = self.settings.timing.election_timeout_s
        # The broker host gets the shortest timeout, so the arbiter usually sits beside the broker.
        lo, hi = (1.0, 1.25) if self.is_broker_host() else (1.5, 2.5)
        self._deadline = self._clock() + base * self._rng.uniform(lo, hi)

    def send_to_arbiter(self, msg: Model, qos: int = 1) -> bool:
        """Send ``msg`` to the arbiter we follow (False, and nothing sent, if we know of none)."""
        if self.arbiter is None:
            return False
        self._publish(self.topics.to_arbiter(self.arbiter), msg, qos)
        return True

    def send_to_node(self, node: str, msg: Model, qos: int = 1) -> None:
        """Send ``msg`` to ``node``'s inbox (the arbiter services: ``replicate``)."""
        self._publish(self.topics.to_node(node), msg, qos)

    def _publish(self, topic: str, msg: Model, qos: int = 1) -> None:
        body = P.encode(msg)
        self.link.publish(topic, body if self._sealer is None else self._sealer.seal(topic, body), qos=qos)

    @property
    def dropped(self) -> dict[str, int]:
        """Protocol messages dropped so far, by reason (``unsigned``, ``forged``, ``replayed``, ``stale``,
        ``malformed``, ``refused``): published in the node's state."""
        return dict(self.drops)

    def refuse(self, kind: str, sender: str | None, why: str) -> None:
        """Count and log (once per sender, then at debug level) a well-sealed message the protocol refuses."""
        self._drop(Drop.REFUSED, sender, f"{kind} from {sender}: {why}")

    def _drop(self, reason: Drop, sender: str | None, why: str, *, counted: bool = False) -> None:
        if not counted:
            self.drops[reason.value] = self.drops.get(reason.value, 0) + 1
        key = (reason.value, sender)
        first = key not in self._warned and len(self._warned) < _WARN_ONCE_LIMIT
        if first:
            self._warned.add(key)
        # A peer's doing: said once per reason and sender, then at debug level, so that it cannot flood the log.
        log.log(logging.WARNING if first else logging.DEBUG, "%s: dropped a protocol message (%s): %s%s",
                self.node_id, reason.value, why[:300], " (further ones at debug level)" if first else "")

    def _is_own(self, payload: bytes) -> bool:
        """A message of ours, come back on a topic we also publish to (the log, elections): ignored there
        whatever it says, so neither opened nor decoded. Only our own key can seal one as us."""
        if self._sealer is None:
            return False
        return payload[payload.rfind(b"\n") + 1:].startswith(self._own_mark)

    def _receive(self, msg: Message, kinds: tuple[type[Model], ...]) -> tuple[str | None, Any] | None:
        """Open, decode and bind one protocol message: ``(sender, message)``, or None (dropped and counted).

        The sender is the one the seal names and proves; the message must name the same (``SENDER_FIELD``),
        and be of a kind this topic carries. In an open farm nothing is verified: the message's own word is
        taken (None for the kinds that name no sender)."""
        now = self._last_rx = self._clock()
        sender: str | None = None
        body = msg.payload
        if self._opener is not None:
            try:
                opened = self._opener.open(msg.topic, body)
            except SealError as exc:
                self._drop(exc.reason, None, f"on {msg.topic}: {exc}", counted=True)
                return None
            sender, body = opened.sender, opened.body
        try:
            m = P.decode(body)
        except ProtocolError as exc:
            self._drop(Drop.MALFORMED, sender, f"on {msg.topic} from {sender}: {exc}")
            return None
        if not isinstance(m, kinds):
            self.refuse(m.kind, sender, f"not a message of {msg.topic}")
            return None
        claimed = P.claimed_sender(m)
        if sender is None:
            sender = claimed
        elif P.needs_sender(m) and claimed != sender:
            self.refuse(getattr(m, "kind", "?"), sender, f"it names {claimed} as its sender")
            return None
        if self.available and sender is not None and sender != self.node_id and self.state.is_member(sender):
            self._heard[sender] = now
        return sender, m

    def _judge_arbiter(self, sender: str | None, kind: str, term: int) -> _From:
        """Entries, heartbeats and snapshots come only from the arbiter of their term: a member (while we
        know of none, anyone: a fresh node), and once we know that term's arbiter, nobody else."""
        if sender is None:
            return _From.ARBITER  # an open farm: nothing to check against
        if self.state.has_members() and not self.state.is_member(sender):
            if term <= self.term:
                self.refuse(kind, sender, f"not a member (term {term})")
                return _From.REFUSED
            return _From.ASK  # enrolled, and arbiter, while we were away? Its state will tell
        if term < self.term:
            return _From.OLDER
        known = self._term_arbiter
        if known is not None and known[0] == term and known[1] != sender:
            self.refuse(kind, sender, f"the arbiter of term {term} is {known[1]}")
            return _From.REFUSED
        if not P.term_reachable(self.term, term):
            return _From.ASK
        return _From.ARBITER

    def _know_arbiter(self, term: int, node: str | None) -> None:
        if node is not None and term == self.term:
            self._term_arbiter = (term, node)

    def _ask_state(self, sender: str, kind: str, term: int) -> None:
        """A member's message of a term past our reach, or an unknown node's claim to be an arbiter: it changes
        nothing, but we may be the one behind (away while the farm moved on, or while that node was enrolled).
        Ask it for its state; its snapshot is taken if it answers for that term (docs/protocol.md, "Catching
        up"). At most every SYNC_RETRY_S."""
        self.refuse(kind, sender, f"term {term} is out of our reach (ours is {self.term}) or its sender is "
                                  f"unknown to us: asking it for its state")
        now = self._clock()
        if now - self._last_catch_up < SYNC_RETRY_S:
            return
        self._last_catch_up = now
        self._catch_up = (sender, term)
        offer = list(self.records.values()) if self._must_offer(term) else []
        self._publish(self.topics.to_arbiter(sender),
                      P.SyncRequest(node=self.node_id, term=self.term, last=self.applied, offer=offer))

    def _answers_ask(self, sender: str | None, m: P.Snapshot) -> bool:
        """Whether snapshot ``m`` answers our request for the state of an arbiter past our reach: from that
        node, for that term or a little past it, listing that node as an enrolled member (and us, if we are)."""
        asked = self._catch_up
        if asked is None or sender != asked[0] or m.term < asked[1] or not P.term_reachable(asked[1], m.term):
            return False
        keys = {o.key: o.value for o in m.objects}
        theirs = keys.get(member_key(sender))
        if theirs is None or theirs.get("retired_at") is not None:
            return False
        return not self.is_member or keys.get(member_key(self.node_id)) is not None

    def _accepts_farm(self, farm: str) -> bool:
        return self.farm is None or self.farm == farm

    def _adopt_term(self, term: int) -> None:
        if term > self.term:
            self.term = term
            self._settle_at = None  # that merge may never be committed: our records stay, to be offered again
            self.replica.set_term(term)
            if self.role != Role.FOLLOWER:
                self._step_down(f"saw term {term}")

    def _step_down(self, why: str) -> None:
        was = self.role
        leader = self.leader
        self.role = Role.FOLLOWER
        self.leader = None
        if leader is not None:
            for p in leader.proposals:
                if not p.future.done():
                    p.future.set_exception(NotCommitted(f"arbiter of term {leader.term} stepped down: {why}"))
        if was != Role.FOLLOWER:
            log.info("%s: %s → follower (%s)", self.node_id, was.value, why)
            for cb in list(self.on_role):
                cb(self.role)

    # --- incoming: the log (entries and heartbeats, in order) --------------------------------------------
    def _on_log(self, msg: Message) -> None:
        if self._is_own(msg.payload):
            self._last_rx = self._clock()  # our own heartbeats say the link delivers (see _check_deaf)
            return
        got = self._receive(msg, P.ON_LOG)
        if got is None:
            return
        sender, m = got
        if isinstance(m, P.Heartbeat):
            self._on_heartbeat(sender, m)
        else:
            self._on_entry(sender, m)

    def _on_heartbeat(self, sender: str | None, hb: P.Heartbeat) -> None:
        if not self._accepts_farm(hb.farm) or hb.arbiter == self.node_id:
            return
        judged = self._judge_arbiter(sender, hb.kind, hb.term)
        if judged == _From.OLDER:
            self._tell_stale_arbiter(hb.arbiter)
        elif judged == _From.ASK:
            self._ask_state(hb.arbiter, hb.kind, hb.term)
        if judged != _From.ARBITER:
            return
        self._adopt_term(hb.term)
        if self.role == Role.CANDIDATE:
            self._step_down(f"{hb.arbiter} is arbiter of term {hb.term}")
        self.farm = self.farm or self._join_farm(hb.farm)
        self.arbiter = hb.arbiter
        self._know_arbiter(hb.term, hb.arbiter)
        self.arbiter_serving = hb.serving
        self._last_heard = self._clock()
        self._reset_deadline()
        self._learn_commit(hb.term, hb.commit)
        if self.applied[0] < hb.term or self.applied[1] < hb.seq:
            self._request_sync()
        elif self.records and not hb.partial and self.applied == (hb.term, hb.seq):
            self._clear_records("every member holds every entry of the arbiter")
        # Entries are acknowledged as they arrive; a heartbeat needs an ack only now and then, as a sign of life
        # (every member acking every heartbeat would be the arbiter's busiest traffic).
        if self._clock() - self._last_ack >= self.settings.timing.node_timeout_s / 4:
            self._schedule_ack()
        if not self.is_member and self.node_id not in self.state.retired():
            self._request_join()  # a retired node id is never enrolled again: it does not ask
        self._notify()

    def _tell_stale_arbiter(self, arbiter: str | None) -> None:
        """An arbiter of a term older than ours is serving: tell it our term, so that it steps down and an election
        past our term follows (Raft: a member answers a stale leader with its term). Ignoring it is not enough:
        our pre-votes are refused while the others hear that arbiter, so we would never follow anyone again.
        Found by the LAN tests in safety mode available: a node that had stood alone in term 101 came back to
        a farm served in term 2, and was left out until the end."""
        if arbiter is None or arbiter == self.node_id:
            return
        now = self._clock()
        if now - self._last_stale_notice < self.settings.timing.election_timeout_s:
            return
        self._last_stale_notice = now
        log.info("%s: %s serves an older term than our %d: telling it", self.node_id, arbiter, self.term)
        self._publish(self.topics.to_arbiter(arbiter), P.Ack(node=self.node_id, term=self.term, seq=0), qos=0)

    def _join_farm(self, farm: str) -> str:
        self.replica.set_farm(farm)
        return farm

    def _learn_commit(self, term: int, seq: int) -> None:
        self.commit = max(self.commit, (term, seq))
        settle = self._settle_at
        if settle is not None and self.commit[0] == settle[0] and self.commit >= settle:
            self._settle_at = None
            kept = {k: r for k, r in self.records.items() if k in self._touched_since}
            if len(kept) < len(self.records):
                log.info("%s: %d records of the split settled (their merge by the arbiter of term %d is "
                         "committed)", self.node_id, len(self.records) - len(kept), settle[0])
                self._store_records(kept)

    def _on_entry(self, sender: str | None, e: P.Entry) -> None:
        if not self._accepts_farm(e.farm) or e.arbiter == self.node_id:
            return
        if self.leader is not None and e.term == self.leader.term:
            self.refuse(e.kind, sender, f"we are the arbiter of term {e.term}")
            return
        judged = self._judge_arbiter(sender, e.kind, e.term)
        if judged == _From.OLDER:
            self._tell_stale_arbiter(e.arbiter)
        elif judged == _From.ASK and e.arbiter is not None:
            self._ask_state(e.arbiter, e.kind, e.term)
        if judged != _From.ARBITER:
            return
        self._adopt_term(e.term)
        self.farm = self.farm or self._join_farm(e.farm)
        if e.arbiter is not None and e.term == self.term:
            self.arbiter = e.arbiter
            self._know_arbiter(e.term, e.arbiter)
        self._last_heard = self._clock()
        self._reset_deadline()
        if e.snapshot:
            if e.stamp > self.applied and self._may_replace(e.term, ()):
                self._apply(e.stamp, e.writes, snapshot=True, partial=e.partial)
            elif e.stamp > self.applied:
                self._request_sync()  # offers our records first
        elif self.applied == (e.term, e.seq - 1):
            self._apply(e.stamp, e.writes, snapshot=False, partial=e.partial)
        elif e.stamp > self.applied:
            self._buffer[e.seq] = e
            self._request_sync()
        self._drain()
        self._learn_commit(e.term, e.commit)
        self._schedule_ack()
        self._notify()

    def _drain(self) -> None:
        term, seq = self.applied
        self._buffer = {s: e for s, e in self._buffer.items() if e.term == self.term and s > seq}
        while term == self.term and (seq + 1) in self._buffer:
            e = self._buffer.pop(seq + 1)
            self._apply(e.stamp, e.writes, snapshot=False, partial=e.partial)
            term, seq = self.applied

    def _apply(self, stamp: Stamp, writes: list[StoredObject], *, snapshot: bool, partial: bool = False) -> None:
        # The objects, `applied`, a snapshot's `base` and the records of a split go to disk in one transaction:
        # a crash between a snapshot's objects and its base left a stale base, which a later merge counted.
        records = self._records_after(writes, snapshot=snapshot, partial=partial) if self.available else None
        self.replica.apply(stamp, writes, snapshot=snapshot, base=(stamp[0], 1) if snapshot else None,
                           records=None if records is None else records.values())
        if records is not None:
            self.records = records
        if snapshot:
            self.base = (stamp[0], 1)
            self.state.replace(writes)
        else:
            self.state.apply(writes)
        self.applied = stamp
        for cb in list(self.on_applied):
            cb(writes, snapshot)

    def _schedule_ack(self) -> None:
        if self._ack_scheduled:
            return
        self._ack_scheduled = True
        asyncio.get_running_loop().call_soon(self._send_ack)

    def _send_ack(self) -> None:
        self._ack_scheduled = False
        if self.role == Role.ARBITER:
            return
        self._last_ack = self._clock()
        term, seq = self.applied
        # QoS 0: an ack is cumulative and sent again with the next entry or now and then with a heartbeat, so a
        # lost one only delays a commit; QoS 1 would double the packets of the farm's busiest traffic.
        if term == self.term:
            self.send_to_arbiter(P.Ack(node=self.node_id, term=term, seq=seq), qos=0)
        else:
            # Still alive and listening, but without this term's snapshot: acknowledge nothing yet.
            self.send_to_arbiter(P.Ack(node=self.node_id, term=self.term, seq=0), qos=0)

    def _request_sync(self) -> None:
        now = self._clock()
        if now - self._last_sync < SYNC_RETRY_S:
            return
        self._last_sync = now
        offer = list(self.records.values()) if self._must_offer(self.term) else []
        self.send_to_arbiter(P.SyncRequest(node=self.node_id, term=self.term, last=self.applied, offer=offer))

    def _request_join(self) -> None:
        now = self._clock()
        if now - self._last_join < max(1.0, self.settings.timing.heartbeat_s * 4):
            return
        self._last_join = now
        self.send_to_arbiter(P.Join(node=self.node_id, witness=self.settings.witness))

    # --- incoming: direct messages (snapshots, votes for us) ---------------------------------------------
    def _on_direct(self, msg: Message) -> None:
        got = self._receive(msg, P.TO_NODE)
        if got is None:
            return
        sender, m = got
        if isinstance(m, P.Snapshot):
            self._on_snapshot(sender, m)
        elif isinstance(m, P.VoteReply):
            self._on_vote(sender, m)
        elif sender is not None and sender != self.arbiter:
            self.refuse(m.kind, sender, f"only the arbiter we follow ({self.arbiter}) sends it")
        else:
            for handler in list(self.direct_handlers):
                handler(m)

    def _on_snapshot(self, sender: str | None, m: P.Snapshot) -> None:
        """A snapshot from the arbiter of its term (see _judge_arbiter), or the answer to our asking for one."""
        if not self._accepts_farm(m.farm) or sender == self.node_id:
            return
        if self._answers_ask(sender, m):
            log.info("%s: catching up with %s, arbiter of term %d (ours was %d)", self.node_id, sender, m.term,
                     self.term)
            self._catch_up = None
        else:
            judged = self._judge_arbiter(sender, m.kind, m.term)
            if judged == _From.ASK:
                # Out of reach, or from a node we do not know, and not what we asked for: an honest arbiter
                # sends a snapshot only to a node that asked it (a heartbeat or entry of its makes us ask).
                self.refuse(m.kind, sender, f"a snapshot of term {m.term} we did not ask for")
            if judged != _From.ARBITER:
                return
        if self.leader is not None and m.term == self.leader.term:
            self.refuse(m.kind, sender, f"we are the arbiter of term {m.term}")
            return
        self._adopt_term(m.term)
        if sender is not None and m.term == self.term:
            self.arbiter = sender
            self._know_arbiter(m.term, sender)
        self.farm = self.farm or self._join_farm(m.farm)
        if (m.term, m.seq) > self.applied and not self._may_replace(m.term, m.merged):
            self._request_sync()  # offers our records first
            return
        if (m.term, m.seq) > self.applied:
            self._apply((m.term, m.seq), m.objects, snapshot=True, partial=m.partial)
            self._drain()
        if self.available and self.node_id in m.merged and self.records and not m.partial:
            # The arbiter merged our records into this state, which it has proposed but may not have
            # committed yet: we hold it now (and acknowledge it, so our weight counts towards that commit),
            # and keep our records until we see it committed. Were they dropped here, an arbiter lost
            # before that commit would take our side's changes with it.
            # A partial state (some member does not follow that arbiter) settles nothing: the members it
            # lacks have not seen our changes, and the next arbiter may be one of them. Our records stay,
            # with their ancestors, until every member holds every entry (found by the LAN tests: records
            # settled by one side's merge were never offered to the arbiter of the other side, which took a
            # failed copy back to printing).
            self._settle_at = (m.term, m.seq)
            self._touched_since = set()
        self._learn_commit(m.term, m.commit)
        self._schedule_ack()
        self._notify()

    # --- election ----------------------------------------------------------------------------------------
    def _hears_arbiter(self) -> bool:
        """A live arbiter was heard within the election timeout (we are it, or it sends us heartbeats)."""
        if self.role == Role.ARBITER:
            return True
        recent = self._clock() - self._last_heard < self.settings.timing.election_timeout_s
        return self.arbiter is not None and recent

    def _on_election(self, msg: Message) -> None:
        if self._is_own(msg.payload):
            self._last_rx = self._clock()  # our own pre-votes say the link delivers (see _check_deaf)
            return
        got = self._receive(msg, P.ON_ELECTION)
        if got is None:
            return
        sender, m = got
        if m.candidate == self.node_id or not self._accepts_farm(m.farm) or self.farm is None:
            return
        # Checked before anything (the term first) changes: only members stand, and never out of reach.
        if not self.state.is_member(m.candidate):
            self.refuse(m.kind, sender, "not a member: only members stand")
            return
        if not P.term_reachable(self.term, m.term, m.last[0]):
            self.refuse(m.kind, sender, f"term {m.term} is out of reach (ours is {self.term}, its log's "
                                        f"{m.last[0]})")
            return
        if m.pre:
            # Pre-vote (Raft §9.6): would we vote? Changes nothing here, so a node that was cut off and
            # comes back cannot depose a working arbiter by bumping the term.
            granted = m.term > self.term - 1 and m.candidate in self.members and not self._hears_arbiter()
            self._publish(self.topics.to_node(m.candidate), P.VoteReply(
                farm=self.farm, term=m.term, voter=self.node_id, candidate=m.candidate, granted=granted,
                last=self.applied, base=self.base, pre=True))
            return
        if m.term < self.term:
            granted = False
        else:
            self._adopt_term(m.term)
            vote = self.replica.voted_for
            free = vote is None or vote[0] < m.term or vote[1] == m.candidate
            granted = free and m.candidate in self.members and self.role != Role.ARBITER
            if granted:
                self.replica.record_vote(m.term, m.candidate)  # durable before it is sent
                self._reset_deadline()
        objects = self.state.newer_than(m.last) if granted else []
        base = self.base
        if granted and self.available and self.records and m.last[0] != self.applied[0]:
            # Our history and the candidate's split apart: stamps of the two do not compare. Our changes reach
            # its state as an offer (three-way merge), never by stamp — and so our base must not count either:
            # as the floor of the candidate's merge it would drop every object of its own history stamped below
            # it (found by the LAN tests: a takeover that kept 0 of 11 objects).
            objects, base = [], ZERO_STAMP
        reply = P.VoteReply(
            farm=self.farm, term=self.term, voter=self.node_id, candidate=m.candidate, granted=granted,
            last=self.applied, base=base, objects=objects,
        )
        self._publish(self.topics.to_node(m.candidate), reply)

    def _pre_vote(self) -> None:
        """Ask whether a quorum would vote for us, before touching the term."""
        if self.farm is None:
            return
        term = self._next_term()
        if term is None:
            self._reset_deadline()
            return
        self.role = Role.CANDIDATE
        self._pre = True
        self._pre_term = term
        self._votes = {}
        self._degraded_set = None
        self._reset_deadline()
        self._publish(self.topics.election, P.VoteRequest(
            farm=self.farm, term=term, candidate=self.node_id, last=self.applied, pre=True))
        self._maybe_win()

    def _next_term(self) -> int | None:
        """The term to stand for: the next one, or in ``available`` mode the next one we own (shared.merge)."""
        if not self.available:
            return self.term + 1
        slot = M.term_slot(self.node_id, [*self.state.members().values(), *self.state.retired().values()])
        if slot is None:
            log.debug("%s: no term slot (more members than %d): not standing", self.node_id, M.TERM_SLOTS)
            return None
        return M.next_owned_term(self.term, slot)

    def _stand(self) -> None:
        """Start a term, vote for ourselves, ask for votes."""
        if self.farm is None:
            return
        self._pre = False
        term = self._next_term()
        if term is None:
            return
        self.replica.record_vote(term, self.node_id)
        self.term = term
        self.role = Role.CANDIDATE
        self.arbiter = None
        self._votes = {}
        self._reset_deadline()
        log.info("%s: standing for term %d", self.node_id, term)
        self._publish(self.topics.election, P.VoteRequest(
            farm=self.farm, term=term, candidate=self.node_id, last=self.applied))
        self._maybe_win()

    def _on_vote(self, sender: str | None, v: P.VoteReply) -> None:
        # Checked before anything (the term first) changes: a vote counts only from a member, for us.
        if not self.state.is_member(v.voter):
            self.refuse(v.kind, sender, "not a member: only members vote")
            return
        if v.candidate != self.node_id:
            self.refuse(v.kind, sender, f"a vote for {v.candidate} sent to {self.node_id}")
            return
        if v.term > self.term and not P.term_reachable(self.term, v.term):
            self.refuse(v.kind, sender, f"term {v.term} is out of reach (ours is {self.term})")
            return
        if self.role != Role.CANDIDATE:
            if v.term > self.term and not v.pre:
                self._adopt_term(v.term)
            return
        if v.pre != self._pre:
            return
        expected = self._pre_term if self._pre else self.term
        if v.term != expected:
            if v.term > self.term and not v.pre:
                self._adopt_term(v.term)
            return
        if v.granted:
            self._votes[v.voter] = v
            self._maybe_win()

    def _maybe_win(self) -> None:
        voters = {self.node_id, *self._votes}
        if not has_quorum(voters, self.members):
            if self._degraded_set is not None and not self._pre:
                heard = {n: m for n, m in self.members.items() if n in self._degraded_set}
                if has_quorum(voters, heard):
                    self._take_over(degraded=True)
            return
        if self._pre:
            self._stand()
        else:
            self._take_over()

    def _stand_degraded(self, now: float) -> bool:
        """Safety mode ``available``: a pre-vote round ended without a quorum. Stand anyway if the members who
        said yes make a majority of the members heard lately (a lone node: itself); True if we stood."""
        memory = HEARD_MEMORY_TIMEOUTS * self.settings.timing.election_timeout_s
        heard = frozenset({self.node_id} | {n for n, t in self._heard.items() if now - t <= memory})
        members = {n: m for n, m in self.members.items() if n in heard}
        if self.node_id not in members or not has_quorum({self.node_id, *self._votes}, members):
            return False
        log.warning("%s: no quorum in sight (heard: %s); standing without one (safety mode available)",
                    self.node_id, ", ".join(sorted(heard)))
        self._stand()
        if self.role == Role.CANDIDATE:
            self._degraded_set = heard
            self._maybe_win()
        return True

    def _take_over(self, degraded: bool = False) -> None:
        """Quorum read done: merge, re-stamp with our term, send as the term's first entry."""
        term = self.term
        sources: list[tuple[Stamp, list[StoredObject]]] = [(self.base, list(self.state.objects.values()))]
        sources += [(v.base, v.objects) for v in self._votes.values()]
        merged = merge_newest(sources)
        stamp = (term, 1)
        # Tombstones survive one term change (so a stale replica cannot resurrect what they deleted), then go.
        kept = [
            StoredObject(key=o.key, stamp=stamp, value=o.value)
            for o in merged.values()
            if o.value is not None or o.stamp[0] >= term - 1
        ]
        voters = list(self._votes)
        own: tuple[list[tuple[str, dict[str, Any] | None]], list[dict[str, Any]]] = ([], [])
        if self.available and self.records:
            # Our own records, merged like any member's offer: the quorum read compares stamps, and a voter of
            # another history can carry higher stamps for older values (found by the LAN tests: a copy this node
            # had finished came back as printing from the other side's snapshot, and it printed it again).
            # Merged now, before our takeover snapshot is applied here and rewrites the records' values.
            own = M.merge_offer({o.key: o.value for o in kept}, list(self.records.values()))
        self._become_arbiter(term, kept, degraded=degraded)
        writes, events = own
        if writes or events:
            log.warning("%s: merging our own %d records of the split: %d changes, %d conflicts", self.node_id,
                        len(self.records), len(writes), len(events))
            if self.merge_commit is not None:
                self.merge_commit(writes, events, lambda _exc: None)
            else:
                self.propose(writes).add_done_callback(lambda f: f.exception())  # a failure: records stay
        if self.available and self.leader is not None:
            now = self._clock()
            for v in voters:  # their votes were heard just now: no false "no quorum" at takeover
                self.leader.last_heard.setdefault(v, now)

    def _become_arbiter(self, term: int, objects: list[StoredObject], degraded: bool = False) -> None:
        self.role = Role.ARBITER
        self.arbiter = self.node_id
        self._term_arbiter = (term, self.node_id)
        self._degraded_set = None
        self.leader = Leadership(term=term, next_seq=1, degraded=degraded)
        log.info("%s: arbiter of term %d (%d objects)%s", self.node_id, term, len(objects),
                 " without a quorum: safety mode available, conflicts possible" if degraded else "")
        self._propose_entry(objects, snapshot=True)
        for cb in list(self.on_role):
            cb(self.role)
        self._notify()

    def bootstrap(self) -> None:
        """Found a new farm with this node as its only member (a one-node farm is its own quorum)."""
        assert self.farm is None and not self.state.objects
        self.farm = self._join_farm(uuid.uuid4().hex[:16])
        term = self.term + 1
        self.replica.record_vote(term, self.node_id)
        self.term = term
        member = Member(node_id=self.node_id, weight=1, witness=self.settings.witness)
        objects = [StoredObject(key=member_key(self.node_id), stamp=(term, 1), value=member.model_dump(mode="json"))]
        log.info("%s: founding farm %s", self.node_id, self.farm)
        self._become_arbiter(term, objects)

    # --- arbiter: proposing and committing ---------------------------------------------------------------
    def propose(self, writes: list[tuple[str, dict[str, Any] | None]]) -> asyncio.Future[None]:
        """Stamp ``writes`` as the next entry, store and send it; the future resolves once it is committed.

        Raises NotCommitted (through the future) if this node stops being the arbiter first."""
        assert self.leader is not None and self.farm is not None
        stamp = (self.leader.term, self.leader.next_seq)
        objects = [StoredObject(key=k, stamp=stamp, value=v) for k, v in writes]
        return self._propose_entry(objects, snapshot=False)

    def next_stamp(self) -> Stamp:
        assert self.leader is not None
        return (self.leader.term, self.leader.next_seq)

    def _propose_entry(self, objects: list[StoredObject], *, snapshot: bool) -> asyncio.Future[None]:
        leader = self.leader
        assert leader is not None and self.farm is not None
        seq = leader.next_seq
        leader.next_seq += 1
        stamp = (leader.term, seq)
        # Safety mode available: every entry is partial when it is made. Until every member has acknowledged
        # it, a member may lack it — also one cut off a moment ago, which we still count as following us for up
        # to node_timeout_s, while its side may already elect its own arbiter (found by the LAN tests: a copy's
        # `done`, made 0.4 s after a member was cut off, was known to no record, and the other side's arbiter
        # had the copy printing and had it printed again). Records settle on a heartbeat that says every member
        # holds every entry (see _heartbeat).
        partial = self.available
        self._apply(stamp, objects, snapshot=snapshot, partial=partial)  # our own durable copy first
        leader.acked[self.node_id] = seq
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        leader.proposals.append(Proposal(seq, fut))
        self._publish(self.topics.log, P.Entry(
            farm=self.farm, term=leader.term, seq=seq, commit=leader.commit, writes=objects, snapshot=snapshot,
            partial=partial, arbiter=self.node_id))
        self._advance_commit()
        return fut

    def _advance_commit(self) -> None:
        leader = self.leader
        if leader is None:
            return
        commit = committed_seq(leader.acked, self.members)
        if self.available:
            commit = max(commit, self._degraded_commit(leader))
        if commit <= leader.commit:
            return
        leader.commit = commit
        self.commit = (leader.term, commit)
        if not leader.serving:
            leader.serving = True
            log.info("%s: serving as arbiter of term %d", self.node_id, leader.term)
        done = [p for p in leader.proposals if p.seq <= commit]
        leader.proposals = [p for p in leader.proposals if p.seq > commit]
        self._schedule_heartbeat()  # tell members at once: a node waits for its start to be committed
        for p in done:
            if not p.future.done():
                p.future.set_result(None)
        self._notify()

    def _schedule_heartbeat(self) -> None:
        if self._hb_scheduled:
            return
        self._hb_scheduled = True
        asyncio.get_running_loop().call_soon(self._heartbeat)

    def _heartbeat(self) -> None:
        self._hb_scheduled = False
        leader = self.leader
        if leader is None or self.farm is None:
            return
        partial = self.available and not self._all_hold(leader, leader.next_seq - 1)
        if self.available and not partial and self.records:
            self._clear_records("every member holds every entry")
        self._publish(self.topics.log, P.Heartbeat(
            farm=self.farm, term=leader.term, arbiter=self.node_id, seq=leader.next_seq - 1,
            commit=leader.commit, serving=leader.serving, partial=partial, degraded=leader.degraded))

    def _on_to_arbiter(self, msg: Message) -> None:
        leader = self.leader
        if leader is None:
            return
        got = self._receive(msg, P.TO_ARBITER)
        if got is None:
            return
        _, m = got
        node: str = m.node  # every kind sent to an arbiter names its sender (bound to the seal)
        if not self.state.is_member(node):
            # A node that is not (or no longer) a member may ask to be enrolled, and for the state it needs
            # to get there; a retired one may still report the end of a print it had started (orphaned).
            ever = self.state.member(node) is not None
            if isinstance(m, P.Ack) and m.term <= leader.term:
                return  # a node that follows us before its enrollment (or after its retirement): nothing to count
            if not (isinstance(m, (P.Join, P.SyncRequest))
                    or (ever and isinstance(m, (P.FinishReport, P.Release, P.StartRequest)))):
                self.refuse(m.kind, node, "not a member")
                return
        else:
            leader.last_heard[node] = self._clock()
        if isinstance(m, P.Ack):
            if m.term == leader.term:
                if m.seq >= leader.next_seq:
                    self.refuse(m.kind, node, f"acknowledges seq {m.seq} of term {m.term}, never sent")
                elif m.seq > leader.acked.get(node, 0):
                    leader.acked[node] = m.seq
                    self._advance_commit()
            elif m.term > leader.term:
                # A member past our term tells us we are stale (see _tell_stale_arbiter); never out of reach.
                if not P.term_reachable(self.term, m.term):
                    self.refuse(m.kind, node, f"term {m.term} is out of reach (ours is {self.term})")
                    return
                self._adopt_term(m.term)
            return
        if isinstance(m, P.SyncRequest):
            if self.available and m.offer:
                if self.state.member(node) is None:
                    self.refuse(m.kind, node, "an offer to merge from a node never enrolled")
                    return
                self._merge_offer(m)
                return
            self._send_snapshot(node)
            return
        for handler in list(self.to_arbiter_handlers):
            handler(m)

    # --- timers ------------------------------------------------------------------------------------------
    async def _ticker(self) -> None:
        interval = self.settings.timing.heartbeat_s
        while True:
            await asyncio.sleep(interval)
            try:
                self.tick(self._clock())
            except Exception:  # a bug here must not stop elections
                log.exception("%s: consensus tick failed", self.node_id)

    def tick(self, now: float) -> None:
        self._check_deaf(now)
        if self.role == Role.ARBITER:
            self._heartbeat()
            self._check_quorum(now)
            return
        if not self.link.connected or now < self._deadline:
            return
        if self.available and self.role == Role.CANDIDATE and self._pre and self._stand_degraded(now):
            return
        if self.farm is None:
            if self.may_bootstrap():
                self.bootstrap()
            else:
                self._reset_deadline()
            return
        if self.is_member and not self.settings.witness:
            self._pre_vote()
        else:
            self._reset_deadline()

    def _check_deaf(self, now: float) -> None:
        """A link that says connected but delivers nothing is dropped and made again.

        A member always hears something within about two election timeouts: the arbiter's heartbeats, or, with
        no arbiter, the pre-votes of the members (its own come back to it too). Hearing nothing for twice that
        while connected means the connection is up but deaf: seen in the LAN chaos tests after an amqtt "timeout
        waiting for PUBACK" on a throttled link, with the node then cut off from the farm for good."""
        if not self.link.connected or self.farm is None or not self.is_member:
            self._last_rx = now
            return
        limit = max(3.0, 4 * self.settings.timing.election_timeout_s)
        if now - self._last_rx > limit:
            log.warning("%s: connected, but no protocol message for %.1f s: reconnecting", self.node_id,
                        now - self._last_rx)
            self._last_rx = now
            for cb in list(self.on_deaf):
                cb()

    def _check_quorum(self, now: float) -> None:
        """An arbiter that has not heard a quorum for an election timeout steps down (it may be cut off).

        In safety mode ``available`` it goes on serving instead, marked degraded (it says so in its heartbeats
        and in the bridge info), and commits with the members that still follow it."""
        leader = self.leader
        assert leader is not None
        window = self.settings.timing.election_timeout_s * 2
        heard = {n for n, t in leader.last_heard.items() if now - t <= window} | {self.node_id}
        if self.available:
            lost = not has_quorum(heard, self.members)
            if not lost:
                leader.quorum_lost_since = None
            elif leader.quorum_lost_since is None:
                leader.quorum_lost_since = now
            # Degraded once a quorum has been out of hearing for a whole window, as quorum mode steps down then.
            since = leader.quorum_lost_since
            degraded = since is not None and (leader.degraded or now - since > window)
            if degraded != leader.degraded:
                leader.degraded = degraded
                log.warning("%s: %s", self.node_id, "no quorum: serving in safety mode available, conflicts "
                            "possible" if degraded else "a quorum is back")
                for cb in list(self.on_availability):
                    cb()
            self._advance_commit()  # followers may have gone: the degraded commit counts the ones left
            return
        if has_quorum(heard, self.members):
            leader.quorum_lost_since = None
        elif leader.quorum_lost_since is None:
            leader.quorum_lost_since = now
        elif now - leader.quorum_lost_since > window:
            self._step_down("lost contact with a quorum")


    # --- safety mode available: records, offers, the degraded commit ------------------------------------
    @property
    def degraded(self) -> bool:
        """This node is the arbiter and serves without hearing a quorum (safety mode ``available``)."""
        return self.leader is not None and self.leader.degraded

    def availability_note(self) -> str | None:
        """What a person should read about the farm's safety right now (None: nothing to say)."""
        if not self.available or self.leader is None:
            return None
        if self.leader.degraded:
            return ("no quorum: available mode, conflicts possible (this side of the farm keeps printing; "
                    "conflicts are reported on netq/events and by `netq jobs` after the heal)")
        if not self._whole():
            return "not every member follows the arbiter: available mode, conflicts possible after a heal"
        return None

    def _must_offer(self, term: int) -> bool:
        """Our records must reach the arbiter of ``term`` as an offer before its snapshot may replace our state.

        Also when we voted for it with our objects: a candidate that may win without a quorum (safety mode
        available) may have taken over before our vote arrived, which we cannot tell (found by the LAN tests:
        a paused arbiter's last adds, sent in a vote that came too late, were lost). Offering what it already
        holds merges to no change."""
        return self.available and bool(self.records) and self.applied[0] != term

    def _may_replace(self, term: int, merged: Any) -> bool:
        """May a snapshot of ``term`` replace our state? Not while it may lack our records (available mode)."""
        return not self._must_offer(term) or self.node_id in merged

    def _records_after(
        self, writes: list[StoredObject], *, snapshot: bool, partial: bool
    ) -> dict[str, M.MergeRecord] | None:
        """Before ``writes`` are applied: our records of the split once they are, if a partial entry or
        snapshot changes them (else None); the caller stores them with the writes."""
        if self._settle_at is not None and not snapshot:
            self._touched_since.update(o.key for o in writes)
        if not partial:
            return None
        # A key a snapshot does not hold is not recorded as deleted: the snapshot's arbiter may never have had
        # it (it was made on our side), and a deletion reaches a snapshot as a tombstone (None), which is.
        # Found by the LAN tests: a node that followed a lone arbiter for a while offered the jobs that arbiter
        # had never seen as deletions, and the merge removed them (a removal wins over edits).
        after: dict[str, dict[str, Any] | None] = {o.key: o.value for o in writes}
        before = {k: self.state.get(k) for k in after}
        records = M.record_changes(self.records, before, after)
        return records if records != self.records else None

    def _clear_records(self, why: str) -> None:
        if not self.records:
            return
        log.info("%s: %d records of the split settled (%s)", self.node_id, len(self.records), why)
        self._store_records({})

    def _store_records(self, records: dict[str, M.MergeRecord]) -> None:
        """Our records, kept durably (replica meta ``unconfirmed``) before anything relies on them."""
        self.records = records
        self.replica.store_records(records.values())

    def _followers(self, leader: Leadership) -> set[str]:
        """Members that hold our term's snapshot (they acked a seq of it) and were heard lately, and us."""
        now = self._clock()
        timeout = self.settings.timing.node_timeout_s
        return {self.node_id} | {
            n for n, seq in leader.acked.items()
            if seq >= 1 and now - leader.last_heard.get(n, -1e9) <= timeout
        }

    def _whole(self) -> bool:
        leader = self.leader
        return leader is not None and set(self.members) <= self._followers(leader)

    def _all_hold(self, leader: Leadership, seq: int) -> bool:
        """Every member follows us and has acknowledged ``seq`` of our term: no member lacks a change up to it."""
        followers = self._followers(leader)
        return all(n == self.node_id or (n in followers and leader.acked.get(n, 0) >= seq) for n in self.members)

    def _degraded_commit(self, leader: Leadership) -> int:
        """Without a quorum: the seq held by a majority (by weight) of the members that follow us.

        Only for an arbiter elected without a quorum, or one that has served and lost it: a new arbiter of a
        quorum waits for its voters to follow it, as in ``quorum`` mode."""
        followers = self._followers(leader)
        if has_quorum(followers, self.members) or not (leader.degraded or leader.serving):
            return 0  # the ordinary commit rule decides
        members = {n: m for n, m in self.members.items() if n in followers}
        return committed_seq({n: s for n, s in leader.acked.items() if n in members}, members)

    def _send_snapshot(self, node: str, merged: list[str] | None = None) -> None:
        leader = self.leader
        if leader is None:
            return
        self._publish(self.topics.to_node(node), P.Snapshot(
            farm=self.farm or "", term=leader.term, seq=leader.next_seq - 1, commit=leader.commit,
            objects=list(self.state.objects.values()), partial=self.available and not self._whole(),
            merged=merged or []))

    def _merge_offer(self, m: P.SyncRequest) -> None:
        """A node of another side offers what it changed during the split: merge it (shared.merge), propose
        the result as an ordinary change of our term, and send that node our state at once, naming it as merged.

        At once, not after the commit: the merge may need that node's acknowledgement to be committed (found by
        the LAN tests: three of five members offered records at a heal, and no merge could reach a quorum while
        they waited for their snapshot). The node keeps its records until it sees the merge committed."""
        if m.node in self._merging:
            return  # its earlier offer is being committed; the answer covers this one
        leader = self.leader
        assert leader is not None
        objects = {k: o.value for k, o in self.state.objects.items()}
        writes, events = M.merge_offer(objects, m.offer)
        log.warning("%s: merging %d records offered by %s: %d changes, %d conflicts", self.node_id,
                    len(m.offer), m.node, len(writes), len(events))
        self._merging.add(m.node)
        term = leader.term

        def done(exc: BaseException | None) -> None:
            self._merging.discard(m.node)

        if self.merge_commit is not None:
            self.merge_commit(writes, events, done)
        else:
            fut = self.propose(writes)
            fut.add_done_callback(lambda f: done(f.exception()))
        if self.leader is not None and self.leader.term == term:
            self._send_snapshot(m.node, merged=[m.node])


class NotCommitted(Exception):
    """A proposal was not committed by this arbiter (it stepped down); the request may be retried."""

