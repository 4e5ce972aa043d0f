"""A simulated printer for the demo, benchmarks and fault tests.

A print lasts as long as its G-code says (PrusaSlicer's ``; estimated printing time (normal mode) = 1h 2m 3s``
or Cura's ``;TIME:<seconds>``, else ``default_duration``), divided by ``time_scale``. Everything runs on the
event loop: time is the running loop's clock and the end of a print is a loop timer, so no threads.

Every ``start()`` call is recorded, in memory (:attr:`SimulatedPrinter.starts`) and, when a journal path is
given, as one JSON line ``{ts, printer, name, file, accepted}`` appended and fsynced, so that a fault test can
count starts across a crash of the process. Faults: ``fail_rate`` makes that share of prints fail part-way
(seeded); :meth:`SimulatedPrinter.fail` and :meth:`SimulatedPrinter.unplug` inject failures on demand.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from node.worker.printers.base import PrinterState, PrinterStatus
from shared.errors import PrinterError, PrinterOffline

log = logging.getLogger(__name__)

DEFAULT_DURATION = 600.0  # seconds, for G-code without a slicer's estimate
AMBIENT_TEMP = 21.3
_SCAN_BYTES = 64 * 1024  # slicers write their estimate in the first (Cura) or last (PrusaSlicer) lines

_PRUSA_TIME = re.compile(rb"^;\s*estimated printing time(?: \(normal mode\))?\s*=\s*([^\r\n]+)", re.MULTILINE)
_CURA_TIME = re.compile(rb"^;TIME:\s*(\d+(?:\.\d+)?)\s*$", re.MULTILINE)
_PRUSA_PART = re.compile(r"(\d+)\s*([dhms])")
_UNIT_SECONDS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_BED_TEMP = re.compile(r"^M(?:140|190)\b.*?\bS(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_duration(gcode: bytes) -> float | None:
    """The slicer's print time estimate in seconds, from PrusaSlicer's or Cura's comment, if present."""
    if match := _PRUSA_TIME.search(gcode):
        parts = _PRUSA_PART.findall(match.group(1).decode("ascii", "replace"))
        if parts:
            return float(sum(int(n) * _UNIT_SECONDS[unit] for n, unit in parts))
    if match := _CURA_TIME.search(gcode):
        return float(match.group(1))
    return None


def estimated_duration(path: Path, default: float = DEFAULT_DURATION) -> float:
    with path.open("rb") as fh:
        head = fh.read(_SCAN_BYTES)
        size = fh.seek(0, os.SEEK_END)
        tail = b""
        if size > _SCAN_BYTES:
            fh.seek(max(size - _SCAN_BYTES, _SCAN_BYTES))
            tail = fh.read()
    found = parse_duration(head + b"\n" + tail)
    return default if found is None else found


@dataclass(frozen=True, slots=True)
class StartRecord:
    ts: float  # wall clock, seconds since the epoch
    printer: str
    name: str
    file: str
    accepted: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def read_journal(path: Path) -> list[StartRecord]:
    """The start calls recorded in a journal file (one JSON object per line)."""
    if not path.exists():
        return []
    return [StartRecord(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class _Job:
    name: str
    duration: float  # simulated seconds, already divided by time_scale
    end_at: float  # fraction of the print at which it ends: 1.0, or earlier when it is fated to fail
    elapsed: float = 0.0  # time printed before the current run
    running_since: float | None = None  # loop time, None while paused
    timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def printed(self, now: float) -> float:
        return self.elapsed + (now - self.running_since if self.running_since is not None else 0.0)

    def progress(self, now: float) -> float:
        if self.duration <= 0:
            return 1.0
        return min(self.printed(now) / self.duration, 1.0)


class SimulatedPrinter:
    """A :class:`~node.worker.printers.base.PrinterDriver` whose prints are timers on the event loop."""

    def __init__(
        self,
        name: str,
        *,
        time_scale: float = 1.0,
        journal: Path | None = None,
        fail_rate: float = 0.0,
        seed: int | None = None,
        default_duration: float = DEFAULT_DURATION,
    ) -> None:
        if time_scale <= 0:
            raise ValueError(f"time_scale must be positive, not {time_scale}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within 0..1, not {fail_rate}")
        self.name = name
        self.time_scale = time_scale
        self.journal = journal
        self.fail_rate = fail_rate
        self.default_duration = default_duration
        self.starts: list[StartRecord] = []
        self.gcode: list[str] = []  # every line given to run_gcode()
        self.bed_temp = AMBIENT_TEMP
        self._random = random.Random(seed)
        self._state = PrinterState.OFFLINE
        self._reason: str | None = "not connected"
        self._unplugged: str | None = None
        self._job: _Job | None = None
        self._last_result: str | None = None
        self._last_file: str | None = None

    def __repr__(self) -> str:
        return f"SimulatedPrinter({self.name!r})"

    # --- the driver protocol ---

    async def connect(self) -> None:
        if self._unplugged is not None:
            raise PrinterOffline(f"{self.name}: {self._unplugged}")
        if self._state in (PrinterState.OFFLINE, PrinterState.ERROR):
            self._state, self._reason = PrinterState.READY, None

    async def close(self) -> None:
        if self._job is not None:
            self._stop_timer(self._job)
            self._job = None
        self._state, self._reason = PrinterState.OFFLINE, "closed"

    async def status(self) -> PrinterStatus:
        job = self._job
        now = asyncio.get_running_loop().time()
        return PrinterStatus(
            state=self._state,
            file=job.name if job else None,
            progress=job.progress(now) if job else None,
            reason=self._reason,
            last_result=self._last_result,
            last_file=self._last_file,
            bed_temp=self.bed_temp,
        )

    async def start(self, path: Path, name: str) -> None:
        """Record the call, then print ``path`` for its estimated duration / ``time_scale``."""
        refusal = self._start_refusal(path, name)
        self._record(StartRecord(time.time(), self.name, name, str(path), accepted=refusal is None))
        if refusal is not None:
            raise refusal
        duration = estimated_duration(path, self.default_duration) / self.time_scale
        fails = self.fail_rate > 0 and self._random.random() < self.fail_rate
        end_at = self._random.uniform(0.1, 0.9) if fails else 1.0
        self._job = _Job(name=name, duration=duration, end_at=end_at)
        self._state, self._reason = PrinterState.PRINTING, None
        self._run(self._job)
        log.info("%r: printing %s for %.3fs", self, name, duration)

    async def pause(self) -> None:
        job = self._require_job("pause")
        if self._state is PrinterState.PRINTING:
            self._stop_timer(job)
            self._state = PrinterState.PAUSED

    async def resume(self) -> None:
        job = self._require_job("resume")
        if self._state is PrinterState.PAUSED:
            self._state = PrinterState.PRINTING
            self._run(job)

    async def cancel(self) -> None:
        self._end("cancelled", PrinterState.READY, None, job=self._require_job("cancel"))

    async def run_gcode(self, lines: list[str]) -> None:
        if self._state is PrinterState.OFFLINE:
            raise PrinterOffline(f"cannot send G-code: {self.name} is offline ({self._reason})")
        for line in lines:
            line = line.strip()
            if not line:
                continue
            self.gcode.append(line)
            if match := _BED_TEMP.match(line):
                self.bed_temp = max(float(match.group(1)), AMBIENT_TEMP)  # M140 S0 cools to ambient

    # --- fault injection ---

    def fail(self, reason: str = "simulated printer failure") -> None:
        """The printer errors now: a print in progress ends "failed"; connect() clears the error."""
        if self._job is not None:
            self._end("failed", PrinterState.ERROR, reason, job=self._job)
        else:
            self._state, self._reason = PrinterState.ERROR, reason

    def unplug(self, reason: str = "printer unplugged") -> None:
        """The printer disappears: OFFLINE, a print in progress is lost, connect() fails until plug_in()."""
        self._unplugged = reason
        if self._job is not None:
            self._end("failed", PrinterState.OFFLINE, reason, job=self._job)
        else:
            self._state, self._reason = PrinterState.OFFLINE, reason

    def plug_in(self) -> None:
        self._unplugged = None

    # --- internals ---

    def _start_refusal(self, path: Path, name: str) -> PrinterError | None:
        if self._state is PrinterState.OFFLINE:
            return PrinterOffline(f"cannot start {name}: {self.name} is offline ({self._reason})")
        if self._state is PrinterState.ERROR:
            return PrinterError(f"cannot start {name}: {self.name} is in error ({self._reason})")
        if self._job is not None:
            return PrinterError(f"cannot start {name}: {self.name} is {self._state} {self._job.name}")
        if not path.is_file():
            return PrinterError(f"cannot start {name}: no file at {path}")
        return None

    def _record(self, record: StartRecord) -> None:
        self.starts.append(record)
        if self.journal is not None:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as fh:
                fh.write(record.to_json() + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def _require_job(self, action: str) -> _Job:
        if self._job is None:
            raise PrinterError(f"cannot {action}: no print job on {self.name}")
        return self._job

    def _run(self, job: _Job) -> None:
        loop = job.loop = asyncio.get_running_loop()
        job.running_since = loop.time()
        remaining = max(job.end_at * job.duration - job.elapsed, 0.0)
        job.timer = loop.call_later(remaining, self._on_timer, job)

    def _stop_timer(self, job: _Job) -> None:
        if job.timer is not None:
            job.timer.cancel()
            job.timer = None
        if job.running_since is not None and job.loop is not None:
            job.elapsed = job.printed(job.loop.time())
            job.running_since = None

    def _on_timer(self, job: _Job) -> None:
        if job is not self._job:
            return
        job.timer = None
        if job.end_at < 1.0:
            self._end("failed", PrinterState.ERROR, f"simulated failure at {job.end_at:.0%}", job=job)
        else:
            self._end("done", PrinterState.READY, None, job=job)

    def _end(self, result: str, state: PrinterState, reason: str | None, *, job: _Job) -> None:
        self._stop_timer(job)
        self._job = None
        self._state, self._reason = state, reason
        self._last_result, self._last_file = result, job.name
        log.info("%r: print of %s ended: %s", self, job.name, result)
