"""The farm's G-code policy (shared/gcode_policy.py): every rule, the ways a line hides a command, the knobs.

The paths a file takes (upload, job/add, URL, .gjob, netq add, the worker) are in
tests/integration/test_policy_paths.py; this is the pure reading of a file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.gcode_policy import (
    DEFAULT_BLOCKED,
    MAX_LINE,
    PEAKS_KEPT,
    Caps,
    GcodePolicy,
    Heater,
    Scan,
    Violation,
    check_policy,
    normalise_command,
)
from shared.settings import GcodeSettings, Settings

DATA = Path(__file__).resolve().parents[1] / "data" / "gcode"
SLICED = ["prusaslicer_mk3s.gcode", "cura_ender3.gcode", "orcaslicer_two_tools.gcode", "cura_griffin_um3.gcode",
          "no_header.gcode", "prusaslicer_mk4_start.gcode", "orcaslicer_klipper.gcode", "bambustudio_x1.gcode"]

# One hostile line per rule, with the rule and a part of the message it must give. Shared with the path tests.
RULE_CASES: list[tuple[str, str, str]] = [
    ("M997", "firmware", "M997 updates the printer's firmware — blocked by [gcode]"),
    ("M500", "settings", "M500 writes the printer's settings (EEPROM) — blocked by [gcode]"),
    ("M502", "settings", "M502 resets the printer's settings"),
    ("M504", "settings", "M504 works on the printer's stored settings"),
    ("G64", "settings", "G64 writes the printer's settings (EEPROM) on Prusa printers"),
    ("M28 evil.gco", "sd-card", "M28 writes a file to the printer's SD card"),
    ("M29", "sd-card", "M29 ends writing a file"),
    ("M30 cfg.g", "sd-card", "M30 deletes a file from the printer's SD card"),
    ("M32 !/other.gco#", "sd-card", "M32 selects and starts another file"),
    ("M303 E0 S400 C8", "autotune", "M303 runs a PID autotune"),
    ("M42 P13 S255", "pin-write", "M42 sets a pin of the printer's board directly"),
    ("M302 P1", "cold-extrusion", "M302 P1 allows extrusion below 150 °C"),
    ("M302 S0", "cold-extrusion", "M302 S0 allows extrusion below 150 °C"),
    ("M810 G28|M500", "macro", "M810 defines a macro that breaks the policy: M500 writes the printer's settings"),
    ("M811 G28|M104 S400", "temperature", "M104 S400 in an M811 macro sets the hotend to 400 °C, above the 285 °C cap"),
    ("SAVE_CONFIG", "klipper-config", "SAVE_CONFIG writes Klipper's printer.cfg"),
    ("FIRMWARE_RESTART", "klipper-config", "FIRMWARE_RESTART restarts Klipper's firmware"),
    ("SET_PIN PIN=heater VALUE=1", "pin-write", "SET_PIN sets a pin of the printer's board directly (Klipper)"),
    ("M112", "emergency-stop", "M112 stops the printer at once"),
    ("M104 S300", "temperature", "M104 S300 sets the hotend to 300 °C, above the 285 °C cap — refused by [gcode]"),
    ("M109 R350", "temperature", "M109 R350 sets the hotend to 350 °C"),
    ("M140 S130", "temperature", "M140 S130 sets the bed to 130 °C, above the 120 °C cap"),
    ("M190 R125", "temperature", "M190 R125 sets the bed to 125 °C"),
    ("M141 S200", "temperature", "M141 S200 sets the chamber to 200 °C, above the 70 °C cap"),
    ("M191 S90", "temperature", "M191 S90 sets the chamber to 90 °C"),
    ("G10 P0 S400 R150", "temperature", "G10 S400 sets the hotend to 400 °C"),
    ("M568 P0 S210 R400", "temperature", "M568 R400 sets the hotend to 400 °C"),
    ("SET_HEATER_TEMPERATURE HEATER=heater_bed TARGET=150", "temperature",
     "SET_HEATER_TEMPERATURE TARGET=150 sets the bed to 150 °C"),
]


def one(line: str, policy: GcodePolicy | None = None) -> list[Violation]:
    return check_policy(["G28", line, "G1 X1"], policy)


# ---- the default rules ----------------------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize(("line", "rule", "message"), RULE_CASES, ids=[c[0] for c in RULE_CASES])
def test_every_default_rule_refuses_its_line_naming_line_and_rule(line: str, rule: str, message: str) -> None:
    violations = one(line)
    assert violations, f"{line!r} passed"
    v = violations[0]
    assert (v.line, v.rule) == (2, rule)
    assert message in v.reason
    assert v.message.startswith("line 2: ")
    assert v.text == line


def test_the_default_block_list_is_what_the_docs_list() -> None:
    assert {"M997", "M500", "M502", "M504", "G64", "M28", "M29", "M30", "M32", "M303", "M42", "SAVE_CONFIG",
            "FIRMWARE_RESTART", "SET_PIN", "M112"} <= set(DEFAULT_BLOCKED)
    for name in DEFAULT_BLOCKED:
        assert normalise_command(name) == name


@pytest.mark.parametrize("name", SLICED)
def test_sample_slicer_files_pass(name: str) -> None:
    scan = GcodePolicy().scan_chunks(_chunks((DATA / name).read_bytes(), 97))
    assert scan.violations() == []
    assert scan.lines == (DATA / name).read_bytes().count(b"\n") + (0 if (DATA / name).read_bytes().endswith(b"\n")
                                                                     else 1)


@pytest.mark.parametrize("line", [
    "M302", "M302 P0", "M302 S180", "M302 S160",  # reports, re-enables, a minimum (Prusa's start G-code: S160)
    "M810", "M819*12",  # running a macro: its definition was checked where it was made
    "M810 G28|G29|M104 S210",  # a definition of harmless commands
    "G10", "G10 P0", "G10 L2 P1 X0 Y0",  # firmware retraction, workspace offsets
    "M104 S285", "M109 S0", "M140 S120", "M190 S60", "M141 S70", "M104 T1 S250",
    "M1040 S999", "M5000", "M50", "M1120",  # other commands that merely share digits
    "; M500 in a comment", "G1 X10 ; M997", "M117 M500 is only text", "START_PRINT EXTRUDER=240 BED=100",
    "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=240", "SET_PIN_HELPER", "T1", "M106 S255",
])
def test_harmless_lines_pass(line: str) -> None:
    assert one(line) == []


# ---- how a line hides a command ---------------------------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize("line", [
    "m500", "  M500", "\tM500", "M 500", "M0500", "M500.1", "M500 ; note", "M500*93", "N10 M500*93", "n10m500",
    "N10M500", "(comment) M500", "M500 (comment)", "(;) M500", "M(x)500", "\x00M500", "M500\x0c",
    "save_config", "Save_Config ; please", "N3 SAVE_CONFIG*12", "set_pin pin=x value=1", "SET_PIN#x",
])
def test_disguised_commands_are_seen_through(line: str) -> None:
    assert one(line), f"{line!r} passed"


@pytest.mark.security
@pytest.mark.parametrize("line", [
    "M104 S400", "M104S400", "m104 s400", "M104 S 400", "M104.0 S400", "M0104 S400", "M104 T0 S400",
    "N7 M104 S400*21", "M104 S200 (S400)", "M104 S200 S400", "M104 S200 B400", "M109 S200 R400",
    "G10 P0 S200:400", "G10 P0 R150:400", "M568 P1 S200 : 400", "M104 S+400", "M104 S400.5",
])
def test_disguised_temperatures_are_seen_through(line: str) -> None:
    v = one(line)
    assert [x.rule for x in v] == ["temperature"], (line, v)


@pytest.mark.security
@pytest.mark.parametrize("line", [
    "M104 S0x12C", "M104 S3e2", "M140 S1E3", "M104 Sinf", "M109 RNaN", "M104 S0x1.2cp8",
    "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=3e2", "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=3_00",
    "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=inf", "M104 S" + "9" * 400,
    "SET_HEATER_TEMPERATURE HEATER=extruder TARGET=" + "9" * 400,
])
def test_temperatures_that_are_not_plain_numbers_are_refused(line: str) -> None:
    v = one(line)
    assert v and v[0].rule == "temperature" and "not a plain number" in v[0].reason, (line, v)


@pytest.mark.security
def test_a_carriage_return_ends_a_command_as_it_does_for_a_firmware() -> None:
    data = b"G28\r\nM104 S200\rM500\n;" + b"x" * 9000 + b"\rM30 x\nG1 X1\r\n"
    for size in (1, 2, 5, 64, 4096, 1 << 20):
        scan = GcodePolicy().scan_chunks(_chunks(data, size))
        assert [(v.line, v.command) for v in scan.violations()] == [(2, "M500"), (3, "M30")], size
        assert scan.lines == 4


@pytest.mark.security
def test_a_long_command_line_is_refused_and_a_long_comment_is_not() -> None:
    long_code = b"M117 " + b"A" * (2 * MAX_LINE) + b" M500\n"
    long_comment = b"; thumbnail " + b"B" * (3 * MAX_LINE) + b"\n"
    scan = GcodePolicy().scan_chunks(_chunks(long_comment + long_code + b"G28\n", 1000))
    assert [(v.line, v.rule) for v in scan.violations()] == [(2, "line-length")]
    assert check_policy([long_comment.decode()]) == []


@pytest.mark.security
def test_macros_are_checked_part_by_part_and_nested_ones_are_bounded() -> None:
    assert [v.rule for v in one("M810 G28|G29|M997")] == ["macro"]
    assert "M997 updates the printer's firmware" in one("M812 G28 | M997")[0].reason
    assert [v.rule for v in one("M813 M302 P1")] == ["macro"]
    assert [v.rule for v in one("M302 S100")] == ["cold-extrusion"] and one("M302 S")
    nested = "M810 M811 M812 M813 M814 G28"
    assert [v.rule for v in one(nested)] == ["macro"] and "nested deeper" in one(nested)[0].reason
    hot = one("M815 G28|M140 S150|M104 S210")
    assert hot[0].command == "M815" and "M140 S150 in an M815 macro sets the bed to 150 °C" in hot[0].reason


def test_m303_when_allowed_is_capped_by_the_heater_it_tunes() -> None:
    allowed = GcodePolicy(allow={"M303"})
    assert one("M303 E0 S250", allowed) == []
    assert "sets the hotend to 400" in one("M303 E0 S400", allowed)[0].reason
    assert "sets the bed to 130" in one("M303 E-1 S130", allowed)[0].reason
    assert "sets the chamber to 80" in one("M303 E-2 S80", allowed)[0].reason


# ---- the knobs ---------------------------------------------------------------------------------------------


def test_block_adds_commands_and_allow_removes_default_ones() -> None:
    p = GcodePolicy(block={"m851", "G29.1", "bed_mesh_calibrate"}, allow={"M112", "M302"})
    assert [v.rule for v in one("M851 Z-1", p)] == ["block"]
    assert one("M851 Z-1", p)[0].reason == "M851 is blocked by [gcode] block"
    assert one("G29.1", p) and one("G29", p) == []  # a subcode blocks only itself
    assert one("BED_MESH_CALIBRATE", p)
    assert one("M112", p) == [] and one("M302 P1", p) == []
    assert one("M500", p)  # the rest of the defaults stay


def test_allowlist_mode_refuses_everything_else_and_keeps_the_caps() -> None:
    p = GcodePolicy(mode="allowlist", commands={"G1", "G28", "M104", "M109", "M140", "M190", "M810"})
    lines = ["G28", "T1", "G1 X1", "M104 S210", "M106 S255", "M500", "G29.1", "M104 S400", "M810 G28|M106"]
    got = [(v.line, v.rule) for v in check_policy(lines, p)]
    assert got == [(5, "allowlist"), (6, "allowlist"), (7, "allowlist"), (8, "temperature"), (9, "macro")]
    assert check_policy(["M106 S255"], p)[0].reason == "M106 is not in [gcode] commands (allow-list mode)"
    assert check_policy(["G29.1"], p.model_copy(update={"commands": frozenset({"G29"})})) == []


def test_caps_are_applied_to_a_scan_afterwards() -> None:
    scan = GcodePolicy().scan_lines(["M104 S260", "M104 S290", "M140 S100", "M141 S50", "M104 S240"])
    assert [v.line for v in scan.violations()] == [2]  # 290 > 285
    assert [v.line for v in scan.violations(Caps(hotend_c=250, bed_c=90, chamber_c=40))] == [1, 2, 3, 4]
    assert scan.violations(Caps(hotend_c=300)) == []
    hot = GcodePolicy().scan_lines([f"M104 S{300 + i}" for i in range(20)])
    assert len([p for p in hot.peaks if p.heater is Heater.HOTEND]) == PEAKS_KEPT
    assert hot.violations()[-1].reason.startswith("M104 S319")


def test_a_scan_travels_as_json_and_names_its_rules() -> None:
    p = GcodePolicy(block={"M851"})
    scan = p.scan_lines(["M500", "M104 S400"])
    again = Scan.model_validate_json(scan.model_dump_json())
    assert again == scan and again.violations() == scan.violations()
    assert scan.rules == p.fingerprint() != GcodePolicy().fingerprint()
    assert p.with_caps(Caps(hotend_c=500)).fingerprint() == p.fingerprint()  # caps are not rules


def test_a_scan_keeps_a_bounded_number_of_violations() -> None:
    scan = GcodePolicy(max_violations=5).scan_lines(["M500"] * 10_000)
    assert len(scan.violations()) == 5 and scan.lines == 10_000


@pytest.mark.parametrize("bad", ["", "M", "12", "M5x", "G1_FOO", "M-5", "x"])
def test_command_names_in_the_config_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="not a G-code command"):
        normalise_command(bad)


def test_gcode_settings() -> None:
    g = GcodeSettings(block=["m0851"], allow=["M112"], max_hotend_c=260,
                      profiles={"Prusa i3 MK3S+": {"max_hotend_c": 300}, "Voron": {"max_chamber_c": 65}})
    assert g.block == ["M851"]
    assert g.caps() == Caps(hotend_c=260, bed_c=120, chamber_c=70)
    assert g.caps("prusa i3 mk3s+") == Caps(hotend_c=300, bed_c=120, chamber_c=70)  # names ignore case
    assert g.caps("unknown") == g.caps()
    assert g.set_caps([]) == g.caps() and g.set_caps(["Voron", "Prusa i3 MK3S+"]).hotend_c == 300
    assert g.farm_caps() == Caps(hotend_c=300, bed_c=120, chamber_c=70)
    assert g.policy().block == frozenset({"M851"}) and g.policy().caps == g.farm_caps()
    s = Settings(node_id="n1", data_dir=Path("/tmp/x"), gcode={"mode": "allowlist", "commands": ["G1"]})
    assert s.gcode.policy().mode == "allowlist"


@pytest.mark.parametrize(("given", "error"), [
    ({"block": ["M5x"]}, "not a G-code command"),
    ({"block": ["M112"], "allow": ["M112"]}, "both in block and in allow"),
    ({"mode": "allowlist"}, "needs gcode.commands"),
    ({"max_hotend_c": 0}, "greater than 0"),
    ({"max_bed_c": 5000}, "less than or equal to 1000"),
    ({"profiles": {"a": {"max_bed_c": -1}}}, "greater than 0"),
    ({"profiles": {"A": {}, "a": {}}}, "given twice"),
    ({"mode": "strict"}, "blocklist"),
    ({"blok": ["M500"]}, "Extra inputs"),
])
def test_bad_gcode_settings_are_refused_with_a_reason(given: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        GcodeSettings.model_validate(given)


# ---- hostile input ----------------------------------------------------------------------------------------


@pytest.mark.security
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 500))
def test_any_bytes_scan_the_same_in_any_chunking_and_never_crash(blob: bytes, size: int) -> None:
    whole = GcodePolicy().scan_chunks([blob])
    assert GcodePolicy().scan_chunks(_chunks(blob, size)) == whole
    assert whole.lines == blob.count(b"\n") + (0 if blob.endswith(b"\n") or not blob else 1)


@pytest.mark.security
@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="MGSRTBNPEH0123456789.:;()*|= \t-+exXinf_", max_size=400), max_size=8))
def test_gcode_shaped_garbage_never_crashes_and_its_scan_travels(lines: list[str]) -> None:
    scan = GcodePolicy().scan_lines(lines)
    assert Scan.model_validate_json(scan.model_dump_json()) == scan
    for v in scan.violations(Caps(hotend_c=1, bed_c=1, chamber_c=1)):
        assert 1 <= v.line <= max(1, len(lines))


@pytest.mark.security
@settings(max_examples=200, deadline=None)
@given(st.sampled_from([c[0] for c in RULE_CASES]), st.sampled_from(["", " ", "N5 ", "(c)", "  n12 (x) "]),
       st.sampled_from(["", " ;c", "*77", " (c)", "\r"]), st.booleans())
def test_a_rule_holds_whatever_surrounds_its_line(line: str, before: str, after: str, lower: bool) -> None:
    text = before + (line.lower() if lower else line) + after
    assert one(text), repr(text)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]
