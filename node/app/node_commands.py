"""Commands addressed to one node, answered by that node itself (not by the arbiter).

``<base>/request/node/<command>`` with ``{"node": "<id>", ...}`` (or, for the single-parameter commands, the
bare node id: ``mosquitto_pub -t netq/request/node/bed_cleared -m n2``); the addressed node answers on
``<base>/response/node/<command>`` with the API envelope, echoing the ``transaction``. Every other node stays
silent. Requests no node can answer — malformed, or naming a node that is not in the farm — are answered with
an error by the serving arbiter (:func:`routing_error`), so a script never waits for nothing.

========================  ==========================================  ====================================
command                   body                                        effect
========================  ==========================================  ====================================
``node/bed_cleared``      ``{"node"}``                                the operator confirms the bed is clear
``node/accept_jobs``      ``{"node", "accept": bool}``                take new work or not
``node/pause``            ``{"node"}``                                stop taking queue work (a running
                                                                      print goes on)
``node/resume``           ``{"node"}``                                take queue work again
``node/release``          ``{"node", "pause": bool = true}``          give back a claimed, not yet started
                                                                      copy (and pause, so that it is not
                                                                      handed straight back)
``node/material``         ``{"node", "tool": int = 0, "material"}``   what tool ``tool`` has loaded:
                                                                      ``"PLA"``, ``"PLA:red"``, ``{"type",
                                                                      "color"}``, or ``null``/``"none"``
========================  ==========================================  ====================================

Accepting jobs, pausing and loaded materials survive a restart of the node (kept in its replica's metadata)
unless the config file changed the same setting since.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field

from node.app.node_view import NodeView
from node.consensus.meta import MetaRecord, Slot
from node.integrations.homeassistant.summary import material_label, parse_material
from node.link.base import Message
from node.link.signing import StateSigning
from shared import farm_api
from shared import protocol as P
from shared.errors import RequestError
from shared.models import CopyState, JobCopy, Material, NodeId, WorkerState, job_key

if TYPE_CHECKING:
    from node.worker.worker import Worker

log = logging.getLogger(__name__)

NODE_COMMANDS = frozenset({"node/bed_cleared", "node/accept_jobs", "node/pause", "node/resume",
                           "node/release", "node/material"})
BARE_NODE_COMMANDS = ("node/bed_cleared", "node/pause", "node/resume", "node/release")  # bare value = node id
REMEMBERED_ANSWERS = 256
SETTLE_S = 2.0  # how long a pause waits for the worker to show it before answering
RELEASE_TIMEOUT_S = 10.0
_POLL_S = 0.02
META_KEY = "node_api"


class SavedConfig(MetaRecord):
    """The settings of the config file that node commands change, as they were when the state was saved."""

    accept_jobs: bool
    materials: list[Material | None]  # per tool


class NodeCommandsState(MetaRecord):
    """What node commands changed, kept across a restart (replica meta ``node_api``); each setting is restored
    unless the config file changed it since (``config``)."""

    config: SavedConfig
    accept_jobs: bool
    paused: bool = False
    materials: list[Material | None]  # loaded, per tool


# Node commands' row of the replica's metadata (node/consensus/meta.py); None: never saved.
SAVED_STATE: Slot[NodeCommandsState | None] = Slot(META_KEY, NodeCommandsState | None, None)


class NodeRef(farm_api.Req):
    node: NodeId


class AcceptJobs(NodeRef):
    accept: bool


class ReleaseClaim(NodeRef):
    pause: bool = True


class SetMaterial(NodeRef):
    tool: Annotated[int, Field(ge=0, le=15)] = 0
    material: Material | Annotated[str, Field(max_length=80)] | None


_MODELS: dict[str, type[farm_api.Req]] = {
    "node/bed_cleared": NodeRef, "node/pause": NodeRef, "node/resume": NodeRef,
    "node/accept_jobs": AcceptJobs, "node/release": ReleaseClaim, "node/material": SetMaterial,
}


def addressee(path: str, payload: bytes) -> tuple[dict[str, Any], str | None, str]:
    """``(body, transaction, node id)`` of a node command; RequestError if no node can be told from it."""
    body, txn = farm_api.parse_envelope(path, payload)
    node = body.get("node")
    if not isinstance(node, str):
        raise RequestError('give the node: {"node": "<node id>", ...}'
                           + (" or the bare node id" if path in BARE_NODE_COMMANDS else ""))
    farm_api._model(NodeRef, {"node": node})  # a valid node id, or RequestError
    return body, txn, node


def routing_error(path: str, payload: bytes, known: Callable[[str], bool]) -> str | None:
    """The error the arbiter answers for a node command that no node will answer, else None."""
    try:
        _, _, node = addressee(path, payload)
    except RequestError as exc:
        return str(exc)
    if not known(node):
        return f"no node {node!r} in this farm"
    return None


class NodeCommands:
    def __init__(self, agent: NodeView, *, release_timeout: float = RELEASE_TIMEOUT_S) -> None:
        self.agent = agent
        self.node_id = agent.node_id
        self.topics = agent.topics
        self.release_timeout = release_timeout
        self._signing = StateSigning.for_farm(agent.settings.farm)
        self._tasks: set[asyncio.Task[None]] = set()
        self._answers: OrderedDict[str, tuple[str, bytes]] = OrderedDict()  # transaction -> (path, answer)
        self._inflight: set[str] = set()

    async def start(self) -> None:
        self._restore()
        self.agent.link.subscribe(self.topics.request("node/+"), self._on_request)

    async def stop(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass

    # --- requests ----------------------------------------------------------------------------------------
    def _on_request(self, msg: Message) -> None:
        path = self.topics.request_path(msg.topic)
        if path not in NODE_COMMANDS or msg.retain:
            return
        try:
            body, txn, node = addressee(path, msg.payload)
        except RequestError:
            return  # no node can be told from it: the arbiter answers
        if node != self.node_id:
            return
        if txn is not None:
            if txn in self._inflight:
                return  # a retry while the first is being served: that one answers
            answered = self._answers.get(txn)
            if answered is not None and answered[0] == path:
                self._publish(path, answered[1])  # a retry of an answered request: the same answer
                return
            self._inflight.add(txn)
        task = asyncio.create_task(self._serve(path, body, txn), name=f"node-api-{path}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, path: str, body: dict[str, Any], txn: str | None) -> None:
        try:
            answer = farm_api.response("ok", await self._handle(path, body), txn)
        except RequestError as exc:
            answer = farm_api.response("error", {}, txn, str(exc))
        except Exception:
            log.exception("%s: %s failed", self.node_id, path)
            answer = farm_api.response("error", {}, txn, "internal error; see the node's log")
        finally:
            if txn is not None:
                self._inflight.discard(txn)
        if txn is not None:
            self._answers[txn] = (path, answer)
            while len(self._answers) > REMEMBERED_ANSWERS:
                self._answers.popitem(last=False)
        # The node state that shows the change goes out first (call_soon runs callbacks in order), so a
        # client that acts on the answer finds the farm already knowing it.
        self.agent.schedule_publish()
        asyncio.get_running_loop().call_soon(self._publish, path, answer)

    def _publish(self, path: str, answer: bytes) -> None:
        topic = self.topics.response(path)
        self.agent.link.publish(topic, self._signing.sign_payload(topic, answer), qos=1)  # node/link/signing.py

    async def _handle(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = farm_api._model(_MODELS[path], body)
        w = self.agent.worker
        if w is None:
            raise RequestError(f"{self.node_id} has no printer (a witness only votes)")
        extra: dict[str, Any] = {}
        if path == "node/bed_cleared":
            self._bed_cleared(w)
        elif path == "node/accept_jobs":
            w.set_accept_jobs(req.accept)
        elif path == "node/pause":
            w.set_paused(True)
            await self._settle(lambda: w.state not in (WorkerState.IDLE, WorkerState.REQUESTING))
        elif path == "node/resume":
            w.set_paused(False)
        elif path == "node/release":
            extra["released"] = await self._release(w, req.pause)
        elif path == "node/material":
            self._set_material(w, req.tool, req.material)
        self._save(w)
        return {**self.view(w), **extra}

    def view(self, w: Worker) -> dict[str, Any]:
        return {"node": self.node_id, "worker": w.state.value, "reason": w.reason, "accept_jobs": w.accept_jobs,
                "paused": w.paused, "materials": [material_label(m) for m in w.capabilities.materials],
                "job": w.current.job if w.current else None}

    # --- commands ----------------------------------------------------------------------------------------
    def _bed_cleared(self, w: Worker) -> None:
        p = self.agent.settings.printer
        if p.clear_script or p.self_clearing:
            raise RequestError(f"{self.node_id} clears its bed itself (printer.self_clearing or clear_script)")
        if w.state != WorkerState.CLEARING:
            raise RequestError(f"{self.node_id} is not waiting for its bed to be cleared (it is {w.state.value})")
        w.bed_cleared()

    async def _settle(self, done: Callable[[], bool]) -> None:
        """Wait (bounded) until the worker shows a change. The worker has no change listeners, hence a poll."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SETTLE_S
        while not done() and loop.time() < deadline:
            await asyncio.sleep(_POLL_S)

    def _held(self) -> tuple[str, str, JobCopy] | None:
        for job in self.agent.consensus.state.jobs():
            for copy in job.copies:
                if copy.node == self.node_id and copy.state in (CopyState.CLAIMED, CopyState.PRINTING,
                                                                 CopyState.ORPHANED):
                    return job.namespace, job.id, copy
        return None

    async def _release(self, w: Worker, pause: bool) -> dict[str, Any]:
        held = self._held()
        if held is None:
            raise RequestError(f"{self.node_id} holds no claim to release")
        ns, job_id, copy = held
        if copy.state != CopyState.CLAIMED or copy.grant is None:
            raise RequestError(f"copy {copy.index} of {job_id!r} is {copy.state.value}: a started copy is never "
                               "released (cancel the print on the printer, or resolve the copy)")
        if pause:
            w.set_paused(True)  # first, so that the worker does not ask for (and get) the same copy again
        c = self.agent.consensus
        if not c.send_to_arbiter(P.Release(node=self.node_id, namespace=ns, job=job_id, copy_index=copy.index,
                                           grant=copy.grant, reason="released by an operator")):
            raise RequestError("no arbiter to release the copy to; try again when the farm has one")
        changed = asyncio.Event()
        c.listeners.append(changed.set)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.release_timeout
        try:
            while True:
                job = c.state.job(job_key(ns, job_id))
                now = job.copies[copy.index] if job is not None and copy.index < len(job.copies) else None
                if now is None or now.node != self.node_id or now.grant != copy.grant:
                    return {"namespace": ns, "job": job_id, "copy": copy.index}
                if now.state != CopyState.CLAIMED:
                    raise RequestError(f"copy {copy.index} of {job_id!r} started before the release arrived")
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise RequestError("the arbiter did not confirm the release in time; the claim may still be "
                                       "held (its lease returns it to the queue)")
                try:
                    async with asyncio.timeout(remaining):  # not wait_for: see Worker._wait
                        await changed.wait()
                except TimeoutError:
                    pass
                changed.clear()
        finally:
            c.listeners.remove(changed.set)

    def _set_material(self, w: Worker, tool: int, material: Material | str | None) -> None:
        if isinstance(material, str):
            try:
                material = parse_material(material)
            except ValueError:
                raise RequestError(f"invalid material {material!r}: give TYPE or TYPE:COLOR, or none") from None
        loaded = list(w.capabilities.materials)
        loaded += [None] * (tool + 1 - len(loaded))
        loaded[tool] = material
        w.capabilities = w.capabilities.model_copy(update={"materials": loaded})
        w.on_state()

    # --- surviving restarts ------------------------------------------------------------------------------
    def _config(self) -> SavedConfig:
        s = self.agent.settings
        return SavedConfig(accept_jobs=s.worker.accept_jobs, materials=list(s.printer.materials))

    def _save(self, w: Worker) -> None:
        self.agent.replica.write(SAVED_STATE.of(NodeCommandsState(
            config=self._config(), accept_jobs=w.accept_jobs, paused=w.paused,
            materials=list(w.capabilities.materials))))

    def _restore(self) -> None:
        w = self.agent.worker
        saved = self.agent.replica.read(SAVED_STATE)
        if w is None or saved is None:
            return
        now = self._config()
        w.paused = saved.paused
        if saved.config.accept_jobs == now.accept_jobs:
            w.accept_jobs = saved.accept_jobs
        if saved.config.materials == now.materials:
            w.capabilities = w.capabilities.model_copy(update={"materials": list(saved.materials)})
