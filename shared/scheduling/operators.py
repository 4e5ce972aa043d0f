"""When an operator is at the farm: weekly shifts, evaluated at a ``now`` that the caller passes in.

A schedule is a set of weekly shifts in one local time, given as a fixed offset from UTC (the caller passes
the offset in force; daylight-saving changes are the caller's to apply). Times are POSIX seconds.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field

DAY = 86_400
WEEK = 7 * DAY
# 1970-01-01 was a Thursday: shift POSIX time so that week position 0 is Monday 00:00.
_EPOCH_WEEKDAY = 3

_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SHIFT_RE = re.compile(r"^\s*(?P<days>[A-Za-z,\- ]+?)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$")


def _minutes(text: str) -> int:
    hours, minutes = text.split(":")
    value = int(hours) * 60 + int(minutes)
    if not 0 <= value <= 24 * 60 or int(minutes) >= 60:
        raise ValueError(f"not a time of day: {text!r}")
    return value


def _days(text: str) -> frozenset[int]:
    text = text.strip().lower()
    if text in ("daily", "every day", "all"):
        return frozenset(range(7))
    if text in ("weekdays",):
        return frozenset(range(5))
    if text in ("weekends",):
        return frozenset((5, 6))
    days: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if "-" in part:
            first, last = (_DAY_NAMES.index(p.strip()[:3]) for p in part.split("-", 1))
            day = first
            days.add(day)
            while day != last:
                day = (day + 1) % 7
                days.add(day)
        elif part:
            days.add(_DAY_NAMES.index(part[:3]))
    return frozenset(days)


@dataclass(frozen=True, slots=True)
class Shift:
    """Operators present on ``days`` (0 = Monday) from ``start_min`` to ``end_min`` minutes after local
    midnight. ``end_min <= start_min`` means the shift runs past midnight into the next day."""

    days: frozenset[int]
    start_min: int
    end_min: int

    def __post_init__(self) -> None:
        if not self.days or not all(0 <= d <= 6 for d in self.days):
            raise ValueError(f"shift days must be 0 (Monday) .. 6 (Sunday), got {sorted(self.days)}")
        if not (0 <= self.start_min < 24 * 60 and 0 <= self.end_min <= 24 * 60):
            raise ValueError("shift times must lie within a day")

    @classmethod
    def parse(cls, text: str) -> Shift:
        """``"Mon-Fri 06:00-14:00"``, ``"daily 22:00-06:00"``, ``"Sat,Sun 09:00-13:00"``."""
        match = _SHIFT_RE.match(text)
        if match is None:
            raise ValueError(f"not a shift (expected e.g. 'Mon-Fri 06:00-14:00'): {text!r}")
        try:
            days = _days(match["days"])
        except ValueError as exc:
            raise ValueError(f"unknown day name in shift {text!r}") from exc
        try:
            start, end = _minutes(match["start"]), _minutes(match["end"])
        except ValueError as exc:
            raise ValueError(f"{exc} in shift {text!r}") from exc
        return cls(days, start % (24 * 60), end)

    def intervals(self) -> Iterator[tuple[int, int]]:
        """Intervals ``[a, b)`` in seconds from Monday 00:00, possibly ending past the end of the week."""
        start = self.start_min * 60
        end = self.end_min * 60
        if end <= start:
            end += DAY
        for day in self.days:
            yield day * DAY + start, day * DAY + end


def _merge(shifts: tuple[Shift, ...]) -> tuple[tuple[int, int], ...]:
    """Merge shifts into sorted, disjoint intervals inside ``[0, WEEK]`` (wrapping ones are split)."""
    raw: list[tuple[int, int]] = []
    for shift in shifts:
        for a, b in shift.intervals():
            a, b = a % WEEK, a % WEEK + (b - a)
            if b > WEEK:
                raw.append((a, WEEK))
                raw.append((0, b - WEEK))
            else:
                raw.append((a, b))
    raw.sort()
    merged: list[tuple[int, int]] = []
    for a, b in raw:
        if merged and a <= merged[-1][1]:
            if b > merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return tuple(merged)


@dataclass(frozen=True, slots=True)
class OperatorSchedule:
    """When an operator can swap filament or clear a bed. No shifts at all means never (lights-out)."""

    shifts: tuple[Shift, ...] = ()
    utc_offset_s: int = 0
    _intervals: tuple[tuple[int, int], ...] = field(init=False, repr=False, compare=False)
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)
    _always: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        intervals = _merge(self.shifts)
        object.__setattr__(self, "_intervals", intervals)
        object.__setattr__(self, "_starts", tuple(a for a, _ in intervals))
        object.__setattr__(self, "_always", intervals == ((0, WEEK),))

    @classmethod
    def always(cls) -> OperatorSchedule:
        return cls((Shift(frozenset(range(7)), 0, 24 * 60),))

    @classmethod
    def never(cls) -> OperatorSchedule:
        return cls(())

    @classmethod
    def parse(cls, shifts: list[str] | tuple[str, ...], utc_offset_s: int = 0) -> OperatorSchedule:
        return cls(tuple(Shift.parse(s) for s in shifts), utc_offset_s)

    @property
    def is_always(self) -> bool:
        return self._always

    @property
    def is_never(self) -> bool:
        return not self._intervals

    def _pos(self, t: float) -> float:
        return (t + self.utc_offset_s + _EPOCH_WEEKDAY * DAY) % WEEK

    def available(self, t: float) -> bool:
        if self._always:
            return True
        pos = self._pos(t)
        i = bisect_right(self._starts, pos) - 1
        return i >= 0 and pos < self._intervals[i][1]

    def next_available(self, t: float) -> float:
        """The first moment at or after ``t`` when an operator is present (``inf`` if never)."""
        if self._always:
            return t
        if not self._intervals:
            return math.inf
        pos = self._pos(t)
        i = bisect_right(self._starts, pos) - 1
        if i >= 0 and pos < self._intervals[i][1]:
            return t
        if i + 1 < len(self._intervals):
            return t + (self._intervals[i + 1][0] - pos)
        return t + (WEEK - pos + self._intervals[0][0])

    def available_until(self, t: float) -> float:
        """The end of the operator presence that covers ``t`` (``t`` if none does, ``inf`` if always)."""
        if self._always:
            return math.inf
        pos = self._pos(t)
        i = bisect_right(self._starts, pos) - 1
        if i < 0 or pos >= self._intervals[i][1]:
            return t
        end = t + (self._intervals[i][1] - pos)
        # A shift that reaches the end of the week continues into one that starts at Monday 00:00.
        while self._intervals[i][1] == WEEK and self._intervals[0][0] == 0:
            i = 0
            end += self._intervals[0][1]
            if self._intervals[0][1] == WEEK:  # pragma: no cover - only the always case, handled above
                return math.inf
        return end

    def windows(self, start: float, end: float) -> list[tuple[float, float]]:
        """The stretches of ``[start, end)`` with an operator present, in order (the last may run past
        ``end``)."""
        out: list[tuple[float, float]] = []
        t = self.next_available(start)
        while t < end:
            until = self.available_until(t)
            out.append((t, until))
            if math.isinf(until):
                break
            t = self.next_available(until)
        return out

    def gaps(self, start: float, end: float) -> Iterator[tuple[float, float]]:
        """The stretches of ``[start, end)`` with no operator present, in order."""
        t = start
        while t < end:
            if self.available(t):
                t = self.available_until(t)
            else:
                resume = self.next_available(t)
                yield t, min(resume, end)
                t = resume


ALWAYS = OperatorSchedule.always()
NEVER = OperatorSchedule.never()
