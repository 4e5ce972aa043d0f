"""Slicer headers, move extents and the G-code policy, on sample files shaped like real slicer output."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.gcode_meta import (
    GcodeMeta,
    ToolMaterial,
    check_policy,
    iter_lines,
    parse_duration,
    parse_gcode_meta,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "gcode"


def chunks(path: Path, size: int = 97) -> Iterator[bytes]:
    """Odd-sized chunks, so lines straddle chunk boundaries as they do when streaming from a store."""
    with open(path, "rb") as f:
        while chunk := f.read(size):
            yield chunk


def meta(name: str) -> GcodeMeta:
    return parse_gcode_meta(iter_lines(chunks(DATA / name)))


def test_prusaslicer_header_and_config_footer() -> None:
    m = meta("prusaslicer_mk3s.gcode")
    assert m.slicer == "PrusaSlicer 2.6.1+linux-x64-GTK3"
    assert m.printer_model == "MK3S"
    assert m.nozzle_mm == 0.4
    assert m.materials == (ToolMaterial(tool=0, type="PLA", colour="#FF8000"),)
    assert m.estimated_s == 1 * 3600 + 2 * 60 + 3  # normal mode, not silent mode
    assert m.filament_used_mm == (1234.56,)
    assert m.extents is not None
    # max_layer_z from the footer; X/Y from the moves, including the purge line at Y-3 and the park move.
    assert m.extents.z_max == 10.2
    assert (m.extents.x_min, m.extents.x_max, m.extents.y_min, m.extents.y_max) == (0.0, 135.0, -3.0, 200.0)
    assert m.extents.source == "mixed"
    assert m.extents.max_xyz == (135.0, 200.0, 10.2)


def test_cura_marlin_header() -> None:
    m = meta("cura_ender3.gcode")
    assert m.slicer == "Cura_SteamEngine 5.2.1"
    assert m.flavor == "Marlin"
    assert m.printer_model == "Creality Ender-3"
    assert m.estimated_s == 5012  # ;TIME:, not the per-layer ;TIME_ELAPSED:
    assert m.filament_used_mm == pytest.approx((2358.53,))
    assert m.extents is not None
    assert m.extents.source == "header"
    assert (m.extents.x_min, m.extents.x_max, m.extents.y_max, m.extents.z_max) == (
        86.795,
        148.205,
        148.205,
        20.0,
    )
    assert m.extents.x == pytest.approx(148.205 - 86.795)
    assert m.nozzle_mm is None
    assert m.materials == ()


def test_cura_griffin_header_with_two_extruders() -> None:
    m = meta("cura_griffin_um3.gcode")
    assert m.flavor == "Griffin"
    assert m.printer_model == "Ultimaker 3"
    assert m.nozzles_mm == (0.4, 0.4)
    assert m.estimated_s == 480
    assert m.extents is not None
    assert (m.extents.x_min, m.extents.y_min, m.extents.z_min) == (9.0, 6.0, 0.27)
    assert (m.extents.x_max, m.extents.y_max, m.extents.z_max) == (138.45, 129.45, 2.8)


def test_orcaslicer_two_tools() -> None:
    m = meta("orcaslicer_two_tools.gcode")
    assert m.slicer == "OrcaSlicer 2.1.1"
    assert m.printer_model == "Bambu Lab X1 Carbon"
    assert m.nozzles_mm == (0.4, 0.4)
    assert m.materials == (
        ToolMaterial(tool=0, type="PLA", colour="#FFFFFF"),
        ToolMaterial(tool=1, type="PETG", colour="#1A1A1A"),
    )
    assert m.estimated_s == 1 * 3600 + 10 * 60 + 5  # total, including prepare time
    assert m.filament_used_mm == (2345.67, 1234.56)
    assert m.extents is not None
    assert m.extents.z_max == 10.0  # ; max_z_height:
    assert (m.extents.x_max, m.extents.y_max) == (240.0, 138.0)


def test_extents_from_moves_only_with_relative_moves() -> None:
    m = meta("no_header.gcode")
    assert m.slicer is None and m.printer_model is None and m.estimated_s is None
    assert m.extents is not None
    assert m.extents.source == "moves"
    # G28 then G1 X10 Y10 ... G91 G1 Z10 from Z0.3 ... G90 G1 X0 Y180; homing itself is not counted.
    assert (m.extents.x_min, m.extents.x_max) == (0.0, 50.0)
    assert (m.extents.y_min, m.extents.y_max) == (10.0, 180.0)
    assert (m.extents.z_min, m.extents.z_max) == (0.3, 10.3)


def test_moves_g92_line_numbers_arcs_and_comments() -> None:
    lines = [
        "G90",
        "G1 X5 Y5 Z0.2 ; G1 X999 in a comment is not a move",
        "N12 G1 X20 Y7*57",
        "G2 X30 Y10 I5 J0",
        "G1X-2Y3",  # no spaces
        "G91",
        "G1 X1",  # relative
        "G92 X100",  # logical position set: the next relative move starts from 100
        "G1 X5",
    ]
    m = parse_gcode_meta(lines)
    assert m.extents is not None
    assert (m.extents.x_min, m.extents.x_max) == (-2.0, 105.0)
    assert (m.extents.y_min, m.extents.y_max) == (3.0, 10.0)


def test_overflowing_coordinates_are_ignored() -> None:
    m = parse_gcode_meta(["G1 X1 Y1 Z1", "G1 X" + "9" * 400, "G92 Y" + "9" * 400, "G1 Y2"])
    assert m.extents is not None
    assert m.extents.max_xyz == (1.0, 2.0, 1.0)


def test_relative_move_from_unknown_position_is_not_guessed() -> None:
    m = parse_gcode_meta(["G91", "G1 X10 Y10 Z10", "G90", "G1 X1 Y2 Z3"])
    assert m.extents is not None
    assert m.extents.max_xyz == (1.0, 2.0, 3.0)


def test_no_moves_and_no_header_means_no_extents() -> None:
    assert parse_gcode_meta(["; nothing here", "M117 hello"]).extents is None
    assert parse_gcode_meta([]) == GcodeMeta()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1h 2m 3s", 3723), ("1d 0h 1m 0s", 86460), ("45s", 45), ("2h", 7200), ("n/a", None)],
)
def test_durations(text: str, seconds: int | None) -> None:
    assert parse_duration(text) == seconds


def test_policy_default_blocks_and_temperature_caps() -> None:
    # The policy's own tests are in test_gcode_policy.py; this one keeps the names gcode_meta re-exports.
    with open(DATA / "policy_violations.gcode") as f:
        violations = check_policy(f)
    assert [(v.line, v.command) for v in violations] == [
        (4, "M500"),
        (5, "M502"),  # line number and checksum around it
        (6, "M997"),  # lower case
        (7, "M109"),  # R350 > 285
        (8, "M190"),  # S130 > 120
    ]
    assert violations[3].reason == "M109 R350 sets the hotend to 350 °C, above the 285 °C cap — refused by [gcode]"
    assert violations[0].text == "M500 ; save settings: blocked"


@pytest.mark.parametrize(
    "name", ["prusaslicer_mk3s.gcode", "cura_ender3.gcode", "orcaslicer_two_tools.gcode", "cura_griffin_um3.gcode",
             "no_header.gcode"]
)
def test_real_slicer_output_passes_the_default_policy(name: str) -> None:
    assert check_policy(iter_lines(chunks(DATA / name))) == []


def test_iter_lines_cuts_overlong_lines() -> None:
    blob = [b"G1 X1\n", b"; " + b"A" * 10_000, b"B" * 10_000 + b"\nG1 X2\r\n", b"G1 X3"]
    lines = list(iter_lines(blob, max_line=100))
    assert lines[0] == "G1 X1"
    assert lines[1] == "; " + "A" * 98
    assert lines[2:] == ["G1 X2\r", "G1 X3"]


@given(
    st.lists(
        st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\n\r"), max_size=30),
        max_size=30,
    ),
    st.data(),
)
def test_iter_lines_reassembles_any_chunking(lines: list[str], data: st.DataObject) -> None:
    blob = "\n".join(lines).encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=10)))
    pieces = [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)], strict=True)]
    expected = list(lines) if blob else []
    if lines and lines[-1] == "" and blob:
        expected = lines[:-1]  # a trailing newline does not start another line
    assert list(iter_lines(pieces, max_line=10_000)) == expected


def test_hostile_comment_lines_parse_in_linear_time() -> None:
    # Each line once took ~60 ms with a backtracking key regex; 500 of them must not take minutes.
    lines = ["; a" + " " * 4090 + "x", ";a" + "a " * 2040 + ":", "; total estimated time:" + " " * 4000 + "x"]
    start = time.perf_counter()
    parse_gcode_meta(lines * 200)
    assert time.perf_counter() - start < 5.0


@given(st.binary(max_size=2000))
def test_garbage_never_crashes(blob: bytes) -> None:
    lines = list(iter_lines([blob]))
    parse_gcode_meta(lines)
    check_policy(lines)
