"""The broker-host decision (broker.choice): agreement, stickiness, timeouts, draining."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.choice import (
    Action,
    Address,
    Advert,
    ChoiceState,
    Decision,
    Observation,
    Timing,
    candidates,
    decide,
)

FARM = "farm-1"
PROTO = 1
T = Timing(wait_timeout=2.0, drain_timeout=10.0)


def advert(node_id: str, priority: int = 1, broker: Address | None = None, **kw: object) -> Advert:
    fields = {"farm": FARM, "proto": PROTO, **kw}
    return Advert(node_id=node_id, priority=priority, broker=broker, **fields)  # type: ignore[arg-type]


def addr(i: int) -> Address:
    return (f"10.0.0.{i + 1}", 1883)


@dataclass(frozen=True)
class Node:
    advert: Advert
    alive: bool  # a dead node's record lingers; it makes no decisions


STATUSES = ["idle", "idle_dead", "hosting", "hosting_dead"]


@st.composite
def farms(draw: st.DrawFn, statuses: list[str] = STATUSES) -> list[Node]:
    ids = draw(
        st.lists(st.text(alphabet="abcde", min_size=1, max_size=3), min_size=1, max_size=7, unique=True)
    )
    nodes = []
    for i, node_id in enumerate(ids):
        status = draw(st.sampled_from(statuses))
        priority = draw(st.integers(min_value=0, max_value=3))
        hosting = status.startswith("hosting") and priority > 0
        nodes.append(
            Node(advert(node_id, priority, addr(i) if hosting else None), alive=not status.endswith("dead"))
        )
    return nodes


def observe(nodes: list[Node], **kw: object) -> Observation:
    probes = {n.advert.broker: n.alive for n in nodes if n.advert.broker is not None}
    return Observation(adverts=tuple(n.advert for n in nodes), probes=probes, **kw)  # type: ignore[arg-type]


def decisions(nodes: list[Node], now: float = 0.0, state: ChoiceState | None = None) -> dict[str, Decision]:
    obs = observe(nodes)
    return {
        n.advert.node_id: decide(n.advert, state or ChoiceState(waiting_since=0.0), obs, now, T)[1]
        for n in nodes
        if n.alive
    }


def key(a: Advert) -> tuple[int, str]:
    return (-a.priority, a.node_id)


# --- properties -------------------------------------------------------------------------------------------


@given(farms())
def test_all_nodes_seeing_the_same_adverts_choose_the_same_broker(nodes: list[Node]) -> None:
    live = [n.advert for n in nodes if n.alive and n.advert.broker is not None]
    chosen = decisions(nodes)
    if not live:
        assert all(d.action in (Action.HOST, Action.WAIT) for d in chosen.values())
        return
    winner = min(live, key=key)
    for node_id, d in chosen.items():
        assert d.action in (Action.USE, Action.STOP_HOSTING)
        assert d.broker == winner.broker
        if node_id == winner.node_id:
            assert d.action is Action.USE


@given(farms(statuses=["idle", "idle_dead", "hosting_dead"]), st.floats(min_value=0, max_value=60))
def test_with_no_live_broker_only_the_candidate_of_the_moment_hosts(nodes: list[Node], now: float) -> None:
    chosen = decisions(nodes, now=now)
    hosts = {node_id for node_id, d in chosen.items() if d.action is Action.HOST}
    eligible = sorted((n.advert for n in nodes if n.advert.priority > 0 and n.advert.broker is None), key=key)
    if not eligible:
        assert not hosts
        return
    expected = eligible[int(now // T.wait_timeout) % len(eligible)]
    alive = {n.advert.node_id for n in nodes if n.alive}
    assert hosts == ({expected.node_id} & alive)
    for node_id, d in chosen.items():
        if node_id not in hosts:
            assert d.action is Action.WAIT and d.candidate == expected.node_id


@given(farms(statuses=["idle"]))
def test_with_no_broker_at_all_exactly_the_first_eligible_node_hosts(nodes: list[Node]) -> None:
    hosts = [node_id for node_id, d in decisions(nodes).items() if d.action is Action.HOST]
    eligible = [n.advert for n in nodes if n.advert.priority > 0]
    assert hosts == ([min(eligible, key=key).node_id] if eligible else [])


@given(farms(), st.floats(min_value=0, max_value=100), st.integers(min_value=0, max_value=3))
def test_priority_zero_never_hosts(nodes: list[Node], now: float, clients: int) -> None:
    obs = observe(nodes, hosted_clients=clients)
    for n in nodes:
        me = replace(n.advert, priority=0, broker=None)
        _, d = decide(me, ChoiceState(), obs, now, T)
        assert d.action is not Action.HOST


@given(farms(), st.integers(min_value=0, max_value=1000), st.text(alphabet="xyz", min_size=1, max_size=3))
def test_a_newcomer_never_moves_a_live_broker(nodes: list[Node], priority: int, newcomer_id: str) -> None:
    if not any(n.alive and n.advert.broker for n in nodes):
        return
    before = decisions(nodes)
    newcomer = Node(advert(newcomer_id, priority), alive=True)
    after = decisions([*nodes, newcomer])
    assert {k: v for k, v in after.items() if k != newcomer_id} == before
    assert after[newcomer_id] == Decision(Action.USE, broker=next(iter(before.values())).broker)


@given(farms(), st.sampled_from(["farm", "proto"]), st.integers(min_value=0, max_value=5))
def test_adverts_of_other_farms_or_protocols_are_ignored(nodes: list[Node], differs: str, prio: int) -> None:
    foreign = [
        Node(
            advert(f"z{i}", prio, ("10.9.9.9", 1000 + i), **{differs: "other" if differs == "farm" else 99}),
            True,
        )
        for i in range(3)
    ]
    with_foreign = decisions([*nodes, *foreign])
    assert {k: v for k, v in with_foreign.items() if not k.startswith("z")} == decisions(nodes)


@given(farms(statuses=["idle"]))
def test_an_unprobed_broker_blocks_hosting(nodes: list[Node]) -> None:
    stranger = advert("zz", 1, ("10.9.9.9", 1883))
    obs = Observation(adverts=(*(n.advert for n in nodes), stranger), probes={})
    for n in nodes:
        _, d = decide(n.advert, ChoiceState(), obs, 0.0, T)
        assert d.action is Action.WAIT


# --- simulation: nodes that act on their decisions converge --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    farms(),
    st.lists(st.floats(min_value=0, max_value=5), min_size=7, max_size=7),
    st.randoms(use_true_random=False),
)
def test_acting_on_decisions_converges_on_one_broker(
    nodes: list[Node], starts: list[float], rnd: object
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    if not any(n.alive and n.advert.priority > 0 for n in nodes):
        return
    world = {n.advert.node_id: n for n in nodes}
    start = {n.advert.node_id: s for n, s in zip(nodes, starts, strict=False)}
    states = {node_id: ChoiceState(host_not_before=start[node_id] + 0.5) for node_id in world}
    last: dict[str, Decision] = {}
    now, dt = 0.0, 0.1
    # Bound: every lingering candidate costs one wait_timeout, plus start-up.
    end = 5.0 + T.wait_timeout * (len(nodes) + 2) + T.drain_timeout
    while now < end:
        snapshot = list(world.values())  # everyone decides on the previous tick's view: races happen
        users = {d.broker for d in last.values() if d.action is Action.USE}
        order = [n for n in snapshot if n.alive and start[n.advert.node_id] <= now]
        rnd.shuffle(order)
        for n in order:
            node_id = n.advert.node_id
            clients = sum(
                1 for k, d in last.items() if k != node_id and d.broker == n.advert.broker and n.advert.broker
            )
            obs = observe(snapshot, hosted_clients=clients if n.advert.broker in users else 0)
            states[node_id], d = decide(n.advert, states[node_id], obs, now, T)
            last[node_id] = d
            if d.action is Action.HOST:
                world[node_id] = replace(n, advert=replace(n.advert, broker=(f"h-{node_id}", 1883)))
            elif d.action is Action.STOP_HOSTING:
                world[node_id] = replace(n, advert=replace(n.advert, broker=None))
        now += dt
    hosting = [n for n in world.values() if n.alive and n.advert.broker is not None]
    assert len(hosting) == 1
    brokers = {d.broker for d in last.values()}
    assert brokers == {hosting[0].advert.broker}
    assert all(d.action is Action.USE for d in last.values())


# --- examples ---------------------------------------------------------------------------------------------------


def test_candidates_wait_their_turn_then_host() -> None:
    a, b, c = advert("a", 3), advert("b", 2), advert("c", 1)
    obs = Observation(adverts=(a, b, c))
    state, d = decide(c, ChoiceState(), obs, 100.0, T)
    assert d == Decision(Action.WAIT, candidate="a", until=102.0)
    state, d = decide(c, state, obs, 101.9, T)
    assert d.candidate == "a"
    state, d = decide(c, state, obs, 102.0, T)
    assert d == Decision(Action.WAIT, candidate="b", until=104.0)
    state, d = decide(c, state, obs, 104.0, T)
    assert d == Decision(Action.HOST, candidate="c")


def test_a_dead_brokers_record_does_not_count_and_its_owner_is_skipped() -> None:
    dead = advert("a", 9, ("10.0.0.1", 1883))
    me = advert("b", 1)
    obs = Observation(adverts=(dead, me), probes={("10.0.0.1", 1883): False})
    assert candidates(me, obs) == [me]
    _, d = decide(me, ChoiceState(), obs, 0.0, T)
    assert d.action is Action.HOST


def test_ties_in_priority_go_to_the_lower_node_id() -> None:
    obs = Observation(adverts=(advert("n2", 5), advert("n1", 5), advert("n3", 7)))
    assert [a.node_id for a in candidates(advert("n1", 5), obs)] == ["n3", "n1", "n2"]


def test_start_up_grace_delays_hosting() -> None:
    me = advert("a", 1)
    state = ChoiceState(host_not_before=5.0)
    state, d = decide(me, state, Observation(adverts=(me,)), 4.0, T)
    assert d == Decision(Action.WAIT, candidate="a", until=5.0)
    _, d = decide(me, state, Observation(adverts=(me,)), 5.0, T)
    assert d.action is Action.HOST


def test_a_losing_host_drains_then_stops() -> None:
    winner = advert("a", 5, ("10.0.0.1", 1883))
    me = advert("b", 1, ("10.0.0.2", 1883))
    probes = {winner.broker: True}
    busy = Observation(adverts=(winner, me), probes=probes, hosted_clients=2)  # type: ignore[dict-item]
    state, d = decide(me, ChoiceState(), busy, 50.0, T)
    assert d == Decision(Action.USE, broker=winner.broker, until=60.0)
    state, d = decide(me, state, busy, 55.0, T)
    assert d.action is Action.USE and state.losing_since == 50.0
    _, d = decide(me, state, replace(busy, hosted_clients=0), 55.0, T)
    assert d == Decision(Action.STOP_HOSTING, broker=winner.broker)
    _, d = decide(me, state, busy, 60.0, T)
    assert d == Decision(Action.STOP_HOSTING, broker=winner.broker)


def test_own_running_broker_is_used_and_state_reset() -> None:
    me = advert("a", 1, ("127.0.0.1", 4000))
    state, d = decide(me, ChoiceState(waiting_since=1.0, losing_since=2.0), Observation(), 9.0, T)
    assert d == Decision(Action.USE, broker=("127.0.0.1", 4000))
    assert state.waiting_since is None and state.losing_since is None


def test_no_eligible_node_means_waiting_for_nobody() -> None:
    me = advert("a", 0)
    _, d = decide(me, ChoiceState(), Observation(adverts=(advert("b", 0),)), 0.0, T)
    assert d == Decision(Action.WAIT)


def test_timing_is_validated() -> None:
    with pytest.raises(ValueError):
        Timing(wait_timeout=0)
    with pytest.raises(ValueError):
        Timing(drain_timeout=-1)
