"""A farm of nodes in one process over the in-memory broker: consensus, arbiter services, worker and a
simulated printer per node, with the real codec and real seals (every farm has a farm key unless told
``key=None``, which makes it an open farm). For unit tests of the protocol and claim rules."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.arbiter.scheduler_bridge import Scheduling
from node.arbiter.services import ArbiterServices
from node.consensus.consensus import Consensus, Role
from node.consensus.replica import Replica
from node.link.base import LinkOptions, Message, Will
from node.link.memory import MemoryBroker, MemoryLink
from node.worker.printers.simulated import SimulatedPrinter
from node.worker.worker import Worker
from shared import protocol as P
from shared import security
from shared.errors import ProtocolError
from shared.models import Model
from shared.settings import Settings, TimingSettings
from shared.topics import Topics
from tests.waiting import until as _until

FAST = TimingSettings(
    heartbeat_s=0.05,
    election_timeout_s=0.3,
    lease_s=2.0,
    lock_delay_s=0.2,
    node_timeout_s=0.6,
    work_retry_s=0.2,
)


def gcode(seconds: float, tag: str = "") -> bytes:
    return f";TIME:{seconds}\n; {tag}\nG28\nG1 X10 Y10\n".encode()


class MemNode:
    def __init__(self, farm: MemFarm, node_id: str, *, witness: bool = False) -> None:
        self.farm = farm
        self.node_id = node_id
        self.settings = Settings(
            node_id=node_id,
            data_dir=farm.root / node_id,
            witness=witness,
            timing=farm.timing,
            printer={"driver": "none" if witness else "simulated", "self_clearing": True},
            farm={"key": farm.key} if farm.key is not None else {"open": True},
        )
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.topics = Topics()
        self.printer = None if witness else SimulatedPrinter(node_id, time_scale=farm.time_scale)
        self.started = False

    async def start(self) -> None:
        will = Will(
            self.topics.node_state(self.node_id),
            json.dumps({"node_id": self.node_id, "state": "offline"}).encode(),
        )
        self.link = MemoryLink(self.farm.broker, LinkOptions(client_id=self.node_id, will=will))
        self.replica = Replica(self.settings.data_dir / "replica.db")
        self.consensus = Consensus(
            self.settings,
            self.link,
            self.replica,
            is_broker_host=lambda: self.node_id == self.farm.host,
            may_bootstrap=lambda: self.node_id == self.farm.host,
        )
        self.arbiter = ArbiterServices(
            self.settings,
            self.consensus,
            self.link,
            Scheduling(self.settings),
            lambda: self.farm.node_states,
            clock=lambda: asyncio.get_running_loop().time(),
            wall=time.time,
        )
        self.worker = None
        if self.printer is not None:
            await self.printer.connect()
            self.worker = Worker(
                self.settings, self.consensus, self.link, self.printer, self.farm.ensure_file, lambda: None
            )
        self.link.subscribe(self.topics.node_state_filter, self.farm.on_node_state)
        await self.consensus.start()
        await self.arbiter.start()
        if self.worker:
            await self.worker.start()
        await self.link.start()
        self.link.publish(
            self.topics.node_state(self.node_id),
            json.dumps({"node_id": self.node_id, "state": "online"}).encode(),
            retain=True,
        )
        self.started = True

    async def stop(self, *, crash: bool = False) -> None:
        if not self.started:
            return
        self.started = False
        if crash:
            self.farm.broker.kill(self.node_id)
        if self.worker:
            await self.worker.stop()
        await self.arbiter.stop()
        await self.consensus.stop()
        await self.link.stop()
        if self.printer:
            await self.printer.close()
        self.replica.close()


class MemFarm:
    def __init__(self, root: Path, n: int, *, time_scale: float = 100.0, witnesses: int = 0,
                 timing: TimingSettings = FAST, key: str | None = "new") -> None:
        self.root = root
        # The farm key every node holds ("new": a fresh one; None: an open farm, unsealed).
        self.key = security.new_farm_key() if key == "new" else key
        self.timing = timing
        self.broker = MemoryBroker()
        self.time_scale = time_scale
        self.files: dict[str, Path] = {}
        self.node_states: dict[str, dict[str, Any]] = {}
        self.nodes = [MemNode(self, f"n{i}") for i in range(1, n + 1)]
        self.nodes += [MemNode(self, f"w{i}", witness=True) for i in range(1, witnesses + 1)]
        self.host = self.nodes[0].node_id
        self.client = MemoryLink(self.broker, LinkOptions(client_id="client"))
        self.responses: dict[str, dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []

    def on_node_state(self, msg: Message) -> None:
        node = Topics().parse_node_state(msg.topic)
        if node and msg.payload:
            self.node_states[node] = json.loads(msg.payload)
        elif node:
            self.node_states.pop(node, None)  # an empty retained message clears it, as for a node agent

    async def ensure_file(self, sha: str, holders: list[str], progress: Callable[[int, int | None], None]) -> Path:
        return self.files[sha]

    def add_file(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / f"{sha}.gcode"
        path.write_bytes(data)
        self.files[sha] = path
        return sha

    async def start(self) -> None:
        for node in self.nodes:
            await node.start()
        self.client.subscribe("netq/response/#", self._on_response)
        self.client.subscribe("netq/events", lambda m: self.events.append(json.loads(m.payload)))
        await self.client.start()

    async def stop(self) -> None:
        await self.client.stop()
        for node in self.nodes:
            await node.stop()

    def _on_response(self, msg: Message) -> None:
        body = json.loads(msg.payload)
        if "transaction" in body:
            self.responses[body["transaction"]] = body

    async def request(
        self, path: str, body: dict[str, Any] | str, txn: str, timeout: float = 5.0
    ) -> dict[str, Any]:
        payload = dict(body, transaction=txn) if isinstance(body, dict) else body
        self.client.publish(f"netq/request/{path}", json.dumps(payload).encode(), qos=1)
        return await self.wait_for(lambda: self.responses.get(txn), timeout, f"response to {path} {txn}")

    def arbiter(self) -> MemNode | None:
        for node in self.nodes:
            if node.started and node.consensus.role == Role.ARBITER and node.consensus.serving:
                return node
        return None

    async def ready(self, members: int, timeout: float = 10.0) -> MemNode:
        """The serving arbiter, once ``members`` members are enrolled and no membership change is pending."""
        node: MemNode = await self.wait_for(
            lambda: (a := self.arbiter()) and len(a.consensus.members) == members
            and not a.arbiter.requests.member_change_pending and a, timeout, f"an arbiter with {members} members")
        return node

    @staticmethod
    async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> Any:
        return await _until(cond, what, timeout, interval=0.01)

    def starts(self) -> list[str]:
        return [r.name for n in self.nodes if n.printer for r in n.printer.starts]


class Rogue:
    """A client of a MemFarm's broker that sends what it likes on ``_proto/`` topics, through the real codec:
    unsigned (no key), sealed with the farm key as a node id of its choice (a key holder that is not a member;
    never a running member's id: its boot and counters would collide with the real node's), sealed by a running
    member's own sealer (that member sending what no honest member sends), or bytes it heard (a replay)."""

    def __init__(self, farm: MemFarm, client_id: str = "rogue") -> None:
        self.farm = farm
        self.topics = Topics()
        self.link = MemoryLink(farm.broker, LinkOptions(client_id=client_id))
        self.heard: list[Message] = []
        self._sealers: dict[str, security.Sealer] = {}

    async def start(self) -> None:
        self.link.subscribe(f"{self.topics.proto}/#", self.heard.append)
        await self.link.start()
        await self.link.wait_connected(5.0)

    async def stop(self) -> None:
        await self.link.stop()

    def payload(self, topic: str, msg: Model | bytes, *, as_node: str | None = None,
                by: MemNode | None = None) -> bytes:
        """``msg`` (a message, or a body as it is) sealed as ``as_node`` or by ``by``'s sealer, or unsigned."""
        body = msg if isinstance(msg, bytes) else P.encode(msg)
        if by is not None:
            sealer = by.consensus._sealer
            assert sealer is not None, "an open farm has no seals"
            return sealer.seal(topic, body)
        if as_node is None:
            return body
        assert self.farm.key is not None and not any(n.node_id == as_node and n.started for n in self.farm.nodes)
        sealer = self._sealers.get(as_node)
        if sealer is None:
            sealer = self._sealers[as_node] = security.Sealer(security.parse_key(self.farm.key), as_node, boot=1)
        return sealer.seal(topic, body)

    def send(self, topic: str, msg: Model | bytes, *, as_node: str | None = None, by: MemNode | None = None,
             qos: int = 1) -> None:
        """Publish ``msg`` on ``topic`` (see :meth:`payload`; bytes and no sealer: exactly those bytes)."""
        payload = self.payload(topic, msg, as_node=as_node, by=by)
        self.link.publish(topic, payload, qos=qos)

    def heard_kind(self, topic: str, kind: type[Model]) -> list[Message]:
        """The messages of ``kind`` heard on ``topic`` (sealed ones decoded from their body)."""
        out = []
        for m in self.heard:
            if m.topic != topic:
                continue
            body = m.payload.rpartition(b"\n")[0] or m.payload
            try:
                decoded = P.decode(body)
            except ProtocolError:
                decoded = None  # whatever it is, it is not one
            if isinstance(decoded, kind):
                out.append(m)
        return out
