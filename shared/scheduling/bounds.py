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
* **Night slots** (the tighter form of the same fact, :func:`_NightSlots`). Call a (manual printer, stretch
  without an operator) pair a *slot*. Each print overlaps the stretches for at most ``W(d)`` seconds, ``d``
  being its length and ``W(d)`` the most that any window of length ``d`` overlaps them; a print can only
  overlap a stretch that ends after it is released; and each slot holds at most one print. So the printing done
  in a run of consecutive stretches is at most the best assignment of the prints to the slots, each print to
  one slot of a stretch ending after its release, worth ``W(d)``: a 20 h print is worth 8 h through an 8 h
  night, and a print queued on Wednesday bridges no night before Wednesday's.
* **Clearing.** After every print but its last, a printer spends the clearing time (its own, or an
  operator's visit) not printing; the bound counts the shortest such time of the printers in ``S``.

Everything else (swaps, waiting for a busy operator, whole copies staying on one printer) is left out, which
only makes the bound lower, so it stays a bound.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .compat import make_filter
from .operators import DAY
from .sim import Workload

_HORIZON_S = 400 * DAY


class _NightSlots:
    """The stretches without an operator, as slots that manual printers fill with at most one print each.

    ``reach(d, lo, hi)``: the most that a print of length ``d`` can overlap stretches ``lo..hi``, wherever it
    starts (``W(d)`` above). The overlap is piecewise linear in the start time, so its maximum is reached with
    the print starting at the start of a stretch or ending at the end of one; a print no longer than every
    operator's presence between the stretches overlaps at most one of them, ``min(d, longest)``.

    ``best(prints, n, lo, hi)``: an upper bound on the printing that ``n`` manual printers can do in
    stretches ``lo..hi``: the heaviest assignment of ``prints`` (pairs ``(d, first stretch ending after the
    print's release)``, longest first) to ``n`` slots per stretch, each print to a slot of a stretch at or after
    its first, worth ``reach(d, lo, hi)``. Why it bounds any schedule: on one manual printer at most one print
    overlaps a stretch (the one running when it begins or, with a clear bed, one started inside it; when that
    one ends, nobody can clear the bed before the stretch ends). Send each print to (its printer, the first
    stretch of ``lo..hi`` it overlaps): no two prints get the same slot, that stretch ends after the print's
    release, and the print overlaps the stretches by at most ``reach(d, lo, hi)``. So a schedule's printing in
    the stretches is the value of one assignment, at most the heaviest. The stretches a print may take are a
    suffix ``first..hi`` of one list and its value does not depend on which, so the assignments form a
    transversal matroid and the greedy below is optimal: heaviest print first, into the earliest stretch at or
    after its first with a slot free (the mirror image of unit jobs with deadlines taking the latest free slot).
    """

    def __init__(self, gaps: list[tuple[float, float]]) -> None:
        self.starts = [a for a, _ in gaps]
        self.ends = [b for _, b in gaps]
        self.prefix = [0.0]
        for a, b in gaps:
            self.prefix.append(self.prefix[-1] + (b - a))
        self._reach: dict[tuple[float, int, int], float] = {}
        self._spans: dict[tuple[int, int], tuple[float, float]] = {}

    def overlap(self, x: float, y: float) -> float:
        """Time in ``[x, y)`` without an operator."""
        i = bisect_right(self.ends, x)
        j = bisect_left(self.starts, y)
        if i >= j:
            return 0.0
        return self.prefix[j] - self.prefix[i] - max(0.0, x - self.starts[i]) - max(0.0, self.ends[j - 1] - y)

    def reach(self, d: float, lo: int, hi: int) -> float:
        """The most a print of length ``d`` can overlap stretches ``lo..hi``."""
        key = (d, lo, hi)
        value = self._reach.get(key)
        if value is not None:
            return value
        spans = self._spans.get((lo, hi))
        if spans is None:
            longest = max(self.ends[k] - self.starts[k] for k in range(lo, hi + 1))
            between = min((self.starts[k + 1] - self.ends[k] for k in range(lo, hi)), default=math.inf)
            spans = self._spans[(lo, hi)] = (longest, between)
        longest, between = spans
        if d <= between:
            # A window no longer than every stretch with an operator between overlaps one stretch without.
            value = min(d, longest)
        else:
            a_lo, b_hi = self.starts[lo], self.ends[hi]
            value = 0.0
            for k in range(lo, hi + 1):
                a, b = self.starts[k], self.ends[k]
                value = max(
                    value,
                    self.overlap(a, min(a + d, b_hi)),
                    self.overlap(max(b - d, a_lo), b),
                )
            value = min(d, value)
        self._reach[key] = value
        return value

    def first_after(self, t: float) -> int:
        """Index of the first stretch that ends after ``t``."""
        return bisect_right(self.ends, t)

    def best(self, prints: list[tuple[float, int]], n: int, lo: int, hi: int) -> float:
        if hi < lo or n <= 0:
            return 0.0
        size = hi - lo + 1
        free = [n] * size
        nxt = list(range(size + 1))  # union-find: the first stretch at or after an index with a free slot

        def find(x: int) -> int:
            root = x
            while nxt[root] != root:
                root = nxt[root]
            while nxt[x] != root:
                nxt[x], x = root, nxt[x]
            return root

        total = 0.0
        left = n * size
        for d, first in prints:
            k = max(first, lo) - lo
            if k >= size:
                continue
            g = find(k)
            if g >= size:
                continue
            total += self.reach(d, lo, hi)
            free[g] -= 1
            if not free[g]:
                nxt[g] = g + 1
            left -= 1
            if not left:
                break
        return total


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

    nights = _NightSlots(gaps)

    def capacity(
        limits: list[float], free: int, r: float, t: float, top: list[float], slots_best: Callable[[int, int], float]
    ) -> float:
        """Printing capacity in [r, t) of ``free`` printers that need no operator between prints and of
        manual printers with the given longest prints; ``top`` holds prefix sums of the longest prints of
        the work being placed (the most manual printers can do while no operator is there), and
        ``slots_best(lo, hi)`` the most they can do in stretches ``lo..hi`` (:class:`_NightSlots`)."""
        span = t - r
        cap = free * span
        if not limits:
            return cap
        n = len(limits)
        in_gaps = 0.0
        gap_time = 0.0
        count = 0
        first = last = -1
        first_len = last_len = 0.0
        first_partial = last_partial = False
        for k in range(bisect_left(gap_ends, r), len(gaps)):
            a, b = gaps[k]
            if a >= t:
                break
            length = min(b, t) - max(a, r)
            if length <= 0:
                continue
            if first < 0:
                first, first_len, first_partial = k, length, a < r
            last, last_len, last_partial = k, length, b > t
            count += 1
            gap_time += length
            in_gaps += sum(min(length, limit) for limit in limits)
        slots = count * n
        in_gaps = min(in_gaps, top[min(slots, len(top) - 1)])
        if count:
            # Stretches cut by r or t: their part is at most n × its length, the rest at most the best
            # assignment to the whole stretches between.
            options = [slots_best(first, last)]
            if first_partial:
                options.append(n * first_len + slots_best(first + 1, last))
            if last_partial:
                options.append(n * last_len + slots_best(first, last - 1))
            if first_partial and last_partial and first < last:
                options.append(n * (first_len + last_len) + slots_best(first + 1, last - 1))
            in_gaps = min(in_gaps, *options)
        return cap + n * (span - gap_time) + in_gaps

    def finish(
        limits: list[float],
        free: int,
        r: float,
        work: float,
        top: list[float],
        slots_best: Callable[[int, int], float],
    ) -> float:
        if work <= 0:
            return r
        lo, hi = r, r + work / (free + len(limits))
        while capacity(limits, free, r, hi, top, slots_best) < work:
            lo, hi = hi, r + 2 * (hi - r)
            if hi - r > _HORIZON_S:
                return math.inf
        for _ in range(60):
            if hi - lo <= 1.0:
                break
            mid = (lo + hi) / 2
            if capacity(limits, free, r, mid, top, slots_best) >= work:
                hi = mid
            else:
                lo = mid
        return lo

    best = max(longest_copy, plain)
    binding = "longest copy" if longest_copy >= plain else "total work / printers"
    classes = {can for _, _, _, can in items}
    classes.add(frozenset(range(len(printers))))
    for members in classes:
        mine = sorted(
            ((a, w, p, any(manual[i] for i in can)) for a, w, p, can in items if can <= members),
            key=lambda m: m[0],
            reverse=True,
        )
        if not mine:
            continue
        limits = [longest_print[i] for i in members if manual[i]]
        free = len(members) - len(limits)
        # Each print but a printer's last is followed by a clearing during which that printer cannot print.
        clearing = min(clear_time[i] for i in members)
        work = -clearing * len(members)
        prints: list[float] = []
        # Prints a manual printer could be given: (how much of the stretches they can cover, first stretch).
        night_prints: list[tuple[float, int]] = []
        k = 0
        # Walk release times from the latest back, accumulating the work released at or after each.
        while k < len(mine):
            r = math.floor(mine[k][0] / release_step_s) * release_step_s
            while k < len(mine) and mine[k][0] >= r:
                arrival, copy_work, durations, on_manual = mine[k]
                work += copy_work + clearing * len(durations)
                prints.extend(durations)
                if on_manual and limits:
                    first = nights.first_after(arrival)
                    night_prints.extend((d, first) for d in durations)
                k += 1
            top = [0.0]
            if limits:
                for d in sorted(prints, reverse=True):
                    top.append(top[-1] + d)
            else:
                top.append(math.inf)
            ranked = sorted(night_prints, key=lambda p: -p[0])
            memo: dict[tuple[int, int], float] = {}

            def slots_best(lo: int, hi: int, ranked: list[tuple[float, int]] = ranked,
                           memo: dict[tuple[int, int], float] = memo, n: int = len(limits)) -> float:
                value = memo.get((lo, hi))
                if value is None:
                    value = memo[(lo, hi)] = nights.best(ranked, n, lo, hi)
                return value

            end = finish(limits, free, r, work, top, slots_best)
            if end > best:
                best = end
                names = Counter(printers[i].profile for i in members)
                who = ", ".join(f"{n} × {name}" for name, n in sorted(names.items()))
                binding = f"{len(members)} printers ({who}), work released from {r / 3600:.0f} h"
    return LowerBound(best, longest_copy, plain, binding, unprintable)
