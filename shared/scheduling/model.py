"""The scheduler's view of printers and job copies: frozen value objects, built once and reused.

Names (profiles, material types and colours, tags) compare case-insensitively; the objects keep the
spelling they were given, for messages. Everything a decision needs repeatedly is derived once, in
``__post_init__``, so that :func:`shared.scheduling.policy.choose` can look at thousands of copies quickly:
build a :class:`CopyView` when a job is added or edited, not on every request for work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .operators import ALWAYS, OperatorSchedule

MatKey = tuple[str | None, str | None]
"""A material as (type, colour), case-folded; ``None`` is unknown (loaded) or any (required)."""

NOZZLE_TOLERANCE_MM = 0.01


def _fold(text: str | None) -> str | None:
    if text is None:
        return None
    folded = text.strip().casefold()
    return folded or None


def _fold_all(items: frozenset[str]) -> frozenset[str]:
    return frozenset(f for f in (_fold(i) for i in items) if f is not None)


@dataclass(frozen=True, slots=True)
class Material:
    """A filament: ``type`` (``"PLA"``) and ``colour`` (``"black"``).

    As a requirement, ``None`` in either field means "any". As what is loaded, ``None`` means unknown.
    """

    type: str | None = field(default=None, compare=False)
    colour: str | None = field(default=None, compare=False)
    key: MatKey = field(init=False, repr=False, compare=True)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (_fold(self.type), _fold(self.colour)))

    def __str__(self) -> str:
        kind = self.type or "any material"
        return f"{kind} {self.colour}" if self.colour else kind


def satisfies(loaded: MatKey | None, required: MatKey | None) -> bool:
    """Whether a tool loaded with ``loaded`` can print a requirement, without an operator touching it."""
    if required is None:
        return True
    if loaded is None:
        return False
    rtype, rcolour = required
    return (rtype is None or rtype == loaded[0]) and (rcolour is None or rcolour == loaded[1])


@dataclass(frozen=True, slots=True)
class PrintSet:
    """One G-code file of a job, printed ``count`` times in a row.

    ``materials`` has one entry per tool the file uses (tool 0 first); ``None`` is a tool used with any
    material, and an empty tuple means tool 0 with any material. ``profiles`` lists the printer profiles the
    file was sliced for (empty = any). ``extents_mm`` is the (x, y, z) size of the printed volume in machine
    coordinates, ``None`` if unknown.
    """

    file: str
    duration_s: float
    count: int = 1
    materials: tuple[Material | None, ...] = ()
    profiles: frozenset[str] = frozenset()
    nozzle_mm: float | None = None
    extents_mm: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"set {self.file!r}: count must be at least 1, got {self.count}")
        if not (self.duration_s >= 0 and math.isfinite(self.duration_s)):
            raise ValueError(f"set {self.file!r}: duration must be a finite number of seconds >= 0")

    @property
    def tools(self) -> int:
        return max(1, len(self.materials))


@dataclass(frozen=True, slots=True)
class CopyView:
    """One copy of a job, as the scheduler sees it while the copy is queued.

    ``rank`` orders jobs inside their namespace (smaller = nearer the top; gaps allowed). ``priority`` is the
    user's priority, higher first. ``enqueued_at`` is when the copy (re)entered the queue, in POSIX seconds;
    aging counts from it. ``tags`` are tags a printer must have.
    """

    job_id: str
    copy: int
    namespace: str
    sets: tuple[PrintSet, ...]
    enqueued_at: float
    rank: int = 0
    priority: int = 0
    tags: frozenset[str] = frozenset()
    # Derived once, used by compat and policy.
    work_s: float = field(init=False, repr=False, compare=False)
    prints: int = field(init=False, repr=False, compare=False)
    longest_print_s: float = field(init=False, repr=False, compare=False)
    last_print_s: float = field(init=False, repr=False, compare=False)
    need_profiles: frozenset[str] | None = field(init=False, repr=False, compare=False)
    need_nozzles: frozenset[float] = field(init=False, repr=False, compare=False)
    need_extents: tuple[float, float, float] = field(init=False, repr=False, compare=False)
    need_tools: int = field(init=False, repr=False, compare=False)
    need_types: frozenset[str] = field(init=False, repr=False, compare=False)
    need_tags: frozenset[str] = field(init=False, repr=False, compare=False)
    first_materials: tuple[MatKey | None, ...] = field(init=False, repr=False, compare=False)
    inner_swaps: int = field(init=False, repr=False, compare=False)
    steps: tuple[tuple[int, float, int], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.sets:
            raise ValueError(f"job {self.job_id!r} has no sets")
        s = object.__setattr__
        s(self, "work_s", sum(p.duration_s * p.count for p in self.sets))
        s(self, "prints", sum(p.count for p in self.sets))
        s(self, "longest_print_s", max(p.duration_s for p in self.sets))
        s(self, "last_print_s", self.sets[-1].duration_s)
        profiles: frozenset[str] | None = None
        for p in self.sets:
            if p.profiles:
                folded = _fold_all(p.profiles)
                profiles = folded if profiles is None else profiles & folded
        s(self, "need_profiles", profiles)
        s(self, "need_nozzles", frozenset(round(p.nozzle_mm, 3) for p in self.sets if p.nozzle_mm is not None))
        x = y = z = 0.0
        for p in self.sets:
            if p.extents_mm is not None:
                x, y, z = max(x, p.extents_mm[0]), max(y, p.extents_mm[1]), max(z, p.extents_mm[2])
        s(self, "need_extents", (x, y, z))
        tools = max(p.tools for p in self.sets)
        s(self, "need_tools", tools)
        s(self, "need_types", frozenset(m.key[0] for p in self.sets for m in p.materials if m and m.key[0]))
        s(self, "need_tags", _fold_all(self.tags))
        # Material changes: the first requirement on each tool depends on what is loaded; every later change
        # of requirement on a tool is a swap inside the copy, whatever the printer had.
        first: list[MatKey | None] = [None] * tools
        current: list[MatKey | None] = [None] * tools
        inner = 0
        steps: list[tuple[int, float, int]] = []
        for p in self.sets:
            swaps_here = 0
            for tool, mat in enumerate(p.materials):
                if mat is None or mat.key == (None, None):
                    continue
                if current[tool] is None:
                    first[tool] = current[tool] = mat.key
                elif not satisfies(current[tool], mat.key):
                    swaps_here += 1
                    current[tool] = mat.key
            inner += swaps_here
            steps.append((swaps_here, p.duration_s, p.count))
        s(self, "first_materials", tuple(first))
        s(self, "inner_swaps", inner)
        s(self, "steps", tuple(steps))

    @property
    def key(self) -> tuple[str, int]:
        return self.job_id, self.copy


@dataclass(frozen=True, slots=True)
class PrinterView:
    """A printer asking for work, with what it can do and what it holds now.

    ``namespaces`` are the queues it serves, in its own order of preference. ``loaded`` has one entry per
    tool (``None`` = unknown or empty). ``bed_mm`` is (width, depth, height) of the build volume, ``None`` if
    unknown; ``circular_bed`` for deltas (width is the diameter). ``material_types`` are the types it can print
    at all (empty = any). ``allow_swaps`` False means it only takes work that matches what is loaded.
    """

    node_id: str
    profile: str
    namespaces: tuple[str, ...]
    loaded: tuple[Material | None, ...] = (None,)
    nozzle_mm: float | None = None
    bed_mm: tuple[float, float, float] | None = None
    circular_bed: bool = False
    aliases: frozenset[str] = frozenset()
    material_types: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    self_clearing: bool = False
    allow_swaps: bool = True
    operator: OperatorSchedule = ALWAYS
    ns_rank: dict[str, int] = field(init=False, repr=False, compare=False)
    names: frozenset[str] = field(init=False, repr=False, compare=False)
    can_types: frozenset[str] = field(init=False, repr=False, compare=False)
    has_tags: frozenset[str] = field(init=False, repr=False, compare=False)
    loaded_keys: tuple[MatKey | None, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.loaded:
            raise ValueError(f"printer {self.node_id!r} must have at least one tool")
        s = object.__setattr__
        rank: dict[str, int] = {}
        for i, ns in enumerate(self.namespaces):
            rank.setdefault(ns, i)
        s(self, "ns_rank", rank)
        s(self, "names", _fold_all(self.aliases | {self.profile}))
        s(self, "can_types", _fold_all(self.material_types))
        s(self, "has_tags", _fold_all(self.tags))
        s(self, "loaded_keys", tuple(m.key if m is not None and m.key != (None, None) else None for m in self.loaded))

    @property
    def tools(self) -> int:
        return len(self.loaded)


@dataclass(frozen=True, slots=True)
class Choice:
    """The copy a printer should print next, and why.

    ``swaps`` is the estimated number of tool material changes (including those between its sets),
    ``operator_wait_s`` the estimated printer time lost waiting for an operator, ``overdue`` whether the
    copy was chosen because it had waited past the aging bound.
    """

    copy: CopyView
    swaps: int
    operator_wait_s: float
    overdue: bool
    reason: str

    @property
    def job_id(self) -> str:
        return self.copy.job_id

    @property
    def copy_index(self) -> int:
        return self.copy.copy
