"""Which broker this node uses, and whether it hosts one: a pure decision, time passed in as ``now``.

The rule (docs: DESIGN.md, "Broker host"):

1. Only adverts of this farm (same farm id) and protocol version count.
2. A broker is *live* when its address answered our probe (or it is our own running broker). A zeroconf
   record that still names a broker which does not answer is a dead node's leftover: reachability decides.
3. If any broker is live, use it (sticky: a newcomer never moves it). If several are live (a race, a healed
   split), every node picks the one whose host ranks first; a losing host stops hosting once its clients
   have left (or after ``drain_timeout``).
4. If none is live, the eligible nodes (priority > 0) ranked by priority (high first), then node id, are
   the candidates. A node whose advertised broker does not answer is skipped (it is gone or cut off from
   us). Candidate ``k`` is expected to host from ``k * wait_timeout`` after waiting began: the first one
   hosts at once, the others wait for it, then move on to the next.
5. Never start hosting while an advertised broker has not been probed yet, nor before ``host_not_before``
   (a start-up grace that lets discovery see the other nodes first).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

Address = tuple[str, int]
"""A broker's (host, port)."""


class Action(enum.Enum):
    """What the broker host should do after a decision."""

    USE = "use"  # connect to ``Decision.broker`` (ours or another node's)
    HOST = "host"  # start our embedded broker and advertise it
    WAIT = "wait"  # no broker yet: wait for ``Decision.candidate`` to host one
    STOP_HOSTING = "stop_hosting"  # another node's broker won: stop ours, use ``Decision.broker``


@dataclass(frozen=True, slots=True)
class Advert:
    """One node's zeroconf advert: who it is, how eager it is to host, and the broker it hosts, if any."""

    node_id: str
    priority: int
    farm: str
    proto: int
    broker: Address | None = None

    @property
    def rank(self) -> tuple[int, str]:
        """Sort key: higher priority first, then lower node id."""
        return (-self.priority, self.node_id)


@dataclass(frozen=True, slots=True)
class Timing:
    """Time limits of the decision, in seconds."""

    wait_timeout: float = 2.0
    """How long to wait for a candidate to host before moving on to the next one."""
    drain_timeout: float = 10.0
    """How long a losing host keeps serving clients that have not left yet."""

    def __post_init__(self) -> None:
        if not (self.wait_timeout > 0 and self.drain_timeout >= 0):
            raise ValueError("wait_timeout must be > 0 and drain_timeout >= 0")


@dataclass(frozen=True, slots=True)
class Observation:
    """What this node sees right now."""

    adverts: tuple[Advert, ...] = ()
    """Every advert browsed (our own and foreign farms included: they are filtered here)."""
    probes: Mapping[Address, bool] = field(default_factory=dict)
    """Last probe result per advertised broker address; an address missing here was not probed yet."""
    hosted_clients: int = 0
    """MQTT clients connected to our own broker, when we run one."""


@dataclass(frozen=True, slots=True)
class ChoiceState:
    """What a node remembers between decisions."""

    waiting_since: float | None = None
    """When this node began waiting with no live broker (``None`` while one is live)."""
    losing_since: float | None = None
    """When our own broker first lost to another one (``None`` unless we are a losing host)."""
    host_not_before: float = -math.inf
    """Never start hosting before this time (start-up grace for discovery)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :func:`decide`."""

    action: Action
    broker: Address | None = None
    """USE, STOP_HOSTING: the broker to connect to. HOST, WAIT: ``None``."""
    candidate: str | None = None
    """WAIT: the node expected to host (``None`` if no node is eligible). HOST: our own node id."""
    until: float | None = None
    """WAIT, or USE while draining: decide again by this time at the latest."""


def counts(me: Advert, advert: Advert) -> bool:
    """Whether ``advert`` belongs to ``me``'s farm and protocol (foreign adverts are ignored)."""
    return advert.farm == me.farm and advert.proto == me.proto


def peers(me: Advert, adverts: Iterable[Advert]) -> list[Advert]:
    """The adverts that count, ``me`` replaced by ``me`` itself (our own browsed record may be stale)."""
    return [me] + [a for a in adverts if a.node_id != me.node_id and counts(me, a)]


def broker_key(advert: Advert) -> tuple[int, str, str, int]:
    """Order of live brokers: the first one wins (rank of its host, then its address, for ties)."""
    host, port = advert.broker if advert.broker is not None else ("", 0)
    return (-advert.priority, advert.node_id, host, port)


def live_brokers(me: Advert, obs: Observation) -> list[Advert]:
    """Adverts of live brokers, winner first. Our own running broker is live; others must answer probes."""
    live = [
        a
        for a in peers(me, obs.adverts)
        if a.broker is not None and (a.node_id == me.node_id or obs.probes.get(a.broker) is True)
    ]
    return sorted(live, key=broker_key)


def candidates(me: Advert, obs: Observation) -> list[Advert]:
    """Nodes that may host, in order; nodes whose advertised broker does not answer are left out."""
    eligible = [
        a
        for a in peers(me, obs.adverts)
        if a.priority > 0
        and (a.broker is None or a.node_id == me.node_id or obs.probes.get(a.broker) is not False)
    ]
    return sorted(eligible, key=lambda a: (a.rank, a.broker or ("", 0)))


def decide(
    me: Advert, state: ChoiceState, obs: Observation, now: float, timing: Timing = Timing()
) -> tuple[ChoiceState, Decision]:
    """Apply the rule of this module. ``me.broker`` is our own running broker, or ``None``."""
    live = live_brokers(me, obs)
    if live:
        winner = live[0]
        assert winner.broker is not None
        state = replace(state, waiting_since=None)
        if me.broker is None or winner.node_id == me.node_id:
            return replace(state, losing_since=None), Decision(Action.USE, broker=winner.broker)
        losing_since = state.losing_since if state.losing_since is not None else now
        state = replace(state, losing_since=losing_since)
        deadline = losing_since + timing.drain_timeout
        if obs.hosted_clients <= 0 or now >= deadline:
            return state, Decision(Action.STOP_HOSTING, broker=winner.broker)
        return state, Decision(Action.USE, broker=winner.broker, until=deadline)

    waiting_since = state.waiting_since if state.waiting_since is not None else now
    state = replace(state, waiting_since=waiting_since, losing_since=None)
    order = candidates(me, obs)
    if not order:
        return state, Decision(Action.WAIT)
    turn = int((now - waiting_since) // timing.wait_timeout)
    candidate = order[turn % len(order)]
    next_turn = waiting_since + (turn + 1) * timing.wait_timeout
    if candidate.node_id != me.node_id:
        return state, Decision(Action.WAIT, candidate=candidate.node_id, until=next_turn)
    if any(a.broker is not None and a.broker not in obs.probes for a in peers(me, obs.adverts)[1:]):
        # Sticky: an advertised broker that was not probed yet may well be live.
        return state, Decision(Action.WAIT, candidate=me.node_id)
    if now < state.host_not_before:
        return state, Decision(Action.WAIT, candidate=me.node_id, until=state.host_not_before)
    return state, Decision(Action.HOST, candidate=me.node_id)
