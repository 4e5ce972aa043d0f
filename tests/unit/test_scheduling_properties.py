"""Property tests of the scheduler: never an incompatible grant, never a copy granted twice, every wait
bounded by the aging rule, and a lower bound that no run beats.

Farms and workloads are drawn at random; the simulator (the same ``choose`` the arbiter calls) runs them.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.scheduling import (
    ALWAYS,
    Choice,
    CopyView,
    Material,
    OperatorSchedule,
    PrinterView,
    PrintSet,
    SchedulerParams,
    choose,
    compatible,
    make_filter,
)
from shared.scheduling.baselines import fifo, in_order_first_fit
from shared.scheduling.bounds import lower_bound
from shared.scheduling.sim import OperatorModel, SimJob, SimResult, Workload, simulate

H = 3600.0
T0 = 1_704_096_000.0  # Monday 08:00 UTC
EPS = 1e-3

MATERIALS = [Material("PLA", "black"), Material("pla", "Red"), Material("PETG", "white"), Material("PLA"), Material("TPU")]
materials = st.sampled_from(MATERIALS)
PROFILES = ["Prusa i3 MK3S+", "Prusa Mini", "Creality Ender 3"]
SCHEDULES = [ALWAYS, OperatorSchedule.parse(["daily 08:00-18:00"]), OperatorSchedule.parse(["Mon-Fri 06:00-22:00"])]

printer_views = st.builds(
    PrinterView,
    node_id=st.sampled_from(["a", "b", "c"]),
    profile=st.sampled_from(PROFILES),
    namespaces=st.sampled_from([("x",), ("y",), ("x", "y"), ("y", "x")]),
    loaded=st.lists(st.none() | materials, min_size=1, max_size=2).map(tuple),
    nozzle_mm=st.sampled_from([None, 0.4, 0.6]),
    bed_mm=st.sampled_from([None, (180.0, 180.0, 180.0), (250.0, 210.0, 210.0), (300.0, 300.0, 400.0)]),
    circular_bed=st.booleans(),
    aliases=st.sampled_from([frozenset(), frozenset({"MK3"})]),
    material_types=st.sampled_from([frozenset(), frozenset({"PLA"}), frozenset({"pla", "PETG"})]),
    tags=st.sampled_from([frozenset(), frozenset({"ejector"}), frozenset({"Enclosure", "ejector"})]),
    self_clearing=st.booleans(),
    allow_swaps=st.booleans(),
    operator=st.sampled_from(SCHEDULES),
)

print_sets = st.builds(
    PrintSet,
    file=st.just("part.gcode"),
    duration_s=st.integers(15, 14 * 60).map(lambda m: m * 60.0),
    count=st.integers(1, 3),
    materials=st.lists(st.none() | materials, max_size=2).map(tuple),
    profiles=st.sampled_from([frozenset(), frozenset({"Prusa i3 MK3S+"}), frozenset({"prusa mini", "MK3"})]),
    nozzle_mm=st.sampled_from([None, 0.4, 0.6]),
    extents_mm=st.sampled_from(
        [None, (100.0, 100.0, 50.0), (200.0, 200.0, 200.0), (240.0, 200.0, 100.0), (120.0, 120.0, 250.0)]
    ),
)

copy_views = st.builds(
    CopyView,
    job_id=st.sampled_from(["j1", "j2", "j3", "j4", "j5", "j6"]),
    copy=st.integers(0, 3),
    namespace=st.sampled_from(["x", "y", "z"]),
    sets=st.lists(print_sets, min_size=1, max_size=3).map(tuple),
    enqueued_at=st.floats(T0, T0 + 8 * 24 * H),
    rank=st.integers(0, 20),
    priority=st.integers(-1, 1),
    tags=st.sampled_from([frozenset(), frozenset({"Ejector"}), frozenset({"enclosure"})]),
)

scheduler_params = st.builds(
    SchedulerParams,
    max_wait_s=st.sampled_from([6 * H, 48 * H, 72 * H]),
    overdue_window_s=st.sampled_from([0.0, 3 * H]),
    namespace_cost_s=st.sampled_from([0.0, 2 * H, 1e9]),
    aging_weight=st.sampled_from([0.0, 0.1, 1.0]),
)


@given(printer_views, copy_views)
def test_the_fast_filter_agrees_with_the_explained_check(p: PrinterView, c: CopyView) -> None:
    for consider_loaded in (True, False):
        assert make_filter(p, consider_loaded=consider_loaded)(c) == compatible(p, c, consider_loaded=consider_loaded).ok


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(printer_views, st.lists(copy_views, max_size=25), st.floats(T0, T0 + 12 * 24 * H), scheduler_params)
def test_choose_grants_a_fitting_candidate_by_the_rules(
    p: PrinterView, cands: list[CopyView], now: float, params: SchedulerParams
) -> None:
    choice = choose(p, cands, now, params)
    fitting = [c for c in cands if c.namespace in p.namespaces and compatible(p, c).ok]
    if not fitting:
        assert choice is None
        return
    assert choice is not None
    assert any(choice.copy is c for c in fitting)  # one of the candidates, and one the printer can print
    overdue = [c for c in fitting if c.enqueued_at <= now - params.max_wait_s]
    if overdue:
        oldest = min(c.enqueued_at for c in overdue)
        assert choice.overdue
        assert choice.copy.enqueued_at <= now - params.max_wait_s
        assert choice.copy.enqueued_at <= oldest + params.overdue_window_s
    else:
        assert not choice.overdue
        assert choice.copy.priority == max(c.priority for c in fitting)


# -- whole runs -----------------------------------------------------------------------------------------

sim_printers: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    profile=st.sampled_from(["A", "B"]),
    nozzle_mm=st.sampled_from([0.4, 0.6]),
    bed_mm=st.sampled_from([(200.0, 200.0, 200.0), (300.0, 300.0, 300.0)]),
    loaded=st.sampled_from([(Material("PLA", "black"),), (Material("PETG", "white"),), (None,)]),
    self_clearing=st.booleans(),
    namespaces=st.sampled_from([("x",), ("x", "y"), ("y", "x")]),
)

sim_sets = st.builds(
    PrintSet,
    file=st.just("f.gcode"),
    duration_s=st.integers(15, 12 * 60).map(lambda m: m * 60.0),
    count=st.integers(1, 3),
    materials=st.sampled_from([(), (Material("PLA", "black"),), (Material("PETG", "white"),), (Material("PLA", "red"),)]),
    profiles=st.sampled_from([frozenset(), frozenset({"A"})]),
    nozzle_mm=st.sampled_from([None, 0.4, 0.6]),
    extents_mm=st.sampled_from([None, (150.0, 150.0, 150.0), (250.0, 250.0, 250.0)]),
)

sim_jobs: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    namespace=st.sampled_from(["x", "y"]),
    sets=st.lists(sim_sets, min_size=1, max_size=2).map(tuple),
    copies=st.integers(1, 3),
    arrival_s=st.integers(0, 48).map(lambda h: h * H),
    priority=st.sampled_from([0, 0, 1]),
)


@st.composite
def workloads(draw: Any, always_operator: bool = False) -> Workload:
    schedule = ALWAYS if always_operator else draw(st.sampled_from(SCHEDULES))
    printers = tuple(
        PrinterView(node_id=f"p{i}", operator=schedule, **spec)
        for i, spec in enumerate(draw(st.lists(sim_printers, min_size=1, max_size=4)))
    )
    jobs = tuple(SimJob(job_id=f"j{i}", **spec) for i, spec in enumerate(draw(st.lists(sim_jobs, min_size=1, max_size=10))))
    operators = OperatorModel(count=draw(st.integers(1, 2)), schedule=schedule)
    return Workload("random", printers, jobs, operators, start=T0)


def _able(w: Workload) -> dict[tuple[str, int], set[str]]:
    """Per copy, the printers that serve its namespace and can print it (the random farms allow swaps)."""
    return {
        c.key: {p.node_id for p in w.printers if c.namespace in p.ns_rank and compatible(p, c).ok}
        for c in w.copies()
    }


def _check_run(w: Workload, r: SimResult) -> None:
    able = _able(w)
    keys = [(g.job_id, g.copy) for g in r.grants]
    assert len(keys) == len(set(keys)), "a copy was granted twice"
    assert set(keys) == {k for k, nodes in able.items() if nodes}, "a printable copy was never granted"
    assert r.unassigned == sum(1 for nodes in able.values() if not nodes)
    for g in r.grants:
        assert g.node_id in able[(g.job_id, g.copy)]
    # One whole copy at a time: a printer's copies never overlap.
    by_node: dict[str, list[tuple[float, float]]] = {}
    for g in r.grants:
        by_node.setdefault(g.node_id, []).append((g.granted_s, g.finished_s))
    for spans in by_node.values():
        spans.sort()
        assert all(a_end <= b_start + EPS for (_, a_end), (b_start, _) in itertools.pairwise(spans))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_runs_grant_every_copy_once_to_a_printer_that_can_print_it_and_never_beat_the_bound(w: Workload) -> None:
    bound = lower_bound(w).value_s
    estimated: dict[tuple[str, int], int] = {}

    def recording(p: PrinterView, cands: Any, now: float, params: SchedulerParams, farm: Any) -> Any:
        choice = choose(p, cands, now, params, farm)
        if choice is not None:
            estimated[choice.copy.key] = choice.swaps
        return choice

    for policy in (recording, in_order_first_fit, fifo):
        r = simulate(w, policy)
        _check_run(w, r)
        if r.grants:
            assert r.makespan_s >= bound - EPS
    # The swaps the scheduler expects are the swaps the printer makes.
    assert estimated == {(g.job_id, g.copy): g.swaps for g in simulate(w, choose).grants}


# -- the bound against the true optimum of tiny farms ---------------------------------------------------

# Schedules that make the operator's absence bind: long nights, one-hour shifts (a long print can span two
# stretches without an operator and cover more than the longest), the weekend; runs start at any hour.
TINY_SCHEDULES = [
    OperatorSchedule.parse(["daily 06:00-22:00"]),
    OperatorSchedule.parse(["daily 08:00-18:00"]),
    OperatorSchedule.parse(["daily 12:00-13:00"]),
    OperatorSchedule.parse(["daily 06:00-07:00", "daily 12:00-13:00"]),
    OperatorSchedule.parse(["Mon-Fri 06:00-22:00", "Sat 08:00-14:00"]),
    ALWAYS,
]

tiny_sets = st.builds(
    PrintSet,
    file=st.just("f.gcode"),
    duration_s=st.integers(1, 4 * 24).map(lambda q: q * 900.0),  # 15 min to 24 h
    count=st.integers(1, 2),
    materials=st.sampled_from([(), (Material("PLA", "black"),), (Material("PETG", "white"),)]),
    profiles=st.sampled_from([frozenset(), frozenset(), frozenset({"A"})]),
)


@st.composite
def tiny_workloads(draw: Any) -> Workload:
    """Two printers and at most five copies: few enough to try every schedule."""
    schedule = draw(st.sampled_from(TINY_SCHEDULES))
    printers = tuple(
        PrinterView(
            f"p{i}",
            draw(st.sampled_from(["A", "B"])),
            ("x",),
            (Material("PLA", "black"),),
            self_clearing=draw(st.booleans()),
            operator=schedule,
        )
        for i in range(2)
    )
    jobs = tuple(
        SimJob(f"j{i}", "x", tuple(draw(st.lists(tiny_sets, min_size=1, max_size=2))), 1, draw(st.integers(0, 40)) * H)
        for i in range(draw(st.integers(1, 5)))
    )
    operators = OperatorModel(count=draw(st.integers(1, 2)), schedule=schedule)
    return Workload("tiny", printers, jobs, operators, start=T0 + draw(st.integers(0, 23)) * H)


def _planned(plan: dict[str, list[tuple[str, int]]]) -> Any:
    """A policy that gives each printer its planned copies in order, each as soon as it is queued."""
    done = {node: 0 for node in plan}

    def policy(p: PrinterView, cands: Any, now: float, params: SchedulerParams, farm: Any) -> Any:
        todo = plan[p.node_id]
        if done[p.node_id] == len(todo):
            return None
        want = todo[done[p.node_id]]
        for c in cands:
            if c.key == want:
                done[p.node_id] += 1
                return Choice(c, 0, 0.0, overdue=False, reason="plan")
        return None

    return policy


def _best_makespan(w: Workload) -> float:
    """The shortest makespan of every schedule that gives each printer a sequence of copies and starts each
    as soon as it can (every split of the copies between the printers, every order on each)."""
    able = _able(w)
    copies = [c.key for c in w.copies() if able[c.key]]
    nodes = [p.node_id for p in w.printers]
    best = math.inf
    for owners in itertools.product(nodes, repeat=len(copies)):
        if any(node not in able[key] for node, key in zip(owners, copies, strict=True)):
            continue
        mine = {n: [k for k, o in zip(copies, owners, strict=True) if o == n] for n in nodes}
        for orders in itertools.product(*(itertools.permutations(mine[n]) for n in nodes)):
            r = simulate(w, _planned({n: list(o) for n, o in zip(nodes, orders, strict=True)}))
            assert r.unassigned == len(w.copies()) - len(copies)
            best = min(best, r.makespan_s)
    return best


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_workloads())
def test_the_bound_never_exceeds_the_best_schedule_of_a_tiny_farm(w: Workload) -> None:
    """Every schedule is tried (a printer starting each copy as soon as it is queued and its bed is clear; a
    schedule with deliberate idle time is never shorter on these farms, and any schedule bounds the optimum
    from above), so this checks the bound, the night-slot assignment included, against the optimum itself."""
    bound = lower_bound(w).value_s
    best = _best_makespan(w)
    if math.isfinite(best):
        assert bound <= best + EPS


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    workloads(always_operator=True),
    st.sampled_from([2 * H, 6 * H, 12 * H]),
    st.sampled_from([0.0, H, 2 * H]),
)
def test_every_wait_is_bounded_by_the_aging_rule(w: Workload, max_wait: float, window: float) -> None:
    """Once a copy ``c`` is overdue, every request from a printer that could print it grants a copy queued no
    later than ``window`` after ``c``; so ``c`` is granted after at most N + 1 such requests, N being the
    copies queued by then that were still waiting, and within D × ceil((N + 1) / R) of becoming overdue,
    with R such printers, each asking at least every D."""
    params = SchedulerParams(max_wait_s=max_wait, overdue_window_s=window)
    r = simulate(w, choose, params)
    _check_run(w, r)
    able = _able(w)
    enqueued = {c.key: c.enqueued_at - w.start for c in w.copies()}
    granted = {(g.job_id, g.copy): g.granted_s for g in r.grants}
    for key, at in granted.items():
        due = enqueued[key] + max_wait
        if at <= due + EPS:
            continue
        nodes = able[key]
        between = [q for q in r.requests if q.node_id in nodes and due + EPS < q.at_s < at - EPS]
        for q in between:
            assert q.granted is not None, "a printer that could print an overdue copy was left idle"
            assert enqueued[q.granted] <= enqueued[key] + window + EPS, "an overdue copy was passed over"
        ahead = [
            k for k, t in enqueued.items()
            if k != key and t <= enqueued[key] + window + EPS and granted.get(k, math.inf) > due - EPS and able[k] & nodes
        ]
        assert len(between) <= len(ahead)
        # The time bound, with D the longest a printer of R went without asking from the moment the copy
        # was overdue until it was granted (counting the stretch that runs past the grant).
        gaps: list[float] = []
        for node in nodes:
            times = sorted(q.at_s for q in r.requests if q.node_id == node and q.at_s > due + EPS)
            marks = [due, *(t for t in times if t <= at + EPS)]
            marks += [t for t in times if t > at + EPS][:1]
            gaps.extend(b - a for a, b in itertools.pairwise(marks))
        longest = max(gaps, default=0.0)
        assert at - due <= longest * math.ceil((len(ahead) + 1) / len(nodes)) + EPS


@settings(max_examples=30, deadline=None)
@given(
    printers=st.integers(1, 4),
    hours=st.integers(1, 6),
    max_wait_h=st.integers(6, 48),
)
def test_a_steady_stream_of_better_work_cannot_starve_a_copy(printers: int, hours: int, max_wait_h: int) -> None:
    """Printers prefer the "rush" queue, have PLA loaded, and rush PLA work keeps arriving faster than they can
    print it. A low-priority PETG copy in their second queue is still granted within the aging bound plus
    one print; without the bound it would wait until the stream stops."""
    pla, petg = Material("PLA", "black"), Material("PETG", "white")
    farm = tuple(
        PrinterView(f"p{i}", "MK3", ("rush", "slow"), (pla,), self_clearing=True) for i in range(printers)
    )
    stream_h = max_wait_h + 10 * hours
    every = hours * H / (2 * printers)  # twice what the farm can print
    # One rush copy per printer at the start, the PETG copy a second later, then the stream.
    jobs = [SimJob("starved", "slow", (PrintSet("s", hours * H, 1, (petg,)),), arrival_s=1, priority=-1)]
    jobs += [
        SimJob(f"r{i}", "rush", (PrintSet("r", hours * H, 1, (pla,)),), arrival_s=max(0, i - printers + 1) * every)
        for i in range(int(stream_h * H / every))
    ]
    w = Workload("stream", farm, tuple(jobs), OperatorModel(count=1), start=T0, self_clear_s=120)
    bounded = SchedulerParams(max_wait_s=max_wait_h * H, overdue_window_s=0, namespace_cost_s=1e9)
    r = simulate(w, choose, bounded)
    granted = next(g.granted_s for g in r.grants if g.job_id == "starved")
    assert granted <= 1 + max_wait_h * H + hours * H + 120 + EPS

    unbounded = SchedulerParams(max_wait_s=1e9, overdue_window_s=0, namespace_cost_s=1e9)
    r = simulate(w, choose, unbounded)
    last_arrival = max(j.arrival_s for j in jobs)
    assert next(g.granted_s for g in r.grants if g.job_id == "starved") > last_arrival
