"""Seeded farm workloads for the scheduler benchmark.

Printer sizes and self-clearing flags are facts from Continuous Print's printer profiles
(``continuousprint/data/printer_profiles.yaml``, commit 834d903 of smartin015/continuousprint, AGPL-3.0),
copied here as data so that the benchmark runs without that file. The job mixes are invented but shaped like
a print farm's: mostly PLA in a few popular colours, a tail of PETG, TPU and ASA, log-normal print times with
a few overnight prints, orders of several identical copies, a standing backlog plus a stream of new work,
and G-code sliced for one printer profile and nozzle.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace

from shared.scheduling import Material, OperatorSchedule, PrinterView, PrintSet
from shared.scheduling.operators import ALWAYS
from shared.scheduling.sim import OperatorModel, SimJob, Workload

HOUR = 3600.0


@dataclass(frozen=True)
class Profile:
    name: str
    width: float
    depth: float
    height: float
    self_clearing: bool
    extra_tags: tuple[str, ...] = ()


# From Continuous Print's printer_profiles.yaml (AGPL-3.0): name, build volume in mm, selfClearing, extra_tags.
PROFILES = {
    p.name: p
    for p in (
        Profile("Prusa i3 MK3S+", 250, 210, 210, False, ("MK3", "MK3S")),
        Profile("Prusa Mini", 180, 180, 180, True),
        Profile("Creality Ender 3 S1 Pro", 220, 220, 270, False),
        Profile("Creality CR-10S-Pro", 300, 300, 400, False),
        Profile("Creality CR30", 200, 1000, 200, True, ("CR", "30")),
        Profile("Anycubic i3 Mega", 210, 210, 205, False),
    )
}

# Share of jobs by material, then by colour within it: roughly what a small production farm runs.
MATERIALS: dict[str, tuple[float, dict[str, float]]] = {
    "PLA": (0.68, {"black": 0.30, "white": 0.22, "grey": 0.15, "red": 0.10, "blue": 0.10, "orange": 0.13}),
    "PETG": (0.20, {"black": 0.5, "white": 0.2, "clear": 0.3}),
    "TPU": (0.06, {"black": 1.0}),
    "ASA": (0.06, {"black": 0.6, "white": 0.4}),
}


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


def _material(rng: random.Random, types: frozenset[str] | None = None) -> Material:
    allowed = {t: share for t, (share, _) in MATERIALS.items() if types is None or t in types}
    kind = _pick(rng, allowed)
    return Material(kind, _pick(rng, MATERIALS[kind][1]))


def _duration(rng: random.Random, median_h: float, sigma: float = 0.7) -> float:
    hours = min(20.0, max(0.25, rng.lognormvariate(math.log(median_h), sigma)))
    return round(hours * 60) * 60.0


def _batch(rng: random.Random, duration_s: float) -> tuple[int, int]:
    """(copies, prints per set) of an order: short prints come in larger batches than long ones."""
    if duration_s <= 3 * HOUR:
        copies = rng.choices((1, 2, 3, 4, 5, 6, 8, 10), (36, 18, 12, 10, 8, 6, 5, 5))[0]
        return copies, rng.choices((1, 2, 3, 4), (70, 15, 10, 5))[0]
    if duration_s <= 8 * HOUR:
        return rng.choices((1, 2, 3, 4), (50, 25, 15, 10))[0], rng.choices((1, 2), (85, 15))[0]
    return rng.choices((1, 2), (75, 25))[0], 1


def _extents(rng: random.Random, profile: Profile, scale: float = 0.8) -> tuple[float, float, float]:
    return (
        round(rng.uniform(0.15, scale) * profile.width),
        round(rng.uniform(0.15, scale) * min(profile.depth, 600)),
        round(rng.uniform(0.05, scale) * profile.height),
    )


def _arrival(rng: random.Random, backlog: float, spread_h: float) -> float:
    """A share ``backlog`` of jobs is queued at the start; the rest arrive over ``spread_h`` hours."""
    if rng.random() < backlog:
        return 0.0
    return round(rng.uniform(0, spread_h * HOUR) / 60) * 60


def _printer(
    node_id: str,
    profile: Profile,
    nozzle: float,
    loaded: Material | None,
    namespaces: tuple[str, ...],
    *,
    types: frozenset[str] = frozenset(),
    tags: frozenset[str] = frozenset(),
    operator: OperatorSchedule = ALWAYS,
) -> PrinterView:
    return PrinterView(
        node_id=node_id,
        profile=profile.name,
        namespaces=namespaces,
        loaded=(loaded,),
        nozzle_mm=nozzle,
        bed_mm=(profile.width, profile.depth, profile.height),
        aliases=frozenset(profile.extra_tags),
        material_types=types,
        tags=tags,
        self_clearing=profile.self_clearing,
        operator=operator,
    )


def uniform(seed: int = 1, min_copies: int = 520) -> Workload:
    """20 identical Prusa i3 MK3S+ (0.4 mm), all PLA black, one queue, operators round the clock."""
    rng = random.Random(seed)
    mk3 = PROFILES["Prusa i3 MK3S+"]
    pla = Material("PLA", "black")
    printers = tuple(_printer(f"mk3-{i:02d}", mk3, 0.4, pla, ("default",)) for i in range(20))
    jobs: list[SimJob] = []
    copies = 0
    while copies < min_copies:
        duration = _duration(rng, 2.5)
        n, count = _batch(rng, duration)
        sets = (
            PrintSet(
                f"part-{len(jobs)}.gcode",
                duration,
                count,
                (pla,),
                frozenset({mk3.name}),
                0.4,
                _extents(rng, mk3),
            ),
        )
        jobs.append(SimJob(f"j{len(jobs):04d}", "default", sets, n, _arrival(rng, 0.35, 60)))
        copies += n
    return Workload(
        "uniform",
        printers,
        tuple(jobs),
        OperatorModel(count=2, schedule=ALWAYS),
        description="20 identical MK3S+, one material, operators 24/7",
    )


def materials(seed: int = 2, min_copies: int = 520) -> Workload:
    """24 Prusa i3 MK3S+ (0.4 mm) loaded with assorted filament; jobs in four materials and many colours,
    some with sets in two colours; two queues served in different orders; a few rush jobs."""
    rng = random.Random(seed)
    mk3 = PROFILES["Prusa i3 MK3S+"]
    printers = tuple(
        _printer(
            f"mk3-{i:02d}",
            mk3,
            0.4,
            _material(rng, frozenset({"PLA", "PETG"})),
            ("orders", "internal") if i < 20 else ("internal", "orders"),
            tags=frozenset({"enclosure"}) if i % 6 == 0 else frozenset(),
        )
        for i in range(24)
    )
    jobs: list[SimJob] = []
    copies = 0
    while copies < min_copies:
        duration = _duration(rng, 2.5)
        n, count = _batch(rng, duration)
        mat = _material(rng)
        name = f"part-{len(jobs)}"
        first = PrintSet(f"{name}.gcode", duration, count, (mat,), frozenset({mk3.name}), 0.4, _extents(rng, mk3))
        sets: tuple[PrintSet, ...] = (first,)
        if rng.random() < 0.12:  # a second part of the same item, in an accent colour
            accent = Material(mat.type, _pick(rng, MATERIALS[mat.type or "PLA"][1]))
            sets += (PrintSet(f"{name}-accent.gcode", _duration(rng, 1.0), 1, (accent,), frozenset({mk3.name}), 0.4),)
        tags = frozenset({"enclosure"}) if mat.type == "ASA" else frozenset()
        rush = rng.random() < 0.04
        seq = len(jobs)
        jobs.append(
            SimJob(
                f"j{seq:04d}",
                "orders" if rng.random() < 0.7 else "internal",
                sets,
                n,
                _arrival(rng, 0.35, 60),
                priority=1 if rush else 0,
                rank=-seq if rush else None,
                tags=tags,
            )
        )
        copies += n
    return Workload(
        "materials",
        printers,
        tuple(jobs),
        OperatorModel(count=2, schedule=ALWAYS),
        description="24 MK3S+, PLA/PETG/TPU/ASA in 12 colours, two queues, rush jobs, operators 24/7",
    )


# (group, profile, nozzle, printers, material types it can print (empty = any), tags)
_MIXED_FARM: tuple[tuple[str, str, float, int, frozenset[str], frozenset[str]], ...] = (
    ("mk3", "Prusa i3 MK3S+", 0.4, 6, frozenset(), frozenset()),
    ("mk3e", "Prusa i3 MK3S+", 0.4, 2, frozenset(), frozenset({"enclosure"})),
    ("mk3w", "Prusa i3 MK3S+", 0.6, 3, frozenset(), frozenset()),
    ("mini", "Prusa Mini", 0.4, 4, frozenset({"PLA", "PETG"}), frozenset()),
    ("s1", "Creality Ender 3 S1 Pro", 0.4, 4, frozenset({"PLA", "PETG", "TPU"}), frozenset()),
    ("cr10", "Creality CR-10S-Pro", 0.6, 2, frozenset({"PLA", "PETG"}), frozenset()),
    ("cr30", "Creality CR30", 0.4, 2, frozenset({"PLA", "PETG"}), frozenset({"belt"})),
    ("mega", "Anycubic i3 Mega", 0.4, 1, frozenset({"PLA", "PETG"}), frozenset()),
)

# How jobs are sliced: (weight, profiles allowed, nozzle, bed the parts are sized for, median hours,
# material types, required tags).
_MIXED_JOBS: tuple[tuple[float, tuple[str, ...], float, str, float, frozenset[str], frozenset[str]], ...] = (
    (8, ("Prusa i3 MK3S+",), 0.4, "Prusa i3 MK3S+", 2.5, frozenset({"PLA", "PETG", "TPU"}), frozenset()),
    (1, ("Prusa i3 MK3S+",), 0.4, "Prusa i3 MK3S+", 4.0, frozenset({"ASA"}), frozenset({"enclosure"})),
    (3.5, ("Prusa i3 MK3S+",), 0.6, "Prusa i3 MK3S+", 3.0, frozenset({"PLA", "PETG"}), frozenset()),
    (7, ("Prusa Mini",), 0.4, "Prusa Mini", 1.5, frozenset({"PLA", "PETG"}), frozenset()),
    # Small parts whose G-code suits both Prusa models.
    (2, ("Prusa i3 MK3S+", "Prusa Mini"), 0.4, "Prusa Mini", 1.5, frozenset({"PLA", "PETG"}), frozenset()),
    # Marlin G-code that both bed-slingers of this size run.
    (
        5,
        ("Creality Ender 3 S1 Pro", "Anycubic i3 Mega"),
        0.4,
        "Anycubic i3 Mega",
        3.0,
        frozenset({"PLA", "PETG"}),
        frozenset(),
    ),
    (1, ("Creality Ender 3 S1 Pro",), 0.4, "Creality Ender 3 S1 Pro", 2.0, frozenset({"TPU"}), frozenset()),
    (1.2, ("Creality CR-10S-Pro",), 0.6, "Creality CR-10S-Pro", 6.0, frozenset({"PLA", "PETG"}), frozenset()),
    (1.7, ("Creality CR30",), 0.4, "Creality CR30", 4.0, frozenset({"PLA", "PETG"}), frozenset({"belt"})),
)


DAILY_SHIFTS = ("daily 06:00-14:00", "daily 14:00-22:00")
WEEKDAY_SHIFTS = ("Mon-Fri 06:00-14:00", "Mon-Fri 14:00-22:00", "Sat 08:00-14:00")


def mixed(seed: int = 3, min_copies: int = 520, shifts: tuple[str, ...] = DAILY_SHIFTS) -> Workload:
    """24 printers of six models with 0.4 and 0.6 mm nozzles, some clearing their own beds; jobs sliced per
    profile and nozzle, large parts only the CR-10S-Pro fits, belt jobs, ASA needing an enclosure; two
    operators working two shifts (06:00-22:00 every day by default), none at night."""
    rng = random.Random(seed)
    schedule = OperatorSchedule.parse(shifts)
    printers: list[PrinterView] = []
    for group, profile, nozzle, n, types, tags in _MIXED_FARM:
        for i in range(n):
            printers.append(
                _printer(
                    f"{group}-{i}",
                    PROFILES[profile],
                    nozzle,
                    _material(rng, frozenset({"PLA"})),
                    ("default",),
                    types=types,
                    tags=tags,
                    operator=schedule,
                )
            )
    jobs: list[SimJob] = []
    copies = 0
    while copies < min_copies:
        weight_of = [spec[0] for spec in _MIXED_JOBS]
        _, profiles, nozzle, bed, median_h, types, tags = rng.choices(_MIXED_JOBS, weight_of)[0]
        duration = _duration(rng, median_h)
        n, count = _batch(rng, duration)
        sets = (
            PrintSet(
                f"part-{len(jobs)}.gcode",
                duration,
                count,
                (_material(rng, types),),
                frozenset(profiles),
                nozzle,
                _extents(rng, PROFILES[bed]),
            ),
        )
        jobs.append(SimJob(f"j{len(jobs):04d}", "default", sets, n, _arrival(rng, 0.35, 60), tags=tags))
        copies += n
    return Workload(
        "mixed",
        tuple(printers),
        tuple(jobs),
        OperatorModel(count=2, schedule=schedule),
        description="24 printers, 6 models, 0.4/0.6 mm, self-clearing and manual, 2 operators daily 06-22",
    )


def mixed_weekdays(seed: int = 3, min_copies: int = 520) -> Workload:
    """The mixed farm with operators on weekdays and Saturday morning only: the weekend is one long stretch
    in which printers that need an operator between prints do one print each."""
    w = mixed(seed, min_copies, WEEKDAY_SHIFTS)
    return replace(w, name="mixed-weekdays", description=w.description.replace("daily 06-22", "Mon-Fri 06-22 + Sat 08-14"))


WORKLOADS = {"uniform": uniform, "materials": materials, "mixed": mixed, "mixed-weekdays": mixed_weekdays}
