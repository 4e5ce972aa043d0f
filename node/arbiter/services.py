"""The arbiter's services: the API requests, grants, starts and finishes, leases, members coming and going.

They run on every node but act only while :class:`node.consensus.consensus.Consensus` says this node is the serving
arbiter. Every change goes through ``consensus.propose`` and is answered, announced and published to the
retained view only once it is committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

from node.app import node_commands
from node.arbiter import url_jobs
from node.arbiter.grant_backoff import GrantBackoff
from node.arbiter.scheduler_bridge import Scheduling
from node.consensus.consensus import Consensus, NotCommitted, Role
from node.files import holder_check
from node.files.analysis import Verdicts
from node.files.replication import FileReplication
from node.files.store import FileStore
from node.files.url_guard import UrlPolicy
from node.integrations.homeassistant.publisher import node_event, remove_node_entities
from node.link.base import Link, Message
from node.link.signing import StateSigning
from node.tasks import cancel_and_wait
from shared import claims, farm_api, membership, security
from shared import protocol as P
from shared import scheduling as S
from shared.errors import RequestError
from shared.models import CopyState, Job, Model, job_key, member_key, txn_key
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger(__name__)

TXN_TTL_S = 24 * 3600.0
Write = tuple[str, dict[str, Any] | None]


class ArbiterServices:
    def __init__(
        self,
        settings: Settings,
        consensus: Consensus,
        link: Link,
        scheduling: Scheduling,
        nodes: Callable[[], dict[str, dict[str, Any]]],
        clock: Callable[[], float],
        wall: Callable[[], float],
        store: FileStore | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.settings = settings
        self.store = store  # where job/add downloads files given by URL
        # The G-code policy scans of our store (shared with our file server's upload check, when given). None
        # without a store: the in-memory test farm, whose nodes have no file servers to ask.
        self.verdicts = verdicts if verdicts is not None or store is None else Verdicts(store, settings.gcode)
        self._downloads: set[asyncio.Task[None]] = set()
        self.c = consensus
        self.link = link
        self.topics = Topics(settings.farm.base_topic, settings.homeassistant.prefix)
        self.signing = StateSigning.for_farm(settings.farm)  # retained view and answers (node/link/signing.py)
        self.scheduling = scheduling
        self.nodes = nodes
        # A copy a node gave back is not handed straight back to that node (node/arbiter/grant_backoff.py).
        self.backoff = GrantBackoff()
        self.choose = scheduling.chooser(self._farm_view,
                                         exclude=lambda node: self.backoff.excluded(node, self.clock()))
        self._dispatch_farm: S.FarmView | None = None  # the farm view of the current dispatch pass
        self.clock = clock  # monotonic: leases and liveness
        self.wall = wall  # wall clock: timestamps people read
        self.waiting: dict[str, P.WorkRequest] = {}
        self.leases: dict[tuple[str, str, int], float] = {}
        self.gone: set[str] = set()
        self.serving_since: float | None = None
        self.member_change_pending = False
        self._refused_joins: set[str] = set()  # retired nodes that asked to join: logged once each
        self.replication = FileReplication(self)
        self._inflight: set[str] = set()  # transactions accepted but not yet answered
        self._recent_jobs: deque[str] = deque(maxlen=16)  # keys of the last jobs added (see _dispatch)
        self._last_gc = 0.0
        self._last_upkeep = 0.0
        self._task: asyncio.Task[None] | None = None
        consensus.to_arbiter_handlers.append(self._on_message)
        consensus.on_role.append(self._on_role)
        consensus.listeners.append(self._on_change)
        # Safety mode available (node/consensus/consensus.py): merges of offered records are committed like any change.
        consensus.merge_commit = self._commit_merge
        consensus.on_availability.append(self._publish_bridge)

    async def start(self) -> None:
        self.link.subscribe(self.topics.request_filter, self._on_request)
        self.link.on_connection(self._on_connection)
        self._task = asyncio.create_task(self._ticker(), name=f"arbiter-{self.settings.node_id}")

    async def stop(self) -> None:
        for task in list(self._downloads):
            task.cancel()
        await cancel_and_wait([self._task])
        self._task = None

    @property
    def active(self) -> bool:
        return self.c.role == Role.ARBITER and self.c.serving

    # --- role changes ------------------------------------------------------------------------------------
    def _on_role(self, role: Role) -> None:
        if role != Role.ARBITER:
            self.waiting.clear()
            self.leases.clear()
            self.gone.clear()
            self.serving_since = None
            self.member_change_pending = False

    def _on_change(self) -> None:
        if self.c.role == Role.ARBITER and self.c.serving and self.serving_since is None:
            self._begin_serving()

    def _begin_serving(self) -> None:
        now = self.clock()
        self.serving_since = now
        # A new arbiter restarts every lease at takeover: its clock says nothing about the old one's.
        deadline = now + self.settings.timing.lease_s + self.settings.timing.lock_delay_s
        for job in self.c.state.jobs():
            for copy in job.copies:
                if copy.state == CopyState.CLAIMED:
                    self.leases[(job.namespace, job.id, copy.index)] = deadline
        self.publish_view()
        self._dispatch()

    def _on_connection(self, connected: bool) -> None:
        if connected and self.active:
            self.publish_view()  # the broker may be a new one, with no retained messages

    # --- the retained view -------------------------------------------------------------------------------
    def publish_view(self) -> None:
        """Publish the whole retained view: bridge state and info, and every job."""
        self._publish_bridge()
        for job in self.c.state.jobs():
            self._publish_job(job.namespace, job.id)

    def _publish_bridge(self) -> None:
        info = self.info()
        state, t = {"state": "online", "arbiter": self.c.node_id, "term": self.c.term}, self.topics
        self.link.publish(t.bridge_state, self.signing.encode(t.bridge_state, state), retain=True)
        self.link.publish(t.bridge_info, self.signing.encode(t.bridge_info, info), retain=True)

    def _publish_job(self, namespace: str, job_id: str) -> None:
        key = job_key(namespace, job_id)
        obj = self.c.state.objects.get(key)
        topic = self.topics.job(namespace, job_id)
        job = self.c.state.job(key)
        if obj is None or job is None:
            self.link.publish(topic, b"", retain=True)  # clears the retained message (MQTT 3.1.1 §3.3.1.3)
            return
        view = farm_api.job_view(job)
        view["stamp"] = list(obj.stamp)
        self.link.publish(topic, self.signing.encode(topic, view), retain=True)

    def _publish_writes(self, writes: list[Write]) -> None:
        for key, _ in writes:
            if key.startswith("job/"):
                _, ns, job_id = key.split("/", 2)
                self._publish_job(ns, job_id)
            elif key.startswith(("member/", "queue/")):
                self._publish_bridge()

    def _events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            ev = {**ev, "ts": self.wall(), "term": self.c.term}
            self.link.publish(self.topics.events, json.dumps(ev).encode(), qos=1)
            forward = node_event(self.topics, ev) if self.settings.homeassistant.enabled else None
            if forward is not None:
                self.link.publish(*forward, qos=1)  # the printer's Home Assistant event entity

    def info(self) -> dict[str, Any]:
        members = self.c.members
        printers = [m for m in members.values() if not m.witness]
        safety = self.settings.farm.safety.value
        warning = None
        if len(printers) == 2 and len(members) == 2:
            warning = ("two printers and no witness cannot keep a quorum when either is gone: add a "
                       "printer-less witness (`netq run --witness`) on any always-on machine")
        note = self.c.availability_note()  # safety mode available: running without a quorum, or split
        if note is not None:
            warning = note if warning is None else f"{note}; {warning}"
        return {
            # farm_id: the farm's public id, from its key (`netq init`, zeroconf); farm: the id of its replicated
            # history, made when its first node founded it (two histories never merge, even under one key).
            "farm_id": self.settings.farm.farm_id, "farm": self.c.farm, "arbiter": self.c.node_id, "term": self.c.term, "commit": self.c.commit[1],
            "members": sorted(members), "retired": sorted(self.c.state.retired()), "safety": safety,
            "namespaces": self.c.state.namespaces(), "warning": warning, "version": _version(),
        }

    def _commit_merge(self, writes: list[Write], events: list[dict[str, Any]],
                      then: Callable[[BaseException | None], None]) -> None:
        """Commit a merge of another side's records; its claimed copies get a lease like any grant."""
        def settled(exc: BaseException | None) -> None:
            if exc is None and self.serving_since is not None:
                deadline = self.clock() + self.settings.timing.lease_s + self.settings.timing.lock_delay_s
                for job in self.c.state.jobs():
                    for copy in job.copies:
                        if copy.state == CopyState.CLAIMED:
                            self.leases.setdefault((job.namespace, job.id, copy.index), deadline)
            then(exc)

        self.commit(writes, events, settled)

    def send_to(self, node: str, msg: Model) -> None:
        self.c.send_to_node(node, msg)  # sealed, as every protocol message

    # --- commits -----------------------------------------------------------------------------------------
    def commit(self, writes: list[Write], events: list[dict[str, Any]],
               then: Callable[[BaseException | None], None] | None = None) -> None:
        """Propose ``writes``; once committed publish them and ``events``; then call ``then``."""
        self._commit(writes, events, then)

    def _commit(self, writes: list[Write], events: list[dict[str, Any]],
                then: Callable[[BaseException | None], None] | None = None) -> None:
        fut = self.c.propose(writes)

        def done(f: asyncio.Future[None]) -> None:
            exc = f.exception()
            if exc is None:
                self._publish_writes(writes)  # the retained view first: an answer must not run ahead of it
            if then is not None:
                then(exc)
            if exc is None:
                self._dispatch()  # before the events: a grant's entry is on the claim latency's path
                self._events(events)

        fut.add_done_callback(done)

    # --- API requests ------------------------------------------------------------------------------------
    def _respond(self, path: str, status: str, data: dict[str, Any], txn: str | None,
                 error: str | None = None) -> None:
        topic = self.topics.response(path)
        answer = farm_api.response(status, data, txn, error)
        self.link.publish(topic, self.signing.sign_payload(topic, answer), qos=1)

    def _on_request(self, msg: Message) -> None:
        path = self.topics.request_path(msg.topic)
        if path is None or msg.retain or not self.active:
            return
        if path in node_commands.NODE_COMMANDS:  # answered by the addressed node; errors no node can answer here
            error = node_commands.routing_error(path, msg.payload, lambda n: n in self.c.members or n in self.nodes())
            if error is not None:
                self._respond(path, "error", {}, _peek_transaction(msg.payload), error)
            return
        txn = _peek_transaction(msg.payload)
        change_members = path in farm_api.MEMBERSHIP
        try:
            body, txn = farm_api.parse_envelope(path, msg.payload)
            if path in farm_api.READING:
                ctx = self._context()
                self._respond(path, "ok", farm_api.READING[path](self.c.state, body, ctx).data, txn)
                return
            handler = farm_api.MUTATING.get(path)
            if handler is None:
                raise RequestError(f"unknown request {path!r}; known: "
                                   + ", ".join(sorted([*farm_api.MUTATING, *farm_api.READING, *node_commands.NODE_COMMANDS])))
            if txn is not None:
                stored = self.c.state.get(txn_key(txn))
                if stored is not None and stored.get("path") == path:
                    # A retry, applied once already: ok only once that is committed (our replica also holds
                    # our own uncommitted entries); until then the commit, or its failure, answers.
                    if self.c.is_committed(self.c.state.objects[txn_key(txn)].stamp):
                        self._respond(path, "ok", stored["data"], txn)
                    return
                if txn in self._inflight:
                    return  # a retry of a request still in progress: the first answer will do for both
            if path == "job/add" and url_jobs.has_urls(body):
                self._add_from_urls(msg.topic, body, txn)  # download first, then come back here
                return
            outcome = handler(self.c.state, body, self._context())
            if change_members and self.member_change_pending:
                raise RequestError("another membership change is being committed; retry in a moment")
        except RequestError as exc:
            self._respond(path, "error", {}, txn, str(exc))
            return
        if txn is not None:
            self._inflight.add(txn)
        if change_members:
            self.member_change_pending = True  # one at a time, so consecutive quorums overlap
            self._retiring(outcome.data["node"], outcome.writes)

        def answer(exc: BaseException | None) -> None:
            if txn is not None:
                self._inflight.discard(txn)
            if change_members:
                self.member_change_pending = False
                if exc is None:
                    self._retired(outcome.data["node"])
            if exc is None:
                self._respond(path, "ok", outcome.data, txn)
            else:
                self._respond(path, "error", {}, txn, f"not committed ({exc}); retry with the same transaction")

        def proceed(extra_holders: dict[str, list[str]]) -> None:
            if not self.active:
                answer(NotCommitted("this node stopped being the arbiter"))
                return
            writes = [_with_holders(k, v, extra_holders) for k, v in outcome.writes]
            if path == "job/add":
                self._recent_jobs.append(writes[0][0])
            if txn is not None:
                writes.append((txn_key(txn), {"path": path, "data": outcome.data, "ts": self.wall()}))
            self._commit(writes, outcome.events, answer)

        if path == "job/add":
            # Acknowledge only once a holder the job names is known to hold each file and the file passes the
            # G-code policy, and once the job's files are on two nodes, so it survives the loss of either.
            _, value = outcome.writes[0]
            assert value is not None
            self._check_files(value, txn, lambda: self.replication.before_add(value, self.clock(), proceed))
        else:
            proceed({})

    def _check_files(self, job: dict[str, Any], txn: str | None, then: Callable[[], None]) -> None:
        """Ask the holders of a job/add's files (node/files/holder_check.py), then ``then()``; or answer the
        refusal. The check is bounded in time, so the request is answered either way."""
        if self.verdicts is None:
            then()
            return
        key = self.settings.farm.key_bytes
        token = None if key is None else security.file_token(key, security.Role.NODE)

        async def check() -> None:
            try:
                await holder_check.check_job_files(job["sets"], own_id=self.c.node_id, verdicts=self.verdicts,
                                                   nodes=self.nodes(), gcode=self.settings.gcode, token=token)
            except Exception as exc:  # the request is answered whatever went wrong
                if not isinstance(exc, RequestError):
                    log.exception("checking the files of a job/add failed")
                    exc = RequestError(f"the job's files could not be checked ({exc.__class__.__name__}); retry")
                if txn is not None:
                    self._inflight.discard(txn)
                self._respond("job/add", "error", {}, txn, str(exc))
                return
            then()

        task = asyncio.create_task(check(), name="job-add-check")
        self._downloads.add(task)  # cancelled by stop(), as the URL downloads are
        task.add_done_callback(self._downloads.discard)

    def _add_from_urls(self, topic: str, body: dict[str, Any], txn: str | None) -> None:
        """Download the sets given by URL into our store, then handle the request as a plain job/add."""
        if txn is not None:
            self._inflight.add(txn)

        async def download() -> None:
            try:
                # Never the farm's own nodes (their file servers' and the broker's hosts), whatever url_allow says.
                policy = UrlPolicy.for_farm(self.settings.files.url_allow, self.nodes(),
                                            getattr(self.link, "address", None))
                resolved = await url_jobs.resolve(body, self.store, self.c.node_id, gcode=self.settings.gcode,
                                                      policy=policy)
            except RequestError as exc:
                self._respond("job/add", "error", {}, txn, str(exc))
                return
            finally:
                if txn is not None:
                    self._inflight.discard(txn)
            if not self.active:
                self._respond("job/add", "error", {}, txn, "the arbiter changed during the download; retry with "
                                                           "the same transaction")
                return
            payload = dict(resolved, **({"transaction": txn} if txn is not None else {}))
            self._on_request(Message(topic, json.dumps(payload).encode()))

        task = asyncio.create_task(download(), name="job-add-download")
        self._downloads.add(task)
        task.add_done_callback(self._downloads.discard)

    def _context(self) -> farm_api.Context:
        nodes = self.nodes()
        members = list(self.c.members)
        return farm_api.Context(
            now=self.wall(), new_id=lambda: uuid.uuid4().hex[:12], nodes=nodes, info=self.info(),
            reachable=frozenset(self._reachable()),
            unprintable=lambda job: self.scheduling.why_unprintable(
                job, self.scheduling.printers(nodes, members, online_only=False)),
            waiting_reason=lambda job: self.scheduling.why_unprintable(
                job, self.scheduling.printers(nodes, members, online_only=True)),
        )

    # --- members' protocol messages ----------------------------------------------------------------------
    def _on_message(self, m: Any) -> None:
        if not self.active:
            return
        node = getattr(m, "node", None)
        if node in self.gone:
            self.gone.discard(node)
            log.info("%s is back", node)
        try:
            log.debug("arbiter got %s from %s", m.kind, node)
            if isinstance(m, P.WorkRequest):
                self.waiting[m.node] = m
                self._dispatch()
            elif isinstance(m, P.StartRequest):
                ch = claims.start(self.c.state, m.node, m.namespace, m.job, m.copy_index, m.grant, self.wall())
                self.leases.pop((m.namespace, m.job, m.copy_index), None)
                self._commit(ch.writes, ch.events)
            elif isinstance(m, P.FinishReport):
                ch = claims.finish(self.c.state, m.node, m.namespace, m.job, m.copy_index, m.grant,
                                   m.outcome.value, m.reason, self.wall(),
                                   max_attempts=self.settings.farm.max_attempts)
                self._commit(ch.writes, ch.events)
            elif isinstance(m, P.Release):
                ch = claims.release(self.c.state, m.node, m.namespace, m.job, m.copy_index, m.grant, m.reason)
                self.leases.pop((m.namespace, m.job, m.copy_index), None)
                self.backoff.gave_back(m.node, (m.namespace, m.job, m.copy_index), self.clock())
                self._commit(ch.writes, ch.events)
            elif isinstance(m, P.Join):
                self._join(m)
            elif isinstance(m, P.Holding):
                self.replication.on_holding(m, self.clock())
        except RequestError as exc:
            if isinstance(m, (P.StartRequest, P.FinishReport, P.Release)) and not self._holds(m):
                self.c.refuse(m.kind, node, f"it does not hold the copy: {exc}")  # counted and said once
            else:
                # Usually a duplicate (a report resent before its commit was seen): harmless, so not loud.
                log.debug("refused %s from %s: %s", m.kind, node, exc)

    def _holds(self, m: P.StartRequest | P.FinishReport | P.Release) -> bool:
        """Whether ``m``'s node is the one the copy it reports on is held by (under whichever grant)."""
        job = self.c.state.job(job_key(m.namespace, m.job))
        return job is not None and m.copy_index < len(job.copies) and job.copies[m.copy_index].node == m.node

    def _join(self, m: P.Join) -> None:
        """Enroll a member: one membership change at a time, so consecutive quorums overlap."""
        if m.node in self.c.members or self.member_change_pending:
            return
        refused = membership.refuse_enrollment(self.c.state, m.node)
        if refused is not None:
            # A retired node that still runs asks again every few heartbeats: say it once, then quietly.
            level = logging.DEBUG if m.node in self._refused_joins else logging.WARNING
            self._refused_joins.add(m.node)
            log.log(level, "not enrolling %s: %s", m.node, refused)
            return
        self.member_change_pending = True
        member = membership.enrollment(m.node, witness=m.witness, now=self.wall())  # weight: the farm's rule

        def settled(exc: BaseException | None) -> None:
            self.member_change_pending = False

        self._commit([(member_key(m.node), member.model_dump(mode="json"))],
                     [{"event": "enrolled", "node": m.node, "witness": m.witness}], settled)

    def _retiring(self, node: str, writes: list[Write]) -> None:
        """A retirement is proposed: its node gets no more work, and the copies it gave up have no lease."""
        self.waiting.pop(node, None)
        for key, _ in writes:
            if key.startswith("job/"):
                _, ns, job_id = key.split("/", 2)
                for k in [k for k in self.leases if k[0] == ns and k[1] == job_id]:
                    self.leases.pop(k, None)

    def _retired(self, node: str) -> None:
        """A retirement is committed: remove the node's Home Assistant entities and its retained state."""
        self.gone.discard(node)
        remove_node_entities(self.link, self.topics, node)
        self._clear_retired_states()
        log.info("%s is retired from the farm (members now: %s)", node, ", ".join(sorted(self.c.members)))

    def _clear_retired_states(self) -> None:
        """Clear the retained state of retired nodes that are not running. One that still runs keeps its own
        (it is listed as retired), and clears it when it stops; this catches its last will if it dies."""
        states = self.nodes()
        for node in self.c.state.retired():
            st = states.get(node)
            if st is not None and st.get("state") != "online":  # our node view drops it once this arrives
                self.link.publish(self.topics.node_state(node), b"", qos=1, retain=True)  # MQTT 3.1.1 §3.3.1.3

    # --- grants ------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        """Grant work to the nodes waiting for it. The holders of the files of recently added jobs are served
        first, so that a new job goes where its files already are and can start at once (grant and start in
        one commit) instead of waiting for a download and another round."""
        if not self.active:
            return
        members = self.c.members
        prefer = self._holders_of_recent_jobs()
        self._dispatch_farm = None  # built at most once per pass (it reads every member's node state)
        for node, req in sorted(self.waiting.items(), key=lambda item: item[0] not in prefer):
            if not self.c.state.has_queued():
                return  # the common case after a commit: nothing left to hand out
            member = members.get(node)
            if member is None or member.witness or node in self.gone:
                continue
            st = self.nodes().get(node, {})
            if st.get("accept_jobs") is False or st.get("worker") in ("paused", "offline", "error"):
                # It said so after asking (node/accept_jobs, node/pause, its printer gone): the request is stale.
                continue
            queue_ok = [ns for ns in req.namespaces] if req.namespaces else []
            start_if = _holds_every_file(node) if req.start_now else None
            result = claims.grant(self.c.state, node, req.capabilities, queue_ok, self.wall(),
                                  self.c.next_stamp(), self.choose, start_if)
            if result is None:
                continue
            change, pick, started = result
            self.waiting.pop(node, None)
            key = (pick.namespace, pick.job, pick.copy_index)

            def granted(exc: BaseException | None, key: tuple[str, str, int] = key, started: bool = started) -> None:
                if exc is None and not started:
                    # The lease runs on our monotonic clock from the commit of the grant.
                    self.leases[key] = self.clock() + self.settings.timing.lease_s

            self._commit(change.writes, change.events, granted)

    def _farm_view(self) -> S.FarmView | None:
        if self._dispatch_farm is None:
            self._dispatch_farm = self.scheduling.farm_view(self.nodes(), self.c.members, self.c.state.namespaces())
        return self._dispatch_farm

    def _holders_of_recent_jobs(self) -> set[str]:
        """Nodes holding every file of one of the last jobs added that still has a queued copy."""
        out: set[str] = set()
        for key in list(self._recent_jobs):
            job = self.c.state.job(key)
            if job is None or not any(c.state == CopyState.QUEUED for c in job.copies):
                self._recent_jobs.remove(key)
                continue
            out |= set.intersection(*(set(s.holders) for s in job.sets))
        return out

    # --- timers ------------------------------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.settings.timing.heartbeat_s)
            if not self.active:
                continue
            try:
                self.tick(self.clock())
            except Exception:
                log.exception("arbiter tick failed")

    def tick(self, now: float) -> None:
        self._expire_leases(now)
        self._check_nodes(now)
        self._clear_retired_states()
        if now - self._last_upkeep > 1.0:
            self._last_upkeep = now
            self.replication.tick(now)
        if now - self._last_gc > 60.0:
            self._last_gc = now
            self._collect_transactions()

    def _expire_leases(self, now: float) -> None:
        lock_delay = self.settings.timing.lock_delay_s
        for key, deadline in list(self.leases.items()):
            if now < deadline + lock_delay:
                continue
            self.leases.pop(key)
            ns, job_id, index = key
            job = self.c.state.job(job_key(ns, job_id))
            if job is None or job.copies[index].state != CopyState.CLAIMED:
                continue
            copy = job.copies[index]
            assert copy.node is not None and copy.grant is not None
            ch = claims.release(self.c.state, copy.node, ns, job_id, index, copy.grant, "lease expired")
            self._commit(ch.writes, ch.events)

    def _reachable(self) -> set[str]:
        """Members this arbiter heard from within ``node_timeout_s`` (and itself)."""
        leader = self.c.leader
        out = {self.c.node_id}
        if leader is None:
            return out
        now = self.clock()
        timeout = self.settings.timing.node_timeout_s
        for node in self.c.members:
            heard = leader.last_heard.get(node)
            if node not in self.gone and heard is not None and now - heard <= timeout:
                out.add(node)
        return out

    def _check_nodes(self, now: float) -> None:
        leader = self.c.leader
        if leader is None or self.serving_since is None:
            return
        timeout = self.settings.timing.node_timeout_s
        if now - self.serving_since < timeout:
            return  # give every member a chance to be heard by the new arbiter
        states = self.nodes()
        for node in self.c.members:
            if node == self.c.node_id or node in self.gone:
                continue
            heard = leader.last_heard.get(node, self.serving_since)
            offline = states.get(node, {}).get("state") == "offline"
            if offline or now - heard > timeout:
                self._node_gone(node)
        members = self.c.members
        for node, st in states.items():
            if node not in members or node in self.gone or st.get("state") != "online" or st.get("job") is None:
                continue  # a retired node's orphaned copy waits for its finish report or an operator
            # A node that is back and says what its printer is doing settles its orphaned copy.
            where = (str(st.get("namespace") or ""), str(st["job"]), st.get("copy_index"))
            job = self.c.state.job(job_key(where[0], where[1]))
            index = where[2]
            if job is None or not isinstance(index, int) or index >= len(job.copies):
                continue
            copy = job.copies[index]
            if copy.state == CopyState.ORPHANED and copy.node == node:
                ch = claims.node_back(self.c.state, node, (where[0], where[1], index))
                self._commit(ch.writes, ch.events)

    def _node_gone(self, node: str) -> None:
        self.gone.add(node)
        self.waiting.pop(node, None)
        log.info("%s is gone", node)
        ch = claims.node_gone(self.c.state, node, self.wall())
        for key, _ in ch.writes:
            _, ns, job_id = key.split("/", 2)
            for k in [k for k in self.leases if k[0] == ns and k[1] == job_id]:
                self.leases.pop(k, None)
        if ch.writes:
            self._commit(ch.writes, ch.events)

    def _collect_transactions(self) -> None:
        """Idempotency records are kept for a day, then dropped."""
        cutoff = self.wall() - TXN_TTL_S
        old = [k for k, o in self.c.state.objects.items()
               if k.startswith("txn/") and o.value is not None and o.value.get("ts", 0) < cutoff]
        if old:
            self._commit([(k, None) for k in old[:500]], [])


def _with_holders(key: str, value: dict[str, Any] | None, extra: dict[str, list[str]]) -> Write:
    if value is None or not extra:
        return (key, value)
    sets = [dict(s, holders=[*s["holders"], *[h for h in extra.get(s["sha256"], []) if h not in s["holders"]]])
            for s in value["sets"]]
    return (key, dict(value, sets=sets))


def _holds_every_file(node: str) -> Callable[[Job], bool]:
    return lambda job: all(node in s.holders for s in job.sets)


def _peek_transaction(payload: bytes) -> str | None:
    """The transaction of a payload we may not be able to parse, to echo it in the error response."""
    try:
        raw = farm_api.loads_bounded(payload, max_bytes=farm_api.MAX_REQUEST_BYTES)  # bounded: never RecursionError
    except RequestError:
        return None
    txn = raw.get("transaction") if isinstance(raw, dict) else None
    return txn if isinstance(txn, str) and len(txn) <= 100 else None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("netqueues")
    except PackageNotFoundError:
        return "0+unknown"
