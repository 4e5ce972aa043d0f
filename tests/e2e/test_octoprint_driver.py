"""OctoPrintDriver against a real OctoPrint 1.11, beyond the shared contract (tests/unit/test_printer_contract.py;
the pure core is in tests/unit/test_octoprint_core.py): what happens when OctoPrint is used by someone else,
restarted, stopped, or refuses the key."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import requests

from node.worker.printers.base import PrinterState
from node.worker.printers.octoprint import OctoPrintDriver
from shared.errors import PrinterError, PrinterOffline
from tests.octoprint_fixture import OctoPrintFactory, OctoPrintServer
from tests.waiting import printer_reaches

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parent.parent / "data" / "printer"
SHORT = DATA / "short.gcode"
LONG = DATA / "long.gcode"


def octoprint_post(server: OctoPrintServer, path: str, body: dict[str, str]) -> requests.Response:
    """What a user does in OctoPrint's own interface, behind the driver's back."""
    return requests.post(f"{server.url}{path}", json=body, headers={"X-Api-Key": server.api_key}, timeout=10)


@pytest.fixture
async def driver(octoprint_server: OctoPrintServer) -> AsyncIterator[OctoPrintDriver]:
    drv = OctoPrintDriver(octoprint_server.url, octoprint_server.api_key, timeout=5.0)
    await drv.connect()
    try:
        yield drv
    finally:
        status = await drv.status()
        if status.state in (PrinterState.PRINTING, PrinterState.PAUSED):
            await drv.cancel()
            await printer_reaches(drv, lambda s: s.state is PrinterState.READY, "teardown: idle")
        await drv.close()


async def test_cancel_in_octoprint_is_seen_as_cancelled(
    driver: OctoPrintDriver, octoprint_server: OctoPrintServer
) -> None:
    await driver.start(LONG, "cancelled elsewhere.gcode")
    await printer_reaches(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    assert octoprint_post(octoprint_server, "/api/job", {"command": "cancel"}).status_code == 204
    status = await printer_reaches(driver, lambda s: s.state is PrinterState.READY, "ready")
    assert (status.last_result, status.last_file) == ("cancelled", "cancelled elsewhere.gcode")


async def test_pause_in_octoprint_is_seen(driver: OctoPrintDriver, octoprint_server: OctoPrintServer) -> None:
    await driver.start(LONG, "paused elsewhere.gcode")
    reply = octoprint_post(octoprint_server, "/api/job", {"command": "pause", "action": "pause"})
    assert reply.status_code == 204
    status = await printer_reaches(driver, lambda s: s.state is PrinterState.PAUSED, "paused")
    assert status.file == "paused elsewhere.gcode"


async def test_a_new_driver_follows_a_print_in_progress_to_its_end(
    driver: OctoPrintDriver, octoprint_server: OctoPrintServer
) -> None:
    """After a node restart the driver finds OctoPrint printing and reports how that print ends."""
    await driver.start(SHORT, "before restart.gcode")
    await driver.close()
    fresh = OctoPrintDriver(octoprint_server.url, octoprint_server.api_key, timeout=5.0)
    try:
        await fresh.connect()  # must not disturb the print
        status = await fresh.status()
        assert status.state is PrinterState.PRINTING
        assert status.file == "before restart.gcode"  # OctoPrint kept the name it was uploaded under
        with pytest.raises(PrinterError):
            await fresh.start(SHORT, "second start.gcode")
        status = await printer_reaches(fresh, lambda s: s.last_result is not None, "print ended")
        assert (status.state, status.last_result) == (PrinterState.READY, "done")
        assert status.last_file == "before restart.gcode"
    finally:
        await fresh.close()


async def test_names_are_made_acceptable_to_octoprint(driver: OctoPrintDriver) -> None:
    await driver.start(SHORT, "jobs/abc 123/set one")  # folders and no G-code suffix
    status = await printer_reaches(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    assert status.file == "jobs/abc 123/set one"
    status = await printer_reaches(driver, lambda s: s.last_result is not None, "print ended")
    assert (status.last_result, status.last_file) == ("done", "jobs/abc 123/set one")


async def test_printer_disconnected_in_octoprint(
    driver: OctoPrintDriver, octoprint_server: OctoPrintServer
) -> None:
    await driver.start(LONG, "unplugged.gcode")
    await printer_reaches(driver, lambda s: s.state is PrinterState.PRINTING, "printing")
    assert octoprint_post(octoprint_server, "/api/connection", {"command": "disconnect"}).status_code == 204
    status = await printer_reaches(driver, lambda s: s.state is PrinterState.OFFLINE, "offline")
    assert status.reason and "not connected" in status.reason
    assert (status.last_result, status.last_file) == ("failed", "unplugged.gcode")
    with pytest.raises(PrinterOffline):
        await driver.start(SHORT, "short.gcode")
    await driver.connect()
    assert (await driver.status()).state is PrinterState.READY


async def test_wrong_api_key(octoprint_server: OctoPrintServer) -> None:
    drv = OctoPrintDriver(octoprint_server.url, "not-the-key", timeout=5.0)
    try:
        status = await drv.status()
        assert status.state is PrinterState.OFFLINE
        assert status.reason and "API key" in status.reason
        with pytest.raises(PrinterError, match="API key") as caught:
            await drv.connect()
        assert not isinstance(caught.value, PrinterOffline)
        assert caught.value.__cause__ is not None  # chained from the HTTP error
    finally:
        await drv.close()


async def test_octoprint_stopped_and_started_again(octoprint_factory: OctoPrintFactory) -> None:
    server = octoprint_factory()
    drv = OctoPrintDriver(server.url, server.api_key, timeout=3.0)
    try:
        await drv.connect()
        await drv.start(LONG, "interrupted.gcode")
        await printer_reaches(drv, lambda s: s.state is PrinterState.PRINTING, "printing")
        await asyncio.to_thread(server.stop)
        status = await drv.status()  # never raises
        assert status.state is PrinterState.OFFLINE
        assert status.reason and "unreachable" in status.reason
        with pytest.raises(PrinterOffline) as caught:
            await drv.connect()
        assert isinstance(caught.value.__cause__, requests.ConnectionError)
        await asyncio.to_thread(server.start)
        await drv.connect()  # OctoPrint came back without its printer connection: connect() makes it
        status = await drv.status()
        assert status.state is PrinterState.READY
        assert (status.last_result, status.last_file) == ("failed", "interrupted.gcode")
    finally:
        await drv.close()
        await asyncio.to_thread(server.stop)
