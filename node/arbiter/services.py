"""The arbiter's services: grants, starts and finishes, leases, members coming and going, the retained view;
the API requests are answered by :class:`node.arbiter.requests.RequestHandler`, which commits through here.

They run on every node but act only while :class:`node.consensus.consensus.Consensus` says this node is the serving
arbiter. Every change goes through ``consensus.propose`` and is answered, announced and published to the
retained view only once it is committed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from node.arbiter.grant_backoff import GrantBackoff
from node.arbiter.requests import ArbiterHooks, RequestHandler
from node.arbiter.scheduler_bridge import Scheduling
from node.consensus.consensus import Consensus, Role
from node.files.analysis import Verdicts
from node.files.replication import FileReplication
from node.files.store import FileStore
from node.integrations.homeassistant.publisher import node_event, remove_node_entities
from node.link.base import Link
from node.link.signing import StateSigning
from node.tasks import cancel_and_wait
from shared import claims, farm_api, membership
from shared import protocol as P
from shared import scheduling as S
from shared.errors import RequestError
from shared.models import CopyState, Job, Model, job_key, member_key
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
        self._refused_joins: set[str] = set()  # retired nodes that asked to join: logged once each
        self.replication = FileReplication(self)
        self._recent_jobs: deque[str] = deque(maxlen=16)  # keys of the last jobs added (see _dispatch)
        self._last_gc = 0.0
        self._last_upkeep = 0.0
        self._task: asyncio.Task[None] | None = None
        hooks = ArbiterHooks(active=lambda: self.active, nodes=nodes, info=self.info, reachable=self._reachable,
                             commit=self.commit, retiring=self._retiring, retired=self._retired,
                             job_added=self._recent_jobs.append)
        self.requests = RequestHandler(settings, consensus, link, self.topics, self.signing, scheduling,
                                       self.replication, hooks, clock, wall, store=store, verdicts=verdicts)
        consensus.to_arbiter_handlers.append(self._on_message)
        consensus.on_role.append(self._on_role)
        consensus.listeners.append(self._on_change)
        # Safety mode available (node/consensus/consensus.py): merges of offered records are committed like any change.
        consensus.merge_commit = self._commit_merge
        consensus.on_availability.append(self._publish_bridge)

    async def start(self) -> None:
        self.link.subscribe(self.topics.request_filter, self.requests.handle)
        self.link.on_connection(self._on_connection)
        self._task = asyncio.create_task(self._ticker(), name=f"arbiter-{self.settings.node_id}")

    async def stop(self) -> None:
        self.requests.cancel()
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
            self.requests.member_change_pending = False

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
        if m.node in self.c.members or self.requests.member_change_pending:
            return
        refused = membership.refuse_enrollment(self.c.state, m.node)
        if refused is not None:
            # A retired node that still runs asks again every few heartbeats: say it once, then quietly.
            level = logging.DEBUG if m.node in self._refused_joins else logging.WARNING
            self._refused_joins.add(m.node)
            log.log(level, "not enrolling %s: %s", m.node, refused)
            return
        self.requests.member_change_pending = True
        member = membership.enrollment(m.node, witness=m.witness, now=self.wall())  # weight: the farm's rule

        def settled(exc: BaseException | None) -> None:
            self.requests.member_change_pending = False

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


def _holds_every_file(node: str) -> Callable[[Job], bool]:
    return lambda job: all(node in s.holders for s in job.sets)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("netqueues")
    except PackageNotFoundError:
        return "0+unknown"
