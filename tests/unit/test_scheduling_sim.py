"""The farm simulator and the makespan lower bound, on small farms whose timelines can be worked out by hand,
and the benchmark's workloads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from shared.scheduling import (
    ALWAYS,
    Choice,
    CopyView,
    FarmView,
    Material,
    OperatorSchedule,
    PrinterView,
    PrintSet,
    SchedulerParams,
    choose,
)
from shared.scheduling.baselines import fifo, in_order_first_fit
from shared.scheduling.bounds import lower_bound
from shared.scheduling.sim import OperatorModel, SimJob, SimulationError, Workload, simulate

H = 3600.0
MINUTE = 60.0
MONDAY = 1_704_067_200.0  # 2024-01-01 00:00 UTC, a Monday
PLA = Material("PLA", "black")
PETG = Material("PETG", "white")
BENCH = Path(__file__).resolve().parents[2] / "bench"


def printer(node_id: str = "p1", **kw: Any) -> PrinterView:
    base: dict[str, Any] = {"profile": "MK3", "namespaces": ("default",), "loaded": (PLA,), "bed_mm": (250, 210, 210)}
    base.update(kw)
    return PrinterView(node_id, **base)


def job(job_id: str, hours: float, *, count: int = 1, copies: int = 1, material: Material = PLA, **kw: Any) -> SimJob:
    sets = kw.pop("sets", None) or (PrintSet(f"{job_id}.gcode", hours * H, count, (material,)),)
    return SimJob(job_id, kw.pop("namespace", "default"), sets, copies, **kw)


def workload(printers: Sequence[PrinterView], jobs: Sequence[SimJob], **kw: Any) -> Workload:
    return Workload("test", tuple(printers), tuple(jobs), **kw)


def test_a_print_that_ends_at_night_waits_for_the_morning_operator() -> None:
    shifts = OperatorSchedule.parse(["daily 06:00-22:00"])
    w = workload(
        [printer(operator=shifts)],
        [job("a", 3), job("b", 3)],
        start=MONDAY + 20 * H,
        operators=OperatorModel(count=1, schedule=shifts, clear_s=3 * MINUTE),
    )
    r = simulate(w, choose)
    # a: 20:00-23:00; cleared at 06:00-06:03; b: 06:03-09:03.
    assert r.makespan_s == pytest.approx(13 * H + 3 * MINUTE)
    assert r.wait_off_shift_s == pytest.approx(7 * H)
    assert (r.clear_visits, r.swap_visits, r.swaps) == (2, 0, 0)
    assert [g.job_id for g in r.grants] == ["a", "b"]
    assert r.printers[0].printing_s == pytest.approx(6 * H)


def test_swaps_take_operator_time_and_are_counted() -> None:
    w = workload(
        [printer(self_clearing=True)],
        [job("petg", 1, material=PETG), job("pla", 1, arrival_s=10 * H)],
        operators=OperatorModel(count=1, swap_s=10 * MINUTE),
        self_clear_s=2 * MINUTE,
    )
    r = simulate(w, choose)
    assert (r.swaps, r.swap_visits, r.clear_visits) == (2, 2, 0)
    assert r.grants[0].finished_s == pytest.approx(10 * MINUTE + H + 2 * MINUTE)
    assert r.makespan_s == pytest.approx(10 * H + 10 * MINUTE + H)
    assert r.operator_busy_s == pytest.approx(20 * MINUTE)


def test_busy_operators_make_printers_queue() -> None:
    w = workload(
        [printer(f"p{i}") for i in range(3)],
        [job(f"j{i}", 1) for i in range(6)],
        operators=OperatorModel(count=1, clear_s=10 * MINUTE),
    )
    r = simulate(w, fifo)
    # Three prints end together at 1 h; one operator clears them one after the other (the second and third
    # printers wait 10 and 20 min); the second round of prints is staggered, so nobody waits again.
    assert r.wait_busy_s == pytest.approx((10 + 20) * MINUTE)
    assert r.makespan_s == pytest.approx(2 * H + 30 * MINUTE)


def test_a_printer_prints_its_whole_copy_before_taking_other_work() -> None:
    sets = (PrintSet("body", 2 * H, 2, (PLA,)), PrintSet("lid", H, 3, (PLA,)))
    w = workload(
        [printer("a", self_clearing=True), printer("b", self_clearing=True)],
        [job("box", 0, copies=2, sets=sets), job("other", 1, copies=3, arrival_s=30 * MINUTE)],
        self_clear_s=0,
    )
    r = simulate(w, choose)
    boxes = [g for g in r.grants if g.job_id == "box"]
    assert {g.node_id for g in boxes} == {"a", "b"}
    for g in boxes:
        assert g.finished_s - g.granted_s == pytest.approx(7 * H)
        others = [o for o in r.grants if o.node_id == g.node_id and o.job_id != "box"]
        assert all(o.granted_s >= g.finished_s for o in others)


def test_runs_are_deterministic() -> None:
    jobs = [job(f"j{i}", 1 + (i * 7) % 5, material=[PLA, PETG][i % 2], arrival_s=(i * 13 % 7) * H) for i in range(30)]
    w = workload([printer(f"p{i}", loaded=([PLA, PETG][i % 2],)) for i in range(4)], jobs)
    first, second = simulate(w, choose), simulate(w, choose)
    assert first == second
    assert first.grants == second.grants and first.requests == second.requests


def test_the_simulator_refuses_a_grant_that_breaks_the_rules() -> None:
    w = workload([printer(bed_mm=(100, 100, 100))], [job("a", 1), job("big", 1, sets=(PrintSet("b", H, extents_mm=(200, 1, 1)),))])

    def careless(p: PrinterView, cands: Sequence[CopyView], now: float, params: SchedulerParams,
                 farm: FarmView | None) -> Choice | None:
        return Choice(max(cands, key=lambda c: c.job_id), 0, 0.0, overdue=False, reason="")

    with pytest.raises(SimulationError, match="cannot print"):
        simulate(w, careless)

    ghost = CopyView("ghost", 0, "default", (PrintSet("g", H),), MONDAY)

    def inventive(p: PrinterView, cands: Sequence[CopyView], now: float, params: SchedulerParams,
                  farm: FarmView | None) -> Choice | None:
        return Choice(ghost, 0, 0.0, overdue=False, reason="")

    with pytest.raises(SimulationError, match="not queued"):
        simulate(w, inventive)


def test_in_order_first_fit_ignores_loaded_material_and_the_scheduler_does_not() -> None:
    printers = [printer("black", loaded=(PLA,)), printer("white", loaded=(PETG,))]
    jobs = [job(f"j{i}", 2, material=[PETG, PLA][i % 2]) for i in range(8)]
    w = workload(printers, jobs)
    assert simulate(w, choose).swaps == 0
    assert simulate(w, in_order_first_fit).swaps > 0


def test_copies_no_printer_can_print_stay_queued() -> None:
    w = workload([printer()], [job("a", 1), job("wide", 1, sets=(PrintSet("w", H, extents_mm=(900, 1, 1)),))])
    r = simulate(w, choose)
    assert r.unassigned == 1 and [g.job_id for g in r.grants] == ["a"]
    assert lower_bound(w).unprintable == 1


# -- the lower bound ------------------------------------------------------------------------------------


def test_bound_is_total_work_over_printers_or_the_longest_copy() -> None:
    w = workload([printer(f"p{i}", self_clearing=True) for i in range(4)], [job(f"j{i}", 3) for i in range(8)], self_clear_s=0)
    assert lower_bound(w).value_s == pytest.approx(6 * H, abs=2)
    w = workload([printer(f"p{i}", self_clearing=True) for i in range(4)], [job("long", 10), job("short", 1)], self_clear_s=0)
    assert lower_bound(w).value_s == pytest.approx(10 * H, abs=2)
    assert lower_bound(w).binding == "longest copy"


def test_bound_counts_release_times() -> None:
    w = workload(
        [printer(f"p{i}", self_clearing=True) for i in range(2)],
        [job("early", 1), job("late", 4, copies=2, arrival_s=20 * H)],
        self_clear_s=0,
    )
    assert lower_bound(w).value_s == pytest.approx(24 * H, abs=2)


def test_bound_is_tightened_per_compatibility_class() -> None:
    big = printer("big", bed_mm=(300, 300, 400), self_clearing=True)
    smalls = [printer(f"s{i}", self_clearing=True) for i in range(3)]
    large = (PrintSet("large", 5 * H, 1, (PLA,), extents_mm=(280, 280, 100)),)
    w = workload([big, *smalls], [job("large", 0, copies=4, sets=large), job("small", 1, copies=4)], self_clear_s=0)
    bound = lower_bound(w)
    assert bound.work_over_printers_s == pytest.approx(6 * H)
    assert bound.value_s == pytest.approx(20 * H, abs=2)  # only "big" can print the large parts
    assert "1 printers (1 × MK3)" in bound.binding


def test_bound_counts_nights_for_printers_that_need_an_operator() -> None:
    shifts = OperatorSchedule.parse(["daily 08:00-16:00"])
    w = workload(
        [printer(operator=shifts)],
        [job("j", 1, copies=10)],
        start=MONDAY + 8 * H,
        operators=OperatorModel(count=1, schedule=shifts, clear_s=3 * MINUTE),
    )
    bound = lower_bound(w).value_s
    # 8 h on Monday's shift, at most one 1 h print through the night, the rest (and 9 clearings) on Tuesday.
    assert bound == pytest.approx(24 * H + 1.45 * H, abs=2)
    r = simulate(w, choose)
    assert r.makespan_s >= bound
    assert r.makespan_s == pytest.approx(26.1 * H)


def test_bound_counts_only_the_long_prints_there_are_for_the_nights() -> None:
    shifts = OperatorSchedule.parse(["daily 06:00-22:00"])
    w = workload(
        [printer(operator=shifts)],
        [job("long", 20), job("short", 1, copies=30)],
        start=MONDAY + 6 * H,
        operators=OperatorModel(count=1, schedule=shifts, clear_s=3 * MINUTE),
    )
    # 51.5 h of work and clearing. Two shifts give 32 h; the 20 h print covers one night (8 h of it, not 20),
    # the second night has only a 1 h print for it; the remaining 10.5 h go on Wednesday from 06:00 (48 h).
    bound = lower_bound(w).value_s
    assert bound == pytest.approx(58.5 * H, abs=2)
    assert simulate(w, choose).makespan_s >= bound


def test_bound_never_exceeds_what_any_policy_achieves_on_the_mixed_farm() -> None:
    w = _bench().mixed(seed=5, min_copies=120)
    bound = lower_bound(w).value_s
    for policy in (choose, in_order_first_fit, fifo):
        assert simulate(w, policy).makespan_s >= bound


# -- the benchmark's workloads --------------------------------------------------------------------------


def _bench() -> Any:
    """``bench/farmsim/workloads.py`` (bench/ is not a package: import it from its folder, then leave
    sys.path as it was)."""
    import importlib
    import sys

    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("farmsim.workloads")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name", ["uniform", "materials", "mixed", "mixed-weekdays"])
def test_bench_workloads_are_seeded_printable_and_big_enough(name: str) -> None:
    make = _bench().WORKLOADS[name]
    w = make()
    assert w == make()  # same seed, same workload
    assert w != make(seed=99)
    assert len(w.printers) >= 20
    assert sum(j.copies for j in w.jobs) >= 500
    assert lower_bound(w).unprintable == 0


def test_mixed_workload_has_what_it_claims() -> None:
    w = _bench().mixed()
    assert len({p.profile for p in w.printers}) >= 5
    assert {p.nozzle_mm for p in w.printers} == {0.4, 0.6}
    assert any(p.self_clearing for p in w.printers) and not all(p.self_clearing for p in w.printers)
    assert not w.operators.schedule.is_always
    assert all(p.operator == w.operators.schedule for p in w.printers)
    assert w.printers[0].operator != ALWAYS
