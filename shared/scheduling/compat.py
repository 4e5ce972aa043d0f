"""Whether a printer can print a job copy at all: the hard rules the scheduler never breaks.

A printer can print a copy when, for every set of the copy: the set allows the printer's profile (or one of
its aliases), the printer's nozzle is the one the set was sliced for, the printed volume fits the bed, the
printer has the tools the set uses and can print the material types it needs, and the printer has every tag
the job requires. A printer with ``allow_swaps=False`` must also hold, already loaded, the materials of every
set. Other printers can be given a copy whose materials are not loaded: an operator swaps them, and the
scheduler counts that as a cost (see :mod:`shared.scheduling.policy`).

:func:`compatible` says why not, in words a person can act on; :func:`make_filter` is the same test without
the words, fast enough to run over every queued copy at each request for work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

from .model import NOZZLE_TOLERANCE_MM, CopyView, PrinterView, satisfies


class Compat(NamedTuple):
    ok: bool
    reason: str


_OK = Compat(True, "")


def _mm(value: float) -> str:
    return f"{value:g}"


def _volume(x: float, y: float, z: float) -> str:
    return f"{_mm(x)}×{_mm(y)}×{_mm(z)} mm"


def _profile_names(copy: CopyView) -> list[str]:
    names: set[str] = set()
    for p in copy.sets:
        names |= p.profiles
    return sorted(names)


def _loaded_ok(printer: PrinterView, copy: CopyView) -> bool:
    if copy.inner_swaps:
        return False
    loaded = printer.loaded_keys
    return all(satisfies(loaded[t], need) for t, need in enumerate(copy.first_materials) if t < len(loaded))


def compatible(printer: PrinterView, copy: CopyView, *, consider_loaded: bool = True) -> Compat:
    """``(True, "")`` if ``printer`` can print every set of ``copy``, else ``(False, reason)``.

    With ``consider_loaded=False`` what is loaded right now is ignored (use it at submission: a printer that
    takes no swaps can still be loaded differently later).
    """
    need = copy.need_profiles
    if need is not None and not (printer.names & need):
        if not need:
            return Compat(False, "its sets were sliced for different printer profiles, with none in common")
        return Compat(False, f"sliced for {', '.join(_profile_names(copy))}, not {printer.profile}")
    if len(copy.need_nozzles) > 1:
        sizes = ", ".join(_mm(n) for n in sorted(copy.need_nozzles))
        return Compat(False, f"its sets need different nozzles ({sizes} mm)")
    for nozzle in copy.need_nozzles:
        if printer.nozzle_mm is None:
            return Compat(False, f"needs a {_mm(nozzle)} mm nozzle; this printer's nozzle is unknown")
        if abs(printer.nozzle_mm - nozzle) > NOZZLE_TOLERANCE_MM:
            return Compat(False, f"needs a {_mm(nozzle)} mm nozzle, printer has {_mm(printer.nozzle_mm)} mm")
    x, y, z = copy.need_extents
    if x or y or z:
        if printer.bed_mm is None:
            return Compat(False, f"needs a build volume of {_volume(x, y, z)}; this printer's is unknown")
        w, d, h = printer.bed_mm
        fits = (math.hypot(x, y) <= w if printer.circular_bed else x <= w and y <= d) and z <= h
        if not fits:
            shape = "round " if printer.circular_bed else ""
            return Compat(False, f"needs {_volume(x, y, z)}, larger than the {shape}build volume {_volume(w, d, h)}")
    if copy.need_tools > printer.tools:
        return Compat(False, f"uses {copy.need_tools} tools, printer has {printer.tools}")
    if printer.can_types and not copy.need_types <= printer.can_types:
        missing = sorted(
            {m.type for p in copy.sets for m in p.materials if m and m.type and m.key[0] not in printer.can_types}
        )
        return Compat(False, f"needs {', '.join(missing)}, which this printer does not print")
    if not copy.need_tags <= printer.has_tags:
        missing = sorted(t for t in copy.tags if t.strip().casefold() not in printer.has_tags)
        return Compat(False, f"needs printer tag{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if consider_loaded and not printer.allow_swaps and not _loaded_ok(printer, copy):
        wanted = "; ".join(
            f"tool {t}: {m}" for p in copy.sets for t, m in enumerate(p.materials) if m is not None
        )
        have = ", ".join(f"tool {t}: {m or 'unknown'}" for t, m in enumerate(printer.loaded))
        return Compat(False, f"needs {wanted} but has {have}, and this printer takes no material swaps")
    return _OK


def make_filter(printer: PrinterView, *, consider_loaded: bool = True) -> Callable[[CopyView], bool]:
    """A predicate equal to ``compatible(printer, copy).ok``, without building reasons.

    The printer's attributes are bound once, so that testing thousands of copies costs a few attribute
    reads each.
    """
    names = printer.names
    nozzle = printer.nozzle_mm
    bed = printer.bed_mm
    circular = printer.circular_bed
    tools = printer.tools
    can_types = printer.can_types
    tags = printer.has_tags
    strict = consider_loaded and not printer.allow_swaps
    w, d, h = bed if bed is not None else (0.0, 0.0, 0.0)

    def fits(copy: CopyView) -> bool:
        need = copy.need_profiles
        if need is not None and names.isdisjoint(need):
            return False
        nozzles = copy.need_nozzles
        if nozzles:
            if len(nozzles) > 1 or nozzle is None:
                return False
            for n in nozzles:
                if abs(nozzle - n) > NOZZLE_TOLERANCE_MM:
                    return False
        x, y, z = copy.need_extents
        if x or y or z:
            if bed is None or z > h:
                return False
            if circular:
                if math.hypot(x, y) > w:
                    return False
            elif x > w or y > d:
                return False
        if copy.need_tools > tools:
            return False
        if can_types and not copy.need_types <= can_types:
            return False
        if copy.need_tags and not copy.need_tags <= tags:
            return False
        return not strict or _loaded_ok(printer, copy)

    return fits


def why_unprintable(
    copy: CopyView,
    printers: Iterable[PrinterView],
    *,
    consider_loaded: bool = True,
    check_namespace: bool = True,
    limit: int = 5,
) -> str | None:
    """``None`` if some printer in ``printers`` can print ``copy``; else one line saying why none can.

    Pass the enrolled printers with ``consider_loaded=False`` to decide whether to refuse a job at submission,
    and the online printers (``consider_loaded=True``) to say why a queued job waits. With ``check_namespace``
    a printer that does not serve the copy's namespace counts as unable.
    """
    by_reason: dict[str, list[str]] = {}
    seen = 0
    for printer in printers:
        seen += 1
        if check_namespace and copy.namespace not in printer.ns_rank:
            reason = f"does not serve namespace {copy.namespace!r}"
        else:
            ok, reason = compatible(printer, copy, consider_loaded=consider_loaded)
            if ok:
                return None
        by_reason.setdefault(reason, []).append(printer.node_id)
    if not seen:
        return "no printer is available"
    parts: list[str] = []
    for reason, nodes in sorted(by_reason.items(), key=lambda item: (-len(item[1]), item[0]))[:limit]:
        shown = ", ".join(nodes[:3]) + (f" and {len(nodes) - 3} more" if len(nodes) > 3 else "")
        parts.append(f"{shown}: {reason}")
    if len(by_reason) > limit:
        parts.append(f"{len(by_reason) - limit} other reasons")
    return "no printer can print it (" + "; ".join(parts) + ")"
