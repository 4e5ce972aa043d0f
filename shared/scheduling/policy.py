"""Which queued copy a printer that asks for work should print next.

:func:`choose` is a pure function of the printer, the queued copies, ``now``, the parameters and, optionally,
the farm's printers. It never returns a copy the printer cannot print or that was not among the candidates,
and it returns ``None`` only when no candidate fits: a printer that can work is never held idle. The rule:

1. **Filter.** Only copies in a namespace the printer serves and that it can print
   (:func:`shared.scheduling.compat.make_filter`).
2. **Overdue first.** A copy that has waited ``max_wait_s`` or longer is overdue. If any fit, the printer
   gets one of them, whatever else is queued: the cheapest (step 4) of those queued no later than
   ``overdue_window_s`` after the oldest. This bounds every wait: while a copy ``c`` is overdue, each grant
   to a printer that could print it goes to a copy queued no later than ``overdue_window_s`` after ``c``,
   and there are finitely many of those (see ``docs/scheduling.md`` for the bound).
3. **Priority.** Otherwise, only the copies of the highest user priority among those that fit.
4. **Least cost**, in seconds of printer time::

       cost = swap_cost_s × swaps                      material changes, to start it and between its sets
            + operator wait                            printer idle, waiting for an operator (shifts)
            + namespace_cost_s × namespace position    0 for the printer's first namespace
            − aging_weight × time waited
            − length_weight × print time               longest first (not on printers that need an operator
                                                       between prints under shifts)
            − end_weight × (print time − queued work per printer), when positive      [needs the farm]
            + flexibility_cost_s × (printers able − 1) / (printers − 1)               [needs the farm]
            + self_clearing_cost_s, on a printer that needs an operator after each print, under shifts,
              if a self-clearing printer could print the copy                          [needs the farm]

   Ties go to queue rank, then to the oldest, then to job id and copy index.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Hashable, Sequence

from .compat import make_filter
from .model import Choice, CopyView, PrinterView, satisfies
from .operators import OperatorSchedule
from .params import HOUR, SchedulerParams


class FarmView:
    """The printers that could take work now, to tell how many of them could print a given copy.

    Owned by the caller (the arbiter rebuilds it when a printer joins, leaves or changes capabilities);
    it caches counts per distinct set of requirements, so repeated requests stay cheap.
    """

    def __init__(self, printers: Sequence[PrinterView]) -> None:
        self.printers = tuple(printers)
        self._filters = [(p.ns_rank, make_filter(p, consider_loaded=False), p.self_clearing) for p in self.printers]
        self._cache: dict[Hashable, tuple[int, int]] = {}

    def __len__(self) -> int:
        return len(self.printers)

    def counts(self, copy: CopyView) -> tuple[int, int]:
        """How many of the farm's printers serve the copy's namespace and could print it, and how many of
        those clear their own beds."""
        key = (
            copy.namespace,
            copy.need_profiles,
            copy.need_nozzles,
            copy.need_extents,
            copy.need_tools,
            copy.need_types,
            copy.need_tags,
        )
        counts = self._cache.get(key)
        if counts is None:
            able = [auto for ns, fits, auto in self._filters if copy.namespace in ns and fits(copy)]
            counts = self._cache[key] = (len(able), sum(able))
        return counts

    def eligible(self, copy: CopyView) -> int:
        """How many of the farm's printers serve the copy's namespace and could print it."""
        return self.counts(copy)[0]


def first_swaps(printer: PrinterView, copy: CopyView) -> int:
    """Tool material changes needed before the copy's first set can start on this printer."""
    loaded = printer.loaded_keys
    return sum(1 for t, need in enumerate(copy.first_materials) if not satisfies(loaded[t], need))


def operator_wait_s(printer: PrinterView, copy: CopyView, now: float, params: SchedulerParams, swaps: int) -> float:
    """Estimated time the printer stands idle waiting for an operator while it prints ``copy`` from ``now``.

    ``swaps`` are the changes needed before the first set. Counts the wait for swaps and, on printers that do
    not clear their own bed, for clearing after each print (the last one included: the printer cannot start
    anything else until it is cleared). The operator's own working time is not counted here, and operators
    are assumed free whenever on shift.
    """
    if printer.operator.is_always:
        return 0.0
    return _OperatorClock(printer.operator, now).wait(printer, copy, params, swaps)


class _OperatorClock:
    """The operator's presence from ``now`` on, unrolled into absolute windows so that each step of the
    estimate is one bisection."""

    _HORIZON_S = 28 * 86_400

    def __init__(self, schedule: OperatorSchedule, now: float) -> None:
        self.schedule = schedule
        self.now = now
        windows = schedule.windows(now, now + self._HORIZON_S)
        self.starts = [a for a, _ in windows]
        self.ends = [b for _, b in windows]
        self.shift_end = self.ends[0] if windows and self.starts[0] <= now else now

    def next_available(self, t: float) -> float:
        i = bisect_right(self.ends, t)
        if i == len(self.ends):
            return self.schedule.next_available(t)
        start = self.starts[i]
        return max(t, start)

    def wait(self, printer: PrinterView, copy: CopyView, params: SchedulerParams, swaps: int) -> float:
        self_clearing = printer.self_clearing
        if self_clearing and not swaps and not copy.inner_swaps:
            return 0.0
        clear = params.self_clear_s if self_clearing else params.clear_s
        t = self.now
        if t + copy.work_s + (swaps + copy.inner_swaps) * params.swap_s + copy.prints * clear <= self.shift_end:
            return 0.0
        next_available = self.next_available
        waited = 0.0
        if swaps:
            resume = next_available(t)
            waited += resume - t
            t = resume + swaps * params.swap_s
        for inner, duration, count in copy.steps:
            if inner:
                resume = next_available(t)
                waited += resume - t
                t = resume + inner * params.swap_s
            if self_clearing:
                t += count * (duration + clear)
                continue
            for _ in range(count):
                t += duration
                resume = next_available(t)
                waited += resume - t
                t = resume + clear
            if math.isinf(waited):
                break
        return waited


def choose(
    printer: PrinterView,
    candidates: Sequence[CopyView],
    now: float,
    params: SchedulerParams,
    farm: FarmView | None = None,
) -> Choice | None:
    """The copy ``printer`` should print next, or ``None`` if it can print none of ``candidates``.

    ``candidates`` are all queued copies (not the granted, printing or finished ones); the ones the printer
    cannot print are skipped, and their work counts in the queue's length. ``farm``, if given, holds the
    printers that could take work now, the asking one included.
    """
    fits = make_filter(printer)
    ns_rank = printer.ns_rank
    overdue_at = now - params.max_wait_s
    overdue: list[CopyView] = []
    oldest_at = math.inf
    top: int | None = None
    pool: list[CopyView] = []
    queued_work = 0.0
    for copy in candidates:
        queued_work += copy.work_s
        rank = ns_rank.get(copy.namespace)
        if rank is None or not fits(copy):
            continue
        if copy.enqueued_at <= overdue_at:
            overdue.append(copy)
            oldest_at = min(oldest_at, copy.enqueued_at)
        elif overdue:
            continue
        elif top is None or copy.priority > top:
            top = copy.priority
            pool = [copy]
        elif copy.priority == top:
            pool.append(copy)
    if overdue:
        # The oldest overdue copy, or one queued at most overdue_window_s after it: every grant made while a
        # copy is overdue goes to a copy queued no later than overdue_window_s after it, so its wait is bounded.
        horizon = oldest_at + params.overdue_window_s
        pool = [copy for copy in overdue if copy.enqueued_at <= horizon]
    if not pool:
        return None

    loaded = printer.loaded_keys
    swap_cost = params.swap_cost_s
    ns_cost = params.namespace_cost_s
    aging = params.aging_weight
    needs_op = not printer.operator.is_always
    clock = _OperatorClock(printer.operator, now) if needs_op else None
    waits: dict[tuple[int, int, tuple[tuple[int, float, int], ...]], float] = {}
    # A printer that needs an operator between prints, under a shift schedule, does not take the longest
    # copies first: long prints are worth most at the end of a shift, where the operator-wait term puts them.
    length = 0.0 if needs_op and not printer.self_clearing else params.length_weight
    flex_unit = 0.0
    if farm is not None and len(farm) > 1:
        flex_unit = params.flexibility_cost_s / (len(farm) - 1)
    # A printer that needs an operator after every print, under shifts, leaves to the self-clearing printers
    # the work they could print: they print through the night, it stands still after its first print.
    leave = params.self_clearing_cost_s if needs_op and not printer.self_clearing else 0.0
    counts = farm.counts if farm is not None and (flex_unit or leave) else None
    # With the farm known, a copy longer than the queue's work per printer would end after everything else:
    # each second it would stretch the end of the queue weighs end_weight.
    end_weight = params.end_weight if farm is not None and len(farm) else 0.0
    per_printer = queued_work / len(farm) if farm is not None and end_weight else 0.0
    best: CopyView | None = None
    best_key: tuple[float, int, float, str, int] | None = None
    best_swaps = 0
    for copy in pool:
        swaps = 0
        for t, need in enumerate(copy.first_materials):
            if need is not None and not satisfies(loaded[t], need):
                swaps += 1
        cost = (
            (swaps + copy.inner_swaps) * swap_cost
            + ns_cost * ns_rank[copy.namespace]
            - aging * (now - copy.enqueued_at)
            - length * copy.work_s
        )
        if needs_op:
            # Copies of one job share their steps: estimate each (swaps, steps) once per request.
            timeline = (swaps, copy.inner_swaps, copy.steps)
            wait = waits.get(timeline)
            if wait is None:
                assert clock is not None
                wait = waits[timeline] = clock.wait(printer, copy, params, swaps)
            cost += wait
        if end_weight and copy.work_s > per_printer:
            cost -= end_weight * (copy.work_s - per_printer)
        if counts is not None:
            able, auto = counts(copy)
            cost += flex_unit * (able - 1)
            if auto:
                cost += leave
        key = (cost, copy.rank, copy.enqueued_at, copy.job_id, copy.copy)
        if best_key is None or key < best_key:
            best, best_key, best_swaps = copy, key, swaps
    assert best is not None
    op_wait = clock.wait(printer, best, params, best_swaps) if clock is not None else 0.0
    total_swaps = best_swaps + best.inner_swaps
    waited_h = (now - best.enqueued_at) / HOUR
    if overdue:
        parts = [f"overdue: waited {waited_h:.1f} h (bound {params.max_wait_s / HOUR:g} h), among the oldest"]
    else:
        parts = [f"namespace {best.namespace!r}"]
        if len(printer.namespaces) > 1:
            parts[0] += f" (#{ns_rank[best.namespace] + 1} of {len(printer.namespaces)} for this printer)"
        parts.append(f"priority {best.priority}")
        parts.append(f"waited {waited_h:.1f} h")
    parts.append("loaded material fits" if not total_swaps else f"{total_swaps} material swap(s)")
    if op_wait:
        parts.append(f"about {op_wait / HOUR:.1f} h waiting for an operator")
    return Choice(best, total_swaps, op_wait, overdue=bool(overdue), reason="; ".join(parts))
