"""Operator schedules: weekly shifts evaluated at a given time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.scheduling.operators import ALWAYS, DAY, NEVER, WEEK, OperatorSchedule, Shift

MONDAY = 1_704_067_200.0  # 2024-01-01 00:00 UTC, a Monday
H = 3600.0


def test_parse_forms() -> None:
    assert Shift.parse("Mon-Fri 06:00-14:00") == Shift(frozenset(range(5)), 360, 840)
    assert Shift.parse("daily 22:00-06:00") == Shift(frozenset(range(7)), 1320, 360)
    assert Shift.parse("Sat,Sun 09:30-13:00").days == frozenset({5, 6})
    assert Shift.parse("Fri-Mon 08:00-09:00").days == frozenset({4, 5, 6, 0})
    for bad in ("Mon 6-14", "Funday 06:00-07:00", "Mon 25:00-26:00", ""):
        with pytest.raises(ValueError):
            Shift.parse(bad)


def test_weekday_shift_boundaries() -> None:
    s = OperatorSchedule.parse(["Mon-Fri 08:00-17:00"])
    assert not s.available(MONDAY + 7 * H + 3599)
    assert s.available(MONDAY + 8 * H)
    assert s.available(MONDAY + 17 * H - 1)
    assert not s.available(MONDAY + 17 * H)
    assert s.next_available(MONDAY + 17 * H) == MONDAY + DAY + 8 * H
    assert s.available_until(MONDAY + 9 * H) == MONDAY + 17 * H
    assert s.available_until(MONDAY + 18 * H) == MONDAY + 18 * H
    friday_evening = MONDAY + 4 * DAY + 18 * H
    assert s.next_available(friday_evening) == MONDAY + WEEK + 8 * H  # over the weekend


def test_overnight_shift_and_week_wrap() -> None:
    s = OperatorSchedule.parse(["Sun 22:00-06:00"])
    sunday_late = MONDAY + 6 * DAY + 23 * H
    assert s.available(sunday_late)
    assert s.available(MONDAY + WEEK + 5 * H)
    assert s.available_until(sunday_late) == MONDAY + WEEK + 6 * H  # continues across the week's end
    assert not s.available(MONDAY + 6 * H)


def test_utc_offset_moves_the_shift() -> None:
    s = OperatorSchedule.parse(["daily 08:00-09:00"], utc_offset_s=2 * 3600)  # 08:00 local is 06:00 UTC
    assert s.available(MONDAY + 6 * H)
    assert not s.available(MONDAY + 8 * H)


def test_always_and_never() -> None:
    assert ALWAYS.is_always and ALWAYS.available(MONDAY) and ALWAYS.next_available(MONDAY) == MONDAY
    assert ALWAYS.available_until(MONDAY) == math.inf
    assert NEVER.is_never and not NEVER.available(MONDAY) and NEVER.next_available(MONDAY) == math.inf
    assert list(NEVER.gaps(MONDAY, MONDAY + DAY)) == [(MONDAY, MONDAY + DAY)]
    assert list(ALWAYS.gaps(MONDAY, MONDAY + DAY)) == []


shifts = st.builds(
    Shift,
    st.frozensets(st.integers(0, 6), min_size=1),
    st.integers(0, 24 * 60 - 1),
    st.integers(1, 24 * 60),
)


@given(st.lists(shifts, max_size=3), st.floats(0, 3 * WEEK), st.integers(-12, 12))
def test_next_available_is_the_first_available_moment(shift_list: list[Shift], offset: float, tz: int) -> None:
    s = OperatorSchedule(tuple(shift_list), tz * 3600)
    t = MONDAY + offset
    nxt = s.next_available(t)
    if math.isinf(nxt):
        assert s.is_never
        return
    assert nxt >= t and s.available(nxt)
    # Nothing between t and the answer is available (checked on a 5-minute grid).
    probe = t
    while probe < nxt - 1:
        assert not s.available(probe)
        probe += 300
    until = s.available_until(nxt)
    assert until > nxt
    if not math.isinf(until):
        assert not s.available(until)
        assert s.available(until - 1)


@given(st.lists(shifts, min_size=1, max_size=3), st.floats(0, WEEK), st.floats(1, 2 * WEEK))
def test_gaps_and_windows_partition_time(shift_list: list[Shift], offset: float, length: float) -> None:
    s = OperatorSchedule(tuple(shift_list))
    start, end = MONDAY + offset, MONDAY + offset + length
    gaps = list(s.gaps(start, end))
    windows = [(a, min(b, end)) for a, b in s.windows(start, end)]
    covered = sum(b - a for a, b in gaps) + sum(b - a for a, b in windows)
    assert covered == pytest.approx(length, abs=1e-3)
    for a, b in gaps:
        assert not s.available(a) and not s.available((a + b) / 2)
    for a, b in windows:
        assert s.available(a) and s.available((a + b) / 2)
