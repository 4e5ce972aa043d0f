"""The choice among compatible copies: each preference, and the order in which they win."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
from pydantic import ValidationError

from shared.scheduling import (
    ALWAYS,
    CopyView,
    FarmView,
    Material,
    OperatorSchedule,
    PrinterView,
    PrintSet,
    SchedulerParams,
    choose,
)

H = 3600.0
MONDAY = 1_704_067_200.0  # 2024-01-01 00:00 UTC, a Monday
NOW = MONDAY + 10 * 24 * H + 12 * H  # a Thursday noon
PLA = Material("PLA", "black")
RED = Material("PLA", "red")
PETG = Material("PETG", "white")
SHIFTS = OperatorSchedule.parse(["daily 06:00-22:00"])
PARAMS = SchedulerParams()


def printer(**kw: Any) -> PrinterView:
    base: dict[str, Any] = {
        "node_id": "p1", "profile": "MK3", "namespaces": ("default",), "loaded": (PLA,), "nozzle_mm": 0.4, "bed_mm": (250, 210, 210)
    }
    base.update(kw)
    return PrinterView(**base)


def copy(job_id: str, *, hours: float = 2.0, material: Material | None = PLA, waited_h: float = 1.0, **kw: Any) -> CopyView:
    sets = kw.pop("sets", None) or (PrintSet(f"{job_id}.gcode", hours * H, 1, (material,) if material else ()),)
    base: dict[str, Any] = {"copy": 0, "namespace": "default", "enqueued_at": NOW - waited_h * H}
    base.update(kw)
    return CopyView(job_id, sets=sets, **base)


def pick(p: PrinterView, *copies: CopyView, now: float = NOW, params: SchedulerParams = PARAMS, **kw: Any) -> str:
    choice = choose(p, list(copies), now, params, **kw)
    assert choice is not None
    return choice.job_id


def test_nothing_fits() -> None:
    assert choose(printer(), [], NOW, PARAMS) is None
    assert choose(printer(), [copy("a", namespace="elsewhere")], NOW, PARAMS) is None
    assert choose(printer(nozzle_mm=0.6), [copy("a", sets=(PrintSet("a", H, nozzle_mm=0.4),))], NOW, PARAMS) is None


def test_prefers_what_is_loaded() -> None:
    choice = choose(printer(), [copy("petg", material=PETG, waited_h=10), copy("pla")], NOW, PARAMS)
    assert choice is not None and choice.job_id == "pla" and choice.swaps == 0
    assert "loaded material fits" in choice.reason


def test_aging_eventually_outweighs_a_swap() -> None:
    # A swap costs swap_cost_s; waiting earns aging_weight per second: 4 h / 0.1 = 40 h.
    assert pick(printer(), copy("petg", material=PETG, waited_h=39), copy("pla", waited_h=0)) == "pla"
    assert pick(printer(), copy("petg", material=PETG, waited_h=41), copy("pla", waited_h=0)) == "petg"


def test_priority_is_strict() -> None:
    rush = copy("rush", material=PETG, waited_h=0, priority=1)
    assert pick(printer(), rush, copy("pla", waited_h=60)) == "rush"


def test_namespace_order_yields_to_a_swap_unless_strict() -> None:
    p = printer(namespaces=("orders", "internal"))
    first = copy("orders", material=PETG, namespace="orders")
    second = copy("internal", namespace="internal")
    assert pick(p, first, second) == "internal"  # 2 h of namespace cost < 4 h of swap cost
    assert pick(p, first, copy("internal-petg", material=PETG, namespace="internal")) == "orders"
    strict = SchedulerParams(namespace_cost_s=1e9)
    assert pick(p, first, second, params=strict) == "orders"


def test_overdue_goes_first_whatever_else() -> None:
    p = printer(namespaces=("orders", "internal"))
    old = copy("old", material=PETG, namespace="internal", waited_h=73, priority=-5)
    fresh = copy("fresh", namespace="orders", waited_h=1, priority=5)
    choice = choose(p, [fresh, old], NOW, PARAMS)
    assert choice is not None and choice.job_id == "old" and choice.overdue
    assert "overdue" in choice.reason


def test_overdue_window_lets_material_count_among_the_oldest() -> None:
    oldest = copy("oldest", material=PETG, waited_h=80)
    near = copy("near", waited_h=75)  # queued 5 h after the oldest: inside the 12 h window
    far = copy("far", waited_h=73)
    assert pick(printer(), oldest, near) == "near"
    assert pick(printer(), oldest, far, params=SchedulerParams(overdue_window_s=4 * H)) == "oldest"
    assert pick(printer(), oldest, near, params=SchedulerParams(overdue_window_s=0)) == "oldest"


def test_longest_first_only_if_asked_for() -> None:
    short, long = copy("short", hours=1, rank=0), copy("long", hours=9, rank=1)
    assert pick(printer(), short, long) == "short"  # default: equal cost, queue order decides
    lpt = SchedulerParams(length_weight=0.1)
    assert pick(printer(), short, long, params=lpt) == "long"
    # Not on printers that need an operator between prints under shifts: long prints are for the evening.
    assert pick(printer(operator=SHIFTS), short, long, now=MONDAY + 8 * H, params=lpt) == "short"


def test_a_print_that_outlasts_the_night_is_chosen_in_the_evening() -> None:
    manual = printer(operator=SHIFTS)
    three, ten = copy("three", hours=3, rank=0), copy("ten", hours=10, rank=1)
    evening = MONDAY + 20 * H  # shift ends at 22:00, resumes at 06:00
    choice = choose(manual, [three, ten], evening, PARAMS)
    assert choice is not None and choice.job_id == "ten" and choice.operator_wait_s == 0
    # The three-hour print would end at 23:00 and wait seven hours to be cleared.
    only_three = choose(manual, [three], evening, PARAMS)
    assert only_three is not None and only_three.operator_wait_s == pytest.approx(7 * H)
    assert "waiting for an operator" in only_three.reason
    # In the morning both end while an operator is there: queue order decides.
    assert pick(manual, three, ten, now=MONDAY + 8 * H) == "three"


def test_no_swap_at_night_when_nobody_can_swap() -> None:
    belt = printer(self_clearing=True, operator=SHIFTS)
    night = MONDAY + 23 * H
    petg = copy("petg", material=PETG, waited_h=30)
    choice = choose(belt, [petg], night, PARAMS)
    assert choice is not None and choice.operator_wait_s == pytest.approx(7 * H) and choice.swaps == 1
    assert pick(belt, petg, copy("pla", waited_h=0), now=night) == "pla"


def test_swaps_between_sets_count() -> None:
    two_colours = copy("two", sets=(PrintSet("body", H, 1, (PLA,)), PrintSet("trim", H, 1, (RED,))))
    choice = choose(printer(), [two_colours], NOW, PARAMS)
    assert choice is not None and choice.swaps == 1 and "1 material swap" in choice.reason
    assert pick(printer(), two_colours, copy("plain", hours=2)) == "plain"


def test_scarce_capabilities_go_to_the_work_that_needs_them() -> None:
    big = printer(node_id="big", bed_mm=(300, 300, 400))
    farm = FarmView([big, printer(node_id="a"), printer(node_id="b"), printer(node_id="c")])
    large = copy("large", sets=(PrintSet("large", 2 * H, 1, (PLA,), extents_mm=(280, 280, 100)),), waited_h=1)
    small = copy("small", waited_h=10)
    assert pick(big, large, small) == "small"  # without the farm, the older copy
    assert pick(big, large, small, farm=farm) == "large"


def test_a_printer_that_needs_an_operator_leaves_shared_work_to_self_clearing_ones() -> None:
    params = SchedulerParams(flexibility_cost_s=0)
    manual = printer(node_id="mk3", operator=SHIFTS)
    auto = printer(node_id="mini", profile="Mini", self_clearing=True, operator=SHIFTS)
    farm = FarmView([manual, auto])
    shared = copy("shared", sets=(PrintSet("s", 2 * H, 1, (PLA,), frozenset({"MK3", "Mini"})),), waited_h=10)
    own = copy("own", sets=(PrintSet("o", 2 * H, 1, (PLA,), frozenset({"MK3"})),), waited_h=1)
    assert pick(manual, shared, own, params=params) == "shared"  # without the farm, the older copy
    assert pick(manual, shared, own, params=params, farm=farm) == "own"
    # Not on printers that clear themselves, nor when an operator is always there.
    always = printer(node_id="mk3", operator=ALWAYS)
    assert pick(always, shared, own, params=params, farm=FarmView([always, auto])) == "shared"
    assert pick(manual, shared, own, params=params.model_copy(update={"self_clearing_cost_s": 0}), farm=farm) == "shared"


def test_a_copy_that_would_end_after_the_queue_goes_early() -> None:
    params = SchedulerParams(length_weight=0)
    farm = FarmView([printer(node_id="a"), printer(node_id="b")])
    long = copy("long", hours=20, waited_h=0)
    shorts = [copy(f"s{i}", hours=1, waited_h=5) for i in range(4)]
    assert pick(printer(), long, *shorts, params=params) == "s0"
    # Queue: 24 h over 2 printers = 12 h each; the 20 h copy would stretch the end by 8 h.
    assert pick(printer(), long, *shorts, params=params, farm=farm) == "long"


def test_the_choice_does_not_depend_on_candidate_order() -> None:
    rng = random.Random(5)
    mats = [PLA, RED, PETG, None]
    cands = [
        copy(f"j{i}", hours=rng.uniform(0.5, 8), material=rng.choice(mats), waited_h=rng.uniform(0, 90), rank=i)
        for i in range(60)
    ]
    expected = pick(printer(operator=SHIFTS), *cands)
    for _ in range(5):
        rng.shuffle(cands)
        assert pick(printer(operator=SHIFTS), *cands) == expected


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        SchedulerParams(overdue_window_s=100 * H, max_wait_s=10 * H)
    with pytest.raises(ValidationError):
        SchedulerParams(swap_cost=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        SchedulerParams(max_wait_s=0)


def test_ten_thousand_candidates_stay_fast() -> None:
    """A regression guard (the benchmark measures it properly): far below a second even on a slow machine."""
    rng = random.Random(1)
    mats = [PLA, RED, PETG]
    cands = [
        copy(f"j{i}", hours=rng.uniform(0.5, 8), material=rng.choice(mats), waited_h=rng.uniform(0, 60), rank=i)
        for i in range(10_000)
    ]
    p = printer(operator=SHIFTS)
    farm = FarmView([p, printer(node_id="b", operator=ALWAYS)])
    t0 = time.perf_counter()
    choose(p, cands, MONDAY + 20 * H, PARAMS, farm)
    assert time.perf_counter() - t0 < 0.5
