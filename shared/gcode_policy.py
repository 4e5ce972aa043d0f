"""The farm's G-code policy: what a print file may not make a printer do, one rule set for every path.

A file is read the way a firmware would read it, and where firmwares differ, every reading is checked:

* a line ends at ``\\n`` **or** ``\\r`` (Marlin, RepRapFirmware and Klipper all end a command at either);
* a ``;`` starts a comment; ``( … )`` is a comment too (Marlin's ``PAREN_COMMENTS``, RS274), but not for
  Klipper: the command word is looked for with and without paren comments, and with a ``;`` inside a paren
  comment read both ways;
* ``N<n>`` line numbers and ``*<n>`` checksums, leading spaces, lower case, a space between the letter and the
  number (``M 500``), leading zeros (``M0500``) and subcodes (``M500.1`` is M500 to a rule about M500) are seen
  through; Klipper's extended commands (``SET_PIN PIN=x VALUE=1``) are matched by name, in any case;
* a temperature parameter whose value is not a plain decimal number (``S0x12C`` is 300 to a C ``strtof``,
  ``TARGET=3e2`` to Klipper's ``float``) is refused rather than guessed at; every occurrence of a parameter
  counts (``M104 S200 (S400)``), and RepRapFirmware's ``S200:400`` lists count in full;
* a line longer than :data:`MAX_LINE` bytes that is not a comment is refused (the rest would go unread).

Rules (``docs/security.md`` has the table and the reasons): the commands of :data:`DEFAULT_BLOCKED`; cold
extrusion (``M302 P1``, ``M302 S0``: any ``P`` but ``P0``, any ``S`` below :data:`MIN_EXTRUDE_C`); a macro
definition ``M810``–``M819`` whose ``|``-separated commands break a rule (each is checked as a line of its own,
temperatures included); temperature caps for the hotend, bed and chamber on every command that sets one.
:class:`GcodePolicy` adds commands to block, removes some from the defaults, or switches to an allow-list.

A :class:`Scan` of a file keeps the rule findings and the hottest setting per heater, so the caps of any printer
profile can be applied to it later without reading the file again (the arbiter applies a set's caps to the scan
a holder made). Pure: no I/O; a file of any size streams through in bounded memory.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import NetqError

MAX_LINE: Final = 4096  # bytes of one line that are read; a longer command line is refused
MAX_TEXT: Final = 200  # characters of a line quoted in a violation
PEAKS_KEPT: Final = 5  # hottest settings kept per heater: what any cap applied later can report
# M302 S below this allows (nearly) cold extrusion. Marlin's EXTRUDE_MINTEMP is 170; Prusa's start G-code lowers
# the limit to 160 for its purge (M302 S160), which must pass; below 150 no common filament flows.
MIN_EXTRUDE_C: Final = 150.0
_MACRO_DEPTH: Final = 3
_RULES_VERSION: Final = "gcode-policy-1"  # part of the fingerprint: bump when the reading of a file changes


class PolicyError(NetqError):
    """A G-code file breaks the farm's G-code policy; ``violations`` says where and why."""

    def __init__(self, message: str, violations: list[Violation]) -> None:
        super().__init__(message)
        self.violations = violations


class Heater(enum.StrEnum):
    HOTEND = "hotend"
    BED = "bed"
    CHAMBER = "chamber"


Celsius = Annotated[float, Field(gt=0, le=1000)]


class Caps(BaseModel):
    """The highest temperature a file may set, per heater (°C)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    hotend_c: Celsius = 285.0
    bed_c: Celsius = 120.0
    chamber_c: Celsius = 70.0

    def of(self, heater: Heater) -> float:
        value: float = getattr(self, f"{heater.value}_c")
        return value

    def highest(self, *others: Caps) -> Caps:
        """Each cap the highest of ``self`` and ``others``."""
        every = (self, *others)
        return Caps(**{f"{h.value}_c": max(c.of(h) for c in every) for h in Heater})


@dataclass(frozen=True, slots=True)
class BlockRule:
    rule: str  # the rule's id (docs/security.md)
    does: str  # what the command does, completing "M500 …"


# The commands no print file needs, and what each does (sources: FIELD.md "Dangerous G-code", the firmwares' docs).
DEFAULT_BLOCKED: Final[dict[str, BlockRule]] = {
    "M997": BlockRule("firmware", "updates the printer's firmware"),
    "M500": BlockRule("settings", "writes the printer's settings (EEPROM)"),
    "M502": BlockRule("settings", "resets the printer's settings to the firmware's defaults"),
    "M504": BlockRule("settings", "works on the printer's stored settings (EEPROM)"),
    "G64": BlockRule("settings", "writes the printer's settings (EEPROM) on Prusa printers"),
    "M28": BlockRule("sd-card", "writes a file to the printer's SD card"),
    "M29": BlockRule("sd-card", "ends writing a file to the printer's SD card"),
    "M30": BlockRule("sd-card", "deletes a file from the printer's SD card"),
    "M928": BlockRule("sd-card", "writes a log file to the printer's SD card"),
    "M23": BlockRule("sd-card", "selects another file on the printer's SD card to print"),
    "M24": BlockRule("sd-card", "starts a print from the printer's SD card"),
    "M32": BlockRule("sd-card", "selects and starts another file from the printer's SD card"),
    "M303": BlockRule("autotune", "runs a PID autotune (heating unattended; with U1 it changes the settings)"),
    "M42": BlockRule("pin-write", "sets a pin of the printer's board directly"),
    "SET_PIN": BlockRule("pin-write", "sets a pin of the printer's board directly (Klipper)"),
    "SAVE_CONFIG": BlockRule("klipper-config", "writes Klipper's printer.cfg and restarts the printer"),
    "FIRMWARE_RESTART": BlockRule("klipper-config", "restarts Klipper's firmware"),
    "M112": BlockRule("emergency-stop", "stops the printer at once; it then needs a person to reset it"),
}
COLD_EXTRUSION: Final = "M302"
MACROS: Final = frozenset(f"M{n}" for n in range(810, 820))

# Command → (heater, the parameters that set a temperature). RepRapFirmware: G10 P<tool> S<active> R<standby>
# and M568 set tool temperatures (G10 without S or R is a firmware retraction: nothing to check); Marlin's
# M104/M109 B is the AUTOTEMP maximum. M303 (blocked by default) is checked when allowed: E-1 is the bed,
# E-2 the chamber.
_TEMPERATURE: Final[dict[str, tuple[Heater, str]]] = {
    "M104": (Heater.HOTEND, "SRB"), "M109": (Heater.HOTEND, "SRB"),
    "G10": (Heater.HOTEND, "SR"), "M568": (Heater.HOTEND, "SR"),
    "M140": (Heater.BED, "SR"), "M190": (Heater.BED, "SR"),
    "M141": (Heater.CHAMBER, "SR"), "M191": (Heater.CHAMBER, "SR"),
    "M303": (Heater.HOTEND, "S"),
}  # fmt: skip
_KLIPPER_HEATER: Final = "SET_HEATER_TEMPERATURE"

# ---- reading a line ----------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_PARENS = re.compile(r"\([^)]*\)|\(.*$")
_LINE_NUMBER = re.compile(r"^\s*[Nn]\s*[0-9]+")
_TRADITIONAL = re.compile(r"^\s*([A-Za-z])\s*([0-9]+)(?:\.([0-9]*))?")
_EXTENDED = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)")
_COMMAND_LETTERS = frozenset("GMTD")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
# What C's strtod would read (hex floats, exponents, inf, nan): when it reads more than _DECIMAL, refuse.
_C_NUMBER = re.compile(
    r"[+-]?(?:0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)(?:[pP][+-]?[0-9]+)?"
    r"|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[iI][nN][fF]|[nN][aA][nN])"
)
_PARAM = re.compile(r"([A-Za-z])[ \t]*")
_COLON = re.compile(r"[ \t]*:[ \t]*")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# The bulk of a sliced file: moves. Nothing on such a line is checked (one command per line), so skip it fast.
_MOVE = re.compile(r"[Gg]0*[0-3](?![0-9.])")
_MOVE_BYTES = re.compile(rb"[Gg]0*[0-3](?![0-9.])")


def normalise_command(name: str) -> str:
    """``"m0104"`` → ``"M104"``, ``"g29.1"`` → ``"G29.1"``, ``"save_config"`` → ``"SAVE_CONFIG"``; ValueError if
    ``name`` is not a command."""
    text = name.strip() if isinstance(name, str) else ""
    m = _TRADITIONAL.match(text)
    if m is not None and m.group(1).upper() in _COMMAND_LETTERS:
        if m.end() == len(text):
            base = f"{m.group(1).upper()}{int(m.group(2))}"
            return f"{base}.{int(m.group(3))}" if m.group(3) else base
    elif _NAME.match(text) and len(text) > 1:
        return text.upper()
    raise ValueError(f"{name[:40]!r} is not a G-code command (like M500, G29.1 or SAVE_CONFIG)")


@dataclass(frozen=True, slots=True)
class _Command:
    name: str  # "M104", "SET_PIN"
    sub: str | None  # "1" for M104.1
    args: str  # the rest of the line after the command word

    @property
    def full(self) -> str:
        return self.name if self.sub is None else f"{self.name}.{self.sub}"


def _views(text: str) -> set[str]:
    """The code of a line as each kind of firmware may read it (see the module docstring)."""
    t = _CONTROL.sub(" ", text)
    semicolon_first = t.partition(";")[0]
    views = {semicolon_first, _PARENS.sub(" ", semicolon_first)}
    if "(" in t:
        views.add(_PARENS.sub(" ", t).partition(";")[0])
    return {v for v in views if v.strip()}


def _command(view: str) -> _Command | None:
    m = _LINE_NUMBER.match(view)
    rest = view[m.end():] if m else view
    t = _TRADITIONAL.match(rest)
    if t is not None:
        letter = t.group(1).upper()
        if letter not in _COMMAND_LETTERS:
            return None  # a line of parameters only ("X10 Y10"), or a stray word
        sub = str(int(t.group(3))) if t.group(3) else None
        return _Command(f"{letter}{int(t.group(2))}", sub, rest[t.end():])
    e = _EXTENDED.match(rest)
    if e is not None and len(e.group(1)) > 1:
        return _Command(e.group(1).upper(), None, rest[e.end():])
    return None


def _values(args: str, letters: str) -> Iterator[tuple[str, str, float | None]]:
    """Every ``(letter, raw, value)`` of a traditional parameter in ``letters``; value None: not a plain number.
    ``S200:210`` (RepRapFirmware's lists) gives each number."""
    for m in _PARAM.finditer(args):
        letter = m.group(1).upper()
        if letter not in letters:
            continue
        at = m.end()
        while True:
            c = _C_NUMBER.match(args, at)
            d = _DECIMAL.match(args, at)
            if c is None:
                break  # "S" without a number: nothing is set
            raw = args[at:c.end()]
            yield letter, raw, (_finite(raw) if d is not None and d.end() == c.end() else None)
            at = c.end()
            colon = _COLON.match(args, at)
            if colon is None:
                break
            at = colon.end()


def _finite(raw: str) -> float | None:
    value = float(raw)  # a plain decimal: always parses, but 400 digits make it inf
    return value if math.isfinite(value) else None


def _klipper_params(args: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for word in args.split():
        key, eq, value = word.partition("=")
        if eq:
            out.setdefault(key.upper(), value)  # Klipper keeps one value per key
    return out


# ---- findings --------------------------------------------------------------------------------------------


class Violation(BaseModel):
    """One line that breaks the policy. ``message`` is what a person is shown."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    line: Annotated[int, Field(ge=1)]  # 1-based, counted in "\n"
    command: Annotated[str, Field(max_length=64)]
    rule: Annotated[str, Field(max_length=32)]
    reason: Annotated[str, Field(max_length=600)]  # "M500 writes the printer's settings (EEPROM) — blocked by [gcode]"
    text: Annotated[str, Field(max_length=MAX_TEXT)]  # the line as written

    @property
    def message(self) -> str:
        return f"line {self.line}: {self.reason}"


class Peak(BaseModel):
    """One of the hottest settings of a heater in a file (:data:`PEAKS_KEPT` per heater are kept)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    heater: Heater
    value: Annotated[float, Field(allow_inf_nan=False)]
    line: Annotated[int, Field(ge=1)]
    command: Annotated[str, Field(max_length=64)]
    setting: Annotated[str, Field(max_length=MAX_TEXT)]  # "M109 R350", or "M810 … M104 S400" through a macro
    text: Annotated[str, Field(max_length=MAX_TEXT)]


class Scan(BaseModel):
    """What a file holds that the policy cares about: the rule violations and the hottest setting per heater.

    ``rules`` is the fingerprint of the rules it was made under (:meth:`GcodePolicy.fingerprint`); ``caps``
    the caps of that policy, the default for :meth:`violations`."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    rules: Annotated[str, Field(max_length=64)]
    caps: Caps
    blocked: Annotated[tuple[Violation, ...], Field(max_length=1000)] = ()
    peaks: Annotated[tuple[Peak, ...], Field(max_length=PEAKS_KEPT * len(Heater))] = ()
    lines: Annotated[int, Field(ge=0)] = 0

    def violations(self, caps: Caps | None = None) -> list[Violation]:
        """The violations under ``caps`` (default: the scan's own), in line order."""
        caps = caps or self.caps
        out = list(self.blocked)
        for p in self.peaks:
            cap = caps.of(p.heater)
            if p.value > cap:
                out.append(Violation(
                    line=p.line, command=p.command, rule="temperature", text=p.text,
                    reason=f"{p.setting} sets the {p.heater.value} to {p.value:g} °C, above the {cap:g} °C cap "
                           "— refused by [gcode]"))
        return sorted(out, key=lambda v: v.line)


def summary(violations: list[Violation], shown: int = 3) -> str:
    """``"line 4: …; line 9: …"`` (and how many more), for one error message."""
    text = "; ".join(v.message for v in violations[:shown])
    more = len(violations) - shown
    return f"{text} (and {more} more)" if more > 0 else text


# ---- the policy ------------------------------------------------------------------------------------------


Mode = Literal["blocklist", "allowlist"]


class GcodePolicy(BaseModel):
    """What the farm refuses in a print file. ``block`` adds commands to :data:`DEFAULT_BLOCKED`, ``allow``
    takes some out of it (and out of the conditional rules: ``M302``, ``M810``…); ``mode = "allowlist"`` refuses
    every command not in ``commands`` (tool changes ``T<n>`` always pass). The caps hold in both modes, for an
    allowed command too."""

    model_config = ConfigDict(strict=True, frozen=True, extra="forbid")

    mode: Mode = "blocklist"
    block: frozenset[str] = Field(default=frozenset(), strict=False)
    allow: frozenset[str] = Field(default=frozenset(), strict=False)
    commands: frozenset[str] = Field(default=frozenset(), strict=False)
    caps: Caps = Caps()
    max_violations: Annotated[int, Field(gt=0, le=1000)] = 100  # rule violations kept; the scan goes on

    @field_validator("block", "allow", "commands", mode="before")
    @classmethod
    def _normalised(cls, names: Iterable[str]) -> frozenset[str]:
        if isinstance(names, str):
            raise ValueError("give a list of commands")  # noqa: TRY004 - pydantic reports ValueError only
        return frozenset(normalise_command(n) for n in names)

    def fingerprint(self) -> str:
        """Names the rules (not the caps): two nodes whose fingerprints agree read a file the same way."""
        body = {"v": _RULES_VERSION, "mode": self.mode, "block": sorted(self.block), "allow": sorted(self.allow),
                "commands": sorted(self.commands)}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:32]

    def with_caps(self, caps: Caps) -> GcodePolicy:
        return self.model_copy(update={"caps": caps})

    def scanner(self) -> Scanner:
        return Scanner(self)

    def scan_lines(self, lines: Iterable[str]) -> Scan:
        """Scan text lines (each item one ``\\n`` line; a ``\\r`` inside still ends a command)."""
        s = Scanner(self)
        for line in lines:
            s.feed_line(line)
        return s.result()

    def scan_chunks(self, chunks: Iterable[bytes]) -> Scan:
        """Scan a file given as byte chunks (the way the file server and the worker read it)."""
        s = Scanner(self)
        for chunk in chunks:
            s.feed_bytes(chunk)
        return s.result()

    def check(self, lines: Iterable[str]) -> list[Violation]:
        return self.scan_lines(lines).violations()

    def refusal(self, scan: Scan, caps: Caps | None = None) -> PolicyError | None:
        """A PolicyError naming the first violations of ``scan`` (made under these rules), or None."""
        violations = scan.violations(caps or self.caps)
        return PolicyError(summary(violations), violations) if violations else None


def check_policy(lines: Iterable[str], policy: GcodePolicy | None = None) -> list[Violation]:
    """The lines of ``lines`` that break ``policy`` (default: the default policy), in line order."""
    return (policy or GcodePolicy()).check(lines)


# ---- the scanner -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Finding:
    rule: str
    reason: str  # complete: "M500 writes … — blocked by [gcode]"
    command: str


@dataclass(slots=True)
class _Heat:
    heater: Heater
    value: float
    setting: str  # "M104 S300"
    command: str  # the line's command: "M104", or "M810" for a macro that sets it


class Scanner:
    """Feed a file (:meth:`feed_bytes` or :meth:`feed_line`), then take its :meth:`result`. Bounded memory."""

    def __init__(self, policy: GcodePolicy) -> None:
        self.policy = policy
        self._blocked_table = {} if policy.mode == "allowlist" else {
            k: v for k, v in DEFAULT_BLOCKED.items() if k not in policy.allow}
        self._blocked: list[Violation] = []
        self._peaks: dict[Heater, list[Peak]] = {h: [] for h in Heater}  # hottest first
        self._newlines = 0  # "\n" seen: the line being read is number _newlines + 1
        self._tail = False  # bytes after the last "\n"
        self._buf = bytearray()
        self._cut = False  # the part being read is longer than MAX_LINE; only its head is kept

    # -- input --

    def feed_line(self, line: str) -> None:
        """One ``\\n`` line (a trailing ``\\n`` is dropped); a ``\\r`` inside it ends a command too."""
        for part in line.rstrip("\n").split("\r"):
            self._check_text(part[:MAX_LINE], cut=len(part) > MAX_LINE)
        self._newlines += 1

    def feed_bytes(self, chunk: bytes) -> None:
        pieces = chunk.split(b"\n")
        last = len(pieces) - 1
        for i, piece in enumerate(pieces):
            if i == last:
                if piece:
                    self._take(piece)
                return
            if self._buf or self._cut or len(piece) > MAX_LINE:
                self._take(piece)
                self._end_part()
            elif b"\r" in piece:
                for part in piece.split(b"\r"):
                    self._check_bytes(part, cut=False)
            else:
                self._check_bytes(piece, cut=False)
            self._newlines += 1
            self._tail = False

    def close(self) -> None:
        """The end of the file: check a last line that has no ``\\n``."""
        if self._buf or self._cut:
            self._end_part()

    def _take(self, piece: bytes) -> None:
        """Part of a line that continues in the next chunk, or is too long to read whole."""
        self._tail = True
        parts = piece.split(b"\r")
        for part in parts[:-1]:
            self._append(part)
            self._end_part()
        self._append(parts[-1])

    def _append(self, part: bytes) -> None:
        if self._cut:
            return
        room = MAX_LINE - len(self._buf)
        if len(part) > room:
            self._buf += part[:room]
            self._cut = True
        else:
            self._buf += part

    def _end_part(self) -> None:
        part, cut = bytes(self._buf), self._cut
        self._buf.clear()
        self._cut = False
        self._check_bytes(part, cut=cut)

    def _check_bytes(self, part: bytes, *, cut: bool) -> None:
        s = part.lstrip()
        if not s or s[0] == 0x3B:  # ";"
            return
        if _MOVE_BYTES.match(s) and b"(" not in s:
            return
        # latin-1: one character per byte, as a firmware reads them; the rules look at ASCII only.
        self._check_text(part.decode("latin-1"), cut=cut)

    # -- checking --

    def _check_text(self, text: str, *, cut: bool) -> None:
        s = text.lstrip()
        if not s or s[0] == ";":
            return
        if _MOVE.match(s) and "(" not in s:
            return
        if cut and ";" not in text:
            self._violate(_Finding("line-length", f"a command line longer than {MAX_LINE} bytes (the rest would "
                                                  "go unread here) — refused by [gcode]", "?"), text)
        seen: set[tuple[str, str]] = set()
        hottest: dict[Heater, _Heat] = {}  # of this line: one setting per heater counts
        for finding in self._read(text, depth=0):
            if isinstance(finding, _Finding):
                if (finding.rule, finding.reason) not in seen:
                    seen.add((finding.rule, finding.reason))
                    self._violate(finding, text)
            elif finding.heater not in hottest or finding.value > hottest[finding.heater].value:
                hottest[finding.heater] = finding
        for heat in hottest.values():
            self._heat(heat, text)

    def _violate(self, f: _Finding, text: str) -> None:
        if len(self._blocked) < self.policy.max_violations:
            self._blocked.append(Violation(line=self._newlines + 1, command=f.command[:64], rule=f.rule,
                                           reason=f.reason[:600], text=text.strip()[:MAX_TEXT]))

    def _heat(self, h: _Heat, text: str) -> None:
        kept = self._peaks[h.heater]
        if len(kept) >= PEAKS_KEPT and h.value <= kept[-1].value:
            return
        line = self._newlines + 1
        kept.append(Peak(heater=h.heater, value=h.value, line=line, command=h.command[:64],
                         setting=h.setting[:MAX_TEXT], text=text.strip()[:MAX_TEXT]))
        kept.sort(key=lambda p: -p.value)  # stable: of equal settings the first lines stay
        del kept[PEAKS_KEPT:]

    def _read(self, text: str, depth: int) -> Iterator[_Finding | _Heat]:
        commands: dict[tuple[str, str | None, str], _Command] = {}
        for view in _views(text):
            cmd = _command(view)
            if cmd is not None:
                commands.setdefault((cmd.name, cmd.sub, cmd.args), cmd)
        for cmd in commands.values():
            yield from self._rules(cmd, depth)

    def _rules(self, cmd: _Command, depth: int) -> Iterator[_Finding | _Heat]:
        p = self.policy
        name, full = cmd.name, cmd.full
        allowed = name in p.allow or full in p.allow
        if name in p.block or full in p.block:
            yield _Finding("block", f"{full} is blocked by [gcode] block", full)
        elif p.mode == "allowlist" and not name.startswith("T") and name not in p.commands \
                and full not in p.commands:
            yield _Finding("allowlist", f"{full} is not in [gcode] commands (allow-list mode)", full)
        elif name in self._blocked_table:
            r = self._blocked_table[name]
            yield _Finding(r.rule, f"{full} {r.does} — blocked by [gcode]", full)
        if name == COLD_EXTRUSION and not allowed:
            yield from self._cold_extrusion(cmd)
        elif name in MACROS and not allowed:
            yield from self._macro(cmd, depth)
        elif name in _TEMPERATURE:  # the caps hold for an allowed command too
            yield from self._temperatures(cmd)
        elif name == _KLIPPER_HEATER:
            yield from self._klipper_heater(cmd)

    def _cold_extrusion(self, cmd: _Command) -> Iterator[_Finding]:
        # Marlin: "M302 P" (no value) is P1, "M302 S" (no value) is S0.
        for m in _PARAM.finditer(cmd.args):
            letter = m.group(1).upper()
            d = _DECIMAL.match(cmd.args, m.end())
            value = float(d.group(0)) if d is not None else None
            if (letter == "P" and value != 0) or (letter == "S" and (value is None or value < MIN_EXTRUDE_C)):
                shown = f"{letter}{d.group(0) if d else ''}"
                yield _Finding("cold-extrusion", f"M302 {shown} allows extrusion below {MIN_EXTRUDE_C:g} °C (cold "
                                                 "extrusion grinds filament and can jam the nozzle) — blocked by "
                                                 "[gcode]", "M302")
                return

    def _macro(self, cmd: _Command, depth: int) -> Iterator[_Finding | _Heat]:
        body = cmd.args.strip()
        if not body or body.startswith("*"):
            return  # "M810" alone runs macro 0, whose definition was checked where it was made
        if depth >= _MACRO_DEPTH:
            yield _Finding("macro", f"{cmd.name} defines macros nested deeper than {_MACRO_DEPTH} — blocked by "
                                    "[gcode]", cmd.name)
            return
        for part in body.split("|"):
            for inner in self._read(part, depth + 1):
                if isinstance(inner, _Finding):
                    yield _Finding("macro", f"{cmd.name} defines a macro that breaks the policy: {inner.reason}",
                                   cmd.name)
                else:
                    yield _Heat(inner.heater, inner.value, f"{inner.setting} in an {cmd.name} macro", cmd.name)

    def _temperatures(self, cmd: _Command) -> Iterator[_Finding | _Heat]:
        heater, letters = _TEMPERATURE[cmd.name]
        if cmd.name == "M303":
            for _, _, e in _values(cmd.args, "E"):
                heater = {-1.0: Heater.BED, -2.0: Heater.CHAMBER}.get(e or 0.0, Heater.HOTEND)
        best: tuple[float, str, str] | None = None  # the hottest of the line: the one any cap is about
        for letter, raw, value in _values(cmd.args, letters):
            if value is None:
                yield _Finding("temperature", f"{cmd.full} {letter}{raw[:20]} gives a temperature that is not a plain "
                                              "number — refused by [gcode]", cmd.full)
            elif best is None or value > best[0]:
                best = (value, letter, raw)
        if best is not None:
            yield _Heat(heater, best[0], f"{cmd.full} {best[1]}{best[2][:20]}", cmd.full)

    def _klipper_heater(self, cmd: _Command) -> Iterator[_Finding | _Heat]:
        params = _klipper_params(cmd.args)
        name = params.get("HEATER", "").lower()
        heater = Heater.HOTEND if name.startswith("extruder") else Heater.BED if name == "heater_bed" \
            else Heater.CHAMBER
        raw = params.get("TARGET")
        if raw is None:
            return
        value = _finite(raw) if _DECIMAL.fullmatch(raw) else None
        setting = f"{cmd.name} TARGET={raw[:20]}"
        if value is None:
            yield _Finding("temperature", f"{setting} gives a temperature that is not a plain number — refused "
                                          "by [gcode]", cmd.name)
        else:
            yield _Heat(heater, value, setting, cmd.name)

    # -- result --

    def result(self) -> Scan:
        self.close()
        return Scan(rules=self.policy.fingerprint(), caps=self.policy.caps, blocked=tuple(self._blocked),
                    peaks=tuple(p for h in Heater for p in self._peaks[h]),
                    lines=self._newlines + (1 if self._tail else 0))
