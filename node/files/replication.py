"""Keeping every G-code file that a queued job needs on at least two live nodes (when the farm has two).

Files never travel over MQTT: the arbiter only asks a node to fetch a file from its holders (``Replicate``),
and the node answers ``Holding`` once the file is in its store, hash-checked. The arbiter then commits the new
holder into every job that references the file. A job add waits (briefly) for its files to have a second
holder before it is acknowledged, so an acknowledged job does not depend on the one node its file was
uploaded to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shared import protocol as P
from shared.models import FINAL_COPY_STATES, CopyState, Job, job_key

log = logging.getLogger(__name__)

WANTED_HOLDERS = 2
REPLICATE_RETRY_S = 5.0
ADD_WAIT_S = 5.0


@dataclass
class PendingAdd:
    shas: set[str]
    deadline: float
    proceed: Callable[[dict[str, list[str]]], None]  # called with extra holders per sha
    extra: dict[str, list[str]] = field(default_factory=dict)


class FileReplication:
    def __init__(self, services: Any) -> None:
        self.s = services
        self.asked: dict[tuple[str, str], float] = {}  # (sha, node) -> when we asked
        self.pending: list[PendingAdd] = []

    # --- which nodes can hold files ----------------------------------------------------------------------
    def live_nodes(self) -> list[str]:
        states = self.s.nodes()
        members = self.s.c.members
        return sorted(n for n in members if n not in self.s.gone and (
            n == self.s.c.node_id or (states.get(n, {}).get("state") == "online"
                                      and states.get(n, {}).get("files_url"))))

    def _want(self, holders: list[str], live: list[str]) -> int:
        return min(WANTED_HOLDERS, len(live)) - sum(1 for h in holders if h in live)

    def _ask(self, sha: str, holders: list[str], live: list[str], now: float) -> None:
        """Ask enough live non-holders to fetch ``sha`` (each at most every REPLICATE_RETRY_S)."""
        need = self._want(holders, live)
        candidates = [n for n in live if n not in holders]
        # Prefer nodes we have not asked recently; spread by a stable order.
        for node in candidates:
            if need <= 0:
                break
            asked = self.asked.get((sha, node))
            if asked is not None and now - asked < REPLICATE_RETRY_S:
                need -= 1  # in flight
                continue
            self.asked[(sha, node)] = now
            self.s.send_to(node, P.Replicate(sha256=sha, holders=[h for h in holders if h in live] or holders))
            need -= 1

    # --- job adds ----------------------------------------------------------------------------------------
    def before_add(self, job_value: dict[str, Any], now: float, proceed: Callable[[dict[str, list[str]]], None]) -> None:
        """Call ``proceed(extra_holders)`` once every file of the new job has enough holders (or after a wait)."""
        live = self.live_nodes()
        short = {}
        for s in job_value["sets"]:
            if self._want(list(s["holders"]), live) > 0:
                short[s["sha256"]] = list(s["holders"])
        if not short:
            proceed({})
            return
        for sha, holders in short.items():
            self._ask(sha, holders, live, now)
        self.pending.append(PendingAdd(set(short), now + ADD_WAIT_S, proceed))

    def on_holding(self, m: P.Holding, now: float) -> None:
        self.asked.pop((m.sha256, m.node), None)
        for p in list(self.pending):
            if m.sha256 in p.shas:
                p.extra.setdefault(m.sha256, []).append(m.node)
                p.shas.discard(m.sha256)
                if not p.shas:
                    self.pending.remove(p)
                    p.proceed(p.extra)
        self._record_holder(m.sha256, m.node)

    def _record_holder(self, sha: str, node: str) -> None:
        writes = []
        for job in self.s.c.state.jobs():
            if job.done or not any(s.sha256 == sha and node not in s.holders for s in job.sets):
                continue
            sets = [s.model_copy(update={"holders": [*s.holders, node]}) if s.sha256 == sha and node not in s.holders
                    else s for s in job.sets]
            writes.append((job_key(job.namespace, job.id), job.model_copy(update={"sets": sets}).model_dump(mode="json")))
        if writes:
            self.s.commit(writes, [])

    # --- upkeep ------------------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        for p in [p for p in self.pending if now >= p.deadline]:
            self.pending.remove(p)
            log.warning("files %s still have a single holder; queueing anyway", ", ".join(x[:12] for x in p.shas))
            p.proceed(p.extra)
        live = self.live_nodes()
        if len(live) < 2:
            return
        seen: set[str] = set()
        for job in self.s.c.state.jobs():
            if not _needs_files(job):
                continue
            for s in job.sets:
                if s.sha256 in seen:
                    continue
                seen.add(s.sha256)
                if self._want(list(s.holders), live) > 0 and any(h in live for h in s.holders):
                    self._ask(s.sha256, list(s.holders), live, now)


def _needs_files(job: Job) -> bool:
    return any(c.state not in FINAL_COPY_STATES and c.state != CopyState.PRINTING for c in job.copies)
