"""A discrete-event farm simulator that drives a scheduling policy, deterministically.

The simulator plays the arbiter and the printers: a printer with a clear bed asks for work, the policy (the
very :func:`shared.scheduling.policy.choose` the arbiter calls, or a baseline) picks a copy, and the printer
prints the whole copy, every set times its count, before it asks again. Operators swap filament and clear
beds; they take time and work shifts. Nothing here reads a clock or draws a random number: the same workload
gives the same result, event for event.

The model:

* Before each set, every tool whose loaded material does not satisfy the set is swapped, in one operator
  visit of ``swap_s`` per tool; the tool then holds what the set asked for.
* After each print, a self-clearing printer clears itself in ``self_clear_s``; any other printer waits for an
  operator visit of ``clear_s``. A printer asks for its next copy once its bed is clear.
* Operators (``count`` of them) take visits first come, first served, and only start one while on shift; a
  visit started before the end of a shift is finished.
* The simulator checks every grant: the copy must be queued and the printer able to print it, or it raises
  :class:`SimulationError`.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from .compat import compatible
from .model import Choice, CopyView, Material, PrinterView, PrintSet, satisfies
from .operators import ALWAYS, OperatorSchedule
from .params import SchedulerParams
from .policy import FarmView

Policy = Callable[[PrinterView, Sequence[CopyView], float, SchedulerParams, FarmView | None], Choice | None]

MONDAY_0800_UTC = 1_704_096_000.0  # 2024-01-01 08:00 UTC, a Monday: the default start of a run


class SimulationError(Exception):
    """A policy broke a rule the simulator enforces (a copy not queued, or one the printer cannot print)."""


@dataclass(frozen=True, slots=True)
class SimJob:
    """A job of the workload: ``copies`` copies of ``sets``, queued ``arrival_s`` after the start."""

    job_id: str
    namespace: str
    sets: tuple[PrintSet, ...]
    copies: int = 1
    arrival_s: float = 0.0
    priority: int = 0
    rank: int | None = None  # queue position in its namespace; None = appended in order of arrival
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class OperatorModel:
    count: int = 1
    schedule: OperatorSchedule = ALWAYS
    swap_s: float = 10 * 60  # per tool
    clear_s: float = 3 * 60


@dataclass(frozen=True, slots=True)
class Workload:
    """Printers (in their initial state: loaded materials, clear beds), jobs and operators."""

    name: str
    printers: tuple[PrinterView, ...]
    jobs: tuple[SimJob, ...]
    operators: OperatorModel = OperatorModel()
    start: float = MONDAY_0800_UTC
    self_clear_s: float = 2 * 60
    description: str = ""

    def copies(self) -> list[CopyView]:
        """Every copy of the workload, as the arbiter would queue it on arrival."""
        out: list[CopyView] = []
        for seq, job in enumerate(sorted(self.jobs, key=lambda j: (j.arrival_s, j.job_id))):
            rank = seq if job.rank is None else job.rank
            for i in range(job.copies):
                out.append(
                    CopyView(
                        job.job_id,
                        i,
                        job.namespace,
                        job.sets,
                        enqueued_at=self.start + job.arrival_s,
                        rank=rank,
                        priority=job.priority,
                        tags=job.tags,
                    )
                )
        return out


@dataclass(frozen=True, slots=True)
class Grant:
    job_id: str
    copy: int
    node_id: str
    enqueued_s: float  # all times in seconds after the start of the run
    granted_s: float
    finished_s: float
    swaps: int


@dataclass(frozen=True, slots=True)
class Request:
    at_s: float
    node_id: str
    granted: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class PrinterStats:
    """Where one printer's time went (seconds): printing, waiting for an operator while none was on shift,
    waiting while all were busy, and being swapped or cleared by one. The rest of the run it had no work."""

    node_id: str
    printing_s: float
    off_shift_s: float
    contention_s: float
    service_s: float


@dataclass(frozen=True, slots=True)
class SimResult:
    workload: str
    policy: str
    makespan_s: float
    utilisation: float
    swaps: int
    swap_visits: int
    clear_visits: int
    operator_busy_s: float
    wait_off_shift_s: float
    wait_busy_s: float
    mean_wait_s: float
    max_wait_s: float
    unassigned: int
    printers: tuple[PrinterStats, ...] = field(repr=False)
    grants: tuple[Grant, ...] = field(repr=False)
    requests: tuple[Request, ...] = field(repr=False)

    @property
    def interventions(self) -> int:
        return self.swap_visits + self.clear_visits


# Event kinds, in the order they are handled when they fall at the same instant.
_ARRIVE, _PRINT_DONE, _CLEARED, _VISIT_DONE, _SHIFT = range(5)


@dataclass(slots=True)
class _Printer:
    view: PrinterView
    loaded: list[Material | None]
    copy: CopyView | None = None
    set_i: int = 0
    print_i: int = 0
    prepared: int = -1  # the set whose materials have been checked (and swapped if needed)
    busy_s: float = 0.0
    off_shift_s: float = 0.0
    contention_s: float = 0.0
    service_s: float = 0.0
    swaps: int = 0
    granted_at: float = 0.0


@dataclass(slots=True)
class _Visit:
    printer: int
    duration: float
    swap: bool
    asked_at: float


class _Sim:
    def __init__(self, workload: Workload, policy: Policy, params: SchedulerParams, use_farm: bool) -> None:
        self.w = workload
        self.policy = policy
        self.params = params
        self.ops = workload.operators
        self.printers = [_Printer(p, list(p.loaded)) for p in workload.printers]
        self.farm = FarmView(workload.printers) if use_farm else None
        self.events: list[tuple[float, int, int, int]] = []
        self.seq = 0
        self.queue: dict[tuple[str, int], CopyView] = {}
        self.idle: set[int] = set()
        self.visits: deque[_Visit] = deque()
        self.free_ops = self.ops.count
        self.shift_wakeup: float | None = None
        self.grants: list[Grant] = []
        self.requests: list[Request] = []
        self.arrivals: dict[int, list[CopyView]] = {}
        self.last_print_done = workload.start
        self.swap_visits = self.clear_visits = 0
        self.operator_busy = 0.0
        self.wait_off_shift = 0.0  # printer time waiting for an operator: none on shift
        self.wait_busy = 0.0  # ... operators on shift, all busy

    def push(self, at: float, kind: int, arg: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, kind, self.seq, arg))

    def run(self) -> None:
        by_time: dict[float, list[CopyView]] = {}
        for copy in self.w.copies():
            by_time.setdefault(copy.enqueued_at, []).append(copy)
        for i, (at, copies) in enumerate(sorted(by_time.items())):
            self.arrivals[i] = copies
            self.push(at, _ARRIVE, i)
        for i in range(len(self.printers)):
            self.idle.add(i)
        self.advance()

    def advance(self) -> None:
        """Handle events until none is left (the run's end)."""
        while self.events:
            now, kind, _, arg = heapq.heappop(self.events)
            if kind == _ARRIVE:
                for copy in self.arrivals.pop(arg):
                    self.queue[copy.key] = copy
                for i in sorted(self.idle):
                    if not self.queue:
                        break
                    self.request(i, now)
            elif kind == _PRINT_DONE:
                self.print_done(arg, now)
            elif kind == _CLEARED:
                self.next_step(arg, now)
            elif kind == _VISIT_DONE:
                self.free_ops += 1
                self.next_step(arg, now)
                self.dispatch(now)
            else:
                self.shift_wakeup = None
                self.dispatch(now)

    # -- the arbiter's part -------------------------------------------------------------------------------

    def request(self, i: int, now: float) -> None:
        p = self.printers[i]
        view = p.view if tuple(p.loaded) == p.view.loaded else replace(p.view, loaded=tuple(p.loaded))
        p.view = view
        choice = self.policy(view, list(self.queue.values()), now, self.params, self.farm)
        if choice is None:
            self.idle.add(i)
            self.requests.append(Request(now - self.w.start, view.node_id, None))
            return
        copy = choice.copy
        if self.queue.get(copy.key) is not copy:
            raise SimulationError(f"{view.node_id} was granted {copy.key}, which is not queued")
        ok, why = compatible(view, copy)
        if not ok:
            raise SimulationError(f"{view.node_id} was granted {copy.key}, which it cannot print: {why}")
        del self.queue[copy.key]
        self.idle.discard(i)
        self.requests.append(Request(now - self.w.start, view.node_id, copy.key))
        p.copy, p.set_i, p.print_i, p.prepared, p.swaps, p.granted_at = copy, 0, 0, -1, 0, now
        self.next_step(i, now)

    # -- the printer's part -------------------------------------------------------------------------------

    def next_step(self, i: int, now: float) -> None:
        p = self.printers[i]
        copy = p.copy
        assert copy is not None
        if p.set_i == len(copy.sets):
            start = self.w.start
            self.grants.append(
                Grant(
                    copy.job_id,
                    copy.copy,
                    p.view.node_id,
                    copy.enqueued_at - start,
                    p.granted_at - start,
                    now - start,
                    p.swaps,
                )
            )
            p.copy = None
            self.request(i, now)
            return
        pset = copy.sets[p.set_i]
        if p.prepared != p.set_i:
            p.prepared = p.set_i
            swaps = 0
            for tool, need in enumerate(pset.materials):
                if need is None or need.key == (None, None):
                    continue
                have = p.loaded[tool]
                if not satisfies(have.key if have is not None else None, need.key):
                    p.loaded[tool] = need
                    swaps += 1
            if swaps:
                p.swaps += swaps
                self.call_operator(i, now, swaps * self.ops.swap_s, swap=True)
                return  # the set starts when the visit is done
        p.busy_s += pset.duration_s
        self.push(now + pset.duration_s, _PRINT_DONE, i)

    def print_done(self, i: int, now: float) -> None:
        p = self.printers[i]
        assert p.copy is not None
        self.last_print_done = max(self.last_print_done, now)
        p.print_i += 1
        if p.print_i == p.copy.sets[p.set_i].count:
            p.set_i += 1
            p.print_i = 0
        if p.view.self_clearing:
            self.push(now + self.w.self_clear_s, _CLEARED, i)
        else:
            self.call_operator(i, now, self.ops.clear_s, swap=False)

    # -- the operators' part ------------------------------------------------------------------------------

    def call_operator(self, i: int, now: float, duration: float, *, swap: bool) -> None:
        self.visits.append(_Visit(i, duration, swap, now))
        self.dispatch(now)

    def dispatch(self, now: float) -> None:
        schedule = self.ops.schedule
        while self.visits and self.free_ops > 0 and schedule.available(now):
            visit = self.visits.popleft()
            off = sum(b - a for a, b in schedule.gaps(visit.asked_at, now))
            self.wait_off_shift += off
            self.wait_busy += now - visit.asked_at - off
            printer = self.printers[visit.printer]
            printer.off_shift_s += off
            printer.contention_s += now - visit.asked_at - off
            printer.service_s += visit.duration
            self.free_ops -= 1
            self.operator_busy += visit.duration
            if visit.swap:
                self.swap_visits += 1
            else:
                self.clear_visits += 1
            self.push(now + visit.duration, _VISIT_DONE, visit.printer)
        if self.visits and self.free_ops > 0 and self.shift_wakeup is None:
            resume = schedule.next_available(now)
            if resume != float("inf"):
                self.shift_wakeup = resume
                self.push(resume, _SHIFT, -1)

    def result(self, policy_name: str) -> SimResult:
        start = self.w.start
        makespan = self.last_print_done - start
        busy = sum(p.busy_s for p in self.printers)
        waits = [g.granted_s - g.enqueued_s for g in self.grants]
        return SimResult(
            workload=self.w.name,
            policy=policy_name,
            makespan_s=makespan,
            utilisation=busy / (len(self.printers) * makespan) if makespan > 0 else 0.0,
            swaps=sum(g.swaps for g in self.grants),
            swap_visits=self.swap_visits,
            clear_visits=self.clear_visits,
            operator_busy_s=self.operator_busy,
            wait_off_shift_s=self.wait_off_shift,
            wait_busy_s=self.wait_busy,
            mean_wait_s=sum(waits) / len(waits) if waits else 0.0,
            max_wait_s=max(waits, default=0.0),
            unassigned=len(self.queue),
            printers=tuple(
                PrinterStats(p.view.node_id, p.busy_s, p.off_shift_s, p.contention_s, p.service_s)
                for p in self.printers
            ),
            grants=tuple(self.grants),
            requests=tuple(self.requests),
        )


def simulate(
    workload: Workload,
    policy: Policy,
    params: SchedulerParams | None = None,
    *,
    name: str | None = None,
    use_farm: bool = True,
) -> SimResult:
    """Run ``workload`` to the end under ``policy`` and report what happened.

    ``use_farm`` passes the farm's printers to the policy (see :class:`shared.scheduling.policy.FarmView`).
    """
    sim = _Sim(workload, policy, params or SchedulerParams(), use_farm)
    sim.run()
    return sim.result(name or str(getattr(policy, "__name__", "policy")))
