"""The one settings object of a node, validated once and passed down.

Sources, later ones winning: defaults, a TOML file, environment variables (``NETQ_<SECTION>__<KEY>``), flags.
Reading the file and the environment happens in :mod:`node.app.config`; this module only validates.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import zoneinfo
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared import gcode_policy, security
from shared.errors import ConfigError
from shared.models import NAMESPACE_RE, NODE_ID_RE, Material
from shared.scheduling.operators import ALWAYS, OperatorSchedule, Shift
from shared.scheduling.params import SchedulerParams


class SafetyMode(enum.StrEnum):
    QUORUM = "quorum"
    AVAILABLE = "available"


class Section(BaseModel):
    # Errors never echo what was given: a damaged farm key or an API key would end up in a log.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)


class FarmSettings(Section):
    # The farm key (`netq init` makes one, `netq join CODE` fetches it): the same on every node. Every
    # credential, token and signature of the farm is derived from it (shared.security, docs/security.md).
    key: str | None = None
    # A farm without a key: any client on the network can read, steer and join it. Only when asked for, and
    # said at every start-up and by `netq nodes`.
    open: bool = False
    # quorum: no copy is ever started twice, a side without a quorum stops; available: every side keeps
    # printing, and each copy printed twice is reported after the heal (docs/protocol.md). Same on every node.
    safety: SafetyMode = SafetyMode.QUORUM
    base_topic: str = "netq"
    # A failed or cancelled print returns its copy to the queue until it has been started this many times;
    # then the copy is marked failed with the reason. The arbiter's setting is the one that counts: keep it
    # the same on every node.
    max_attempts: Annotated[int, Field(ge=1, le=100)] = 3

    @field_validator("key")
    @classmethod
    def _key_parses(cls, key: str | None) -> str | None:
        if key is None:
            return None
        try:
            security.parse_key(key)
        except ConfigError as exc:  # says what is wrong without echoing the key
            raise ValueError(str(exc)) from None
        return key.strip()

    @model_validator(mode="after")
    def _key_or_open(self) -> FarmSettings:
        if self.key is not None and self.open:
            raise ValueError("farm.open = true and farm.key are exclusive: a farm with a key is not open")
        return self

    @property
    def key_bytes(self) -> bytes | None:
        """The farm key's bytes (None: an open farm, or no key yet)."""
        return None if self.key is None else security.parse_key(self.key)

    @property
    def farm_id(self) -> str:
        """The farm's public id (``open`` for an open farm)."""
        key = self.key_bytes
        return "open" if key is None else security.farm_id(key)


class BrokerSettings(Section):
    url: str | None = None  # mqtt://host:port of an existing broker: skips choosing a broker host
    priority: Annotated[int, Field(ge=0, le=100)] = 10  # 0: never host the broker
    bind: str = "0.0.0.0"  # address the embedded broker listens on
    advertise: str | None = None  # address advertised to other nodes; default: bind (or the first interface)
    port: Annotated[int, Field(ge=0, le=65535)] = 1883
    interfaces: list[str] = []  # zeroconf interfaces (addresses); empty: all
    max_payload: int = 1024 * 1024  # bound on one MQTT publish we accept for the API


class TimingSettings(Section):
    heartbeat_s: Annotated[float, Field(gt=0)] = 0.25
    election_timeout_s: Annotated[float, Field(gt=0)] = 1.0  # randomised up to twice this; host gets the least
    lease_s: Annotated[float, Field(gt=0)] = 30.0
    lock_delay_s: Annotated[float, Field(ge=0)] = 2.0
    node_timeout_s: Annotated[float, Field(gt=0)] = 3.0  # a member silent this long is gone
    work_retry_s: Annotated[float, Field(gt=0)] = 2.0

    @model_validator(mode="after")
    def _ordering(self) -> TimingSettings:
        if self.election_timeout_s < 3 * self.heartbeat_s:
            raise ValueError("timing.election_timeout_s must be at least 3 × timing.heartbeat_s")
        if self.lease_s <= 3 * self.heartbeat_s:
            raise ValueError("timing.lease_s must be more than 3 × timing.heartbeat_s")
        if self.node_timeout_s < 2 * self.heartbeat_s:
            raise ValueError("timing.node_timeout_s must be at least 2 × timing.heartbeat_s")
        return self


class PrinterSettings(Section):
    driver: Literal["simulated", "octoprint", "none"] = "simulated"
    name: str | None = None
    # OctoPrint
    url: str | None = None
    api_key: str | None = None
    port: str = "AUTO"
    # simulated
    time_scale: Annotated[float, Field(gt=0)] = 1.0
    default_duration_s: Annotated[float, Field(gt=0)] = 60.0
    journal: Path | None = None  # simulated: append-only record of every start call
    # capabilities
    profile: str | None = None
    model: str | None = None
    nozzle_mm: float | None = 0.4
    bed_mm: tuple[float, float, float] | None = None
    materials: list[Material | None] = []
    tags: list[str] = []
    self_clearing: bool = True
    clear_script: list[str] = []  # G-code sent to clear the bed; empty + not self clearing: operator confirms
    # Before the bed is cleared (and the next print starts), wait until the bed is at most this warm (°C).
    cooldown_bed_c: Annotated[float, Field(ge=0, le=150)] | None = None
    # OctoPrint or the printer gone: try to reconnect after work_retry_s, doubling up to this.
    reconnect_max_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _octoprint_needs_url(self) -> PrinterSettings:
        if self.driver == "octoprint" and (not self.url or not self.api_key):
            raise ValueError("printer.url and printer.api_key are required with printer.driver = 'octoprint'")
        return self


class WorkerSettings(Section):
    namespaces: list[Annotated[str, Field(pattern=NAMESPACE_RE)]] = []  # in priority order; empty = all
    accept_jobs: bool = True


_HOST_NAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                           r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")


def _network_or_host(entry: str) -> str:
    """A ``[files] url_allow`` entry: a network or an address, or a host name."""
    text = entry.strip()
    try:
        ipaddress.ip_network(text, strict=False)
        return text
    except ValueError:
        pass
    if not _HOST_NAME_RE.match(text) or text.replace(".", "").isdigit():
        raise ValueError(f"{entry[:80]!r} is neither a network (10.0.0.0/8, 192.168.1.20) nor a host name")
    return text


class FilesSettings(Section):
    """``[files]``: the node's G-code HTTP server and its store (docs/security.md, "Files")."""

    # Address the file server listens on. None: the first of broker.interfaces, else 127.0.0.1; all
    # interfaces ("0.0.0.0") only when written here.
    bind: str | None = None
    advertise: str | None = None  # address in the node's files_url; default: the bound one
    port: Annotated[int, Field(ge=0, le=65535)] = 0
    max_upload_mb: Annotated[int, Field(ge=1, le=65536)] = 256  # one upload; larger ones are refused (413)
    quota_mb: Annotated[int, Field(ge=1)] = 8192  # the whole store; an upload past it is refused (507)
    # A stored file that no job references is deleted once it is this old: long enough for a file uploaded
    # now to be named by the job/add that follows it.
    collect_grace_s: Annotated[float, Field(ge=60)] = 24 * 3600.0
    collect_every_s: Annotated[float, Field(gt=0)] = 600.0
    # Private networks (10.0.0.0/8, 192.168.1.20, fd00::/8) or host names (nas.lan) that URL jobs may be
    # fetched from; loopback and link-local only by a network inside them (127.0.0.1/32). Never a farm node.
    url_allow: list[Annotated[str, AfterValidator(_network_or_host)]] = []

    def bind_host(self, interfaces: Sequence[str]) -> str:
        """The address to listen on, given the node's broker.interfaces."""
        if self.bind is not None:
            return self.bind
        return interfaces[0] if interfaces else "127.0.0.1"

    def advertised_host(self, interfaces: Sequence[str]) -> str:
        """The address other nodes and the CLI reach the file server at."""
        if self.advertise:
            return self.advertise
        host = self.bind_host(interfaces)
        if host in ("0.0.0.0", "::", ""):
            return interfaces[0] if interfaces else "127.0.0.1"
        return host


class HomeAssistantSettings(Section):
    enabled: bool = True
    prefix: str = "homeassistant"


_OFFSET_RE = re.compile(r"^(?:UTC)?(?P<sign>[+-])(?P<h>\d{1,2}):(?P<m>\d{2})$")


class SchedulerSettings(SchedulerParams):
    """``[scheduler]``: the scheduler's parameters (:class:`SchedulerParams`, ``docs/scheduling.md``) and when
    an operator is at the farm to swap filament and clear beds. The arbiter's settings are the ones that count:
    keep this section the same on every node."""

    operator_shifts: list[str] | None = None
    """Weekly shifts in local time (``timezone``), e.g. ``["Mon-Fri 06:00-22:00", "Sat 08:00-14:00"]``;
    ``"daily 22:00-06:00"`` runs past midnight. Not set: an operator is always there. ``[]``: never
    (lights-out)."""

    timezone: str = "UTC"
    """The local time of ``operator_shifts``: an IANA name (``"Europe/Berlin"``) or a fixed offset
    (``"+02:00"``). The offset in force when a printer asks for work applies to the whole estimate."""

    @field_validator("operator_shifts")
    @classmethod
    def _shifts_parse(cls, shifts: list[str] | None) -> list[str] | None:
        for text in shifts or ():
            Shift.parse(text)  # its ValueError names the shift and the expected form
        return shifts

    @field_validator("timezone")
    @classmethod
    def _timezone_known(cls, name: str) -> str:
        _zone(name)
        return name

    def params(self) -> SchedulerParams:
        """The scheduler's parameters alone."""
        return SchedulerParams(**{k: getattr(self, k) for k in SchedulerParams.model_fields})

    def shifts(self) -> tuple[Shift, ...] | None:
        """The parsed shifts (``None``: no schedule, an operator is always there)."""
        return None if self.operator_shifts is None else tuple(Shift.parse(s) for s in self.operator_shifts)

    def utc_offset_s(self, now: float) -> int:
        """The timezone's offset from UTC at ``now`` (POSIX seconds)."""
        offset = datetime.fromtimestamp(now, _zone(self.timezone)).utcoffset()
        return int(offset.total_seconds()) if offset is not None else 0

    def operators(self, now: float) -> OperatorSchedule:
        """The operator schedule in force at ``now``."""
        shifts = self.shifts()
        return ALWAYS if shifts is None else OperatorSchedule(shifts, self.utc_offset_s(now))


def _zone(name: str) -> tzinfo:
    match = _OFFSET_RE.match(name.strip())
    if match is not None:
        hours, minutes = int(match["h"]), int(match["m"])
        if hours > 14 or minutes >= 60:
            raise ValueError(f"not a UTC offset: {name!r}")
        sign = -1 if match["sign"] == "-" else 1
        return timezone(sign * timedelta(hours=hours, minutes=minutes))
    try:
        return zoneinfo.ZoneInfo(name.strip()) if name.strip().upper() != "UTC" else UTC
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown timezone {name!r} (expected an IANA name like 'Europe/Berlin', or '+02:00')") from exc


GcodeCelsius = Annotated[float, Field(gt=0, le=1000)]


class GcodeProfileCaps(Section):
    """``[gcode.profiles."<profile>"]``: the caps for printers of one profile; an unset cap is [gcode]'s."""

    max_hotend_c: GcodeCelsius | None = None
    max_bed_c: GcodeCelsius | None = None
    max_chamber_c: GcodeCelsius | None = None


class GcodeSettings(Section):
    """``[gcode]``: the farm's G-code policy, checked on every path a file takes and once more before a printer
    is called (docs/security.md, "G-code policy"). Keep it the same on every node: a holder's check of a file
    counts for the arbiter only when both read files under the same rules."""

    mode: Literal["blocklist", "allowlist"] = "blocklist"
    block: list[str] = []  # added to the default block list (M500, M997, SAVE_CONFIG, …)
    allow: list[str] = []  # taken out of the default block list and its conditional rules (M302, M810…)
    commands: list[str] = []  # mode "allowlist": the only commands a file may hold (T<n> always passes)
    max_hotend_c: GcodeCelsius = 285.0
    max_bed_c: GcodeCelsius = 120.0
    max_chamber_c: GcodeCelsius = 70.0
    # Per printer profile (printer.profile on the printer's node; a job set's profiles at submission).
    profiles: Annotated[dict[str, GcodeProfileCaps], Field(max_length=256)] = {}

    @field_validator("block", "allow", "commands")
    @classmethod
    def _commands(cls, names: list[str]) -> list[str]:
        return sorted({gcode_policy.normalise_command(n) for n in names})

    @field_validator("profiles")
    @classmethod
    def _profile_names(cls, profiles: dict[str, GcodeProfileCaps]) -> dict[str, GcodeProfileCaps]:
        out: dict[str, GcodeProfileCaps] = {}
        for name, caps in profiles.items():
            key = name.strip().casefold()
            if not key or len(key) > 200:
                raise ValueError(f"gcode.profiles: {name[:40]!r} is not a printer profile name")
            if key in out:
                raise ValueError(f"gcode.profiles: {name[:40]!r} is given twice (names ignore case)")
            out[key] = caps
        return out

    @model_validator(mode="after")
    def _consistent(self) -> GcodeSettings:
        both = set(self.block) & set(self.allow)
        if both:
            raise ValueError(f"gcode: {', '.join(sorted(both))} both in block and in allow")
        if self.mode == "allowlist" and not self.commands:
            raise ValueError('gcode.mode = "allowlist" needs gcode.commands: the commands a file may hold')
        return self

    def caps(self, profile: str | None = None) -> gcode_policy.Caps:
        """The caps for a printer of ``profile`` (the [gcode] defaults where its profile sets none)."""
        own = (self.profiles.get(profile.strip().casefold()) if profile else None) or GcodeProfileCaps()
        return gcode_policy.Caps(
            hotend_c=self.max_hotend_c if own.max_hotend_c is None else own.max_hotend_c,
            bed_c=self.max_bed_c if own.max_bed_c is None else own.max_bed_c,
            chamber_c=self.max_chamber_c if own.max_chamber_c is None else own.max_chamber_c)

    def set_caps(self, profiles: Sequence[str]) -> gcode_policy.Caps:
        """The caps for a job set: the highest of the profiles it may print on ([gcode]'s when it names none)."""
        if not profiles:
            return self.caps()
        first, *rest = [self.caps(p) for p in profiles]
        return first.highest(*rest)

    def farm_caps(self) -> gcode_policy.Caps:
        """The highest caps of any profile: what an upload, not yet part of any job, is checked against."""
        return self.caps().highest(*(self.caps(p) for p in self.profiles))

    def policy(self, caps: gcode_policy.Caps | None = None) -> gcode_policy.GcodePolicy:
        """The policy under these rules with ``caps`` (default: :meth:`farm_caps`)."""
        return gcode_policy.GcodePolicy(mode=self.mode, block=frozenset(self.block), allow=frozenset(self.allow),
                                        commands=frozenset(self.commands), caps=caps or self.farm_caps())


class Settings(Section):
    node_id: Annotated[str, Field(pattern=NODE_ID_RE)]
    data_dir: Path
    witness: bool = False  # a printer-less member that only votes
    farm: FarmSettings = FarmSettings()
    broker: BrokerSettings = BrokerSettings()
    timing: TimingSettings = TimingSettings()
    printer: PrinterSettings = PrinterSettings()
    worker: WorkerSettings = WorkerSettings()
    files: FilesSettings = FilesSettings()
    homeassistant: HomeAssistantSettings = HomeAssistantSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    gcode: GcodeSettings = GcodeSettings()

    @model_validator(mode="after")
    def _witness_has_no_printer(self) -> Settings:
        if self.witness and self.printer.driver != "none":
            self.printer = self.printer.model_copy(update={"driver": "none"})
        return self
