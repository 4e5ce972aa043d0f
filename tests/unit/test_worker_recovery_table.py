"""The worker's restart recovery as a table (node/worker/recovery.py): one case per row, and its safety rules
as properties over every situation.

The rows that record bugs (found by the LAN chaos tests) are run end to end in test_worker_recovery.py.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.worker import recovery
from node.worker.printers.base import PrinterState
from node.worker.recovery import (
    UNKNOWN_OUTCOME,
    Action,
    AwaitStart,
    Busy,
    Follow,
    Print,
    Record,
    Report,
    Situation,
    decide,
    record_of,
)
from node.worker.worker import LOCAL_COPY, parse_print_name, print_name
from shared import protocol as P

IDLE = (PrinterState.READY, PrinterState.ERROR, PrinterState.OFFLINE)
BUSY = (PrinterState.PRINTING, PrinterState.PAUSED)
COUNTS = (2, 3)  # two sets: printed twice, then three times


def at(printer: PrinterState = PrinterState.READY, record: Record | None = None, committed: bool = True,
       prints: tuple[int, int] | None = None, counts: tuple[int, ...] = COUNTS) -> Situation:
    return Situation(record=record, printer=printer, prints=prints, committed=committed, counts=counts)


FIRST = "started and never sent to the printer"
UNKNOWN = Report(P.Outcome.FAILED, UNKNOWN_OUTCOME, clear_bed=False)


def rec(phase: str, set_index: int = 0, run: int = 0, reason: str | None = None) -> Record:
    return Record(set_index=set_index, run=run, phase=phase, reason=reason)


TABLE: list[tuple[str, Situation, Action]] = [
    # 1: idle and the start not committed: nothing, whatever the record says.
    ("1 uncommitted, no record", at(committed=False), AwaitStart()),
    ("1 uncommitted, ready", at(record=rec("ready", 1, 2), committed=False), AwaitStart()),
    ("1 uncommitted, finishing", at(record=rec("finishing:done", -1, -1), committed=False), AwaitStart()),
    ("1 uncommitted, printer in error", at(PrinterState.ERROR, rec("ok"), committed=False), AwaitStart()),
    # 2: the printer prints a file that is not this copy's.
    ("2 busy", at(PrinterState.PRINTING), Busy()),
    ("2 busy, paused", at(PrinterState.PAUSED, rec("printing", 1, 0)), Busy()),
    ("2 busy, uncommitted", at(PrinterState.PRINTING, committed=False), Busy()),
    # 3: the printer prints this copy: followed from the run it names, not the one recorded.
    ("3 follow", at(PrinterState.PRINTING, rec("printing", 0, 1), prints=(1, 2)), Follow(1, 2)),
    ("3 follow, paused", at(PrinterState.PAUSED, rec("ok", 0, 0), prints=(0, 1)), Follow(0, 1)),
    ("3 follow, no record", at(PrinterState.PRINTING, prints=(0, 0)), Follow(0, 0)),
    ("3 follow, uncommitted", at(PrinterState.PRINTING, committed=False, prints=(0, 1)), Follow(0, 1)),
    # 4: no record: the printer was never called for the copy.
    ("4 no record", at(), Print(0, 0, FIRST)),
    ("4 no record, printer in error", at(PrinterState.ERROR), Print(0, 0, FIRST)),
    # 5: the copy ended; the report's commit was not seen.
    ("5 finishing done", at(record=rec("finishing:done", -1, -1)), Report(P.Outcome.DONE, None)),
    ("5 finishing requeue", at(record=rec("finishing:requeue", -1, -1, "print x failed")),
     Report(P.Outcome.REQUEUE, "print x failed")),
    ("5 finishing failed", at(record=rec("finishing:failed", -1, -1, "why")),
     Report(P.Outcome.FAILED, "why")),
    # 6: ready: the printer was never called for this run.
    ("6 ready", at(record=rec("ready", 1, 2)), Print(1, 2, "the printer was never called for this run")),
    # 7: the last run failed.
    ("7 failed", at(record=rec("failed", 1, 0, "cancelled")), Report(P.Outcome.REQUEUE, "cancelled")),
    # 8: the last run ended ok and more are left: the next run of the set, or the next set's first.
    ("8 ok, next run", at(record=rec("ok", 0, 0)), Print(0, 1, "the run before ended ok")),
    ("8 ok, next set", at(record=rec("ok", 0, 1)), Print(1, 0, "the run before ended ok")),
    ("8 ok, last set", at(record=rec("ok", 1, 1)), Print(1, 2, "the run before ended ok")),
    # 9: the last run ended ok and was the copy's last.
    ("9 ok, last run", at(record=rec("ok", 1, 2)), Report(P.Outcome.DONE, None)),
    ("9 ok, one run only", at(record=rec("ok"), counts=(1,)), Report(P.Outcome.DONE, None)),
    # 10: called for this run, not printing it: the outcome is unknown, and the bed is left as it is.
    ("10 printing", at(record=rec("printing", 1, 1)), UNKNOWN),
    ("10 unknown phase", at(record=rec("halfway")), UNKNOWN),
]


@pytest.mark.parametrize(("situation", "action"), [(s, a) for _, s, a in TABLE], ids=[i for i, _, _ in TABLE])
def test_every_row_of_the_table(situation: Situation, action: Action) -> None:
    assert decide(situation) == action


def test_every_row_has_a_case() -> None:
    assert {int(name.split()[0]) for name, _, _ in TABLE} == set(range(1, 11))


def test_the_printers_own_name_says_which_run_to_follow() -> None:
    name = print_name("job-1.x", 2, 1, 0, "part b.gcode")
    s = at(PrinterState.PRINTING, prints=parse_print_name("job-1.x", 2, "local/" + name.replace(" ", "_")))
    assert decide(s) == Follow(1, 0)
    other = at(PrinterState.PRINTING, prints=parse_print_name("job-1.x", 1, name))  # another copy's print
    assert decide(other) == Busy()


def test_a_finishing_record_with_an_unknown_outcome_is_an_error() -> None:
    with pytest.raises(ValueError):
        decide(at(record=rec("finishing:maybe", -1, -1)))


# --- the record ---------------------------------------------------------------------------------------------
KEY, GRANT = "job/default/j1", (4, 8)
SAVED = {"key": KEY, "copy": 0, "grant": [4, 8], "set": 1, "run": 2, "phase": "ready", "reason": None}


def stored(local: dict[str, object] | None) -> recovery.LocalCopy | None:
    """``local`` as the worker's slot reads it from the replica (the JSON shape on disk)."""
    return LOCAL_COPY.parse(json.dumps(local))


def test_the_record_of_this_copy_under_this_grant_is_read() -> None:
    assert record_of(stored(SAVED), KEY, 0, GRANT) == Record(1, 2, "ready", None)
    failed = {**SAVED, "phase": "failed", "reason": "r"}
    assert record_of(stored(failed), KEY, 0, GRANT) == Record(1, 2, "failed", "r")


@pytest.mark.parametrize("local", [
    None, {**SAVED, "key": "job/default/j2"}, {**SAVED, "copy": 1}, {**SAVED, "grant": [4, 9]},
], ids=["none", "another job", "another copy", "another grant"])
def test_a_record_of_anything_else_is_no_record(local: dict[str, object] | None) -> None:
    assert record_of(stored(local), KEY, 0, GRANT) is None


def test_a_record_without_grant_is_this_grants_and_one_without_phase_is_printing() -> None:
    local = {k: v for k, v in SAVED.items() if k not in ("grant", "phase")}  # as the first versions wrote it
    assert record_of(stored(local), KEY, 0, GRANT) == Record(1, 2, "printing", None)
    assert decide(at(record=record_of(stored(local), KEY, 0, GRANT))) == UNKNOWN


def test_a_record_that_cannot_be_read_may_be_this_copys_and_is_never_taken_for_none() -> None:
    """No record says the printer was never called (row 4: print from the start); a record that cannot be read
    says nothing of the kind, so the copy is reported as of unknown outcome, or followed if it prints."""
    unreadable = record_of(recovery.Unreadable(), KEY, 0, GRANT)
    assert decide(at(record=unreadable)) == UNKNOWN
    assert decide(at(PrinterState.PRINTING, record=unreadable, prints=(1, 0))) == Follow(1, 0)


# --- properties ---------------------------------------------------------------------------------------------
PHASES = ["ready", "printing", "ok", "failed", "finishing:done", "finishing:failed", "finishing:requeue"]


@st.composite
def situations(draw: st.DrawFn) -> Situation:
    counts = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))

    def a_run() -> tuple[int, int]:
        si = draw(st.integers(0, len(counts) - 1))
        return si, draw(st.integers(0, counts[si] - 1))

    record = None
    if draw(st.booleans()):
        other = st.text(max_size=10).filter(lambda p: not p.startswith("finishing:"))
        phase = draw(st.sampled_from(PHASES) | other)
        record = Record(*(a_run() if not phase.startswith("finishing:") else (-1, -1)), phase,
                        draw(st.none() | st.text(max_size=10)))
    prints = a_run() if draw(st.booleans()) else None
    return Situation(record=record, printer=draw(st.sampled_from(PrinterState)), prints=prints,
                     committed=draw(st.booleans()), counts=counts)


@settings(max_examples=500, deadline=None)
@given(situations())
def test_an_idle_printer_is_not_called_nor_the_copy_reported_before_the_start_commits(s: Situation) -> None:
    if s.printer in IDLE and not s.committed:
        assert decide(s) == AwaitStart()


@settings(max_examples=500, deadline=None)
@given(situations())
def test_a_printing_printer_is_followed_or_waited_for_never_called_again(s: Situation) -> None:
    action = decide(s)
    if s.printer in BUSY:
        assert action == (Busy() if s.prints is None else Follow(*s.prints))
    else:
        assert not isinstance(action, (Busy, Follow))


@settings(max_examples=500, deadline=None)
@given(situations())
def test_only_a_run_the_printer_was_certainly_not_called_for_is_printed(s: Situation) -> None:
    action = decide(s)
    if not isinstance(action, Print):
        return
    assert s.committed and s.printer in IDLE
    assert 0 <= action.set_index < len(s.counts) and 0 <= action.run < s.counts[action.set_index]
    where = (action.set_index, action.run)
    r = s.record
    if r is None:
        assert where == (0, 0)
    elif r.phase == "ready":
        assert where == (r.set_index, r.run)
    else:  # the run after one that ended ok: the next in print order
        assert r.phase == "ok"
        order = [(si, run) for si, n in enumerate(s.counts) for run in range(n)]
        assert order.index(where) == order.index((r.set_index, r.run)) + 1


@settings(max_examples=500, deadline=None)
@given(situations())
def test_a_copy_is_reported_done_only_when_every_run_ended_ok(s: Situation) -> None:
    action = decide(s)
    if isinstance(action, Report) and action.outcome == P.Outcome.DONE:
        r = s.record
        assert r is not None
        assert r.phase == "finishing:done" or (
            r.phase == "ok" and (r.set_index, r.run) == (len(s.counts) - 1, s.counts[-1] - 1))


@settings(max_examples=500, deadline=None)
@given(situations())
def test_a_run_that_may_have_run_is_never_printed_again(s: Situation) -> None:
    """A run recorded ``printing`` (the printer may have been called) is followed, waited for or reported
    failed: never printed."""
    r = s.record
    if r is None or (r.phase in PHASES and r.phase != "printing"):
        return
    action = decide(s)
    assert not isinstance(action, Print)
    if s.printer in IDLE and s.committed:
        assert action == UNKNOWN


def test_the_module_is_pure() -> None:
    """No asyncio, no I/O, no clock: the decision imports nothing that could do any (pydantic: the local copy
    record's model, which only validates)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(recovery))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "collections", "dataclasses", "typing", "pydantic", "node", "shared"}
