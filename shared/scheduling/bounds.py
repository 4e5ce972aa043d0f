"""A lower bound on the makespan of a workload: no policy, however clever, can finish sooner.

The bound is the largest of:

* **Longest copy.** A copy cannot finish before it arrives plus its printing time.
* **Work over capacity, per compatibility class, from each release time.** Take any set ``S`` of printers,
  the copies that only printers in ``S`` can print, and a time ``r``: the printing of those copies that arrive
  at or after ``r`` must fit in the printing capacity of ``S`` between ``r`` and the end. With ``S`` = every
  printer and ``r`` = 0 this is total work over printers; the bound takes ``S`` = each distinct set of
  printers some copy can use, and ``r`` = each arrival time (rounded down to ``release_step_s``, which keeps
  the bound valid: copies counted from ``r`` still arrive no earlier than ``r``).
* **Operators.** A printer that does not clear its own bed cannot start a print while no operator is there
  (someone must clear it first), so through a stretch of ``g`` seconds with no operator it prints at most one
  print: at most ``min(g, L)`` seconds of work, ``L`` being the longest single print it could be given. And
  in ``k`` such printer-stretches together, at most the ``k`` longest prints of the work being placed.
* **Clearing.** After every print but its last, a printer spends the clearing time (its own, or an
  operator's visit) not printing; the bound counts the shortest such time of the printers in ``S``.

Everything else (swaps, waiting for a busy operator, whole copies staying on one printer) is left out, which
only makes the bound lower, so it stays a bound.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass

from .compat import make_filter
from .operators import DAY
from .sim import Workload

_HORIZON_S = 400 * DAY


@dataclass(frozen=True, slots=True)
class LowerBound:
    value_s: float
    longest_copy_s: float
    work_over_printers_s: float
    binding: str
    unprintable: int


def lower_bound(workload: Workload, *, release_step_s: float = 3600.0) -> LowerBound:
    """The makespan lower bound of ``workload`` (seconds after its start), and the constraint that sets it."""
    printers = workload.printers
    start = workload.start
    filters = [(p.ns_rank, make_filter(p, consider_loaded=False)) for p in printers]
    longest_print = [0.0] * len(printers)
    # Per copy: (release time, work, print durations, printers that can print it).
    items: list[tuple[float, float, list[float], frozenset[int]]] = []
    unprintable = 0
    longest_copy = 0.0
    for copy in workload.copies():
        can = frozenset(i for i, (ns, fits) in enumerate(filters) if copy.namespace in ns and fits(copy))
        if not can:
            unprintable += 1
            continue
        for i in can:
            longest_print[i] = max(longest_print[i], copy.longest_print_s)
        arrival = copy.enqueued_at - start
        longest_copy = max(longest_copy, arrival + copy.work_s)
        durations = [p.duration_s for p in copy.sets for _ in range(p.count)]
        items.append((arrival, copy.work_s, durations, can))
    total = sum(work for _, work, _, _ in items)
    plain = total / len(printers) if printers else math.inf

    ops = workload.operators
    if ops.count > 0:
        gaps = [(a - start, b - start) for a, b in ops.schedule.gaps(start, start + _HORIZON_S)]
    else:
        gaps = [(0.0, _HORIZON_S)]
    gap_ends = [b for _, b in gaps]
    manual = [not p.self_clearing and bool(gaps) for p in printers]
    clear_time = [workload.self_clear_s if p.self_clearing else ops.clear_s for p in printers]

    def capacity(limits: list[float], free: int, r: float, t: float, top: list[float]) -> float:
        """Printing capacity in [r, t) of ``free`` printers that need no operator between prints and of
        manual printers with the given longest prints; ``top`` holds prefix sums of the longest prints of
        the work being placed (the most manual printers can do while no operator is there)."""
        span = t - r
        cap = free * span
        if not limits:
            return cap
        in_gaps = 0.0
        gap_time = 0.0
        count = 0
        for k in range(bisect_left(gap_ends, r), len(gaps)):
            a, b = gaps[k]
            if a >= t:
                break
            length = min(b, t) - max(a, r)
            if length <= 0:
                continue
            count += 1
            gap_time += length
            in_gaps += sum(min(length, limit) for limit in limits)
        slots = count * len(limits)
        in_gaps = min(in_gaps, top[min(slots, len(top) - 1)])
        return cap + len(limits) * (span - gap_time) + in_gaps

    def finish(limits: list[float], free: int, r: float, work: float, top: list[float]) -> float:
        if work <= 0:
            return r
        lo, hi = r, r + work / (free + len(limits))
        while capacity(limits, free, r, hi, top) < work:
            lo, hi = hi, r + 2 * (hi - r)
            if hi - r > _HORIZON_S:
                return math.inf
        for _ in range(60):
            if hi - lo <= 1.0:
                break
            mid = (lo + hi) / 2
            if capacity(limits, free, r, mid, top) >= work:
                hi = mid
            else:
                lo = mid
        return lo

    best = max(longest_copy, plain)
    binding = "longest copy" if longest_copy >= plain else "total work / printers"
    classes = {can for _, _, _, can in items}
    classes.add(frozenset(range(len(printers))))
    for members in classes:
        mine = sorted(((a, w, p) for a, w, p, can in items if can <= members), key=lambda m: m[0], reverse=True)
        if not mine:
            continue
        limits = [longest_print[i] for i in members if manual[i]]
        free = len(members) - len(limits)
        # Each print but a printer's last is followed by a clearing during which that printer cannot print.
        clearing = min(clear_time[i] for i in members)
        work = -clearing * len(members)
        prints: list[float] = []
        k = 0
        # Walk release times from the latest back, accumulating the work released at or after each.
        while k < len(mine):
            r = math.floor(mine[k][0] / release_step_s) * release_step_s
            while k < len(mine) and mine[k][0] >= r:
                work += mine[k][1] + clearing * len(mine[k][2])
                prints.extend(mine[k][2])
                k += 1
            top = [0.0]
            if limits:
                for d in sorted(prints, reverse=True):
                    top.append(top[-1] + d)
            else:
                top.append(math.inf)
            end = finish(limits, free, r, work, top)
            if end > best:
                best = end
                names = Counter(printers[i].profile for i in members)
                who = ", ".join(f"{n} × {name}" for name, n in sorted(names.items()))
                binding = f"{len(members)} printers ({who}), work released from {r / 3600:.0f} h"
    return LowerBound(best, longest_copy, plain, binding, unprintable)
