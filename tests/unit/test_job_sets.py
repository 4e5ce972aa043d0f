"""Pure parts of issue 4's printer cycle and CLI: print names, material checks, sets from headers and archives."""

from __future__ import annotations

from pathlib import Path

from node.files.job_sets import (
    beds_known,
    file_chunks,
    fill_set,
    job_from_manifest,
    manifest_from_job,
    material_from_key,
    read_meta,
)
from node.worker.worker import missing_materials, parse_print_name, print_name
from shared.gjob import GjobSet, Manifest
from shared.models import Material

DATA = Path(__file__).resolve().parent.parent / "data" / "gcode"
SHA = "ab" * 32


def test_a_print_name_is_read_back_from_what_the_printer_reports() -> None:
    name = print_name("job-1.x", 2, 1, 3, "my part.gcode")
    assert parse_print_name("job-1.x", 2, name) == (1, 3)
    assert parse_print_name("job-1.x", 2, "local/" + name.replace(" ", "_")) == (1, 3)  # sanitised, in a folder
    assert parse_print_name("job-1.x", 1, name) is None  # another copy
    assert parse_print_name("job-1", 2, name) is None  # another job whose id is a prefix
    assert parse_print_name("job-1.x", 2, "benchy.gcode") is None
    assert parse_print_name("job-1.x", 2, None) is None


def test_missing_materials_per_tool() -> None:
    pla_red, petg = Material(type="PLA", color="red"), Material(type="PETG")
    assert missing_materials([], [pla_red]) == []  # the node does not track what is loaded
    assert missing_materials([Material(type="pla", color="Red")], [pla_red]) == []  # case-folded
    assert missing_materials([Material(type="PLA", color="blue")], [Material(type="PLA")]) == []  # any colour
    assert missing_materials([pla_red], [None, petg]) == ["tool 1: PETG (loaded: unknown)"]
    assert missing_materials([petg], [pla_red]) == ["tool 0: PLA red (loaded: PETG)"]


def test_continuous_print_material_keys() -> None:
    assert material_from_key("PLA_red_#ff0000") == {"type": "PLA", "color": "red"}
    assert material_from_key("PETG__#000000") == {"type": "PETG", "color": "#000000"}
    assert material_from_key("ABS") == {"type": "ABS", "color": None}
    assert material_from_key("") is None and material_from_key(None) is None


def test_the_header_fills_only_what_the_user_left_out() -> None:
    meta = read_meta(file_chunks(DATA / "prusaslicer_mk3s.gcode"))
    filled = fill_set({"file": "x", "profiles": ["mine"], "materials": []}, meta)
    assert filled["profiles"] == ["mine"]
    assert filled["materials"] == [{"type": "PLA", "color": None}]
    assert filled["nozzle_mm"] == 0.4 and filled["duration_s"] == 3723.0 and filled["extents_mm"]
    assert "extents_mm" not in fill_set({"file": "x"}, meta, extents=False)


def test_extents_only_when_every_printer_declares_its_bed() -> None:
    bed = {"capabilities": {"bed_mm": [200, 200, 200]}}
    assert beds_known([bed, {"witness": True}])
    assert not beds_known([bed, {"capabilities": {"bed_mm": None}}])
    assert not beds_known([])


def test_an_archive_manifest_becomes_a_job_and_back() -> None:
    manifest = Manifest(name="kit", count=3, sets=(
        GjobSet(path="a.gcode", count=2, materials=("PLA_red_#ff0000", ""), profiles=("MK4",),
                estimated_print_time=90.0),
        GjobSet(path="skip.gcode", count=0),
    ))
    job = job_from_manifest(manifest, {"a.gcode": SHA, "skip.gcode": SHA}, "n1")
    assert job == {"name": "kit", "count": 3, "sets": [{
        "file": "a.gcode", "sha256": SHA, "count": 2, "holders": ["n1"], "profiles": ["MK4"],
        "materials": [{"type": "PLA", "color": "red"}], "duration_s": 90.0}]}
    back, paths = manifest_from_job({"id": "j1", **job})
    assert paths == {"a.gcode": SHA}
    assert back.name == "kit" and back.count == 3
    assert back.sets[0].materials == ("PLA_red",) and back.sets[0].profiles == ("MK4",)


def test_two_files_under_one_name_get_distinct_archive_paths() -> None:
    job = {"id": "j", "count": 1, "sets": [{"file": "p.gcode", "sha256": SHA, "count": 1},
                                           {"file": "p.gcode", "sha256": "cd" * 32, "count": 1},
                                           {"file": "p.gcode", "sha256": SHA, "count": 1}]}
    manifest, paths = manifest_from_job(job)
    assert [s.path for s in manifest.sets] == ["p.gcode", "1-p.gcode", "p.gcode"]
    assert paths == {"p.gcode": SHA, "1-p.gcode": "cd" * 32}
