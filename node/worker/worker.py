"""The per-printer worker: ``idle → requesting → fetching → printing → clearing → idle``.

The worker never decides what to print: it asks the arbiter for work, and acts on what the replicated state
says once it is committed. Its one safety rule: the printer is called to start a copy only after this node has
seen the copy's start committed (``printing`` by this node under its grant) and stored in its own SQLite.

The rest of the cycle, on a real printer:

* **A whole copy on one printer**: every set times its count, in order, each print named
  ``<job>-c<copy>-s<set>-r<run>-<file>`` (:func:`print_name`), so that the printer itself says what it prints.
* **Between prints** the bed is cooled (``printer.cooldown_bed_c``: until the reported bed temperature is at
  most that) and cleared: by ``printer.clear_script``, or by an operator's ``node/bed_cleared``
  (``netq bed-cleared NODE``) unless the printer is ``self_clearing``. A bed left dirty by a restart is
  cleared before anything else (``bed_dirty`` in the replica's metadata).
* **Failure policy**: a print that fails, is cancelled on the printer, is lost while the printer is gone, or
  cannot be started ends the copy with ``requeue`` and the reason; the arbiter puts it back in the queue until
  it has been started ``farm.max_attempts`` times, then marks it failed with that reason. A copy whose files
  cannot be fetched (tried :data:`FETCH_TRIES` times) is given back with the reason, and the arbiter keeps it
  from this node for a while (node/arbiter/grant_backoff.py); one already started ends with ``requeue``.
* **awaiting_material**: the scheduler may give a copy whose materials are not loaded (an operator swaps them).
  The worker gets the start committed first (so no lease takes the copy during a swap of many minutes, and no
  other printer gets it), then, before each set whose per-tool materials the loaded ones do not satisfy, waits
  in ``awaiting_material`` with what to load; the operator's ``node/material`` report is the go-ahead. A node
  that declares no loaded materials does not track them and never waits.
* **Printer gone** (OctoPrint down, printer disconnected): the worker is ``offline`` with the reason in its
  retained node state, reconnects with a delay doubling from ``timing.work_retry_s`` to
  ``printer.reconnect_max_s``, gives back a copy granted but not started, and asks for no work (the arbiter
  also skips the stale request of a node that says offline). A print in progress is followed again when the
  printer answers; if the printer no longer prints it, it was lost (requeue).
* **Restart**: where the node is in its copy is kept durably before every step (``local_copy``: set, run and
  phase ``ready`` / ``printing`` / ``ok`` / ``failed``). A print the printer still runs is followed to its end
  (its set and run read from the name the printer reports); a run the printer was never called for is
  started; a run that was called and is no longer printing has an unknown outcome and is reported failed for
  an operator to resolve — never started twice. The whole decision is one table, in node/worker/recovery.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, assert_never

from pydantic import Field

from node.consensus.consensus import Consensus
from node.consensus.meta import MetaRecord, Slot
from node.files.analysis import refusal_before_print
from node.link.base import Link
from node.tasks import cancel_and_wait
from node.worker import recovery
from node.worker.printers.base import PrinterDriver, PrinterState
from shared import claims
from shared import protocol as P
from shared.errors import FileStoreError, NetqError, PrinterError
from shared.models import Capabilities, CopyState, Job, JobCopy, Material, Model, Stamp, WorkerState, job_key
from shared.scheduling.model import Material as MatchMaterial
from shared.scheduling.model import satisfies
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger(__name__)

POLL_S = 0.1
FETCH_TRIES = 3  # tries to fetch a copy's files before it goes back to the queue
ENDED_KEPT = 256  # copies whose end this node reported, remembered (replica meta ``ended``) newest last
ProgressCallback = Callable[[int, int | None], None]  # bytes so far, total bytes (None: unknown)
EnsureFile = Callable[[str, list[str], ProgressCallback], Awaitable[Path]]


class EndedCopy(MetaRecord):
    """A copy whose end this node reported, under its grant (replica meta ``ended``): never printed again."""

    key: str  # the job's object key
    copy_index: Annotated[int, Field(alias="copy")]
    grant: Stamp
    outcome: P.Outcome
    reason: str | None = None


# The worker's rows of the replica's metadata (node/consensus/meta.py); only the worker writes them.
LOCAL_COPY: Slot[recovery.LocalCopy | None] = Slot("local_copy", recovery.LocalCopy | None, None)  # None: none
ENDED: Slot[tuple[EndedCopy, ...]] = Slot("ended", tuple[EndedCopy, ...], ())  # at most ENDED_KEPT, newest last
BED_DIRTY: Slot[bool] = Slot("bed_dirty", bool, False)  # a print ended and its bed was not cleared yet


def print_name(job_id: str, copy_index: int, set_index: int, run: int, file: str) -> str:
    """The name a print is started under: it says which job copy, set and run the printer is printing."""
    return f"{job_id}-c{copy_index}-s{set_index}-r{run}-{file}"


def parse_print_name(job_id: str, copy_index: int, reported: str | None) -> tuple[int, int] | None:
    """``(set, run)`` if the printer's file name ``reported`` is a print of this job copy, else None.

    Only the prefix is read: OctoPrint may change the rest (a ``.gcode`` suffix, sanitised characters), and
    after a restart of the node its driver knows only the name OctoPrint reports.
    """
    if not reported:
        return None
    base = reported.replace("\\", "/").rsplit("/", 1)[-1]
    m = re.match(re.escape(job_id) + r"-c(\d+)-s(\d+)-r(\d+)-", base)
    if m is None or int(m.group(1)) != copy_index:
        return None
    return int(m.group(2)), int(m.group(3))


def missing_materials(loaded: list[Material | None], needed: list[Material | None]) -> list[str]:
    """What an operator must load before a set can print: one text per tool, empty when nothing is missing.

    A node that declares no loaded materials at all (``printer.materials`` empty) does not track them: nothing
    is ever missing there.
    """
    if not loaded:
        return []
    out = []
    for tool, need in enumerate(needed):
        if need is None:
            continue
        have = loaded[tool] if tool < len(loaded) else None
        if not satisfies(None if have is None else MatchMaterial(have.type, have.color).key,
                         MatchMaterial(need.type, need.color).key):
            out.append(f"tool {tool}: {need} (loaded: {have or 'unknown'})")
    return out


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
        self._wake = asyncio.Event()
        self._capabilities = Capabilities(
            profile=settings.printer.profile, model=settings.printer.model, nozzle_mm=settings.printer.nozzle_mm,
            bed_mm=settings.printer.bed_mm, materials=list(settings.printer.materials),
            tags=list(settings.printer.tags), self_clearing=settings.printer.self_clearing,
        )
        self._bed_cleared = asyncio.Event()
        self._backoff: float | None = None  # current reconnect delay while the printer is offline
        self._next_connect = 0.0
        self._released: Stamp | None = None  # grant released because the printer is offline
        self._gave_back: Stamp | None = None  # grant given back because its files could not be fetched
        self._fetch_warned: OrderedDict[tuple[str, int], None] = OrderedDict()  # copies whose failure was said
        self._bed_dirty = consensus.replica.read(BED_DIRTY)
        # The ends this node reported, by (job key, copy, grant): never printed again (see _report_again).
        self._ended_list = consensus.replica.read(ENDED)
        self._task: asyncio.Task[None] | None = None
        self._last_request = -1e9
        self._requested_key: tuple[int, str | None, bool] | None = None
        consensus.listeners.append(self._wake.set)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"worker-{self.node_id}")

    async def stop(self) -> None:
        await cancel_and_wait([self._task])
        self._task = None

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @capabilities.setter
    def capabilities(self, caps: Capabilities) -> None:
        # An operator's material change (node/material) may be what a worker awaiting material waits for.
        self._capabilities = caps
        self._wake.set()

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
                self.current = None  # the next step finds a held copy again, and _recover decides
                await self._wait(self.settings.timing.work_retry_s)
            except Exception:
                log.exception("%s worker failed", self.node_id)
                self._set(WorkerState.ERROR, "internal error; see the node's log")
                self.current = None
                await self._wait(self.settings.timing.work_retry_s)

    def _mine(self) -> tuple[Job, JobCopy] | None:
        held = claims.holding(self.c.state, self.node_id)
        return held[0] if held else None

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
            reason = status.reason or "printer unreachable"
            if self.state != WorkerState.OFFLINE or self.reason is None:
                self._set(WorkerState.OFFLINE, reason)
            self._release_offline(reason)
            await self._reconnect()
            return
        mine = self._mine()
        if mine is not None:
            job, copy = mine
            held = Held.of(job, copy)
            ended = self._ended(held) if self.current is None else None
            if ended is not None:
                await self._report_again(held, copy, ended)
                return
            if copy.state == CopyState.CLAIMED and copy.grant == self._gave_back:
                await self._wait(self.settings.timing.work_retry_s)  # given back: until its release commits
                return
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

    def _release_offline(self, reason: str) -> None:
        """A copy granted (not started) while the printer is gone goes back to the queue, once per grant."""
        mine = self._mine()
        if mine is None or mine[1].state != CopyState.CLAIMED or mine[1].grant == self._released:
            return
        job, copy = mine
        assert copy.grant is not None
        self._released = copy.grant
        self._send(P.Release(node=self.node_id, namespace=job.namespace, job=job.id, copy_index=copy.index,
                             grant=copy.grant, reason=f"printer of {self.node_id} is offline: {reason}"))

    async def _reconnect(self) -> None:
        """Try to reconnect the printer, with a delay doubling from work_retry_s to printer.reconnect_max_s."""
        loop = asyncio.get_running_loop()
        retry = self.settings.timing.work_retry_s
        if loop.time() >= self._next_connect:
            try:
                await self.printer.connect()
                self._backoff, self._next_connect = None, 0.0
                return
            except PrinterError as exc:
                self._set(WorkerState.OFFLINE, str(exc))
            self._backoff = retry if self._backoff is None else min(2 * self._backoff,
                                                                     self.settings.printer.reconnect_max_s)
            self._next_connect = loop.time() + self._backoff
        await self._wait(max(0.05, min(self._next_connect - loop.time(), retry)))

    async def _idle(self, printer_state: PrinterState) -> None:
        if self.state not in (WorkerState.IDLE, WorkerState.REQUESTING):
            self._requested_key = None  # back from an error or a pause: ask at once
        self.current = None
        self.progress = None
        self._backoff, self._next_connect = None, 0.0
        if printer_state != PrinterState.READY:
            self._set(WorkerState.ERROR if printer_state == PrinterState.ERROR else WorkerState.PAUSED,
                      f"printer is {printer_state.value}")
            await self._wait(self.settings.timing.work_retry_s)
            return
        if self._bed_dirty:  # a print ended before a restart and its bed was never cleared
            await self._clear_bed()
            return
        if self.paused:
            self._set(WorkerState.PAUSED, "queue work paused on this node")
        elif not self.accept_jobs:
            self._set(WorkerState.IDLE, "not accepting jobs")
        elif self.node_id in self.c.state.retired():
            self._set(WorkerState.IDLE, "retired from the farm (netq node retire): stop this node")
        elif not self.c.is_member:
            self._set(WorkerState.IDLE, "waiting to be enrolled in the farm")
        elif self.c.arbiter is None and self.c.leader is None:
            self._set(WorkerState.IDLE, "no arbiter")
        else:
            if self.state != WorkerState.REQUESTING:
                self._set(WorkerState.REQUESTING)
                # Let our new state go out before the request: the arbiter drops requests of nodes whose
                # retained state says offline, paused or in error.
                await asyncio.sleep(0)
            now = asyncio.get_running_loop().time()
            # The arbiter keeps our request until it has work for us: ask again only when the arbiter changed,
            # or now and then in case the request was lost.
            key = self.c.arbiter_key
            if key != self._requested_key or now - self._last_request >= 5 * self.settings.timing.work_retry_s:
                self._last_request = now
                self._requested_key = key
                self._send(P.WorkRequest(node=self.node_id, capabilities=self.capabilities,
                                         namespaces=list(self.settings.worker.namespaces), start_now=True))
        await self._wait(self.settings.timing.work_retry_s)

    def _send(self, msg: Model) -> None:
        self.c.send_to_arbiter(msg)

    # --- one whole copy ----------------------------------------------------------------------------------
    async def _take(self, held: Held, job: Job) -> None:
        """A committed grant: fetch the files, get the start committed, then print every set."""
        self.current = held
        self._set(WorkerState.FETCHING)
        paths = await self._fetch_files(held, job)
        if paths is None:
            self.current = None
            return
        if not await self._start_committed(held):
            self.current = None
            return
        await self._print_all(held, job, paths, start_set=0, start_run=0)

    async def _fetch_files(self, held: Held, job: Job) -> list[Path] | None:
        """The local paths of the copy's files, fetched from their holders if need be.

        A file that cannot be fetched is tried :data:`FETCH_TRIES` times, with a pause doubling from
        ``timing.work_retry_s`` (each at most a quarter of the lease, so that the grant does not expire
        meanwhile); then the copy goes back to the queue with the reason: a granted copy is given back, and
        the arbiter keeps it from this node for a while (node/arbiter/grant_backoff.py); a started one (the printer
        not called for what is left) ends with requeue, so it fails after ``farm.max_attempts``. None when
        the copy went back, or was lost meanwhile."""
        loop = asyncio.get_running_loop()
        timing = self.settings.timing
        now = self._copy(held)
        state = now.state if now is not None else CopyState.CLAIMED
        name = error = ""
        for attempt in range(1, FETCH_TRIES + 1):
            paths: list[Path] = []
            try:
                for s in job.sets:
                    name = f"{s.file} ({s.sha256[:12]})"
                    paths.append(await self.ensure_file(s.sha256, list(s.holders), self._fetch_progress))
                return paths
            except FileStoreError as exc:
                error = str(exc)[:300]
            self._say_once(held, f"{self.node_id}: {held.job}#{held.copy_index}: could not fetch {name} "
                                 f"(try {attempt} of {FETCH_TRIES}): {error}")
            if attempt == FETCH_TRIES:
                break
            self._set(WorkerState.FETCHING, f"could not fetch {name}: {error}; trying again")
            until = loop.time() + min(timing.work_retry_s * 2 ** (attempt - 1), timing.lease_s / 4)
            while (left := until - loop.time()) > 0:
                await self._wait(left)
                copy = self._copy(held)
                if copy is None or copy.state != state:
                    return None  # released, removed or taken meanwhile: nothing to give back
        reason = f"{self.node_id} could not fetch {name} in {FETCH_TRIES} tries: {error}"
        if state != CopyState.CLAIMED:
            # Started (the arbiter granted and started it at once, or a restart found it started) and the
            # printer not called for what is left: it ends with requeue, and after farm.max_attempts it fails.
            await self._finish(held, P.Outcome.REQUEUE, reason)
            return None
        self._gave_back = held.grant
        self._send(P.Release(node=self.node_id, namespace=held.namespace, job=held.job,
                             copy_index=held.copy_index, grant=held.grant, reason=reason))
        self._requested_key = None  # the arbiter dropped our request when it granted: ask again
        self._set(WorkerState.IDLE, f"gave back {held.job}#{held.copy_index}: {reason}")
        return None

    def _say_once(self, held: Held, text: str) -> None:
        """A fetch failure is the holders' doing (gone, or never had the file): said once per copy at warning
        level, then at debug level, so that a copy nobody can fetch does not flood the log."""
        key = (held.key, held.copy_index)
        if key in self._fetch_warned:
            log.debug("%s", text)
            return
        self._fetch_warned[key] = None
        while len(self._fetch_warned) > ENDED_KEPT:
            self._fetch_warned.popitem(last=False)
        log.warning("%s (further failures of this copy are logged at debug level)", text)

    async def _start_committed(self, held: Held) -> bool:
        """Ask for the start and wait until it is committed; False if the copy is no longer ours."""
        self._set(WorkerState.FETCHING, "waiting for the start to be committed")
        last_ask = -1e9
        asked_of = self.c.arbiter_key
        loop = asyncio.get_running_loop()
        while True:
            copy = self._copy(held)
            if copy is None or copy.state not in (CopyState.CLAIMED, CopyState.PRINTING):
                log.info("%s: lost %s/%s#%d before it started", self.node_id, held.namespace, held.job,
                         held.copy_index)
                return False
            if copy.state == CopyState.PRINTING and self._committed(held.key):
                return True
            if copy.state == CopyState.CLAIMED and (loop.time() - last_ask >= self.settings.timing.work_retry_s
                                                    or self.c.arbiter_key != asked_of):
                last_ask, asked_of = loop.time(), self.c.arbiter_key
                self._send(P.StartRequest(node=self.node_id, namespace=held.namespace, job=held.job,
                                          copy_index=held.copy_index, grant=held.grant))
            await self._wait(self.settings.timing.work_retry_s)

    def _save_local(self, held: Held, si: int, run: int, phase: str, reason: str | None = None) -> None:
        """Where this node is in its copy, durably, before each step that a restart must not repeat.

        ``phase``: ``ready`` (the printer was not called for this run yet), ``printing`` (it may have been),
        ``ok`` / ``failed`` (the run ended so).
        """
        self.c.replica.write(LOCAL_COPY.of(recovery.LocalCopy(
            key=held.key, copy_index=held.copy_index, grant=held.grant, set_index=si, run=run, phase=phase,
            reason=reason)))

    def _mark_bed(self, dirty: bool) -> None:
        self._bed_dirty = dirty
        self.c.replica.write(BED_DIRTY.of(dirty))

    async def _print_all(self, held: Held, job: Job, paths: list[Path], start_set: int, start_run: int,
                         following: bool = False) -> None:
        """Print every remaining run of the copy, one after the other, clearing the bed between them."""
        total = sum(s.count for s in job.sets)
        done = sum(s.count for s in job.sets[:start_set]) + start_run
        for si in range(start_set, len(job.sets)):
            s = job.sets[si]
            for run in range(start_run if si == start_set else 0, s.count):
                name = print_name(job.id, held.copy_index, si, run, s.file)
                if not following:
                    if self._bed_dirty:
                        await self._clear_bed(idle_after=False)
                    # No "ready" record here: the last one (none for this copy, or the previous run's "ok") says
                    # the same to a restart, and one write less stands between a committed start and the print.
                    if not await self._await_material(held, job, si):
                        return
                    if not await self._start_print(held, paths[si], name, si, run):
                        return
                following = False
                ok, reason = await self._follow(held, si, run, done, total)
                done += 1
                self._mark_bed(True)
                self._save_local(held, si, run, "ok" if ok else "failed", reason)
                if not ok:
                    await self._finish(held, P.Outcome.REQUEUE, reason)
                    await self._clear_bed()
                    return
        await self._finish(held, P.Outcome.DONE, None)
        await self._clear_bed()

    async def _start_print(self, held: Held, path: Path, name: str, si: int, run: int) -> bool:
        """Call the printer; True once it prints ``name``. A start that fails before printing is a failed run."""
        if (refused := await refusal_before_print(path, self.settings)) is not None:
            # The G-code policy once more, under this printer's caps, whatever path the file came by: the
            # printer is never called, and the copy goes back to the queue with the reason.
            log.warning("%s: not printing %s: %s", self.node_id, name, refused)
            self._save_local(held, si, run, "failed", refused)
            await self._finish(held, P.Outcome.REQUEUE, refused)
            return False
        self._save_local(held, si, run, "printing")
        self._set(WorkerState.PRINTING)
        try:
            await self.printer.start(path, name)
            return True
        except PrinterError as exc:
            st = await self.printer.status()
            if st.state in (PrinterState.PRINTING, PrinterState.PAUSED) and \
                    parse_print_name(held.job, held.copy_index, st.file) == (si, run):
                log.warning("%s: start of %s reported %s, but the printer prints it", self.node_id, name, exc)
                return True
            if st.state == PrinterState.OFFLINE:
                # Not started, and the printer is gone: the copy waits for it (a started copy stays ours).
                self._save_local(held, si, run, "ready")
                raise
            reason = f"could not start {name}: {exc}"
            self._save_local(held, si, run, "failed", reason)
            await self._finish(held, P.Outcome.REQUEUE, reason)
            return False

    async def _await_material(self, held: Held, job: Job, si: int) -> bool:
        """Wait until the loaded materials can print set ``si``; False if the copy is no longer ours.

        The copy's start is already committed, so no lease takes it away while an operator swaps filament:
        the worker shows ``awaiting_material`` with what to load, and goes on once the node's loaded
        materials (the ``node/material`` command) satisfy the set.
        """
        s = job.sets[si]
        while True:
            missing = missing_materials(list(self.capabilities.materials), list(s.materials))
            if not missing:
                return True
            copy = self._copy(held)
            if copy is None or copy.state not in (CopyState.PRINTING, CopyState.ORPHANED):
                log.info("%s: %s/%s#%d was settled elsewhere while awaiting material", self.node_id,
                         held.namespace, held.job, held.copy_index)
                self.current = None
                return False
            self._set(WorkerState.AWAITING_MATERIAL,
                      f"{s.file} needs {'; '.join(missing)}: load it, then tell the node (node/material)")
            await self._wait(self.settings.timing.work_retry_s)

    async def _follow(self, held: Held, si: int, run: int, done: int, total: int) -> tuple[bool, str | None]:
        """Poll the printer until the print ``name`` ends; (succeeded, reason).

        The printer going offline does not end the print: the node reports itself offline, reconnects with
        backoff, and reads how the print ended once the printer answers again.
        """
        s = self.c.state.job(held.key)
        name = print_name(held.job, held.copy_index, si, run, s.sets[si].file if s else "?")
        lost: str | None = None
        while True:
            st = await self.printer.status()
            if st.state in (PrinterState.PRINTING, PrinterState.PAUSED):
                lost = None
                self.progress = (done + (st.progress or 0.0)) / total
                self._set(WorkerState.PRINTING if st.state == PrinterState.PRINTING else WorkerState.PAUSED)
                self.on_state()
                await asyncio.sleep(POLL_S)
                continue
            if st.state == PrinterState.OFFLINE:
                lost = st.reason or "printer unreachable"
                if self.state != WorkerState.OFFLINE:
                    self._set(WorkerState.OFFLINE, f"{lost} (while printing {name})")
                await self._reconnect()
                continue
            self._backoff, self._next_connect = None, 0.0
            ours = st.last_file is None or st.last_file == name or parse_print_name(
                held.job, held.copy_index, st.last_file) == (si, run)
            if st.state == PrinterState.READY and st.last_result == "done" and ours:
                return True, None
            if lost is not None:
                return False, f"print {name} was lost while the printer was unreachable ({lost})"
            if st.last_result == "cancelled":
                return False, f"print {name} was cancelled on the printer"
            if st.state == PrinterState.ERROR:
                return False, f"print {name} failed: {st.reason or 'printer error'}"
            return False, f"print {name} ended: {st.reason or st.last_result or st.state.value}"

    def _ended(self, held: Held) -> EndedCopy | None:
        """Our own report of how this copy ended under this grant, if we made one."""
        for e in self._ended_list:
            if e.key == held.key and e.copy_index == held.copy_index and e.grant == held.grant:
                return e
        return None

    async def _report_again(self, held: Held, copy: JobCopy, ended: EndedCopy) -> None:
        """The farm holds a copy of ours as not yet ended under a grant whose end we already reported.

        In safety mode ``available`` the merge of two sides can bring back an older value of a copy (one side
        never saw the end). Printing it again would print it twice on this printer; the outcome is known:
        report it again. (A claimed copy first gets its start committed: only a started copy can end.)"""
        outcome = ended.outcome
        log.warning("%s: %s#%d is %s again under grant %s, whose end (%s) we reported: reporting it again, "
                    "not printing it twice", self.node_id, held.job, held.copy_index, copy.state.value,
                    held.grant, outcome.value)
        self.current = held
        if copy.state == CopyState.CLAIMED and not await self._start_committed(held):
            self.current = None
            return
        await self._finish(held, outcome, ended.reason)

    async def _finish(self, held: Held, outcome: P.Outcome, reason: str | None) -> None:
        """Report the end of the copy until the arbiter has committed it (or the copy is no longer ours)."""
        # Remember the outcome until its commit is seen: a restart in between reports it again, and never
        # mistakes the copy for one whose printer was never called.
        self._save_local(held, -1, -1, f"finishing:{outcome.value}", reason)
        if self._ended(held) is None:  # and for good: see _report_again
            self._ended_list = (*self._ended_list[-(ENDED_KEPT - 1):], EndedCopy(
                key=held.key, copy_index=held.copy_index, grant=held.grant, outcome=outcome, reason=reason))
            self.c.replica.write(ENDED.of(self._ended_list))
        loop = asyncio.get_running_loop()
        last_sent = -1e9
        last_key = self.c.arbiter_key
        while True:
            copy = self._copy(held)
            # Only a committed end counts: our replica may hold an uncommitted entry (our own, as a deposed
            # arbiter) that a new arbiter rolls back to printing, and then _recover would call it failed.
            settled = held.key not in self.c.state.objects or self._committed(held.key)
            if (copy is None or copy.state not in (CopyState.PRINTING, CopyState.ORPHANED)) and settled:
                break
            if loop.time() - last_sent >= self.settings.timing.work_retry_s or self.c.arbiter_key != last_key:
                # Resent now and then, and at once to a new arbiter, or one that starts serving (it may never
                # have seen it, or ignored it before serving).
                last_sent, last_key = loop.time(), self.c.arbiter_key
                self._send(P.FinishReport(node=self.node_id, namespace=held.namespace, job=held.job,
                                          copy_index=held.copy_index, grant=held.grant, outcome=outcome,
                                          reason=reason))
            await self._wait(self.settings.timing.work_retry_s)
        self.c.replica.write(LOCAL_COPY.of(None))
        self.current = None
        self.progress = None
        self._requested_key = None  # the arbiter dropped our request when it granted: ask again when idle

    async def _clear_bed(self, idle_after: bool = True) -> None:
        """Cool down (printer.cooldown_bed_c), then clear the bed by script or wait for an operator."""
        p = self.settings.printer
        self._bed_cleared.clear()  # a confirmation given from here on (even while cooling) counts
        if p.cooldown_bed_c is not None:
            await self._cool_down(p.cooldown_bed_c)
        if p.clear_script:
            self._set(WorkerState.CLEARING, "running the bed clearing script")
            await self.printer.run_gcode(list(p.clear_script))
        elif not p.self_clearing:
            self._set(WorkerState.CLEARING, "waiting for an operator to clear the bed (`netq bed-cleared`)")
            await self._bed_cleared.wait()
        self._mark_bed(False)
        if idle_after:
            self._set(WorkerState.IDLE)

    async def _cool_down(self, limit: float) -> None:
        while True:
            st = await self.printer.status()
            if st.state == PrinterState.OFFLINE:
                self._set(WorkerState.OFFLINE, f"{st.reason or 'printer unreachable'} (cooling the bed)")
                await self._reconnect()
                continue
            if st.bed_temp is None:
                log.warning("%s: the printer reports no bed temperature: not waiting for it to cool to %g °C",
                            self.node_id, limit)
                return
            if st.bed_temp <= limit:
                return
            self._set(WorkerState.CLEARING, f"cooling the bed to {limit:g} °C (now {st.bed_temp:.0f} °C)")
            await asyncio.sleep(min(1.0, self.settings.timing.work_retry_s))

    async def _recover(self, held: Held, job: Job, printer_state: PrinterState, file: str | None) -> None:
        """After a restart: follow a print that is still running, never start one that may have run.

        The table in node/worker/recovery.py decides; this gathers its inputs and carries out its answer."""
        self.current = held
        local = self.c.replica.read(LOCAL_COPY, unreadable=recovery.Unreadable())
        action = recovery.decide(recovery.Situation(
            record=recovery.record_of(local, held.key, held.copy_index, held.grant), printer=printer_state,
            prints=parse_print_name(job.id, held.copy_index, file), committed=self._committed(held.key),
            counts=tuple(s.count for s in job.sets)))
        match action:
            case recovery.AwaitStart():
                self.current = None
                if self.state != WorkerState.REQUESTING:
                    # (Just after asking, this is a grant that was also the start, committed a moment later:
                    # no state to publish to every node in that moment, which would only delay the commit.)
                    self._set(WorkerState.FETCHING, "waiting for the farm to confirm the start")
                await self._wait(self.settings.timing.work_retry_s)
            case recovery.Busy():
                self.current = None
                self._set(WorkerState.ERROR, f"printer busy with a print netqueues did not start ({file})")
                await self._wait(self.settings.timing.work_retry_s)
            case recovery.Follow(set_index=si, run=run):
                paths = [await self.ensure_file(s.sha256, list(s.holders), self._fetch_progress)
                         for s in job.sets]
                log.info("%s: following the print of %s (set %d, run %d) that was running before a restart",
                         self.node_id, file, si, run)
                await self._print_all(held, job, paths, si, run, following=True)
            case recovery.Print(set_index=si, run=run, why=why):
                # The printer is to be called again: its files first (tried, then the copy is requeued).
                fetched = await self._fetch_files(held, job)
                if fetched is None:
                    return
                log.info("%s: %s#%d after a restart: printing it from set %d, run %d (%s)", self.node_id,
                         held.job, held.copy_index, si, run, why)
                await self._print_all(held, job, fetched, si, run)
            case recovery.Report(outcome=outcome, reason=reason, clear_bed=clear_bed):
                await self._finish(held, outcome, reason)
                if clear_bed:
                    await self._clear_bed()
            case _:
                assert_never(action)

    def _fetch_progress(self, done: int, total: int | None) -> None:
        self.progress = done / total if total else None
        self.on_state()
