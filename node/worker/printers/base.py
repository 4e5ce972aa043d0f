"""The printer driver seam.

A driver is the node's view of one physical (or simulated) printer. Drivers are asynchronous: blocking
clients (octorest) run in worker threads inside the driver, so the node's event loop never blocks.
Every driver is checked by the same contract suite, ``tests/unit/test_printer_contract.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class PrinterState(enum.StrEnum):
    OFFLINE = "offline"  # driver cannot reach the printer (or its host software)
    READY = "ready"  # connected, idle, can start a print
    PRINTING = "printing"
    PAUSED = "paused"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class PrinterStatus:
    state: PrinterState
    file: str | None = None  # name of the selected / printing file, as given to start()
    progress: float | None = None  # 0..1
    reason: str | None = None  # why OFFLINE / ERROR, human readable
    # Outcome of the last print that ended since the driver started: "done", "cancelled", "failed".
    last_result: str | None = None
    last_file: str | None = None
    bed_temp: float | None = None


class PrinterDriver(Protocol):
    async def connect(self) -> None:
        """Connect to the printer; raise :class:`shared.errors.PrinterError` on failure."""

    async def close(self) -> None: ...

    async def status(self) -> PrinterStatus: ...

    async def start(self, path: Path, name: str) -> None:
        """Upload (if needed) and start printing ``path`` under ``name``. Raise PrinterError if it cannot."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    async def cancel(self) -> None: ...

    async def run_gcode(self, lines: list[str]) -> None:
        """Send G-code lines (bed clearing scripts, cooldown)."""
