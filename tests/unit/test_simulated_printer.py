"""What the simulated printer adds to the driver contract: durations from slicer comments, the start journal,
time scaling and injected faults. (The contract itself: tests/unit/test_printer_contract.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from node.worker.printers.base import PrinterState, PrinterStatus
from node.worker.printers.simulated import (
    SimulatedPrinter,
    StartRecord,
    estimated_duration,
    parse_duration,
    read_journal,
)
from shared.errors import PrinterError, PrinterOffline


@pytest.mark.parametrize(
    ("gcode", "seconds"),
    [
        (b"; estimated printing time (normal mode) = 1h 2m 3s\n", 3723.0),
        (b"G1 X1\n; estimated printing time (normal mode) = 1d 0h 0m 5s\r\n", 86405.0),
        (b"; estimated printing time (normal mode) = 45s\n", 45.0),
        (b"; estimated printing time = 2m 0s\n", 120.0),
        (b";FLAVOR:Marlin\n;TIME:6123\n;Filament used: 1m\n", 6123.0),
        (b";TIME:12.5\n", 12.5),
        (b"G28\nG1 X10\n", None),
        (b";TIME_ELAPSED:30\n", None),
    ],
)
def test_parse_duration(gcode: bytes, seconds: float | None) -> None:
    assert parse_duration(gcode) == seconds


def test_estimate_at_the_end_of_a_large_file(tmp_path: Path) -> None:
    path = tmp_path / "big.gcode"
    body = b"G1 X1 Y1 E0.1\n" * 20_000  # ~280 kB, more than the scanned head and tail
    path.write_bytes(body + b"; estimated printing time (normal mode) = 3m 20s\n")
    assert estimated_duration(path) == 200.0
    path.write_bytes(b";TIME:99\n" + body)
    assert estimated_duration(path) == 99.0
    path.write_bytes(body)
    assert estimated_duration(path, default=7.0) == 7.0


async def wait_for(
    printer: SimulatedPrinter, check: Callable[[PrinterStatus], bool], timeout: float = 10
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check(await printer.status()):
        assert loop.time() < deadline, await printer.status()
        await asyncio.sleep(0.01)


def gcode_file(tmp_path: Path, seconds: float, name: str = "p.gcode") -> Path:
    path = tmp_path / name
    path.write_text(f";TIME:{seconds}\nG28\n")
    return path


async def test_time_scale_divides_the_duration(tmp_path: Path) -> None:
    printer = SimulatedPrinter("p1", time_scale=100.0)
    await printer.connect()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await printer.start(gcode_file(tmp_path, 30), "thirty")  # 0.3 s of loop time
    await wait_for(printer, lambda s: s.last_result == "done")
    elapsed = loop.time() - began
    assert 0.29 <= elapsed < 2.0
    status = await printer.status()
    assert (status.state, status.last_file, status.file, status.progress) == (
        PrinterState.READY,
        "thirty",
        None,
        None,
    )
    await printer.close()


async def test_progress_stops_while_paused(tmp_path: Path) -> None:
    printer = SimulatedPrinter("p1", time_scale=1.0)
    await printer.connect()
    await printer.start(gcode_file(tmp_path, 100), "slow")
    await wait_for(printer, lambda s: (s.progress or 0) > 0.001)
    await printer.pause()
    paused = await printer.status()
    await asyncio.sleep(0.05)  # time passes: a paused print must not progress
    assert (await printer.status()).progress == paused.progress
    await printer.pause()  # pausing a paused print changes nothing, like OctoPrint
    await printer.resume()
    await printer.resume()
    await wait_for(printer, lambda s: (s.progress or 0) > (paused.progress or 0))
    await printer.close()
    assert (await printer.status()).state is PrinterState.OFFLINE


async def test_every_start_call_is_journaled_and_fsynced(tmp_path: Path) -> None:
    journal = tmp_path / "journal" / "starts.jsonl"
    printer = SimulatedPrinter("p1", time_scale=10_000.0, journal=journal)
    path = gcode_file(tmp_path, 1000)
    with pytest.raises(PrinterOffline):
        await printer.start(path, "before connect")
    await printer.connect()
    await printer.start(path, "first")
    with pytest.raises(PrinterError):
        await printer.start(path, "second")
    await wait_for(printer, lambda s: s.last_result == "done")
    records = read_journal(journal)
    assert records == printer.starts
    assert [(r.printer, r.name, r.file, r.accepted) for r in records] == [
        ("p1", "before connect", str(path), False),
        ("p1", "first", str(path), True),
        ("p1", "second", str(path), False),
    ]
    assert records[0].ts <= records[1].ts <= records[2].ts
    # Another printer (another process, after a crash) appends to the same journal.
    other = SimulatedPrinter("p2", journal=journal)
    await other.connect()
    await other.start(path, "elsewhere")
    assert [r.name for r in read_journal(journal)] == ["before connect", "first", "second", "elsewhere"]
    await other.close()
    assert StartRecord(1.0, "p", "n", "f").to_json() == (
        '{"ts":1.0,"printer":"p","name":"n","file":"f","accepted":true}'
    )


async def test_fail_rate_fails_prints_part_way(tmp_path: Path) -> None:
    printer = SimulatedPrinter("p1", time_scale=1000.0, fail_rate=1.0, seed=7)
    await printer.connect()
    await printer.start(gcode_file(tmp_path, 100), "doomed")
    await wait_for(printer, lambda s: s.last_result is not None)
    status = await printer.status()
    assert (status.state, status.last_result, status.last_file) == (PrinterState.ERROR, "failed", "doomed")
    assert status.reason and "simulated failure" in status.reason
    await printer.connect()
    assert (await printer.status()).state is PrinterState.READY


def ended(name: str) -> Callable[[PrinterStatus], bool]:
    return lambda status: status.last_file == name


async def test_seeded_failures_repeat(tmp_path: Path) -> None:
    async def outcomes(seed: int) -> list[str | None]:
        printer = SimulatedPrinter("p", time_scale=10_000.0, fail_rate=0.5, seed=seed)
        results = []
        for i in range(12):
            await printer.connect()
            name = f"job {i}"
            await printer.start(gcode_file(tmp_path, 10), name)
            await wait_for(printer, ended(name))
            results.append((await printer.status()).last_result)
        await printer.close()
        return results

    first = await outcomes(3)
    assert first == await outcomes(3)
    assert set(first) == {"done", "failed"}


async def test_unplug_and_plug_in(tmp_path: Path) -> None:
    printer = SimulatedPrinter("p1", time_scale=1.0)
    await printer.connect()
    await printer.start(gcode_file(tmp_path, 100), "lost")
    printer.unplug("cable pulled")
    status = await printer.status()
    assert (status.state, status.reason, status.last_result) == (
        PrinterState.OFFLINE,
        "cable pulled",
        "failed",
    )
    with pytest.raises(PrinterOffline):
        await printer.connect()
    with pytest.raises(PrinterOffline):
        await printer.run_gcode(["G28"])
    printer.plug_in()
    await printer.connect()
    assert (await printer.status()).state is PrinterState.READY


async def test_run_gcode_records_lines_and_bed_temperature() -> None:
    printer = SimulatedPrinter("p1")
    await printer.connect()
    await printer.run_gcode(["M190 S60", " ", "G28 ; home"])
    assert printer.gcode == ["M190 S60", "G28 ; home"]
    assert (await printer.status()).bed_temp == 60.0
    await printer.run_gcode(["M140 S0"])
    assert (await printer.status()).bed_temp == pytest.approx(21.3)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SimulatedPrinter("p", time_scale=0)
    with pytest.raises(ValueError):
        SimulatedPrinter("p", fail_rate=1.5)
