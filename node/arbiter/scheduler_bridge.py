"""The arbiter's bridge to the scheduler (:mod:`shared.scheduling`): farm state → scheduler views → a pick.

Views of queued copies are cached per job revision (the job object's stamp), so a request for work does not
rebuild thousands of them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from shared import scheduling as S
from shared.claims import Chooser, Pick
from shared.models import Capabilities, CopyState, Job, Material
from shared.settings import Settings
from shared.state import FarmState

DEFAULT_DURATION_S = 3600.0  # a set without an estimate counts as an hour of printing


def _material(m: Material | None) -> S.Material | None:
    return None if m is None else S.Material(m.type, m.color)


def printer_view(node_id: str, caps: Capabilities, namespaces: Sequence[str],
                 operator: S.OperatorSchedule = S.ALWAYS) -> S.PrinterView:
    return S.PrinterView(
        node_id=node_id,
        profile=caps.profile or caps.model or "",
        namespaces=tuple(namespaces),
        loaded=tuple(_material(m) for m in caps.materials) or (None,),
        nozzle_mm=caps.nozzle_mm,
        bed_mm=caps.bed_mm,
        aliases=frozenset(x for x in (caps.model,) if x),
        tags=frozenset(caps.tags),
        self_clearing=caps.self_clearing,
        operator=operator,
    )


def _sets(job: Job) -> tuple[S.PrintSet, ...]:
    return tuple(
        S.PrintSet(file=s.file, duration_s=s.duration_s if s.duration_s is not None else DEFAULT_DURATION_S,
                   count=s.count, materials=tuple(_material(m) for m in s.materials),
                   profiles=frozenset(s.profiles), nozzle_mm=s.nozzle_mm, extents_mm=s.extents_mm)
        for s in job.sets
    )


def copy_view(job: Job, index: int, rank: int) -> S.CopyView:
    return S.CopyView(job_id=job.id, copy=index, namespace=job.namespace, sets=_sets(job),
                      enqueued_at=job.created, rank=rank, priority=job.priority, tags=frozenset(job.tags))


class Scheduling:
    """Chooses copies for printers and explains why a job cannot be printed, from the replicated state."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings.scheduler
        self.params = self.settings.params()
        self._shifts = self.settings.shifts()
        self._schedules: dict[int, S.OperatorSchedule] = {}
        self._views: dict[tuple[str, tuple[int, int], int, int], S.CopyView] = {}
        self._farm: S.FarmView | None = None

    def operators(self, now: float) -> S.OperatorSchedule:
        """The operator schedule of ``[scheduler]`` in force at ``now`` (its timezone's offset then)."""
        if self._shifts is None:
            return S.ALWAYS
        offset = self.settings.utc_offset_s(now)
        schedule = self._schedules.get(offset)
        if schedule is None:
            schedule = self._schedules[offset] = S.OperatorSchedule(self._shifts, offset)
        return schedule

    def candidates(self, state: FarmState) -> list[S.CopyView]:
        """Every queued copy of an unpaused queue, as scheduler views (cached per job revision)."""
        out: list[S.CopyView] = []
        fresh: dict[tuple[str, tuple[int, int], int, int], S.CopyView] = {}
        for ns in state.namespaces():
            if state.queue(ns).paused:
                continue
            for rank, job in enumerate(state.jobs(ns)):
                key = f"job/{ns}/{job.id}"
                obj = state.objects[key]
                for copy in job.copies:
                    if copy.state != CopyState.QUEUED:
                        continue
                    ck = (key, obj.stamp, copy.index, rank)
                    view = self._views.get(ck) or copy_view(job, copy.index, rank)
                    fresh[ck] = view
                    out.append(view)
        self._views = fresh
        return out

    def farm_view(self, nodes: dict[str, dict[str, Any]], members: Iterable[str],
                  namespaces: Sequence[str]) -> S.FarmView | None:
        """The members' online printers as the scheduler's farm view (None when none is known), rebuilt only
        when a printer comes, goes or changes capabilities, so that its per-requirement counts stay cached.
        ``namespaces``: the farm's queues, which a printer with no list of its own serves (as in ``choose``)."""
        printers = tuple(p if p.namespaces else _serving(p, *namespaces)
                         for p in self.printers(nodes, members, online_only=True))
        if not printers:
            return None
        if self._farm is None or self._farm.printers != printers:
            self._farm = S.FarmView(printers)
        return self._farm

    def chooser(self, farm: Callable[[], S.FarmView | None] = lambda: None,
                exclude: Callable[[str], Collection[tuple[str, str, int]]] | None = None) -> Chooser:
        """The arbiter's choice. ``farm`` gives the printers that could take work now: with it the policy keeps
        scarce printers for the work only they can print, leaves shared work to self-clearing printers and pulls
        long copies forward near the end of the queue (docs/scheduling.md); without it those terms are off.
        ``exclude(node)``: copies (namespace, job, copy) not to give that node now (node.arbiter.grant_backoff)."""
        def choose(state: FarmState, node: str, caps: Capabilities, namespaces: Sequence[str],
                   now: float) -> Pick | None:
            printer = printer_view(node, caps, list(namespaces) or state.namespaces(), self.operators(now))
            candidates = self.candidates(state)
            kept = exclude(node) if exclude is not None else ()
            if kept:
                candidates = [c for c in candidates if (c.namespace, c.job_id, c.copy) not in kept]
            choice = S.choose(printer, candidates, now, self.params, farm())
            if choice is None:
                return None
            return Pick(choice.copy.namespace, choice.job_id, choice.copy_index)

        return choose

    @staticmethod
    def printers(nodes: dict[str, dict[str, Any]], members: Iterable[str], online_only: bool) -> list[S.PrinterView]:
        """Views of the members' printers, from their retained node states."""
        out = []
        for node in members:
            st = nodes.get(node)
            if not st or not st.get("capabilities") or st.get("witness"):
                continue
            if online_only and (st.get("state") != "online" or st.get("worker") in ("offline", "error")):
                continue
            caps = Capabilities.model_validate(st["capabilities"], strict=False)
            out.append(printer_view(node, caps, st.get("namespaces") or []))
        return out

    def why_unprintable(self, job: Job, printers: list[S.PrinterView]) -> str | None:
        """Why no printer of ``printers`` can print ``job`` (None if one can, or if none is known)."""
        if not printers:
            return None
        view = copy_view(job, 0, 0)
        # A printer with no namespace list serves every queue.
        printers = [p if p.namespaces else _serving(p, job.namespace) for p in printers]
        return S.why_unprintable(view, printers, consider_loaded=False)


def _serving(p: S.PrinterView, *namespaces: str) -> S.PrinterView:
    return S.PrinterView(node_id=p.node_id, profile=p.profile, namespaces=namespaces, loaded=p.loaded,
                         nozzle_mm=p.nozzle_mm, bed_mm=p.bed_mm, circular_bed=p.circular_bed, aliases=p.aliases,
                         material_types=p.material_types, tags=p.tags, self_clearing=p.self_clearing,
                         allow_swaps=p.allow_swaps, operator=p.operator)

