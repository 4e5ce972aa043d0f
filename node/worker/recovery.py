"""What a worker does after a restart with a started copy it holds: a pure decision table.

:func:`decide` maps a :class:`Situation` (the copy's local record, the printer, the farm) to one
:class:`Action`; ``Worker._recover`` gathers the one and carries out the other. The rows, in the order they
are tried (the first that matches wins)::

    #   printer             start        local record (phase)        action
    1   idle                uncommitted  any                         AwaitStart: until the farm confirms it
    2   printing not ours   any          any                         Busy: worker in error, the copy stays
    3   printing (s, r)     any          any                         Follow (s, r) to its end, then go on
    4   idle                committed    none                        Print from (0, 0)
    5   idle                committed    finishing:<outcome>         Report <outcome> again; clear the bed
    6   idle                committed    ready at (s, r)             Print from (s, r)
    7   idle                committed    failed                      Report requeue, its reason; clear the bed
    8   idle                committed    ok at (s, r), more to print Print from the run after (s, r)
    9   idle                committed    ok at the copy's last run   Report done; clear the bed
    10  idle                committed    printing, or anything else  Report failed, outcome unknown; bed as is

*printer*: *printing* is PRINTING or PAUSED, *idle* any other state; *(s, r)* when ``parse_print_name``
reads set ``s`` and run ``r`` of this job copy from the printer's file, *not ours* when it does not. *start*:
whether the farm has committed the copy's start. *local record*: the replica meta ``local_copy``
(:class:`LocalCopy`) if it is of this copy under this grant (:func:`record_of`), written before every step a
restart must not repeat. A record that cannot be read counts as this copy's, in phase ``printing``.

The safety rule behind the table: a run the printer may have been called for is never started again; only a
run it was certainly not called for (rows 4, 6, 8) is printed, and only once the start is committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from node.consensus.meta import MetaRecord
from node.worker.printers.base import PrinterState
from shared import protocol as P
from shared.models import Stamp

UNKNOWN_OUTCOME = ("the node restarted during this print and its outcome is unknown: check the printer, then "
                   "resolve the copy")


class LocalCopy(MetaRecord):
    """The worker's durable record of where it is in the copy it prints (replica meta ``local_copy``), written
    before every step a restart must not repeat (``Worker._save_local``)."""

    key: str  # the job's object key
    copy_index: Annotated[int, Field(alias="copy")]
    grant: Stamp | None = None  # None: a record of before grants were written, taken as the held grant's
    set_index: Annotated[int, Field(alias="set")]  # -1 while finishing
    run: int
    phase: str | None = None  # see Record.phase; None (a record of before phases were written): printing
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """The stored local copy record could not be read: nothing says the printer was not called for the copy."""


@dataclass(frozen=True, slots=True)
class Record:
    """Where the node was in the copy (its :class:`LocalCopy`, :func:`record_of`): the run and its phase."""

    set_index: int
    run: int
    phase: str  # ready / printing / ok / failed / finishing:<outcome>
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Situation:
    """What the worker knows after a restart about a started copy it holds."""

    record: Record | None  # None: no record of this copy under this grant
    printer: PrinterState
    prints: tuple[int, int] | None  # (set, run) of this copy the printer's file names; None: not ours
    committed: bool  # the farm has committed the copy's start
    counts: tuple[int, ...]  # each set's count, in order


@dataclass(frozen=True, slots=True)
class AwaitStart:
    """Print nothing, report nothing: wait for the farm to confirm the start."""


@dataclass(frozen=True, slots=True)
class Busy:
    """The printer prints something netqueues did not start: wait for it, the copy staying where it is."""


@dataclass(frozen=True, slots=True)
class Follow:
    """Follow the print of run ``run`` of set ``set_index`` that the printer is running, then go on."""

    set_index: int
    run: int


@dataclass(frozen=True, slots=True)
class Print:
    """Call the printer from run ``run`` of set ``set_index`` (its files fetched first); ``why`` it may."""

    set_index: int
    run: int
    why: str


@dataclass(frozen=True, slots=True)
class Report:
    """Report how the copy ended, then clear the bed if ``clear_bed``."""

    outcome: P.Outcome
    reason: str | None
    clear_bed: bool = True


Action = AwaitStart | Busy | Follow | Print | Report


def record_of(local: LocalCopy | Unreadable | None, key: str, copy_index: int, grant: Stamp) -> Record | None:
    """The record ``local`` (replica meta ``local_copy``) if it is of this job copy under ``grant``, or None.

    A record without a grant counts as this grant's; one without a phase as ``printing`` (outcome unknown). One
    that cannot be read counts as this copy's, in phase ``printing``: it may have been this copy's, written as
    the printer was called, and so is never taken for no record (row 4, print from the start).
    """
    if isinstance(local, Unreadable):
        return Record(set_index=0, run=0, phase="printing")
    if local is None or local.key != key or local.copy_index != copy_index \
            or (local.grant is not None and local.grant != grant):
        return None
    return Record(set_index=local.set_index, run=local.run, phase=local.phase or "printing", reason=local.reason)


def decide(s: Situation) -> Action:
    """The row of the table (module docstring) that ``s`` matches, as the action to take."""
    printing = s.printer in (PrinterState.PRINTING, PrinterState.PAUSED)
    if not printing and not s.committed:
        # Row 1. What our replica says may be an entry its arbiter never got committed (we may have been that
        # arbiter): a start we hold is not ours to print, nor to report on, until the farm confirms it.
        # Found by the LAN chaos tests: an arbiter killed just after proposing its own start came back and
        # printed the copy, which the next arbiter had (rightly) as only granted, and granted again.
        return AwaitStart()
    if printing:
        if s.prints is None:
            # Row 2. Not ours: someone printed by hand. Wait for the printer; our copy stays where it is.
            return Busy()
        return Follow(*s.prints)  # row 3
    r = s.record
    if r is None:
        # Row 4. No record of this copy: we never reached the point of calling the printer for it (the record
        # is written before the first call). Either the arbiter granted and started it at once (we asked with
        # start_now and hold its files), or the start was committed just as we were paused, cut off or
        # restarted: print it from the beginning instead of calling it failed.
        return Print(0, 0, "started and never sent to the printer")
    if r.phase.startswith("finishing:"):
        # Row 5. Every print ended; only the report's commit was not seen yet. (An outcome that is not one
        # raises ValueError: only _finish writes this phase, from a P.Outcome.)
        return Report(P.Outcome(r.phase.split(":", 1)[1]), r.reason)
    if r.phase == "ready":
        # Row 6. The printer was never called for this run: go on from there.
        return Print(r.set_index, r.run, "the printer was never called for this run")
    if r.phase == "failed":
        return Report(P.Outcome.REQUEUE, r.reason)  # row 7
    if r.phase == "ok":
        nxt = (r.set_index, r.run + 1) if r.run + 1 < s.counts[r.set_index] else (r.set_index + 1, 0)
        if nxt[0] < len(s.counts):
            return Print(*nxt, "the run before ended ok")  # row 8
        return Report(P.Outcome.DONE, None)  # row 9
    # Row 10. The printer was called for this run, is not printing it, and we cannot know whether it
    # completed: say so and let an operator decide (job/resolve), rather than risk printing it twice.
    return Report(P.Outcome.FAILED, UNKNOWN_OUTCOME, clear_bed=False)
