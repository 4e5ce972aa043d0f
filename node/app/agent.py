"""The node agent: wires the broker host, the MQTT link, the replica, consensus, the arbiter services, the worker,
the file store and its HTTP server into one asyncio program, and publishes the node's retained state.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker.auth import FarmAccess, TopicPolicy
from broker.host import BrokerHost, BrokerSource, FixedBroker
from node.app.node_commands import NodeCommands
from node.app.pairing import PairingServer, PairingService
from node.arbiter.scheduler_bridge import Scheduling
from node.arbiter.services import ArbiterServices
from node.consensus.consensus import Consensus, Role
from node.consensus.replica import Replica
from node.files.analysis import Verdicts
from node.files.collect import referenced_shas
from node.files.fetch import fetch
from node.files.http import FileServer
from node.files.store import FileStore, MiB
from node.integrations.homeassistant.publisher import HomeAssistantPublisher
from node.link.base import Link, LinkOptions, Message, Will
from node.link.mqtt import MqttLink
from node.link.signing import StateSigning, StateVerifier
from node.tasks import cancel_and_wait
from node.worker.printers.base import PrinterDriver
from node.worker.worker import Worker
from shared import PROTOCOL_VERSION, security
from shared import protocol as P
from shared.errors import ConfigError, FileStoreError, NetqError
from shared.models import NodeState, StoredObject, WorkerState, member_key
from shared.settings import Settings
from shared.topics import Topics

log = logging.getLogger(__name__)

STATE_REFRESH_S = 5.0
NO_KEY = ("this node has no farm key: run `netq init` to make a new farm, or `netq join CODE` to join one (a code "
          "from `netq pair` on a member; or set farm.key to the farm's key); `farm.open = true` runs a farm "
          "without a key, which anyone on the network can join and steer")
PROGRESS_EVERY_S = 2.0


class Lifecycle(enum.StrEnum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def make_printer(settings: Settings) -> PrinterDriver | None:
    p = settings.printer
    if p.driver == "none":
        return None
    if p.driver == "octoprint":
        from node.worker.printers.octoprint import OctoPrintDriver

        assert p.url and p.api_key
        return OctoPrintDriver(p.url, p.api_key, port=p.port)
    from node.worker.printers.simulated import SimulatedPrinter

    return SimulatedPrinter(p.name or settings.node_id, time_scale=p.time_scale, journal=p.journal,
                            default_duration=p.default_duration_s)


class NodeAgent:
    """One node of the farm. ``link`` and ``printer`` may be given (tests); otherwise built from settings."""

    def __init__(self, settings: Settings, *, link: Link | None = None, printer: PrinterDriver | None = None,
                 broker: BrokerSource | None = None) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.topics = Topics(settings.farm.base_topic, settings.homeassistant.prefix)
        self._signing = StateSigning.for_farm(settings.farm)  # the node state and its last will
        self._link = link
        self._broker = broker
        self.printer = printer
        self.lifecycle = Lifecycle.NEW
        self.nodes: dict[str, dict[str, Any]] = {}  # retained node states seen, by node id
        self._publish_scheduled = False
        self._last_essence: dict[str, Any] | None = None
        self._last_publish = -1e9
        self._progress_pending = False
        self._replicating: set[str] = set()
        self._retired_said = False
        self._tasks: list[asyncio.Task[None]] = []
        self.on_stop: list[Callable[[], Any]] = []
        key = settings.farm.key_bytes
        self._state_verifier = None if key is None else StateVerifier(security.state_public_key(key), self.topics)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        if self.lifecycle != Lifecycle.NEW:
            raise NetqError(f"node agent cannot start when {self.lifecycle.value}")
        s = self.settings
        if s.farm.key is None and not s.farm.open:
            raise ConfigError(NO_KEY)
        self.lifecycle = Lifecycle.STARTING
        s.data_dir.mkdir(parents=True, exist_ok=True)
        if s.farm.key is None:
            log.warning("farm is OPEN (farm.open = true): any client on the network can join it, read it and send "
                        "commands. `netq init` makes a farm key (docs/security.md).")
        self.replica = Replica(s.data_dir / "replica.db")
        self.store = FileStore(s.data_dir / "files")
        self.verdicts = Verdicts(self.store, s.gcode)  # G-code policy scans: upload check, holder answers, arbiter
        key = s.farm.key_bytes
        self._file_token = security.file_token(key, security.Role.NODE) if key is not None else None
        self.files = FileServer(self.store, host=s.files.bind_host(s.broker.interfaces), port=s.files.port,
                                key=key, max_upload_bytes=s.files.max_upload_mb * MiB,
                                quota_bytes=s.files.quota_mb * MiB, check=self.verdicts.scan)
        await self.files.start()
        files_host = s.files.advertised_host(s.broker.interfaces)
        self.files_url = f"http://{f'[{files_host}]' if ':' in files_host else files_host}:{self.files.port}"
        self.pairing = None if s.farm.key is None else PairingServer(  # `netq join`: the SRV port of our advert
            PairingService(key=s.farm.key, node_id=self.node_id, data_dir=s.data_dir), host=self.files.host)
        self.pair_address = None if self.pairing is None else f"{files_host}:{await self.pairing.start()}"

        if self._link is None:
            if self._broker is None:
                self._broker = self._make_broker()
            await self._broker.start()
            self._link = MqttLink(self._broker.current, self._link_options())
            self._broker.on_change(lambda _addr: self._reconnect())
        self.link: Link = self._link

        if self.printer is None:
            self.printer = make_printer(s)
        self.consensus = Consensus(s, self.link, self.replica, is_broker_host=self._is_broker_host,
                                   may_bootstrap=self._may_bootstrap)
        self.arbiter = ArbiterServices(s, self.consensus, self.link, Scheduling(s), lambda: self.nodes,
                                       clock=self._monotonic, wall=time.time, store=self.store,
                                       verdicts=self.verdicts)
        self.worker: Worker | None = None
        if self.printer is not None:
            self.worker = Worker(s, self.consensus, self.link, self.printer, self.ensure_file,
                                 self.schedule_publish)
        self.consensus.direct_handlers.append(self._on_direct)
        self.consensus.on_deaf.append(self._reconnect)
        # QoS 0: retained state, superseded by the next message and sent again on every reconnect.
        self.link.subscribe(self.topics.node_state_filter, self._on_node_state, qos=0)
        self.link.on_connection(self._on_connection)
        self.consensus.on_role.append(lambda _role: self.schedule_publish())
        self.consensus.on_applied.append(self._check_retired)
        self._check_retired([], True)
        await self.consensus.start()
        await self.arbiter.start()
        if self.printer is not None:
            try:
                await self.printer.connect()
            except NetqError as exc:
                log.warning("%s: printer not connected yet: %s", self.node_id, exc)
        if self.worker is not None:
            await self.worker.start()
        self.node_commands, self.homeassistant = NodeCommands(self), HomeAssistantPublisher(self)
        await self.node_commands.start()
        await self.homeassistant.start()
        await self.link.start()
        self._tasks.append(asyncio.create_task(self._refresh(), name=f"state-{self.node_id}"))
        self._tasks.append(asyncio.create_task(self._collect_files(), name=f"collect-{self.node_id}"))
        self.lifecycle = Lifecycle.RUNNING
        log.info("%s: node agent running (files at %s)", self.node_id, self.files_url)

    async def stop(self) -> None:
        if self.lifecycle in (Lifecycle.STOPPING, Lifecycle.STOPPED, Lifecycle.NEW):
            self.lifecycle = Lifecycle.STOPPED
            return
        self.lifecycle = Lifecycle.STOPPING
        await cancel_and_wait(list(self._tasks))
        await self.homeassistant.stop()
        await self.node_commands.stop()
        if self.worker is not None:
            await self.worker.stop()
        await self.arbiter.stop()
        await self.consensus.stop()
        if self.link.connected:
            # A retired node leaves no record behind (MQTT 3.1.1 §3.3.1.3: an empty retained payload clears).
            last = b"" if self.retired else self._offline_payload()
            self.link.publish(self.topics.node_state(self.node_id), last, qos=1, retain=True)
        await self.link.stop()
        if self._broker is not None:
            await self._broker.stop()
        if self.printer is not None:
            await self.printer.close()
        await self.files.stop()
        if self.pairing is not None:
            await self.pairing.stop()
        self.replica.close()
        self.lifecycle = Lifecycle.STOPPED

    # --- broker ------------------------------------------------------------------------------------------
    def _make_broker(self) -> BrokerSource:
        b = self.settings.broker
        if b.url:
            return FixedBroker(b.url)
        if not b.interfaces:
            raise ConfigError("broker.interfaces must list the addresses zeroconf binds to (e.g. ['192.168.1.5']),"
                              " or set broker.url to use an existing broker")
        key = self.settings.farm.key_bytes
        policy = TopicPolicy(self.settings.farm.base_topic, self.settings.homeassistant.prefix)
        return BrokerHost(node_id=self.node_id, priority=b.priority, farm=self.settings.farm.farm_id,
                          interfaces=b.interfaces, broker_host=b.advertise or (b.bind if b.bind != "0.0.0.0" else None),
                          broker_port=b.port, proto=PROTOCOL_VERSION, max_packet_bytes=b.max_payload,
                          access=None if key is None else FarmAccess.keyed(key, policy),
                          service_port=self.pairing.port if self.pairing is not None else 0)

    def _is_broker_host(self) -> bool:
        return isinstance(self._broker, BrokerHost) and self._broker.hosting is not None

    def _may_bootstrap(self) -> bool:
        """May this node found a new farm? Only if no node it sees belongs to one, and it is the one chosen:
        the broker host when the broker is embedded (exactly one per broker), else the lowest node id."""
        if any(st.get("farm") for st in self.nodes.values() if st.get("node_id") != self.node_id):
            return False
        if isinstance(self._broker, BrokerHost):
            return self._is_broker_host()
        online = [n for n, st in self.nodes.items() if st.get("state") == "online"]
        return not online or min(online + [self.node_id]) == self.node_id

    def _reconnect(self) -> None:
        if isinstance(self._link, MqttLink):
            self._link.reconnect_now()

    @property
    def retired(self) -> bool:
        """This node was retired from its farm (``netq node retire``): it votes in no quorum and takes no work."""
        return self.node_id in self.consensus.state.retired()

    def _check_retired(self, writes: list[StoredObject], snapshot: bool) -> None:
        mine = member_key(self.node_id)
        if self._retired_said or not (snapshot or any(o.key == mine for o in writes)):
            return
        if self.retired:
            self._retired_said = True
            log.warning("%s: this node was retired from farm %s: it no longer counts in quorums, takes no work "
                        "and is not enrolled again under this id; stop it, or run it with a new node id to add "
                        "this machine back", self.node_id, self.consensus.farm)

    def _monotonic(self) -> float:
        return asyncio.get_running_loop().time()

    # --- node state --------------------------------------------------------------------------------------
    def _link_options(self) -> LinkOptions:
        key = self.settings.farm.key_bytes  # the member's broker credential (none in an open farm)
        return LinkOptions(client_id=f"netq-{self.node_id}", username=security.Role.NODE.value,
                           password=None if key is None else security.broker_password(key, security.Role.NODE),
                           will=Will(self.topics.node_state(self.node_id), self._offline_payload()))

    def _offline_payload(self) -> bytes:
        return self._signing.encode(self.topics.node_state(self.node_id), {
            "node_id": self.node_id, "state": "offline", "worker": "offline",
            "farm": getattr(self, "consensus", None) and self.consensus.farm})

    def node_state(self) -> NodeState:
        w = self.worker
        return NodeState(
            node_id=self.node_id, state="online", farm=self.consensus.farm,
            arbiter=self.consensus.role == Role.ARBITER, broker_host=self._is_broker_host(),
            worker=w.state if w else WorkerState.IDLE, printer=self.settings.printer.driver,
            reason=(w.reason if w else "witness: votes only, no printer"),
            namespace=w.current.namespace if w and w.current else None,
            job=w.current.job if w and w.current else None,
            copy_index=w.current.copy_index if w and w.current else None,
            progress=w.progress if w else None, capabilities=w.capabilities if w else None,
            namespaces=list(self.settings.worker.namespaces), accept_jobs=w.accept_jobs if w else False,
            witness=self.settings.witness, files_url=self.files_url, ts=time.time(),
            dropped=self.consensus.dropped,
        )

    def schedule_publish(self) -> None:
        if self._publish_scheduled:
            return
        self._publish_scheduled = True
        asyncio.get_running_loop().call_soon(self._publish_state)

    def _publish_state(self) -> None:
        """Publish the retained node state: at once when something but progress changed, else (progress alone)
        at most every PROGRESS_EVERY_S, since every node and Home Assistant receive each publication."""
        self._publish_scheduled = False
        if self.lifecycle not in (Lifecycle.RUNNING, Lifecycle.STARTING):
            return
        state = self.node_state()
        dump = state.model_dump(mode="json")
        essence = {k: v for k, v in dump.items() if k not in ("progress", "ts")}
        now = self._monotonic()
        if essence == self._last_essence and now - self._last_publish < PROGRESS_EVERY_S:
            if not self._progress_pending:
                self._progress_pending = True
                asyncio.get_running_loop().call_later(PROGRESS_EVERY_S - (now - self._last_publish),
                                                      self._publish_progress)
            return
        self._last_essence, self._last_publish = essence, now
        self.nodes[self.node_id] = dump
        topic = self.topics.node_state(self.node_id)
        self.link.publish(topic, self._signing.encode(topic, dump), qos=1, retain=True)

    def _publish_progress(self) -> None:
        self._progress_pending = False
        self._last_essence = None  # force it out
        self._publish_state()

    def _on_connection(self, connected: bool) -> None:
        if connected:
            self.schedule_publish()
            self._write_runtime()

    def _write_runtime(self) -> None:
        """``<data_dir>/runtime.json``: how local tools (the CLI, the demo) reach this node and its broker."""
        address = self._broker.address if self._broker is not None else None
        info = {"node_id": self.node_id, "pid": os.getpid(), "files_url": self.files_url,
                "broker": list(address) if address else None, "base_topic": self.settings.farm.base_topic,
                "pair_address": self.pair_address}
        path = self.settings.data_dir / "runtime.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(info))
        tmp.replace(path)

    def _on_node_state(self, msg: Message) -> None:
        node = self.topics.parse_node_state(msg.topic)
        if node is None:
            return
        if not msg.payload:
            self.nodes.pop(node, None)
            return
        try:
            raw = json.loads(msg.payload)
            st = NodeState.model_validate(raw, strict=False)  # JSON has lists where the model has tuples (bed_mm)
        except (ValueError, RecursionError):
            log.debug("ignoring malformed node state on %s", msg.topic)
            return
        # The arbiter acts on node states (offline, accept_jobs, files_url): only a member's signed one counts.
        if st.node_id != node or (self._state_verifier is not None and not self._state_verifier.check(msg.topic, raw)):
            return
        self.nodes[node] = st.model_dump(mode="json")
        if node == self.node_id and st.state == "offline" and self.lifecycle == Lifecycle.RUNNING:
            self.schedule_publish()  # a stale will of ours (e.g. after a reconnect): say we are online

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(STATE_REFRESH_S)
            self.schedule_publish()

    # --- files -------------------------------------------------------------------------------------------
    def _on_direct(self, m: Any) -> None:
        if isinstance(m, P.Replicate) and m.sha256 not in self._replicating:
            self._replicating.add(m.sha256)
            task = asyncio.create_task(self._replicate(m), name=f"replicate-{m.sha256[:12]}")
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _replicate(self, m: P.Replicate) -> None:
        """Fetch a file the arbiter wants on this node too, then say we hold it."""
        try:
            await self.ensure_file(m.sha256, list(m.holders), lambda done, total: None)
        except NetqError as exc:
            log.warning("%s: could not replicate %s: %s", self.node_id, m.sha256[:12], exc)
            return
        finally:
            self._replicating.discard(m.sha256)
        self.consensus.send_to_arbiter(P.Holding(node=self.node_id, sha256=m.sha256))

    async def ensure_file(self, sha256: str, holders: list[str], progress: Callable[[int, int | None], None]) -> Path:
        """The local path of a G-code file, fetched from a holder (and hash-checked) if we lack it."""
        if self.store.has(sha256):
            return self.store.path(sha256)
        urls = [self.nodes[h]["files_url"] for h in holders
                if h != self.node_id and self.nodes.get(h, {}).get("files_url")]
        if not urls:
            raise FileStoreError(f"no reachable holder of {sha256[:12]} (holders: {', '.join(holders)})")
        await fetch(sha256, urls, self.store, token=self._file_token, progress_cb=progress)
        return self.store.path(sha256)

    async def _collect_files(self) -> None:
        """Every ``files.collect_every_s``, delete the stored files no job references (node/files/collect.py)."""
        f = self.settings.files
        while True:
            await asyncio.sleep(f.collect_every_s)
            c = self.consensus
            # Only from a replica that is current: one still waiting for its snapshot names no job at all.
            if c.farm is None or not c.is_member or not (c.serving or c.arbiter_serving):
                continue
            referenced = referenced_shas(c.state.jobs())
            try:
                await asyncio.to_thread(self.store.gc, referenced, now=time.time(), grace_s=f.collect_grace_s)
            except FileStoreError as exc:
                log.warning("%s: file collection failed: %s", self.node_id, exc)

