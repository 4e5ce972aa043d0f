"""The contract of :class:`node.worker.printers.base.PrinterDriver`, run against every driver.

* ``simulated``: :class:`node.worker.printers.simulated.SimulatedPrinter`, always.
* ``octoprint``: :class:`node.worker.printers.octoprint.OctoPrintDriver` against a real OctoPrint 1.11 and its virtual
  printer (``tests/octoprint_fixture.py``; skipped without ``.octoprint-venv``, failed when ``CI=true``).

Every wait polls ``status()`` against a deadline. A test leaves its printer connected and idle.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from node.worker.printers.base import PrinterDriver, PrinterState, PrinterStatus
from node.worker.printers.octoprint import OctoPrintDriver
from node.worker.printers.simulated import SimulatedPrinter
from shared.errors import PrinterError, PrinterOffline
from tests.octoprint_fixture import OctoPrintServer, free_port, octoprint_factory, octoprint_server
from tests.waiting import printer_reaches

__all__ = ["octoprint_factory", "octoprint_server"]  # fixtures, imported for pytest to find

DATA = Path(__file__).resolve().parent.parent / "data" / "printer"
SHORT = DATA / "short.gcode"  # about 2 s on OctoPrint's virtual printer
LONG = DATA / "long.gcode"  # about 60 s: long enough to pause, resume and cancel it
DEADLINE = 30.0
POLL = 0.05


@dataclass
class Harness:
    """A connected driver, plus what the contract needs that the protocol does not offer."""

    driver: PrinterDriver
    inject_failure: Callable[[], Awaitable[None]]  # the printer errors while printing
    make_unreachable: Callable[[], PrinterDriver]  # a driver whose printer cannot be reached


async def wait_for(
    driver: PrinterDriver, check: Callable[[PrinterStatus], bool], what: str, timeout: float = DEADLINE
) -> PrinterStatus:
    return cast(PrinterStatus, await printer_reaches(driver, check, what, timeout))


def is_ready(status: PrinterStatus) -> bool:
    return status.state is PrinterState.READY


async def simulated_harness() -> Harness:
    # time_scale 4: SHORT (;TIME:2) takes 0.5 s, LONG (1m 0s) 15 s.
    printer = SimulatedPrinter("sim-contract", time_scale=4.0, seed=1)

    async def inject_failure() -> None:
        printer.fail("thermal runaway (injected)")

    def make_unreachable() -> PrinterDriver:
        other = SimulatedPrinter("sim-unplugged")
        other.unplug("USB cable pulled (injected)")
        return other

    return Harness(printer, inject_failure, make_unreachable)


def octoprint_harness(server: OctoPrintServer) -> Harness:
    driver = OctoPrintDriver(server.url, server.api_key, port="VIRTUAL", timeout=5.0)

    async def inject_failure() -> None:
        # The virtual printer's debug command: Marlin's "Error:Printer halted. kill() called!".
        await driver.run_gcode(["!!DEBUG:trigger_fatal_error_marlin"])

    def make_unreachable() -> PrinterDriver:
        return OctoPrintDriver(f"http://127.0.0.1:{free_port()}", server.api_key, timeout=2.0)

    return Harness(driver, inject_failure, make_unreachable)


@pytest.fixture(params=["simulated", pytest.param("octoprint", marks=pytest.mark.e2e)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "simulated":
        h = await simulated_harness()
    else:
        h = octoprint_harness(request.getfixturevalue("octoprint_server"))
    driver = h.driver
    try:
        await driver.connect()
        yield h
    finally:
        # Leave the printer idle for the next test (the OctoPrint server is shared by the session).
        status = await driver.status()
        if status.state in (PrinterState.PRINTING, PrinterState.PAUSED):
            await driver.cancel()
        if status.state is not PrinterState.OFFLINE:
            await wait_for(driver, lambda s: s.state is not PrinterState.PRINTING, "teardown: print ended")
        if (await driver.status()).state is not PrinterState.READY:
            await driver.connect()
        await driver.close()


@pytest.fixture
def driver(harness: Harness) -> PrinterDriver:
    return harness.driver


async def test_connect_makes_ready_and_is_idempotent(driver: PrinterDriver) -> None:
    status = await driver.status()
    assert status.state is PrinterState.READY, status
    assert status.file is None and status.progress is None
    await driver.connect()
    assert (await driver.status()).state is PrinterState.READY


async def test_start_prints_the_file_under_its_name(driver: PrinterDriver) -> None:
    name = "part #1 (long).gcode"  # spaces, '#' and parentheses must survive OctoPrint's URLs
    await driver.start(LONG, name)
    status = await wait_for(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    assert status.file == name
    assert status.progress is not None and 0.0 <= status.progress < 1.0


async def test_progress_grows(driver: PrinterDriver) -> None:
    await driver.start(LONG, "progress.gcode")
    first = await wait_for(driver, lambda s: s.progress is not None, "progress reported")
    assert first.progress is not None
    later = await wait_for(
        driver, lambda s: (s.progress or 0.0) > (first.progress or 0.0), "progress grows", timeout=15
    )
    assert later.state is PrinterState.PRINTING
    assert later.progress is not None and later.progress < 1.0


async def test_pause_and_resume(driver: PrinterDriver) -> None:
    await driver.start(LONG, "pause me.gcode")
    await wait_for(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    await driver.pause()
    paused = await wait_for(driver, lambda s: s.state is PrinterState.PAUSED, "paused")
    assert paused.file == "pause me.gcode"
    assert paused.progress is not None and paused.progress < 1.0
    still = await driver.status()
    assert still.state is PrinterState.PAUSED and still.progress == paused.progress
    await driver.resume()
    resumed = await wait_for(driver, lambda s: s.state is PrinterState.PRINTING, "printing again")
    assert resumed.file == "pause me.gcode"
    assert resumed.progress is not None and resumed.progress >= paused.progress


async def test_cancel_returns_to_ready_with_result_cancelled(driver: PrinterDriver) -> None:
    await driver.start(LONG, "cancel me.gcode")
    await wait_for(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    await driver.cancel()
    status = await wait_for(driver, is_ready, "ready after cancel")
    assert status.last_result == "cancelled"
    assert status.last_file == "cancel me.gcode"
    assert status.file is None and status.progress is None


async def test_cancel_while_paused(driver: PrinterDriver) -> None:
    await driver.start(LONG, "paused then cancelled.gcode")
    await driver.pause()  # straight after start(): OctoPrint loses a pause while "Starting", a driver must not
    await wait_for(driver, lambda s: s.state is PrinterState.PAUSED, "paused")
    await driver.cancel()
    status = await wait_for(driver, is_ready, "ready after cancel")
    assert (status.last_result, status.last_file) == ("cancelled", "paused then cancelled.gcode")


async def test_short_print_runs_to_done(driver: PrinterDriver) -> None:
    loop = asyncio.get_running_loop()
    began = loop.time()
    await driver.start(SHORT, "short.gcode")
    status = await wait_for(driver, lambda s: s.last_result is not None, "print ended")
    assert status.state is PrinterState.READY, status
    assert (status.last_result, status.last_file) == ("done", "short.gcode")
    assert loop.time() - began < 20
    # The next print starts cleanly after a finished one, and its result replaces the last one.
    await driver.start(SHORT, "short again.gcode")
    status = await wait_for(driver, lambda s: s.last_file == "short again.gcode", "second print ended")
    assert (status.state, status.last_result) == (PrinterState.READY, "done")


async def test_start_while_printing_raises(driver: PrinterDriver) -> None:
    await driver.start(LONG, "first.gcode")
    await wait_for(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    with pytest.raises(PrinterError):
        await driver.start(SHORT, "second.gcode")
    status = await driver.status()
    assert status.state is PrinterState.PRINTING and status.file == "first.gcode"


async def test_start_while_paused_raises(driver: PrinterDriver) -> None:
    await driver.start(LONG, "first.gcode")
    await driver.pause()
    await wait_for(driver, lambda s: s.state is PrinterState.PAUSED, "paused")
    with pytest.raises(PrinterError):
        await driver.start(SHORT, "second.gcode")
    assert (await driver.status()).file == "first.gcode"


async def test_job_commands_without_a_job_raise(driver: PrinterDriver) -> None:
    for command in (driver.pause, driver.resume, driver.cancel):
        with pytest.raises(PrinterError, match="no print job"):
            await command()
    status = await driver.status()
    assert status.state is PrinterState.READY and status.last_result is None


async def test_start_of_a_missing_file_raises(driver: PrinterDriver, tmp_path: Path) -> None:
    with pytest.raises(PrinterError):
        await driver.start(tmp_path / "nowhere.gcode", "nowhere.gcode")
    assert (await driver.status()).state is PrinterState.READY


async def test_run_gcode_when_ready(driver: PrinterDriver) -> None:
    await driver.run_gcode(["M140 S0", "", "G4 P1"])
    status = await driver.status()
    assert status.state is PrinterState.READY
    assert status.bed_temp is None or 0.0 < status.bed_temp < 100.0


async def test_printer_error_ends_the_print_failed_and_connect_recovers(harness: Harness) -> None:
    driver = harness.driver
    await driver.start(LONG, "doomed.gcode")
    await wait_for(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    await harness.inject_failure()
    status = await wait_for(driver, lambda s: s.last_result is not None, "print ended")
    assert (status.last_result, status.last_file) == ("failed", "doomed.gcode")
    assert status.state in (PrinterState.ERROR, PrinterState.OFFLINE) and status.reason
    with pytest.raises(PrinterError):
        await driver.start(SHORT, "too soon.gcode")
    await driver.connect()
    assert (await driver.status()).state is PrinterState.READY


async def test_unreachable_printer(harness: Harness) -> None:
    lost = harness.make_unreachable()
    try:
        status = await lost.status()  # never raises
        assert status.state is PrinterState.OFFLINE and status.reason
        with pytest.raises(PrinterOffline):
            await lost.connect()
        with pytest.raises(PrinterOffline):
            await lost.start(SHORT, "short.gcode")
    finally:
        await lost.close()
