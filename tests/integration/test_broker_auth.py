"""Rogue and credentialed clients against the embedded broker of a farm with a key (broker.auth, broker.embedded).

A real EmbeddedBroker on 127.0.0.1, port 0, with the farm's plugins; real paho clients in their own threads.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.auth import FarmAccess, TopicPolicy
from broker.embedded import EmbeddedBroker
from node.app.client import FarmClient
from shared import security
from shared.errors import NetqError
from shared.security import Role
from tests import paho_thread
from tests.waiting import until

pytestmark = [pytest.mark.integration, pytest.mark.security, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
KEY = security.parse_key(security.new_farm_key())


def role_password(role: Role) -> str:
    return security.broker_password(KEY, role)


class Client:
    """A paho client in its own network thread, recording what it gets (the broker runs in the test's loop)."""

    def __init__(self, address: tuple[str, int], role: Role | None = None, *, password: str | None = None,
                 username: str | None = None, client_id: str | None = None,
                 will: tuple[str, bytes, bool] | None = None, clean_session: bool = True) -> None:
        self.address = address
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311, reconnect_on_failure=False, clean_session=clean_session)
        user = username if username is not None else (role.value if role is not None else None)
        if user is not None:
            secret = password if password is not None else (role_password(role) if role else None)
            self.client.username_pw_set(user, secret)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1, retain=will[2])
        self.connacks: list[ReasonCode] = []
        self.subacks: list[list[ReasonCode]] = []
        self.published: set[int] = set()
        self.messages: list[mqtt.MQTTMessage] = []
        self.disconnects = 0
        self._lock = threading.Lock()
        self.client.on_connect = lambda c, u, f, rc, p: self.connacks.append(rc)
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.append(list(rcs))
        self.client.on_publish = lambda c, u, mid, rc, p: self.published.add(mid)
        self.client.on_message = self._on_message

    def _on_disconnect(self, *args: object) -> None:
        self.disconnects += 1

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    def topics(self) -> list[str]:
        with self._lock:
            return [m.topic for m in self.messages]

    def got(self, topic: str) -> list[bytes]:
        with self._lock:
            return [m.payload for m in self.messages if m.topic == topic]

    async def connect(self) -> ReasonCode:
        """The CONNACK's reason code (success or refusal)."""
        await asyncio.to_thread(self.client.connect, *self.address, 5)
        self.client.loop_start()
        await until(lambda: self.connacks, "a CONNACK", 10)
        return self.connacks[0]

    async def subscribe(self, topic: str, qos: int = 1) -> ReasonCode:
        before = len(self.subacks)
        self.client.subscribe(topic, qos)
        await until(lambda: len(self.subacks) > before, f"SUBACK of {topic}", 10)
        return self.subacks[before][0]

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            await until(lambda: info.mid in self.published, f"PUBACK of {topic}", 10)

    async def close(self) -> None:
        await asyncio.to_thread(paho_thread.stop, self.client)


@pytest.fixture
async def farm_broker() -> AsyncIterator[EmbeddedBroker]:
    embedded = EmbeddedBroker("127.0.0.1", 0, access=FarmAccess.keyed(KEY))
    await embedded.start()
    yield embedded
    await embedded.stop()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(*args: Any, **kwargs: Any) -> Client:
        client = Client(*args, **kwargs)
        made.append(client)
        return client

    yield make
    await asyncio.gather(*(c.close() for c in made))


async def connected(make: Callable[..., Client], broker: EmbeddedBroker, role: Role, **kw: Any) -> Client:
    assert broker.address is not None
    client = make(broker.address, role, **kw)
    rc = await client.connect()
    assert not rc.is_failure, f"{role} refused: {rc}"
    return client


async def delivered_in_order(sender: Client, receiver: Client, marker: str) -> None:
    """Publish a marker after what the test sent; once it arrives, every earlier message has been routed
    (one publisher's messages are delivered in order, MQTT 3.1.1 §4.6)."""
    token = uuid.uuid4().hex.encode()
    await sender.publish(marker, token)
    await until(lambda: token in receiver.got(marker), f"the marker on {marker}", 10)


# --- CONNECT ---------------------------------------------------------------------------------------------------
async def test_an_anonymous_client_is_refused_at_connect(farm_broker: EmbeddedBroker,
                                                         clients: Callable[..., Client]) -> None:
    assert farm_broker.address is not None
    anonymous = clients(farm_broker.address)
    rc = await anonymous.connect()
    assert rc.is_failure and rc.getName() == "Not authorized"
    await until(lambda: anonymous.disconnects, "the broker closing the connection", 10)
    assert farm_broker.drops == {"connect_anonymous": 1}
    assert farm_broker.client_count == 0


@pytest.mark.parametrize(("username", "secret"), [
    ("node", "wrong"),
    ("node", security.broker_password(KEY, Role.VIEWER)),  # a real password, of another role
    ("operator", security.broker_password(security.parse_key(security.new_farm_key()), Role.OPERATOR)),
    ("admin", security.broker_password(KEY, Role.NODE)),  # not a role
    ("node", ""),
])
async def test_a_wrong_password_is_refused_at_connect(farm_broker: EmbeddedBroker, clients: Callable[..., Client],
                                                      username: str, secret: str) -> None:
    assert farm_broker.address is not None
    rogue = clients(farm_broker.address, username=username, password=secret)
    rc = await rogue.connect()
    assert rc.is_failure and rc.getName() in ("Bad user name or password", "Not authorized")
    await until(lambda: rogue.disconnects, "the broker closing the connection", 10)
    assert sum(farm_broker.drops.values()) == 1
    assert farm_broker.client_count == 0


async def test_every_role_with_its_password_is_admitted(farm_broker: EmbeddedBroker,
                                                        clients: Callable[..., Client]) -> None:
    for role in Role:
        await connected(clients, farm_broker, role)
    await until(lambda: farm_broker.client_count == len(Role), "every role connected", 10)
    assert farm_broker.drops == {}


async def test_a_will_the_role_may_not_publish_is_refused(farm_broker: EmbeddedBroker,
                                                          clients: Callable[..., Client]) -> None:
    """A will is a publish the broker makes later on the client's behalf: it obeys the publishing rules."""
    assert farm_broker.address is not None
    for will in [("netq/_proto/log", b"forged", False), ("netq/nodes/n1/state", b"{}", False),
                 ("homeassistant/status", b"offline", True)]:
        rogue = clients(farm_broker.address, Role.HOMEASSISTANT, will=will)
        rc = await rogue.connect()
        assert rc.is_failure, will
    assert farm_broker.drops == {"connect_will": 3}
    ha = await connected(clients, farm_broker, Role.HOMEASSISTANT, will=("homeassistant/status", b"offline", False))
    assert ha.connacks[0].getName() == "Success"


async def test_no_client_but_a_member_takes_over_a_members_client_id(farm_broker: EmbeddedBroker,
                                                                     clients: Callable[..., Client]) -> None:
    """amqtt acts on a CONNECT before authenticating it (it drops the session of that client id): without the
    broker's own admission, a client with no credentials could deafen a node by connecting with its id."""
    member = await connected(clients, farm_broker, Role.NODE, client_id="netq-n1")
    assert await member.subscribe("netq/#") == 1
    other = await connected(clients, farm_broker, Role.NODE)
    assert farm_broker.address is not None
    for role, clean in ((None, True), (None, False), (Role.VIEWER, True), (Role.HOMEASSISTANT, False)):
        rogue = clients(farm_broker.address, role, client_id="netq-n1", clean_session=clean)
        rc = await rogue.connect()
        assert rc.is_failure, role
        await delivered_in_order(other, member, "netq/events")  # the member still has its session and filter
    assert farm_broker.drops == {"connect_anonymous": 2, "connect_takeover": 2}
    assert member.disconnects == 0


# --- reading ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", [Role.HOMEASSISTANT, Role.OPERATOR, Role.VIEWER])
@pytest.mark.parametrize("topic_filter", ["#", "netq/#", "+/_proto/#"])
async def test_a_wildcard_subscriber_that_is_not_a_member_never_gets_protocol_messages(
        farm_broker: EmbeddedBroker, clients: Callable[..., Client], role: Role, topic_filter: str) -> None:
    node = await connected(clients, farm_broker, Role.NODE)
    await node.publish("other/farm/state", b"retained elsewhere", retain=True)
    await node.publish("netq/nodes/n1/state", b'{"state": "online"}', retain=True)
    watcher = await connected(clients, farm_broker, Role.NODE)
    assert await watcher.subscribe("#") == 1
    reader = await connected(clients, farm_broker, role)
    assert await reader.subscribe(topic_filter) == 1  # granted: deliveries are filtered per message
    for topic in ("netq/_proto/log", "netq/_proto/arbiter/n1", "netq/_proto", "other/farm/x"):
        await node.publish(topic, b"not for you")
    await node.publish("homeassistant/sensor/n1/state/config", b"{}")
    await delivered_in_order(node, watcher, "netq/events")
    await until(lambda: watcher.got("homeassistant/sensor/n1/state/config"), "the control message", 10)
    if topic_filter != "+/_proto/#":
        await until(lambda: reader.got("netq/events"), "the readable marker", 10)
    assert "netq/_proto/log" in watcher.topics()  # the member got them: they were sent
    leaked = [t for t in reader.topics() if "_proto" in t or t.startswith("other/")]
    assert leaked == []
    if topic_filter == "#":
        assert reader.got("netq/nodes/n1/state") == [b'{"state": "online"}']  # retained, readable
        assert reader.got("homeassistant/sensor/n1/state/config") == [b"{}"]


@pytest.mark.parametrize("topic_filter", ["netq/_proto/#", "netq/_proto/log", "netq/_proto", "other/#"])
async def test_a_subscription_that_can_match_nothing_readable_is_refused(
        farm_broker: EmbeddedBroker, clients: Callable[..., Client], topic_filter: str) -> None:
    reader = await connected(clients, farm_broker, Role.HOMEASSISTANT)
    assert (await reader.subscribe(topic_filter)).is_failure
    assert farm_broker.drops == {"subscribe_refused": 1}
    node = await connected(clients, farm_broker, Role.NODE)
    assert not (await node.subscribe(topic_filter)).is_failure


# --- publishing ------------------------------------------------------------------------------------------------
async def publish_and_observe(farm_broker: EmbeddedBroker, clients: Callable[..., Client], role: Role,
                              attempts: list[tuple[str, bool]]) -> Client:
    """``role`` publishes each (topic, retain) in turn; returns a member's ``#`` subscriber that saw the result."""
    watcher = await connected(clients, farm_broker, Role.NODE)
    assert await watcher.subscribe("#") == 1
    sender = await connected(clients, farm_broker, role)
    for topic, retain in attempts:
        await sender.publish(topic, b'{"node": "n1", "transaction": "t"}', retain=retain)
    await delivered_in_order(sender, watcher, "netq/request/queue/list")
    return watcher


async def test_homeassistant_cannot_write_protocol_state_retained_or_membership(
        farm_broker: EmbeddedBroker, clients: Callable[..., Client]) -> None:
    refused = [("netq/_proto/log", False), ("netq/_proto/arbiter/n1", False), ("netq/nodes/n1/state", False),
               ("netq/queues/default/jobs/j1", False), ("netq/bridge/state", False),
               ("netq/response/queue/list", False), ("netq/request/node/retire", False),
               ("homeassistant/sensor/n1/state/config", False), ("netq/request/node/pause", True),
               ("homeassistant/status", True)]
    allowed = [("netq/request/node/bed_cleared", False), ("netq/request/job/add", False),
               ("homeassistant/status", False)]
    watcher = await publish_and_observe(farm_broker, clients, Role.HOMEASSISTANT, refused + allowed)
    seen = watcher.topics()
    assert [t for t, _ in refused if t in seen and (t, False) not in allowed] == []
    assert all(t in seen for t, _ in allowed)
    assert farm_broker.drops == {"publish_refused": 8, "retained_refused": 2}
    assert farm_broker.retained_usage == (0, 0)  # nothing of theirs was kept
    late = await connected(clients, farm_broker, Role.NODE)
    assert await late.subscribe("#") == 1
    await delivered_in_order(late, late, "netq/events")
    assert [m for m in late.messages if m.retain] == []


async def test_a_viewer_sends_only_reading_requests(farm_broker: EmbeddedBroker,
                                                     clients: Callable[..., Client]) -> None:
    mutating = ["netq/request/job/add", "netq/request/job/remove", "netq/request/queue/pause",
                "netq/request/node/bed_cleared", "netq/request/node/retire", "netq/request/queue/list/x"]
    reading = ["netq/request/node/list", "netq/request/health_check"]
    watcher = await publish_and_observe(farm_broker, clients, Role.VIEWER, [(t, False) for t in mutating + reading])
    seen = watcher.topics()
    assert [t for t in mutating if t in seen] == []
    assert all(t in seen for t in reading)
    assert farm_broker.drops == {"publish_refused": len(mutating)}


async def test_an_operator_sends_every_request_but_nothing_else(farm_broker: EmbeddedBroker,
                                                                 clients: Callable[..., Client]) -> None:
    requests = ["netq/request/node/retire", "netq/request/job/add", "netq/request/node/pause"]
    refused = ["netq/_proto/log", "netq/events", "netq/response/job/add", "homeassistant/status"]
    attempts = [(t, False) for t in requests + refused] + [("netq/request/job/add", True)]
    watcher = await publish_and_observe(farm_broker, clients, Role.OPERATOR, attempts)
    seen = watcher.topics()
    assert all(t in seen for t in requests) and [t for t in refused if t in seen] == []
    assert farm_broker.drops == {"publish_refused": len(refused), "retained_refused": 1}


async def test_retained_requests_responses_and_protocol_messages_are_refused_from_members_too(
        farm_broker: EmbeddedBroker, clients: Callable[..., Client]) -> None:
    node = await connected(clients, farm_broker, Role.NODE)
    for topic in ("netq/request/job/add", "netq/response/job/add", "netq/_proto/log"):
        await node.publish(topic, b"{}", retain=True)
    await node.publish("netq/nodes/n1/state", b"{}", retain=True)
    await until(lambda: farm_broker.retained_usage[0] == 1, "the node state retained", 10)
    assert farm_broker.drops == {"retained_refused": 3}


# --- bounds ----------------------------------------------------------------------------------------------------
async def test_a_retained_flood_beyond_the_bound_is_not_kept_and_updates_still_work(
        clients: Callable[..., Client]) -> None:
    broker = EmbeddedBroker("127.0.0.1", access=FarmAccess.keyed(KEY), max_retained_topics=20,
                            max_retained_bytes=10_000)
    await broker.start()
    try:
        node = await connected(clients, broker, Role.NODE)
        for i in range(30):
            await node.publish(f"netq/junk/{i}", b"x" * 10, retain=True)
        # The broker acknowledges a publish before it has stored it: wait for the store.
        await until(lambda: broker.drops == {"retained_full": 10}, "the flood refused", 10)
        assert broker.retained_usage[0] == 20
        await node.publish("netq/junk/3", b"updated", retain=True)  # an existing topic: still kept
        await node.publish("netq/big", b"y" * 5000, retain=True)  # a new topic over the bound: not kept
        await node.publish("netq/junk/4", b"z" * 9_800, retain=True)  # an update over the byte bound: not kept
        await node.publish("netq/junk/5", b"", retain=True)  # clearing always works (and frees room)
        await until(lambda: broker.retained_usage[0] == 19, "the topic cleared", 10)
        assert broker.drops == {"retained_full": 12}
        assert broker.retained_usage[1] <= 10_000
        reader = await connected(clients, broker, Role.NODE)
        assert await reader.subscribe("netq/junk/#") == 1
        await until(lambda: len(reader.messages) == 19, "the retained messages", 10)
        assert reader.got("netq/junk/3") == [b"updated"] and reader.got("netq/junk/4") == [b"x" * 10]
        assert reader.got("netq/junk/25") == [] and reader.got("netq/junk/5") == []
    finally:
        await broker.stop()


async def test_a_member_may_send_a_snapshot_sized_packet_and_no_one_else(farm_broker: EmbeddedBroker,
                                                                         clients: Callable[..., Client]) -> None:
    big = b"s" * (2 << 20)
    watcher = await connected(clients, farm_broker, Role.NODE)
    assert await watcher.subscribe("netq/#") == 1
    node = await connected(clients, farm_broker, Role.NODE)
    await node.publish("netq/_proto/node/n2", big)
    await until(lambda: watcher.got("netq/_proto/node/n2") == [big], "the member's large message", 20)
    operator = await connected(clients, farm_broker, Role.OPERATOR)
    operator.client.publish("netq/request/job/add", big, qos=0)
    await until(lambda: operator.disconnects, "the operator disconnected", 10)
    assert farm_broker.drops == {"oversize": 1}
    await delivered_in_order(node, watcher, "netq/events")
    assert watcher.got("netq/request/job/add") == []


_BROKER_PROCESS = """
import asyncio, json, sys
from broker.auth import FarmAccess
from broker.embedded import EmbeddedBroker

async def main():
    broker = EmbeddedBroker("127.0.0.1", access=FarmAccess.keyed(bytes.fromhex(sys.argv[1])))
    host, port = await broker.start()
    print(port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    print(json.dumps(broker.drops), flush=True)
    await broker.stop()

asyncio.run(main())
"""


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def test_an_oversized_publish_is_refused_without_the_broker_growing(clients: Callable[..., Client]) -> None:
    """The broker runs in a process of its own, so that its peak RSS (VmHWM, reset through clear_refs) is not
    the test's: a broker that read the 2 MiB packet before refusing it would peak at least 2 MiB higher."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BROKER_PROCESS, KEY.hex(), cwd=REPO, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert proc.stdout is not None and proc.stdin is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        address = ("127.0.0.1", port)
        warm = clients(address, Role.OPERATOR)  # the first connection's allocations are not the packet's
        assert not (await warm.connect()).is_failure
        await warm.close()
        operator = clients(address, Role.OPERATOR)
        assert not (await operator.connect()).is_failure
        Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # peak RSS := current RSS
        before = _memory_kib(proc.pid)
        operator.client.publish("netq/request/job/add", os.urandom(2 << 20), qos=0)
        await until(lambda: operator.disconnects, "the operator disconnected", 10)
        after = _memory_kib(proc.pid)
        assert after["VmHWM"] - before["VmRSS"] < 1024, (before, after)
        proc.stdin.close()
        drops = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        assert drops == {"oversize": 1}
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- an open farm ----------------------------------------------------------------------------------------------
async def test_an_open_farm_admits_anyone_and_says_so(clients: Callable[..., Client],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    broker = EmbeddedBroker("127.0.0.1")
    with caplog.at_level("WARNING", logger="broker.embedded"):
        await broker.start()
    try:
        assert "OPEN" in caplog.text
        assert broker.address is not None
        anonymous = clients(broker.address)
        assert not (await anonymous.connect()).is_failure
        assert await anonymous.subscribe("#") == 1
        await anonymous.publish("netq/_proto/log", b"anyone may")
        await until(lambda: anonymous.got("netq/_proto/log"), "the open farm's message", 10)
        await anonymous.publish("netq/request/job/add", b"{}", retain=True)  # never retained, even when open
        await until(lambda: broker.drops == {"retained_refused": 1}, "the retained request refused", 10)
        member = clients(broker.address, username="node", password="")  # says it is a member: large packets
        assert not (await member.connect()).is_failure
        big = b"s" * (2 << 20)
        await member.publish("netq/_proto/node/n1", big)
        await until(lambda: anonymous.got("netq/_proto/node/n1") == [big], "the member's large message", 20)
        anonymous.client.publish("netq/_proto/node/n1", big, qos=0)  # held to 1 MiB
        await until(lambda: anonymous.disconnects, "the anonymous client disconnected", 10)
        assert broker.drops == {"retained_refused": 1, "oversize": 1}
    finally:
        await broker.stop()


def test_the_farm_plugins_carry_no_secret() -> None:
    """amqtt's configuration holds only digests of the role passwords: a leaked config logs no one in."""
    access = FarmAccess.keyed(KEY, TopicPolicy("farm/a", "ha"))
    text = json.dumps(EmbeddedBroker("127.0.0.1", access=access).config(1))
    assert all(role_password(r) not in text for r in Role)
    assert KEY.hex() not in text and security._b64(KEY) not in text and "farm/a" in text


async def test_farm_client_with_another_farms_key_fails_at_once_with_the_reason(
        farm_broker: EmbeddedBroker) -> None:
    assert farm_broker.address is not None
    other = security.parse_key(security.new_farm_key())
    client = FarmClient(farm_broker.address, username="operator",
                        password=security.broker_password(other, Role.OPERATOR))
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(NetqError, match="refused this client.*Bad user name or password"):
        await client.connect(timeout=30)
    assert loop.time() - started < 10  # the refusal, not the timeout
    good = FarmClient(farm_broker.address, username="operator", password=role_password(Role.OPERATOR))
    await good.connect()
    await good.close()
