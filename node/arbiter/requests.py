"""The arbiter's answers to API requests: every message on the farm's request topics, from ``netq`` and the like.

One request goes through named steps (:meth:`RequestHandler.handle`): node commands are routed (their node
answers them); the envelope is parsed; reads are answered from the state at once; a retry is recognised by its
transaction; a ``job/add`` by URL downloads its files first; the pure handler (``shared/farm_api.py``) turns the
request into writes; a ``job/add``'s files are checked and given a second holder; the writes are committed
through the consensus, and only then is the request answered. A ``netq add`` (``FarmClient.request("job/add")``)
runs::

    RequestHandler.handle → farm_api.parse_envelope → _handler_for → _is_retry → _run_handler (farm_api.job_add)
      → _accept → _check_files (holder_check.check_job_files) → FileReplication.before_add → _commit_writes
      → ArbiterServices.commit (Consensus.propose) → _answer → _respond
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from node.app import node_commands
from node.arbiter import url_jobs
from node.arbiter.scheduler_bridge import Scheduling
from node.consensus.consensus import Consensus, NotCommitted
from node.files import holder_check
from node.files.analysis import Verdicts
from node.files.replication import FileReplication
from node.files.store import FileStore
from node.files.url_guard import UrlPolicy
from node.link.base import Link, Message
from node.link.signing import StateSigning
from shared import farm_api, security
from shared.errors import RequestError
from shared.farm_api import Write
from shared.models import txn_key
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger(__name__)

Settled = Callable[[BaseException | None], None]


@dataclass(frozen=True)
class ArbiterHooks:
    """What request handling needs from the rest of the arbiter (:class:`node.arbiter.services.ArbiterServices`)."""

    active: Callable[[], bool]  # this node is the serving arbiter
    nodes: Callable[[], dict[str, dict[str, Any]]]  # the node states it sees: node_id -> NodeState dump
    info: Callable[[], dict[str, Any]]  # the bridge info (arbiter, term, members, ...)
    reachable: Callable[[], set[str]]  # members it heard from lately, itself included
    commit: Callable[[list[Write], list[dict[str, Any]], Settled], None]  # propose; publish once committed
    retiring: Callable[[str, list[Write]], None]  # a retirement is proposed (its writes)
    retired: Callable[[str], None]  # a retirement is committed
    job_added: Callable[[str], None]  # the key of a job about to be added (its holders are served first)


class RequestHandler:
    """Answers the farm's API requests while this node is the serving arbiter: each change is committed
    through the consensus before it is answered, and a retry under the same transaction is applied once."""

    def __init__(
        self,
        settings: Settings,
        consensus: Consensus,
        link: Link,
        topics: Topics,
        signing: StateSigning,
        scheduling: Scheduling,
        replication: FileReplication,
        hooks: ArbiterHooks,
        clock: Callable[[], float],
        wall: Callable[[], float],
        store: FileStore | None = None,
        verdicts: Verdicts | None = None,
    ) -> None:
        self.settings = settings
        self.c = consensus
        self.link = link
        self.topics = topics
        self.signing = signing  # answers are signed (node/link/signing.py)
        self.scheduling = scheduling
        self.replication = replication
        self.hooks = hooks
        self.clock = clock  # monotonic
        self.wall = wall  # wall clock: timestamps people read
        self.store = store  # where job/add downloads files given by URL
        # The G-code policy scans of our store (shared with our file server's upload check, when given). None
        # without a store: the in-memory test farm, whose nodes have no file servers to ask.
        self.verdicts = verdicts if verdicts is not None or store is None else Verdicts(store, settings.gcode)
        # One membership change at a time, so consecutive quorums overlap: a node/retire's, or an enrollment
        # (ArbiterServices._join takes it too, and a change of role drops it).
        self.member_change_pending = False
        self._inflight: set[str] = set()  # transactions accepted but not yet answered
        self._tasks: set[asyncio.Task[None]] = set()  # file checks and URL downloads

    def cancel(self) -> None:
        """Cancel the file checks and URL downloads under way (the arbiter is stopping)."""
        for task in list(self._tasks):
            task.cancel()

    # --- the steps of a request ----------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        """Handle one message on the request topics; every request that reaches a serving arbiter is answered."""
        path = self.topics.request_path(msg.topic)
        if path is None or msg.retain or not self.hooks.active():
            return
        if path in node_commands.NODE_COMMANDS:  # answered by the addressed node; errors no node can answer here
            self._route_node_command(path, msg.payload)
            return
        txn = _peek_transaction(msg.payload)
        try:
            body, txn = farm_api.parse_envelope(path, msg.payload)
            if path in farm_api.READING:
                self._answer_read(path, body, txn)
                return
            handler = self._handler_for(path)
            if self._is_retry(path, txn):
                return
            if path == "job/add" and url_jobs.has_urls(body):
                self._add_from_urls(msg.topic, body, txn)  # download first, then come back here
                return
            outcome = self._run_handler(path, handler, body)
        except RequestError as exc:
            self._respond(path, "error", {}, txn, str(exc))
            return
        self._accept(path, txn, outcome)

    def _route_node_command(self, path: str, payload: bytes) -> None:
        """Answer a node command that no node will answer (a bad address, an unknown node); the addressed node
        answers the rest."""
        error = node_commands.routing_error(path, payload, lambda n: n in self.c.members or n in self.hooks.nodes())
        if error is not None:
            self._respond(path, "error", {}, _peek_transaction(payload), error)

    def _answer_read(self, path: str, body: dict[str, Any], txn: str | None) -> None:
        """Answer a read from the state at once: nothing to commit."""
        ctx = self._context()
        self._respond(path, "ok", farm_api.READING[path](self.c.state, body, ctx).data, txn)

    def _handler_for(self, path: str) -> farm_api.Handler:
        """The pure handler of a change (shared/farm_api.py); RequestError for an unknown request."""
        handler = farm_api.MUTATING.get(path)
        if handler is None:
            raise RequestError(f"unknown request {path!r}; known: "
                               + ", ".join(sorted([*farm_api.MUTATING, *farm_api.READING, *node_commands.NODE_COMMANDS])))
        return handler

    def _is_retry(self, path: str, txn: str | None) -> bool:
        """Whether the request is a retry of one applied or under way; it is answered here if it needs to be."""
        if txn is None:
            return False
        stored = self.c.state.get(txn_key(txn))
        if stored is not None and stored.get("path") == path:
            # A retry, applied once already: ok only once that is committed (our replica also holds
            # our own uncommitted entries); until then the commit, or its failure, answers.
            if self.c.is_committed(self.c.state.objects[txn_key(txn)].stamp):
                self._respond(path, "ok", stored["data"], txn)
            return True
        return txn in self._inflight  # a retry of a request still in progress: the first answer will do for both

    def _run_handler(self, path: str, handler: farm_api.Handler, body: dict[str, Any]) -> farm_api.Outcome:
        """The request's writes and answer, from its pure handler; RequestError if it is refused."""
        outcome = handler(self.c.state, body, self._context())
        if path in farm_api.MEMBERSHIP and self.member_change_pending:
            raise RequestError("another membership change is being committed; retry in a moment")
        return outcome

    def _accept(self, path: str, txn: str | None, outcome: farm_api.Outcome) -> None:
        """Take the request in hand, then commit it: a job/add once its files are checked and on two nodes."""
        if txn is not None:
            self._inflight.add(txn)
        if path in farm_api.MEMBERSHIP:
            self.member_change_pending = True  # one at a time, so consecutive quorums overlap
            self.hooks.retiring(outcome.data["node"], outcome.writes)

        def proceed(extra_holders: dict[str, list[str]]) -> None:
            self._commit_writes(path, txn, outcome, extra_holders)

        if path == "job/add":
            # Acknowledge only once a holder the job names is known to hold each file and the file passes the
            # G-code policy, and once the job's files are on two nodes, so it survives the loss of either.
            _, value = outcome.writes[0]
            assert value is not None
            self._check_files(value, txn, lambda: self.replication.before_add(value, self.clock(), proceed))
        else:
            proceed({})

    def _commit_writes(self, path: str, txn: str | None, outcome: farm_api.Outcome,
                       extra_holders: dict[str, list[str]]) -> None:
        """Propose the request's writes (with any new holders, and its transaction record); answer once settled."""
        def settled(exc: BaseException | None) -> None:
            self._answer(path, txn, outcome, exc)

        if not self.hooks.active():
            settled(NotCommitted("this node stopped being the arbiter"))
            return
        writes = [_with_holders(k, v, extra_holders) for k, v in outcome.writes]
        if path == "job/add":
            self.hooks.job_added(writes[0][0])
        if txn is not None:
            writes.append((txn_key(txn), {"path": path, "data": outcome.data, "ts": self.wall()}))
        self.hooks.commit(writes, outcome.events, settled)

    def _answer(self, path: str, txn: str | None, outcome: farm_api.Outcome, exc: BaseException | None) -> None:
        """Answer a request whose writes are committed (``exc`` None) or failed; release what it held."""
        if txn is not None:
            self._inflight.discard(txn)
        if path in farm_api.MEMBERSHIP:
            self.member_change_pending = False
            if exc is None:
                self.hooks.retired(outcome.data["node"])
        if exc is None:
            self._respond(path, "ok", outcome.data, txn)
        else:
            self._respond(path, "error", {}, txn, f"not committed ({exc}); retry with the same transaction")

    def _respond(self, path: str, status: str, data: dict[str, Any], txn: str | None,
                 error: str | None = None) -> None:
        """Publish the signed answer on the request's response topic."""
        topic = self.topics.response(path)
        answer = farm_api.response(status, data, txn, error)
        self.link.publish(topic, self.signing.sign_payload(topic, answer), qos=1)

    # --- job/add's files -----------------------------------------------------------------------------------
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
                                                   nodes=self.hooks.nodes(), gcode=self.settings.gcode, token=token)
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
        self._tasks.add(task)  # cancelled by cancel() (the arbiter's stop()), as the URL downloads are
        task.add_done_callback(self._tasks.discard)

    def _add_from_urls(self, topic: str, body: dict[str, Any], txn: str | None) -> None:
        """Download the sets given by URL into our store, then handle the request as a plain job/add."""
        if txn is not None:
            self._inflight.add(txn)

        async def download() -> None:
            try:
                # Never the farm's own nodes (their file servers' and the broker's hosts), whatever url_allow says.
                policy = UrlPolicy.for_farm(self.settings.files.url_allow, self.hooks.nodes(),
                                            getattr(self.link, "address", None))
                resolved = await url_jobs.resolve(body, self.store, self.c.node_id, gcode=self.settings.gcode,
                                                      policy=policy)
            except RequestError as exc:
                self._respond("job/add", "error", {}, txn, str(exc))
                return
            finally:
                if txn is not None:
                    self._inflight.discard(txn)
            if not self.hooks.active():
                self._respond("job/add", "error", {}, txn, "the arbiter changed during the download; retry with "
                                                           "the same transaction")
                return
            payload = dict(resolved, **({"transaction": txn} if txn is not None else {}))
            self.handle(Message(topic, json.dumps(payload).encode()))

        task = asyncio.create_task(download(), name="job-add-download")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _context(self) -> farm_api.Context:
        nodes = self.hooks.nodes()
        members = list(self.c.members)
        return farm_api.Context(
            now=self.wall(), new_id=lambda: uuid.uuid4().hex[:12], nodes=nodes, info=self.hooks.info(),
            reachable=frozenset(self.hooks.reachable()),
            unprintable=lambda job: self.scheduling.why_unprintable(
                job, self.scheduling.printers(nodes, members, online_only=False)),
            waiting_reason=lambda job: self.scheduling.why_unprintable(
                job, self.scheduling.printers(nodes, members, online_only=True)),
        )


def _with_holders(key: str, value: dict[str, Any] | None, extra: dict[str, list[str]]) -> Write:
    if value is None or not extra:
        return (key, value)
    sets = [dict(s, holders=[*s["holders"], *[h for h in extra.get(s["sha256"], []) if h not in s["holders"]]])
            for s in value["sets"]]
    return (key, dict(value, sets=sets))


def _peek_transaction(payload: bytes) -> str | None:
    """The transaction of a payload we may not be able to parse, to echo it in the error response."""
    try:
        raw = farm_api.loads_bounded(payload, max_bytes=farm_api.MAX_REQUEST_BYTES)  # bounded: never RecursionError
    except RequestError:
        return None
    txn = raw.get("transaction") if isinstance(raw, dict) else None
    return txn if isinstance(txn, str) and len(txn) <= 100 else None
