"""The OctoPrint driver's pure core (state mapping, outcome tracking, names) and its timeouts, without OctoPrint.

The driver against a real OctoPrint: tests/unit/test_printer_contract.py and tests/e2e/test_octoprint_driver.py.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from node.worker.printers.base import PrinterState
from node.worker.printers.octoprint import (
    ACTIVE_TEXTS,
    OctoPrintDriver,
    _Tracker,
    _translate,
    interpret,
    remote_name,
)
from shared.errors import PrinterError, PrinterOffline


def job_reply(
    state: str, path: str | None = None, completion: float | None = None, error: str | None = None
) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "job": {"file": {"name": path, "path": path, "display": path, "origin": "local" if path else None}},
        "progress": {"completion": completion, "filepos": None},
        "state": state,
    }
    if error:
        reply["error"] = error
    return reply


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("Operational", PrinterState.READY),
        ("Printing", PrinterState.PRINTING),
        ("Starting", PrinterState.PRINTING),
        ("Pausing", PrinterState.PRINTING),
        ("Paused", PrinterState.PAUSED),
        ("Resuming", PrinterState.PRINTING),
        ("Cancelling", PrinterState.PRINTING),
        ("Finishing", PrinterState.PRINTING),
        ("Printing from SD", PrinterState.PRINTING),
        ("Offline", PrinterState.OFFLINE),
        ("Closed", PrinterState.OFFLINE),
        ("Detecting serial connection", PrinterState.OFFLINE),
        ("Error", PrinterState.ERROR),
        ("Offline after error", PrinterState.ERROR),
        ("Something new", PrinterState.ERROR),
    ],
)
def test_interpret_maps_octoprint_states(text: str, state: PrinterState) -> None:
    obs = interpret(job_reply(text, "a.gcode", 12.5, error="Thermal runaway"))
    assert obs.state is state
    assert obs.active is (text in ACTIVE_TEXTS)
    if state in (PrinterState.OFFLINE, PrinterState.ERROR):
        assert obs.reason
    if text == "Error":
        assert obs.reason and "Thermal runaway" in obs.reason


def test_interpret_reads_progress_file_and_bed() -> None:
    obs = interpret(job_reply("Printing", "a b.gcode", 42.0), {"bed": {"actual": 59.5, "target": 60}})
    assert (obs.path, obs.completion, obs.bed_temp) == ("a b.gcode", 42.0, 59.5)
    tracker = _Tracker()
    status = tracker.status(obs)
    assert status.progress == pytest.approx(0.42)
    assert status.file == "a b.gcode"  # unknown to this driver: OctoPrint's own name


def test_interpret_survives_a_sparse_reply() -> None:
    obs = interpret({})
    assert obs.state is PrinterState.ERROR and obs.path is None and obs.completion is None


def run(tracker: _Tracker, *readings: dict[str, Any]) -> None:
    for reading in readings:
        tracker.observe(interpret(reading))


def test_done_when_printing_turns_operational_at_100_percent() -> None:
    tracker = _Tracker()
    tracker.started("x.gcode", "X")
    run(tracker, job_reply("Printing", "x.gcode", 50), job_reply("Operational", "x.gcode", 100.0))
    assert (tracker.last_result, tracker.last_file, tracker.active_path) == ("done", "X", None)


def test_done_even_when_no_printing_state_was_seen() -> None:
    tracker = _Tracker()
    tracker.started("x.gcode", "X")  # a short print ended before the first poll
    run(tracker, job_reply("Operational", "x.gcode", 100.0))
    assert tracker.last_result == "done"


def test_cancelled_through_the_driver() -> None:
    tracker = _Tracker()
    tracker.started("x.gcode", "X")
    tracker.cancel_requested = True
    run(tracker, job_reply("Operational", "x.gcode", 100.0))
    assert tracker.last_result == "cancelled"


def test_cancelled_when_cancelling_was_seen_or_progress_was_cleared() -> None:
    tracker = _Tracker()
    run(tracker, job_reply("Printing", "x.gcode", 10), job_reply("Cancelling", "x.gcode"))
    run(tracker, job_reply("Operational", "x.gcode", 100.0))
    assert tracker.last_result == "cancelled"
    run(tracker, job_reply("Printing", "y.gcode", 10), job_reply("Operational", "y.gcode", None))
    assert (tracker.last_result, tracker.last_file) == ("cancelled", "y.gcode")


@pytest.mark.parametrize("text", ["Error", "Offline after error", "Offline", "Detecting serial connection"])
def test_failed_when_the_print_is_lost(text: str) -> None:
    tracker = _Tracker()
    run(tracker, job_reply("Paused", "x.gcode", 10), job_reply(text, "x.gcode", 10))
    assert tracker.last_result == "failed"


def test_no_result_without_a_print_or_from_a_stale_selection() -> None:
    tracker = _Tracker()
    run(tracker, job_reply("Operational", "old.gcode", 100.0), job_reply("Offline"), job_reply("Operational"))
    assert tracker.last_result is None


def test_a_new_print_replaces_one_that_ended_unseen() -> None:
    tracker = _Tracker()
    tracker.started("x.gcode", "X")
    tracker.cancel_requested = True
    run(tracker, job_reply("Printing", "y.gcode", 1), job_reply("Operational", "y.gcode", 100.0))
    assert (tracker.last_result, tracker.last_file) == ("done", "y.gcode")


def test_remembered_names_are_bounded() -> None:
    tracker = _Tracker()
    for i in range(100):
        tracker.started(f"{i}.gcode", f"job {i}")
    assert len(tracker.names) == 32 and tracker.name_of("99.gcode") == "job 99"


@pytest.mark.parametrize(
    ("name", "remote"),
    [
        ("part.gcode", "part.gcode"),
        ("Part.GCO", "Part.GCO"),
        ("jobs/abc/set one", "set one.gcode"),
        ("..\\..\\evil.g", "evil.g"),
        ("", "print.gcode"),
    ],
)
def test_remote_name(name: str, remote: str) -> None:
    assert remote_name(name) == remote


def test_translate_keeps_offline_apart_from_refusals() -> None:
    url = "http://127.0.0.1:1"
    assert isinstance(_translate(requests.ConnectionError("refused"), "status", url, None), PrinterOffline)
    assert isinstance(_translate(requests.ReadTimeout("slow"), "status", url, None), PrinterOffline)
    refused = _translate(RuntimeError("Reply was not OK"), "start", url, None)
    assert type(refused) is PrinterError


def test_bad_urls_are_refused() -> None:
    with pytest.raises(PrinterError):
        OctoPrintDriver("ftp://printer", "key")


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_every_call_to_a_hung_octoprint_times_out(silent_server: str) -> None:
    driver = OctoPrintDriver(silent_server, "key", timeout=0.3)
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        status = await driver.status()  # never raises
        assert status.state is PrinterState.OFFLINE
        assert status.reason and "in time" in status.reason
        for call in (driver.connect(), driver.pause(), driver.run_gcode(["G28"])):
            with pytest.raises(PrinterOffline) as caught:
                await call
            assert isinstance(caught.value.__cause__, requests.Timeout)
        assert loop.time() - began < 5
    finally:
        await driver.close()
    with pytest.raises(PrinterError, match="closed"):
        await driver.pause()
    assert (await driver.status()).state is PrinterState.OFFLINE
