"""Headroom experiment for the mixed-farm makespan (not a policy the arbiter can run): a one-step look-ahead
("rollout") over the scheduler's choice, in the farm simulator.

At each request (from ``--after`` hours into the run on), the ``--k`` copies that ``choose`` ranks first (of
distinct jobs) are each tried: the simulation is copied, the copy granted, and the run continued with plain
``choose`` to its end. The copy whose continuation ends soonest (ties: the smaller sum of every printer's
last finishing time) is granted. Without ``--clairvoyant`` the continuation knows only the queued work (jobs
still to arrive are left out); with it, it knows every future arrival, which no arbiter does. Because the
simulator is deterministic, the continuation of the plain choice is exactly what plain ``choose`` would do, so
with ``--clairvoyant`` (or once all work has arrived) the look-ahead never ends later than plain ``choose``.

It costs ``k`` whole simulations per request (minutes per run): it measures how far better choices could go,
not something to deploy. ``docs/scheduling.md`` ("Against the targets") reports the figures.

    .venv/bin/python bench/scheduler_lookahead.py --workload mixed --seeds default,16 --k 3 --after 60
"""

from __future__ import annotations

import argparse
import copy as copying
import heapq
import json
import sys
import time
from collections import deque
from dataclasses import replace
from typing import Any

from farmsim.workloads import WORKLOADS

from shared.scheduling import SchedulerParams, choose
from shared.scheduling.bounds import lower_bound
from shared.scheduling.compat import make_filter
from shared.scheduling.model import Choice
from shared.scheduling.sim import _ARRIVE, Workload, _Sim

HOUR = 3600.0


class LookaheadSim(_Sim):
    def __init__(
        self,
        workload: Workload,
        params: SchedulerParams,
        k: int,
        after_s: float,
        clairvoyant: bool,
        per_component: bool = False,
    ) -> None:
        super().__init__(workload, choose, params, use_farm=True)
        self.per_component = per_component
        self.k = k
        self.after = workload.start + after_s
        self.clairvoyant = clairvoyant
        self.lookahead = True
        self.changed = 0
        # Printers linked by work that several of them can print: a choice matters to its own component.
        parent = list(range(len(workload.printers)))
        fits = [(p.ns_rank, make_filter(p, consider_loaded=False)) for p in workload.printers]

        def root(x: int) -> int:
            while parent[x] != x:
                x = parent[x]
            return x

        for copy in workload.copies():
            able = [j for j, (ns, fit) in enumerate(fits) if copy.namespace in ns and fit(copy)]
            for j in able[1:]:
                parent[root(j)] = root(able[0])
        self.component = [
            frozenset(p.node_id for j, p in enumerate(workload.printers) if root(j) == root(i))
            for i in range(len(workload.printers))
        ]

    def request(self, i: int, now: float) -> None:
        if not self.lookahead or now < self.after:
            return super().request(i, now)
        p = self.printers[i]
        view = p.view if tuple(p.loaded) == p.view.loaded else replace(p.view, loaded=tuple(p.loaded))
        p.view = view
        options: list[Choice] = []
        queue = list(self.queue.values())
        while len(options) < self.k:
            choice = choose(view, queue, now, self.params, self.farm)
            if choice is None:
                break
            options.append(choice)
            queue = [c for c in queue if c.job_id != choice.copy.job_id]
        if len(options) > 1:
            scored = [(self.continuation(i, now, o), n) for n, o in enumerate(options)]
            best = options[min(scored)[1]]
            self.changed += best is not options[0]
            self.policy = lambda *_: best
        try:
            super().request(i, now)
        finally:
            self.policy = choose

    def continuation(self, i: int, now: float, choice: Choice) -> tuple[float, ...]:
        """Grant ``choice`` to printer ``i`` in a copy of the simulation, run it to the end with plain
        ``choose``, and return (last print done, sum of the printers' last finishing times)."""
        s = copying.copy(self)
        s.lookahead = False
        s.printers = [copying.copy(p) for p in self.printers]
        for p in s.printers:
            p.loaded = list(p.loaded)
        if self.clairvoyant:
            s.events = list(self.events)
            s.arrivals = {k: list(v) for k, v in self.arrivals.items()}
        else:
            s.events = [e for e in self.events if e[1] != _ARRIVE]
            heapq.heapify(s.events)
            s.arrivals = {}
        s.queue = dict(self.queue)
        s.idle = set(self.idle)
        s.visits = deque(copying.copy(v) for v in self.visits)
        s.grants, s.requests = [], []
        s.policy = lambda *_: choice
        _Sim.request(s, i, now)
        s.policy = choose
        s.advance()
        last: dict[str, float] = {}
        for g in s.grants:
            last[g.node_id] = max(last.get(g.node_id, 0.0), g.finished_s)
        if self.per_component:
            # The component's own end (its last copy finished), then the farm's, then the sum.
            mine = self.component[i]
            return max((t for n, t in last.items() if n in mine), default=0.0), s.last_print_done, sum(
                t for n, t in last.items() if n in mine
            )
        return s.last_print_done, sum(last.values())


def run(job: tuple[str, int | None, int, float, bool, bool]) -> dict[str, Any]:
    name, seed, k, after_h, clairvoyant, per_component = job
    w = WORKLOADS[name]() if seed is None else WORKLOADS[name](seed)
    started = time.perf_counter()
    sim = LookaheadSim(w, SchedulerParams(), k, after_h * HOUR, clairvoyant, per_component)
    sim.run()
    result = sim.result("lookahead")
    bound = lower_bound(w).value_s
    return {
        "seed": "default" if seed is None else seed,
        "makespan_vs_lower_bound": round(result.makespan_s / bound, 3),
        "swaps": result.swaps,
        "changed_choices": sim.changed,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="mixed", choices=sorted(WORKLOADS))
    parser.add_argument("--seeds", default="default", help="comma-separated; 'default' is the workload's own")
    parser.add_argument("--k", type=int, default=3, help="copies tried per request")
    parser.add_argument("--after", type=float, default=0.0, help="look ahead only from this many hours on")
    parser.add_argument("--clairvoyant", action="store_true", help="continuations know future arrivals")
    parser.add_argument(
        "--per-component",
        action="store_true",
        help="judge a continuation by when the asking printer's component (printers sharing work) is done",
    )
    args = parser.parse_args()
    seeds = [None if s == "default" else int(s) for s in args.seeds.split(",")]
    from multiprocessing import Pool

    with Pool(min(2, len(seeds))) as pool:
        rows = pool.map(
            run, [(args.workload, s, args.k, args.after, args.clairvoyant, args.per_component) for s in seeds]
        )
    for row in rows:
        print(row, flush=True)
    print(json.dumps({"bench": "scheduler-lookahead", **vars(args), "runs": rows}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
