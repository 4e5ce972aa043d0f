"""The ``netq`` command line against a farm of real node processes (simulated printers): ``netq add`` of a
``.gjob`` archive and of a sliced G-code file (what it needs read from its header), ``netq export``, and
``netq bed-cleared``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from node.demo.farm import NodeProc, ProcessFarm, gcode_for
from node.demo.run import DEMO_TIMING
from shared.errors import NetqError
from shared.gjob import GjobSet, Manifest, read_gjob, write_gjob
from tests.waiting import until as _until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DATA = Path(__file__).resolve().parent.parent / "data" / "gcode"


@pytest.fixture
async def farm() -> AsyncIterator[ProcessFarm]:
    """n1: an MK3S that takes no jobs (so what is queued for it stays queued); n2: any profile, cleared by hand."""
    farm = ProcessFarm(2, time_scale=100, timing=DEMO_TIMING)
    farm.nodes[0].extra = {"printer": {"profile": "MK3S", "bed_mm": [250.0, 210.0, 210.0]},
                           "worker": {"accept_jobs": False}}
    farm.nodes[1].extra = {"printer": {"profile": "other", "bed_mm": [200.0, 200.0, 200.0],
                                       "self_clearing": False}}
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


def netq(node: NodeProc, *args: str) -> str:
    """Run the CLI as a user on ``node``'s host would (its config names the local node)."""
    proc = subprocess.run([sys.executable, "-m", "node.app.cli", *args, "--config", str(node.config_path)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"netq {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


async def until(cond: Callable[[], Awaitable[Any]], timeout: float, what: str, farm: ProcessFarm) -> Any:
    return await _until(cond, what, timeout, interval=0.1, retry_on=(NetqError,), context=farm.logs)


async def test_netq_add_gjob_queues_its_sets_counts_materials_and_profiles_and_export_gives_it_back(
        farm: ProcessFarm, tmp_path: Path) -> None:
    client = await farm.client(timeout=60)
    try:
        await farm.wait_ready(client, 2)
        part_a, part_b = gcode_for(600, "a"), gcode_for(300, "b")
        manifest = Manifest(name="bracket kit", count=2, sets=(
            GjobSet(path="bracket.gcode", count=3, materials=("PLA_red_#ff0000",), profiles=("MK3S",),
                    estimated_print_time=600.0),
            GjobSet(path="clip.gcode", count=1, materials=("PETG_black_#000000",), profiles=("MK3S",)),
        ))
        archive = tmp_path / "kit.gjob"
        archive.write_bytes(write_gjob(manifest, {"bracket.gcode": part_a, "clip.gcode": part_b}))

        added = json.loads(netq(farm.nodes[0], "add", str(archive), "--json"))
        job = next(j for j in await farm.queue(client) if j["id"] == added["id"])
        assert job["name"] == "bracket kit" and job["count"] == 2 and len(job["copies"]) == 2
        a, b = job["sets"]
        assert (a["file"], a["count"], b["file"], b["count"]) == ("bracket.gcode", 3, "clip.gcode", 1)
        assert a["materials"] == [{"type": "PLA", "color": "red"}]
        assert b["materials"] == [{"type": "PETG", "color": "black"}]
        assert a["profiles"] == b["profiles"] == ["MK3S"]
        assert a["duration_s"] == 600.0  # the manifest's estimate wins over the header's ;TIME:
        assert b["duration_s"] == 300.0  # the header tells where the manifest does not
        assert farm.nodes[0].node_id in a["holders"]

        out = tmp_path / "again.gjob"
        netq(farm.nodes[1], "export", added["id"], "-o", str(out))
        back, files = read_gjob(out)
        assert back.name == "bracket kit" and back.count == 2
        assert [(s.path, s.count, s.materials, s.profiles) for s in back.sets] == [
            ("bracket.gcode", 3, ("PLA_red",), ("MK3S",)), ("clip.gcode", 1, ("PETG_black",), ("MK3S",))]
        assert files["bracket.gcode"].read() == part_a and files["clip.gcode"].read() == part_b
    finally:
        await client.close()


async def test_netq_add_reads_what_a_file_needs_from_its_slicer_header(farm: ProcessFarm) -> None:
    client = await farm.client(timeout=60)
    try:
        await farm.wait_ready(client, 2)
        added = json.loads(netq(farm.nodes[0], "add", str(DATA / "prusaslicer_mk3s.gcode"), "--json"))
        job = next(j for j in await farm.queue(client) if j["id"] == added["id"])
        s = job["sets"][0]
        assert s["profiles"] == ["MK3S"]  # so only n1 (an MK3S) may print it
        assert s["nozzle_mm"] == 0.4 and s["materials"] == [{"type": "PLA", "color": None}]
        assert s["duration_s"] == 3723.0
        assert s["extents_mm"] == [135.0, 200.0, 10.2]  # every printer here declares its bed size
        # What the user says wins over the header.
        added = json.loads(netq(farm.nodes[0], "add", str(DATA / "prusaslicer_mk3s.gcode"), "--json",
                                "--material", "PETG:blue"))
        job = next(j for j in await farm.queue(client) if j["id"] == added["id"])
        assert job["sets"][0]["materials"] == [{"type": "PETG", "color": "blue"}]
    finally:
        await client.close()


async def test_netq_bed_cleared_lets_a_node_cleared_by_hand_go_on(farm: ProcessFarm, tmp_path: Path) -> None:
    client = await farm.client(timeout=60)
    try:
        await farm.wait_ready(client, 2)
        part = tmp_path / "quick.gcode"
        part.write_bytes(gcode_for(30, "quick"))
        added = json.loads(netq(farm.nodes[1], "add", str(part), "--json"))

        n2 = farm.nodes[1].node_id

        async def n2_clearing() -> bool:
            states = {n["node_id"]: n for n in (await client.request("node/list", timeout=3))["nodes"]}
            job = next(j for j in await farm.queue(client) if j["id"] == added["id"])
            return states[n2].get("worker") == "clearing" and job["copies"][0]["state"] == "done"

        await until(n2_clearing, 30, "n2 to print and wait for its bed to be cleared", farm)
        out = netq(farm.nodes[0], "bed-cleared", n2)
        assert n2 in out

        async def n2_idle() -> bool:
            states = {n["node_id"]: n for n in (await client.request("node/list", timeout=3))["nodes"]}
            return states[n2].get("worker") in ("idle", "requesting")

        await until(n2_idle, 15, "n2 to go back to work", farm)
    finally:
        await client.close()
