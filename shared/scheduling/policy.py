"""Which queued copy a printer that asks for work should print next.

:func:`choose` is a pure function of the printer, the queued copies, ``now`` and the parameters (and,
optionally, the farm's printers). It never returns a copy the printer cannot print, never returns a copy
that was not among the candidates, and returns ``None`` only when no candidate fits: a printer that can
work is never held idle. The rule, in order:

1. **Filter.** Only copies in a namespace the printer serves and that it can print
   (:func:`shared.scheduling.compat.make_filter`).
2. **Overdue first.** A copy that has waited ``max_wait_s`` or longer is overdue. If any fit, the printer
   gets the oldest (earliest ``enqueued_at``, then rank, job id, copy), whatever else is queued. This bounds
   the wait: once a copy is overdue, each request from a printer that can print it grants it or an older
   copy, and there are finitely many older copies.
3. **Namespace order, then priority.** Otherwise the printer's first namespace with a fitting copy, and in
   it the highest user priority, are strict.
4. **Least cost.** Among those, the copy of least cost, in seconds of printer time::

       cost = swaps × swap_cost_s + operator_wait − aging_weight × waited − length_weight × work
              + flexibility_cost_s × (printers that could print it − 1) / (printers − 1)

   ``swaps`` counts tool material changes (to start it, and between its sets); ``operator_wait`` is the time
   the printer would stand waiting for an operator (swaps, and bed clearing on printers that do not clear
   themselves) given the operator schedule; the last term needs the farm. Ties go to queue rank, then age.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

from .compat import make_filter
from .model import Choice, CopyView, PrinterView, satisfies
from .params import HOUR, SchedulerParams


class FarmView:
    """The printers that could take work now, to tell how many of them could print a given copy.

    Owned by the caller (the arbiter rebuilds it when a printer joins, leaves or changes capabilities);
    it caches counts per distinct set of requirements, so repeated requests stay cheap.
    """

    def __init__(self, printers: Sequence[PrinterView]) -> None:
        self.printers = tuple(printers)
        self._filters = [(p.ns_rank, make_filter(p, consider_loaded=False)) for p in self.printers]
        self._cache: dict[Hashable, int] = {}

    def __len__(self) -> int:
        return len(self.printers)

    def eligible(self, copy: CopyView) -> int:
        """How many of the farm's printers serve the copy's namespace and could print it."""
        key = (
            copy.namespace,
            copy.need_profiles,
            copy.need_nozzles,
            copy.need_extents,
            copy.need_tools,
            copy.need_types,
            copy.need_tags,
        )
        count = self._cache.get(key)
        if count is None:
            count = sum(1 for ns, fits in self._filters if copy.namespace in ns and fits(copy))
            self._cache[key] = count
        return count


def first_swaps(printer: PrinterView, copy: CopyView) -> int:
    """Tool material changes needed before the copy's first set can start on this printer."""
    loaded = printer.loaded_keys
    return sum(1 for t, need in enumerate(copy.first_materials) if not satisfies(loaded[t], need))


def operator_wait_s(printer: PrinterView, copy: CopyView, now: float, params: SchedulerParams, swaps: int) -> float:
    """Estimated time the printer stands idle waiting for an operator while it prints ``copy`` from ``now``.

    ``swaps`` are the changes needed before the first set. Counts the wait for swaps and, on printers that do
    not clear their own bed, for clearing after each print (the last one included: the printer cannot start
    anything else until it is cleared). The operator's own working time is not counted here.
    """
    op = printer.operator
    if op.is_always:
        return 0.0
    self_clearing = printer.self_clearing
    if self_clearing and not swaps and not copy.inner_swaps:
        return 0.0
    clear = params.self_clear_s if self_clearing else params.clear_s
    span = copy.work_s + (swaps + copy.inner_swaps) * params.swap_s + copy.prints * clear
    if op.available_until(now) >= now + span:
        return 0.0
    t = now
    waited = 0.0
    if swaps:
        resume = op.next_available(t)
        waited += resume - t
        t = resume + swaps * params.swap_s
    for inner, duration, count in copy.steps:
        if inner:
            resume = op.next_available(t)
            waited += resume - t
            t = resume + inner * params.swap_s
        if self_clearing:
            t += count * (duration + clear)
            continue
        for _ in range(count):
            t += duration
            resume = op.next_available(t)
            waited += resume - t
            t = resume + clear
        if math.isinf(waited):
            break
    return waited


def _age_key(copy: CopyView) -> tuple[float, int, str, int]:
    return copy.enqueued_at, copy.rank, copy.job_id, copy.copy


def choose(
    printer: PrinterView,
    candidates: Sequence[CopyView],
    now: float,
    params: SchedulerParams,
    farm: FarmView | None = None,
) -> Choice | None:
    """The copy ``printer`` should print next, or ``None`` if it can print none of ``candidates``.

    ``candidates`` are the queued copies (granted, started and finished ones must not be passed).
    ``farm``, if given, holds the printers that could take work now, the asking one included.
    """
    fits = make_filter(printer)
    ns_rank = printer.ns_rank
    overdue_at = now - params.max_wait_s
    oldest: CopyView | None = None
    oldest_key: tuple[float, int, str, int] | None = None
    top: tuple[int, int] | None = None
    pool: list[CopyView] = []
    for copy in candidates:
        rank = ns_rank.get(copy.namespace)
        if rank is None or not fits(copy):
            continue
        if copy.enqueued_at <= overdue_at:
            key = _age_key(copy)
            if oldest_key is None or key < oldest_key:
                oldest, oldest_key = copy, key
            continue
        if oldest is not None:
            continue
        tier = (rank, -copy.priority)
        if top is None or tier < top:
            top = tier
            pool = [copy]
        elif tier == top:
            pool.append(copy)

    if oldest is not None:
        swaps = first_swaps(printer, oldest)
        waited_h = (now - oldest.enqueued_at) / HOUR
        return Choice(
            oldest,
            swaps + oldest.inner_swaps,
            operator_wait_s(printer, oldest, now, params, swaps),
            overdue=True,
            reason=f"overdue: waited {waited_h:.1f} h (bound {params.max_wait_s / HOUR:g} h), oldest first",
        )
    if not pool:
        return None

    loaded = printer.loaded_keys
    swap_cost = params.swap_cost_s
    aging = params.aging_weight
    length = params.length_weight
    flex_unit = 0.0
    if farm is not None and len(farm) > 1 and params.flexibility_cost_s:
        flex_unit = params.flexibility_cost_s / (len(farm) - 1)
    needs_op = not printer.operator.is_always
    best: CopyView | None = None
    best_key: tuple[float, int, float, str, int] | None = None
    best_swaps = 0
    for copy in pool:
        swaps = 0
        for t, need in enumerate(copy.first_materials):
            if need is not None and not satisfies(loaded[t], need):
                swaps += 1
        cost = (swaps + copy.inner_swaps) * swap_cost - aging * (now - copy.enqueued_at) - length * copy.work_s
        if needs_op:
            cost += operator_wait_s(printer, copy, now, params, swaps)
        if flex_unit:
            cost += flex_unit * (farm.eligible(copy) - 1)  # type: ignore[union-attr]
        key = (cost, copy.rank, copy.enqueued_at, copy.job_id, copy.copy)
        if best_key is None or key < best_key:
            best, best_key, best_swaps = copy, key, swaps
    assert best is not None
    op_wait = operator_wait_s(printer, best, now, params, best_swaps)
    parts = [f"namespace {best.namespace!r}"]
    if len(printer.namespaces) > 1:
        parts[0] += f" (#{ns_rank[best.namespace] + 1} of {len(printer.namespaces)} for this printer)"
    parts.append(f"priority {best.priority}")
    total_swaps = best_swaps + best.inner_swaps
    parts.append("loaded material fits" if not total_swaps else f"{total_swaps} material swap(s)")
    if op_wait:
        parts.append(f"about {op_wait / HOUR:.1f} h waiting for an operator")
    parts.append(f"waited {(now - best.enqueued_at) / HOUR:.1f} h")
    return Choice(best, total_swaps, op_wait, overdue=False, reason="; ".join(parts))
