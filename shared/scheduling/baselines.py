"""Reference policies the farm simulator measures :func:`shared.scheduling.policy.choose` against.

Both obey the same hard rules (:mod:`shared.scheduling.compat`), so a difference in the numbers is a
difference in choice, never in what is allowed. Neither looks at loaded material: a mismatch is simply
swapped by an operator, as in Continuous Print.
"""

from __future__ import annotations

from collections.abc import Sequence

from .compat import make_filter
from .model import Choice, CopyView, PrinterView
from .params import SchedulerParams
from .policy import FarmView, first_swaps, operator_wait_s


def _choice(printer: PrinterView, copy: CopyView, now: float, params: SchedulerParams, why: str) -> Choice:
    swaps = first_swaps(printer, copy)
    wait = operator_wait_s(printer, copy, now, params, swaps)
    return Choice(copy, swaps + copy.inner_swaps, wait, overdue=False, reason=why)


def in_order_first_fit(
    printer: PrinterView,
    candidates: Sequence[CopyView],
    now: float,
    params: SchedulerParams,
    farm: FarmView | None = None,
) -> Choice | None:
    """Continuous Print's rule: walk the printer's queues in order, each from the top, and take the first
    copy the printer can print."""
    fits = make_filter(printer, consider_loaded=True)
    ns_rank = printer.ns_rank
    best: CopyView | None = None
    best_key: tuple[int, int, int] | None = None
    for copy in candidates:
        rank = ns_rank.get(copy.namespace)
        if rank is None:
            continue
        key = (rank, copy.rank, copy.copy)
        if (best_key is None or key < best_key) and fits(copy):
            best, best_key = copy, key
    return None if best is None else _choice(printer, best, now, params, "first that fits, in queue order")


def fifo(
    printer: PrinterView,
    candidates: Sequence[CopyView],
    now: float,
    params: SchedulerParams,
    farm: FarmView | None = None,
) -> Choice | None:
    """Plain first in, first out: the oldest copy the printer can print, from any queue it serves."""
    fits = make_filter(printer, consider_loaded=True)
    ns_rank = printer.ns_rank
    best: CopyView | None = None
    best_key: tuple[float, str, int] | None = None
    for copy in candidates:
        if copy.namespace not in ns_rank:
            continue
        key = (copy.enqueued_at, copy.job_id, copy.copy)
        if (best_key is None or key < best_key) and fits(copy):
            best, best_key = copy, key
    return None if best is None else _choice(printer, best, now, params, "oldest that fits")
