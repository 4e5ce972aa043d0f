"""The per-printer worker: ``idle → requesting → fetching → printing → clearing → idle``.

The worker never decides what to print: it asks the arbiter for work, and acts on what the replicated state
says once it is committed. Its one safety rule: the printer is called to start a copy only after this node has
seen the copy's start committed (``printing`` by this node under its grant) and stored in its own SQLite.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.consensus import Consensus
from node.link.base import Link
from node.printers.base import PrinterDriver, PrinterState
from shared import protocol as P
from shared.errors import FileStoreError, NetqError, PrinterError
from shared.models import Capabilities, CopyState, Job, JobCopy, Stamp, WorkerState, job_key
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger(__name__)

POLL_S = 0.1
ProgressCallback = Callable[[int, int | None], None]  # bytes so far, total bytes (None: unknown)
EnsureFile = Callable[[str, list[str], ProgressCallback], Awaitable[Path]]


@dataclass
class Held:
    namespace: str
    job: str
    copy_index: int
    grant: Stamp

    @classmethod
    def of(cls, job: Job, copy: JobCopy) -> Held:
        assert copy.grant is not None
        return cls(job.namespace, job.id, copy.index, copy.grant)

    @property
    def key(self) -> str:
        return job_key(self.namespace, self.job)


class Worker:
    def __init__(
        self,
        settings: Settings,
        consensus: Consensus,
        link: Link,
        printer: PrinterDriver,
        ensure_file: EnsureFile,
        on_state: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.c = consensus
        self.link = link
        self.topics = Topics(settings.farm.base_topic)
        self.printer = printer
        self.ensure_file = ensure_file
        self.on_state = on_state
        self.state = WorkerState.OFFLINE
        self.reason: str | None = None
        self.current: Held | None = None
        self.progress: float | None = None
        self.accept_jobs = settings.worker.accept_jobs
        self.paused = False
        self.capabilities = Capabilities(
            profile=settings.printer.profile, model=settings.printer.model, nozzle_mm=settings.printer.nozzle_mm,
            bed_mm=settings.printer.bed_mm, materials=list(settings.printer.materials),
            tags=list(settings.printer.tags), self_clearing=settings.printer.self_clearing,
        )
        self._wake = asyncio.Event()
        self._bed_cleared = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last_request = -1e9
        self._requested_term = -1
        consensus.listeners.append(self._wake.set)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker-{self.node_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- operator commands -------------------------------------------------------------------------------
    def bed_cleared(self) -> None:
        self._bed_cleared.set()
        self._wake.set()

    def set_accept_jobs(self, accept: bool) -> None:
        self.accept_jobs = accept
        self._wake.set()
        self.on_state()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self._wake.set()
        self.on_state()

    # --- the loop ----------------------------------------------------------------------------------------
    def _set(self, state: WorkerState, reason: str | None = None) -> None:
        if state != self.state or reason != self.reason:
            self.state, self.reason = state, reason
            log.debug("%s worker: %s %s", self.node_id, state.value, reason or "")
            self.on_state()

    async def _wait(self, timeout: float) -> None:
        # asyncio.timeout, not wait_for: in 3.11 wait_for can swallow a cancellation that races with the
        # event being set, and then stop() would wait for this loop forever.
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except NetqError as exc:
                log.warning("%s worker: %s", self.node_id, exc)
                self._set(WorkerState.ERROR, str(exc))
                await self._wait(self.settings.timing.work_retry_s)
            except Exception:
                log.exception("%s worker failed", self.node_id)
                self._set(WorkerState.ERROR, "internal error; see the node's log")
                await self._wait(self.settings.timing.work_retry_s)

    def _mine(self) -> tuple[Job, JobCopy] | None:
        for job in self.c.state.jobs():
            for copy in job.copies:
                if copy.node == self.node_id and copy.state in (CopyState.CLAIMED, CopyState.PRINTING,
                                                                 CopyState.ORPHANED):
                    return job, copy
        return None

    def _committed(self, key: str) -> bool:
        obj = self.c.state.objects.get(key)
        return obj is not None and self.c.is_committed(obj.stamp)

    def _copy(self, held: Held) -> JobCopy | None:
        job = self.c.state.job(held.key)
        if job is None or held.copy_index >= len(job.copies):
            return None
        copy = job.copies[held.copy_index]
        if copy.node != self.node_id or copy.grant != held.grant:
            return None
        return copy

    async def _step(self) -> None:
        status = await self.printer.status()
        if status.state == PrinterState.OFFLINE:
            self._set(WorkerState.OFFLINE, status.reason or "printer unreachable")
            try:
                await self.printer.connect()
            except PrinterError as exc:
                self._set(WorkerState.OFFLINE, str(exc))
            await self._wait(self.settings.timing.work_retry_s)
            return
        mine = self._mine()
        if mine is not None:
            job, copy = mine
            held = Held.of(job, copy)
            if copy.state == CopyState.CLAIMED:
                # No need to wait for the grant's commit: the start we ask for is a later entry of the same
                # log, so its commit implies the grant's. The printer waits for *that* commit.
                await self._take(held, job)
                return
            if copy.state in (CopyState.PRINTING, CopyState.ORPHANED) and self.current is None:
                await self._recover(held, job, status.state, status.file)
                return
            await self._wait(self.settings.timing.work_retry_s)
            return
        await self._idle(status.state)

    async def _idle(self, printer_state: PrinterState) -> None:
        if self.state not in (WorkerState.IDLE, WorkerState.REQUESTING):
            self._requested_term = -1  # back from an error or a pause: ask at once
        self.current = None
        self.progress = None
        if printer_state != PrinterState.READY:
            self._set(WorkerState.ERROR if printer_state == PrinterState.ERROR else WorkerState.PAUSED,
                      f"printer is {printer_state.value}")
            await self._wait(self.settings.timing.work_retry_s)
            return
        if self.paused:
            self._set(WorkerState.PAUSED, "queue work paused on this node")
        elif not self.accept_jobs:
            self._set(WorkerState.IDLE, "not accepting jobs")
        elif not self.c.is_member:
            self._set(WorkerState.IDLE, "waiting to be enrolled in the farm")
        elif self.c.arbiter is None and self.c.leader is None:
            self._set(WorkerState.IDLE, "no arbiter")
        else:
            self._set(WorkerState.REQUESTING)
            now = asyncio.get_running_loop().time()
            # The arbiter keeps our request until it has work for us: ask again only when the arbiter changed,
            # or now and then in case the request was lost.
            term = self.c.term
            if term != self._requested_term or now - self._last_request >= 5 * self.settings.timing.work_retry_s:
                self._last_request = now
                self._requested_term = term
                self._send(P.WorkRequest(node=self.node_id, capabilities=self.capabilities,
                                         namespaces=list(self.settings.worker.namespaces)))
        await self._wait(self.settings.timing.work_retry_s)

    def _send(self, msg: P.Model) -> None:
        self.link.publish(self.topics.to_arbiter, P.encode(msg), qos=1)

    # --- one whole copy ----------------------------------------------------------------------------------
    async def _take(self, held: Held, job: Job) -> None:
        """A committed grant: fetch the files, get the start committed, then print every set."""
        self.current = held
        self._set(WorkerState.FETCHING)
        paths: list[Path] = []
        try:
            for s in job.sets:
                paths.append(await self.ensure_file(s.sha256, list(s.holders), self._fetch_progress))
        except FileStoreError as exc:
            self._send(P.Release(node=self.node_id, namespace=held.namespace, job=held.job,
                                 copy_index=held.copy_index, grant=held.grant, reason=f"file unavailable: {exc}"))
            self.current = None
            self._set(WorkerState.ERROR, f"could not fetch files: {exc}")
            await self._wait(self.settings.timing.work_retry_s)
            return
        if not await self._start_committed(held):
            self.current = None
            return
        self.c.replica.set_meta(local_copy={"key": held.key, "copy": held.copy_index, "set": 0, "run": 0})
        await self._print_all(held, job, paths, start_set=0, start_run=0)

    async def _start_committed(self, held: Held) -> bool:
        """Ask for the start and wait until it is committed; False if the copy is no longer ours."""
        self._set(WorkerState.FETCHING, "waiting for the start to be committed")
        last_ask = -1e9
        loop = asyncio.get_running_loop()
        while True:
            copy = self._copy(held)
            if copy is None or copy.state not in (CopyState.CLAIMED, CopyState.PRINTING):
                log.info("%s: lost %s/%s#%d before it started", self.node_id, held.namespace, held.job,
                         held.copy_index)
                return False
            if copy.state == CopyState.PRINTING and self._committed(held.key):
                return True
            if copy.state == CopyState.CLAIMED and loop.time() - last_ask >= self.settings.timing.work_retry_s:
                last_ask = loop.time()
                self._send(P.StartRequest(node=self.node_id, namespace=held.namespace, job=held.job,
                                          copy_index=held.copy_index, grant=held.grant))
            await self._wait(self.settings.timing.work_retry_s)

    async def _print_all(self, held: Held, job: Job, paths: list[Path], start_set: int, start_run: int,
                         following: bool = False) -> None:
        total = sum(s.count for s in job.sets)
        done = sum(s.count for s in job.sets[:start_set]) + start_run
        for si in range(start_set, len(job.sets)):
            s = job.sets[si]
            for run in range(start_run if si == start_set else 0, s.count):
                name = f"{job.id}-c{held.copy_index}-s{si}-r{run}-{s.file}"
                if not following:
                    self.c.replica.set_meta(local_copy={"key": held.key, "copy": held.copy_index, "set": si,
                                                        "run": run})
                    self._set(WorkerState.PRINTING)
                    await self.printer.start(paths[si], name)
                following = False
                ok, reason = await self._follow(done, total)
                done += 1
                if not ok:
                    await self._finish(held, P.Outcome.REQUEUE, reason)
                    await self._clear_bed()
                    return
                if done < total:
                    await self._clear_bed()
        await self._finish(held, P.Outcome.DONE, None)
        await self._clear_bed()

    async def _follow(self, done: int, total: int) -> tuple[bool, str | None]:
        """Poll the printer until the current print ends; (succeeded, reason)."""
        while True:
            st = await self.printer.status()
            if st.state in (PrinterState.PRINTING, PrinterState.PAUSED):
                self.progress = (done + (st.progress or 0.0)) / total
                self._set(WorkerState.PRINTING if st.state == PrinterState.PRINTING else WorkerState.PAUSED)
                self.on_state()
                await asyncio.sleep(POLL_S)
                continue
            if st.state == PrinterState.READY and st.last_result == "done":
                return True, None
            return False, st.reason or f"print ended: {st.last_result or st.state.value}"

    async def _finish(self, held: Held, outcome: P.Outcome, reason: str | None) -> None:
        """Report the end of the copy until the arbiter has committed it (or the copy is no longer ours)."""
        self.c.replica.set_meta(local_copy=None)
        loop = asyncio.get_running_loop()
        last_sent = -1e9
        while True:
            copy = self._copy(held)
            # Only a committed end counts: our replica may hold an uncommitted entry (our own, as a deposed
            # arbiter) that a new arbiter rolls back to printing, and then _recover would call it failed.
            settled = held.key not in self.c.state.objects or self._committed(held.key)
            if (copy is None or copy.state not in (CopyState.PRINTING, CopyState.ORPHANED)) and settled:
                break
            if loop.time() - last_sent >= self.settings.timing.work_retry_s:
                last_sent = loop.time()
                self._send(P.FinishReport(node=self.node_id, namespace=held.namespace, job=held.job,
                                          copy_index=held.copy_index, grant=held.grant, outcome=outcome,
                                          reason=reason))
            await self._wait(self.settings.timing.work_retry_s)
        self.current = None
        self.progress = None
        self._requested_term = -1  # the arbiter dropped our request when it granted: ask again when idle

    async def _clear_bed(self) -> None:
        p = self.settings.printer
        if p.clear_script:
            self._set(WorkerState.CLEARING, "running the bed clearing script")
            await self.printer.run_gcode(list(p.clear_script))
        elif not p.self_clearing:
            self._set(WorkerState.CLEARING, "waiting for an operator to clear the bed")
            self._bed_cleared.clear()
            await self._bed_cleared.wait()
        self._set(WorkerState.IDLE)

    async def _recover(self, held: Held, job: Job, printer_state: PrinterState, file: str | None) -> None:
        """After a restart: follow a print that is still running, never start it again."""
        self.current = held
        local: dict[str, Any] | None = self.c.replica.get_meta("local_copy")
        si = int(local["set"]) if local and local.get("key") == held.key else 0
        run = int(local["run"]) if local and local.get("key") == held.key else 0
        if printer_state in (PrinterState.PRINTING, PrinterState.PAUSED):
            log.info("%s: following the print of %s/%s#%d that was running before a restart", self.node_id,
                     held.namespace, held.job, held.copy_index)
            paths = [await self.ensure_file(s.sha256, list(s.holders), self._fetch_progress) for s in job.sets]
            await self._print_all(held, job, paths, si, run, following=True)
            return
        # The printer is not printing it and we cannot know whether the interrupted print completed:
        # say so and let an operator decide (job/resolve), rather than risk printing it twice.
        await self._finish(held, P.Outcome.FAILED, "the node restarted during this print and its outcome is "
                                                   "unknown: check the printer, then resolve the copy")

    def _fetch_progress(self, done: int, total: int | None) -> None:
        self.progress = done / total if total else None
        self.on_state()
