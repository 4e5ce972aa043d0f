"""The link contract (``node/link/base.py``), checked against every implementation.

Each implementation gets a *harness* that knows how to do what the contract tests need but the ``Link``
protocol does not offer: make links, kill a client without DISCONNECT, stop and start the broker, and hold a
client back from reconnecting. MqttLink runs against a real amqtt broker on 127.0.0.1; its crash is a real
process killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from node.link.base import Link, LinkOptions, Message, Will
from node.link.memory import Delivery, MemoryBroker, MemoryLink
from node.link.mqtt import MqttLink
from shared.errors import LinkError

TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


class Inbox:
    """A message handler that records what it gets and lets a test wait for a condition on it."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self._changed = asyncio.Event()

    def __call__(self, message: Message) -> None:
        self.messages.append(message)
        self._changed.set()

    @property
    def topics(self) -> list[str]:
        return [m.topic for m in self.messages]

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.messages if m.topic == topic]

    async def wait_for(self, predicate: Callable[[list[Message]], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                if predicate(self.messages):
                    return
                await self._changed.wait()

    async def wait_message(self, topic: str, payload: bytes | None = None) -> Message:
        def found(ms: list[Message]) -> bool:
            return any(m.topic == topic and (payload is None or m.payload == payload) for m in ms)

        await self.wait_for(found)
        return next(
            m for m in self.messages if m.topic == topic and (payload is None or m.payload == payload)
        )


class ConnectionLog:
    def __init__(self) -> None:
        self.states: list[bool] = []
        self._changed = asyncio.Event()

    def __call__(self, connected: bool) -> None:
        self.states.append(connected)
        self._changed.set()

    async def wait_state(self, connected: bool, timeout: float = TIMEOUT) -> None:
        await self.wait_until(lambda states: bool(states) and states[-1] is connected, timeout)

    async def wait_until(self, predicate: Callable[[list[bool]], bool], timeout: float = TIMEOUT) -> None:
        async with asyncio.timeout(timeout):
            while True:
                self._changed.clear()
                if predicate(self.states):
                    return
                await self._changed.wait()


class Harness:
    name = "?"

    def __init__(self) -> None:
        self._links: list[Link] = []

    def make(self, options: LinkOptions) -> Link:
        raise NotImplementedError

    async def link(
        self,
        client_id: str,
        *,
        will: Will | None = None,
        birth: Iterable[Message] = (),
        subscribe: Iterable[tuple[str, Callable[[Message], None]]] = (),
        connect: bool = True,
    ) -> Link:
        link = self.make(LinkOptions(client_id, will=will, birth=list(birth)))
        self._links.append(link)
        for filter_, handler in subscribe:
            link.subscribe(filter_, handler)
        await link.start()
        if connect:
            await link.wait_connected(TIMEOUT)
        return link

    async def crashable(
        self, client_id: str, will: Will, birth: list[Message]
    ) -> Callable[[], Awaitable[None]]:
        """A connected client with this will and birth; the returned function kills it without DISCONNECT."""
        raise NotImplementedError

    async def settled(self, client_id: str) -> None:
        """Return once the broker has finished with a client that disconnected."""

    async def stop_broker(self) -> None:
        raise NotImplementedError

    async def start_broker(self) -> None:
        raise NotImplementedError

    def hold(self, client_id: str) -> None:
        """Keep this client from (re)connecting until release()."""
        raise NotImplementedError

    def release(self, client_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        for link in self._links:
            await link.stop()


class MemoryHarness(Harness):
    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.broker = MemoryBroker(foreign_retained=True)  # behave like amqtt 0.12.1

    def make(self, options: LinkOptions) -> MemoryLink:
        return MemoryLink(self.broker, options)

    async def crashable(
        self, client_id: str, will: Will, birth: list[Message]
    ) -> Callable[[], Awaitable[None]]:
        link = MemoryLink(self.broker, LinkOptions(client_id, will=will, birth=birth))
        self._links.append(link)
        await link.start()
        await link.wait_connected(TIMEOUT)

        async def kill() -> None:
            link.crash()

        return kill

    async def stop_broker(self) -> None:
        self.broker.stop()

    async def start_broker(self) -> None:
        self.broker.start()

    def hold(self, client_id: str) -> None:
        self.broker.refuse(client_id)

    def release(self, client_id: str) -> None:
        self.broker.admit(client_id)


CHILD = """
import asyncio, sys
from node.link.base import LinkOptions, Message, Will
from node.link.mqtt import MqttLink

async def main():
    host, port, client_id, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    async def address():
        return host, port
    will = Will(topic, b"offline", retain=True, qos=1)
    link = MqttLink(address, LinkOptions(client_id, will=will, birth=[Message(topic, b"online", True, 1)]))
    await link.start()
    await link.wait_connected(10)
    print("connected", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class MqttHarness(Harness):
    name = "mqtt"

    def __init__(self, server: Any) -> None:
        super().__init__()
        self.server = server
        self._gates: dict[str, asyncio.Event] = {}
        self._children: list[asyncio.subprocess.Process] = []

    def _gate(self, client_id: str) -> asyncio.Event:
        if client_id not in self._gates:
            self._gates[client_id] = asyncio.Event()
            self._gates[client_id].set()
        return self._gates[client_id]

    def make(self, options: LinkOptions) -> MqttLink:
        gate = self._gate(options.client_id)

        async def address() -> tuple[str, int]:
            await gate.wait()
            return self.server.address  # type: ignore[no-any-return]

        return MqttLink(address, options)

    async def crashable(
        self, client_id: str, will: Will, birth: list[Message]
    ) -> Callable[[], Awaitable[None]]:
        assert will.payload == b"offline" and birth == [Message(will.topic, b"online", True, 1)]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            CHILD,
            self.server.host,
            str(self.server.port),
            client_id,
            will.topic,
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
            env=env,
        )
        self._children.append(proc)
        assert proc.stdout is not None
        async with asyncio.timeout(TIMEOUT):
            assert await proc.stdout.readline() == b"connected\n"

        async def kill() -> None:
            proc.kill()  # SIGKILL: the kernel closes the socket, no DISCONNECT is ever sent
            await proc.wait()

        return kill

    async def settled(self, client_id: str) -> None:
        # amqtt publishes a will before it marks the session disconnected; no event to wait on, so poll.
        async with asyncio.timeout(TIMEOUT):
            while True:
                entry = self.server.broker.sessions.get(client_id)
                if entry is None or entry[0].transitions.state != "connected":
                    return
                await asyncio.sleep(0.01)

    async def stop_broker(self) -> None:
        await self.server.stop()

    async def start_broker(self) -> None:
        await self.server.start()

    def hold(self, client_id: str) -> None:
        self._gate(client_id).clear()

    def release(self, client_id: str) -> None:
        self._gate(client_id).set()

    async def close(self) -> None:
        for gate in self._gates.values():
            gate.set()
        await super().close()
        for proc in self._children:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


@pytest.fixture(params=["memory", "mqtt"])
def broker_server(request: pytest.FixtureRequest) -> Any:
    """None for the memory link, a running amqtt server for MqttLink (async fixtures can't be pulled lazily)."""
    return request.getfixturevalue("amqtt_server") if request.param == "mqtt" else None


@pytest.fixture
async def harness(broker_server: Any) -> AsyncIterator[Harness]:
    h: Harness = MemoryHarness() if broker_server is None else MqttHarness(broker_server)
    try:
        yield h
    finally:
        await h.close()


# -- the contract -----------------------------------------------------------------------------------------


async def test_publish_subscribe_round_trip(harness: Harness) -> None:
    inbox = Inbox()
    await harness.link("sub", subscribe=[("a/b", inbox)])
    pub = await harness.link("pub")
    pub.publish("a/b", b"hello", qos=1)
    pub.publish("a/b", b"zero", qos=0)
    await inbox.wait_for(lambda ms: len(ms) == 2)
    assert inbox.payloads("a/b") == [b"hello", b"zero"]
    assert not inbox.messages[0].retain


async def test_wildcard_filters(harness: Harness) -> None:
    plus, hash_ = Inbox(), Inbox()
    await harness.link("sub", subscribe=[("w/+/temp", plus), ("w/x/#", hash_)])
    pub = await harness.link("pub")
    for topic in ["w/a/temp", "w/a/hum", "w/a/b/temp", "w/x", "w/x/y/z", "w/x/temp", "other/x"]:
        pub.publish(topic, b"1")
    pub.publish("w/end/temp", b"marker")
    await plus.wait_message("w/end/temp")
    await hash_.wait_message("w/x/temp")
    # w/x/temp matches both filters: amqtt sends one copy per matching subscription (allowed by MQTT 3.1.1
    # §3.3.5), and each copy reaches every matching handler. Handlers must be idempotent.
    assert list(dict.fromkeys(plus.topics)) == ["w/a/temp", "w/x/temp", "w/end/temp"]
    # "#" also matches the parent level (§4.7.1.2)
    assert list(dict.fromkeys(hash_.topics)) == ["w/x", "w/x/y/z", "w/x/temp"]


async def test_retained_message_reaches_late_subscriber(harness: Harness) -> None:
    early = Inbox()
    await harness.link("early", subscribe=[("ret/#", early)])
    pub = await harness.link("pub")
    pub.publish("ret/state", b"v1", qos=1, retain=True)
    pub.publish("ret/state", b"v2", qos=1, retain=True)
    await early.wait_message("ret/state", b"v2")  # the broker has stored it

    late = Inbox()
    await harness.link("late", subscribe=[("ret/+", late)])
    msg = await late.wait_message("ret/state")
    assert msg.payload == b"v2" and msg.retain
    # Not "exactly once": amqtt 0.12.1 (and the memory broker emulating it) also pushes it on connect because
    # "early" subscribed to ret/#. Never the old value, though.
    assert set(late.payloads("ret/state")) == {b"v2"}


async def test_per_publisher_order_of_qos1_messages(harness: Harness) -> None:
    inbox = Inbox()
    await harness.link("sub", subscribe=[("ord/#", inbox)])
    p1 = await harness.link("p1")
    p2 = await harness.link("p2")
    for i in range(500):
        p1.publish("ord/p1", str(i).encode(), qos=1)
        if i % 5 == 0:
            p2.publish("ord/p2", str(i).encode(), qos=1)
    await inbox.wait_for(lambda ms: len(ms) >= 600, timeout=30)
    assert inbox.payloads("ord/p1") == [str(i).encode() for i in range(500)]
    assert inbox.payloads("ord/p2") == [str(i).encode() for i in range(0, 500, 5)]


async def test_last_will_when_client_dies_without_disconnect(harness: Harness) -> None:
    inbox = Inbox()
    await harness.link("watcher", subscribe=[("will/#", inbox)])
    kill = await harness.crashable(
        "victim",
        Will("will/victim", b"offline", retain=True, qos=1),
        [Message("will/victim", b"online", True, 1)],
    )
    await inbox.wait_message("will/victim", b"online")
    await kill()
    await inbox.wait_message("will/victim", b"offline")

    late = Inbox()
    await harness.link("late", subscribe=[("will/victim", late)])
    assert (await late.wait_message("will/victim")).payload == b"offline"  # the will was retained


async def test_no_will_on_clean_stop(harness: Harness) -> None:
    inbox = Inbox()
    watcher = await harness.link("watcher", subscribe=[("will/#", inbox)])
    victim = await harness.link(
        "victim", will=Will("will/victim", b"offline"), birth=[Message("will/victim", b"online", True, 1)]
    )
    await inbox.wait_message("will/victim", b"online")
    await victim.stop()
    await victim.stop()  # idempotent
    await harness.settled("victim")
    watcher.publish("will/marker", b"after")  # a will would have been routed before this
    await inbox.wait_message("will/marker")
    assert b"offline" not in inbox.payloads("will/victim")

    late = Inbox()
    await harness.link("late", subscribe=[("will/victim", late)])
    assert (await late.wait_message("will/victim")).payload == b"online"


async def test_resubscribe_and_queued_qos1_after_broker_restart(harness: Harness) -> None:
    inbox = Inbox()
    sub_log, pub_log = ConnectionLog(), ConnectionLog()
    sub = harness.make(LinkOptions("sub"))
    pub = harness.make(LinkOptions("pub"))
    harness._links += [sub, pub]
    sub.subscribe("r/#", inbox)
    sub.on_connection(sub_log)
    pub.on_connection(pub_log)
    await sub.start()
    await pub.start()
    await sub.wait_connected(TIMEOUT)
    await pub.wait_connected(TIMEOUT)
    pub.publish("r/before", b"x")
    await inbox.wait_message("r/before")

    harness.hold("pub")  # so that the subscriber is back before the publisher flushes its queue
    await harness.stop_broker()
    await sub_log.wait_state(False)
    await pub_log.wait_state(False)
    assert not pub.connected
    for i in range(20):
        pub.publish("r/queued", str(i).encode(), qos=1)  # must not raise
        if i == 10:
            pub.publish("r/queued", b"qos0", qos=0)  # dropped: MQTT 3.1.1 semantics
    await harness.start_broker()
    await sub.wait_connected(TIMEOUT)  # connected means subscriptions re-applied
    harness.release("pub")
    await pub.wait_connected(TIMEOUT)
    await inbox.wait_for(lambda ms: len(ms) >= 21)
    assert inbox.payloads("r/queued") == [str(i).encode() for i in range(20)]
    assert sub_log.states == [True, False, True]
    assert pub_log.states == [True, False, True]


async def test_handler_exception_does_not_stop_delivery(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Message] = []

    def bad(message: Message) -> None:
        calls.append(message)
        raise RuntimeError("boom")

    good = Inbox()
    link = await harness.link("sub", subscribe=[("h/#", bad), ("h/#", good)])
    pub = await harness.link("pub")
    for i in range(3):
        pub.publish(f"h/{i}", b"x")
    await good.wait_message("h/2")
    assert len(calls) == 3 and link.connected
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("node.link")]
    assert len(errors) == 1 and "boom" in (errors[0].exc_text or "")


async def test_messages_for_filters_not_subscribed_are_not_dispatched(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="node.link")
    other = Inbox()
    await harness.link("other", subscribe=[("other/#", other)])
    pub = await harness.link("pub")
    pub.publish("other/r", b"retained", qos=1, retain=True)
    await other.wait_message("other/r")

    # amqtt 0.12.1 pushes other/r to "mine" on connect, because "other" subscribed to other/#.
    mine = Inbox()
    link = await harness.link("mine", subscribe=[("mine/#", mine)])
    link.publish("mine/marker", b"m")
    await mine.wait_message("mine/marker")
    assert mine.topics == ["mine/marker"]
    assert any("ignored 'other/r'" in r.getMessage() for r in caplog.records)


async def test_connection_handlers_and_stop(harness: Harness) -> None:
    log = ConnectionLog()
    link = harness.make(LinkOptions("c"))
    harness._links.append(link)
    link.on_connection(log)
    assert not link.connected
    await link.start()
    await link.wait_connected(TIMEOUT)
    assert link.connected and log.states == [True]
    await link.stop()
    assert not link.connected and log.states == [True, False]
    link.publish("c/after", b"x")  # a stopped link drops, never raises
    with pytest.raises(LinkError):
        await link.wait_connected(0.1)


async def test_wait_connected_times_out_with_link_error(harness: Harness) -> None:
    harness.hold("nobody")
    link = await harness.link("nobody", connect=False)
    with pytest.raises(LinkError):
        await link.wait_connected(0.2)
    harness.release("nobody")
    await link.wait_connected(TIMEOUT)


async def test_invalid_arguments_raise_link_error(harness: Harness) -> None:
    link = await harness.link("bad")
    for topic in ["", "a/+", "a/#"]:
        with pytest.raises(LinkError):
            link.publish(topic, b"x")
    for filter_ in ["", "a/#/b", "a+", "a/b#"]:
        with pytest.raises(LinkError):
            link.subscribe(filter_, Inbox())
    with pytest.raises(LinkError):
        link.publish("a", b"x", qos=3)


async def test_qos1_published_just_before_stop_is_delivered(harness: Harness) -> None:
    inbox = Inbox()
    await harness.link("sub", subscribe=[("last/#", inbox)])
    pub = await harness.link("pub")
    for i in range(50):
        pub.publish("last/words", str(i).encode(), qos=1)
    await pub.stop()  # waits for the acknowledgements before DISCONNECT
    await inbox.wait_for(lambda ms: len(ms) >= 50)
    assert inbox.payloads("last/words") == [str(i).encode() for i in range(50)]


async def test_handlers_are_never_called_inside_publish(harness: Harness) -> None:
    inbox = Inbox()
    link = await harness.link("self", subscribe=[("s/#", inbox)])
    link.publish("s/1", b"x")
    assert inbox.messages == []
    await inbox.wait_message("s/1")


# -- MqttLink only ----------------------------------------------------------------------------------------


async def test_mqtt_reconnect_now_follows_the_broker_to_a_new_address(amqtt_server: Any) -> None:
    from tests.conftest import AmqttServer

    second = AmqttServer()
    await second.start()
    current: list[tuple[str, int]] = [amqtt_server.address]

    async def address() -> tuple[str, int]:
        return current[0]

    inbox, log = Inbox(), ConnectionLog()
    link = MqttLink(address, LinkOptions("mover", birth=[Message("m/state", b"online", True, 1)]))
    link.subscribe("m/#", inbox)
    link.on_connection(log)
    try:
        await link.start()
        await link.wait_connected(TIMEOUT)
        await inbox.wait_message("m/state")  # the birth on the first broker, before we leave it
        current[0] = second.address
        link.reconnect_now()
        await log.wait_until(lambda states: states == [True, False, True])
        assert link.address == second.address
        link.publish("m/x", b"on the new broker")
        await inbox.wait_message("m/x")  # subscriptions re-applied there
        await inbox.wait_for(lambda ms: len([m for m in ms if m.topic == "m/state"]) >= 2)
        assert "m/state" in second.broker.retained_messages  # birth published on the new broker
    finally:
        await link.stop()
        await second.stop()


async def test_mqtt_start_before_broker_exists_then_connects() -> None:
    from tests.conftest import AmqttServer

    server = AmqttServer()  # not started: connections are refused

    async def address() -> tuple[str, int]:
        return server.address

    link = MqttLink(address, LinkOptions("early"))
    try:
        await link.start()
        with pytest.raises(LinkError):
            await link.wait_connected(0.3)
        await server.start()
        await link.wait_connected(TIMEOUT)  # backoff is capped at 2 s
    finally:
        await link.stop()
        await server.stop()


async def test_mqtt_credentials_and_refused_connection(caplog: pytest.LogCaptureFixture) -> None:
    from tests.conftest import AmqttServer

    # amqtt 0.12.1: with allow_anonymous False, any client that sends a username is let in.
    server = AmqttServer(
        plugins={"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False}}
    )
    await server.start()

    async def address() -> tuple[str, int]:
        return server.address

    anonymous = MqttLink(address, LinkOptions("anon"))
    named = MqttLink(address, LinkOptions("named", username="node-1", password="secret"))
    try:
        await anonymous.start()
        await named.start()
        await named.wait_connected(TIMEOUT)
        with pytest.raises(LinkError):
            await anonymous.wait_connected(0.5)
        assert any("refused" in r.getMessage() for r in caplog.records if r.name == "node.link.mqtt")
    finally:
        await anonymous.stop()
        await named.stop()
        await server.stop()


# -- MemoryBroker fault hooks -----------------------------------------------------------------------------


@pytest.fixture
async def memory() -> AsyncIterator[MemoryHarness]:
    h = MemoryHarness()
    try:
        yield h
    finally:
        await h.close()


async def test_memory_disconnect_fires_will_and_reconnects(memory: MemoryHarness) -> None:
    inbox, log = Inbox(), ConnectionLog()
    await memory.link("watcher", subscribe=[("st/#", inbox)])
    victim = memory.make(
        LinkOptions("victim", will=Will("st/v", b"offline"), birth=[Message("st/v", b"online")])
    )
    memory._links.append(victim)
    victim.on_connection(log)
    await victim.start()
    await inbox.wait_message("st/v", b"online")
    memory.broker.disconnect("victim")
    await inbox.wait_message("st/v", b"offline")
    await inbox.wait_for(lambda ms: [m.payload for m in ms] == [b"online", b"offline", b"online"])
    assert log.states == [True, False, True]


async def test_memory_kill_is_final(memory: MemoryHarness) -> None:
    inbox = Inbox()
    await memory.link("watcher", subscribe=[("st/#", inbox)])
    victim = await memory.link("victim", will=Will("st/v", b"offline"))
    memory.broker.kill("victim")
    await inbox.wait_message("st/v", b"offline")
    assert not victim.connected and "victim" not in memory.broker.clients
    victim.publish("st/v", b"ghost")  # a dead link publishes nothing
    memory.broker.start()  # nothing brings it back
    await memory.link("marker", birth=[Message("st/m", b"m")])
    await inbox.wait_message("st/m")
    assert inbox.payloads("st/v") == [b"offline"]


async def test_memory_drop_rule(memory: MemoryHarness) -> None:
    inbox = Inbox()
    await memory.link("sub", subscribe=[("d/#", inbox)])
    pub = await memory.link("pub")
    remove = memory.broker.drop(lambda d: d.receiver == "sub" and d.message.payload == b"lost")
    pub.publish("d/1", b"lost")
    pub.publish("d/2", b"kept")
    await inbox.wait_message("d/2")
    remove()
    pub.publish("d/3", b"lost")
    await inbox.wait_message("d/3")
    assert inbox.topics == ["d/2", "d/3"]
    assert Delivery("a", "b", Message("t", b"")).receiver == "b"


async def test_memory_partition_and_heal(memory: MemoryHarness) -> None:
    left, right = Inbox(), Inbox()
    await memory.link("l", subscribe=[("p/#", left)])
    r = await memory.link("r", subscribe=[("p/#", right)])
    lp = await memory.link("lp")
    memory.broker.partition({"l", "lp"})
    lp.publish("p/from-left", b"x", retain=True)
    r.publish("p/from-right", b"y")
    await left.wait_message("p/from-left")
    await right.wait_message("p/from-right")
    late_right = Inbox()
    await memory.link("r2", subscribe=[("p/#", late_right)])  # unlisted: on the right side
    r.publish("p/marker", b"m")
    await late_right.wait_message("p/marker")
    assert left.topics == ["p/from-left"]
    assert right.topics == ["p/from-right", "p/marker"]
    assert late_right.topics == ["p/marker"]  # the left side's retained message is not visible
    memory.broker.heal()
    r.publish("p/healed", b"z")
    await left.wait_message("p/healed")


async def test_memory_refuse_and_admit(memory: MemoryHarness) -> None:
    log = ConnectionLog()
    link = memory.make(LinkOptions("x"))
    memory._links.append(link)
    link.on_connection(log)
    memory.broker.refuse("x")
    await link.start()
    link.publish("q/1", b"queued")
    inbox = Inbox()
    await memory.link("sub", subscribe=[("q/#", inbox)])
    memory.broker.admit("x")
    await inbox.wait_message("q/1")
    assert log.states == [True]


async def test_memory_empty_retained_payload_clears_topic(memory: MemoryHarness) -> None:
    pub = await memory.link("pub")
    pub.publish("c/t", b"v", retain=True)
    assert memory.broker.retained["c/t"].payload == b"v"
    pub.publish("c/t", b"", retain=True)
    assert "c/t" not in memory.broker.retained


async def test_memory_restart_clears_retained_and_reconnects(memory: MemoryHarness) -> None:
    log = ConnectionLog()
    link = memory.make(LinkOptions("x"))
    memory._links.append(link)
    link.on_connection(log)
    await link.start()
    await link.wait_connected(TIMEOUT)
    link.publish("k/t", b"v", retain=True)
    memory.broker.restart()
    assert memory.broker.retained == {}
    await log.wait_until(lambda states: states == [True, False, True])


async def test_memory_client_id_takeover_does_not_flap(memory: MemoryHarness) -> None:
    first = await memory.link("twin")
    second = await memory.link("twin")
    assert second.connected and not first.connected
    assert memory.broker.clients == ["twin"]


async def test_mqtt_link_turns_nagle_off(amqtt_server: Any) -> None:
    """With Nagle's algorithm on, a small publish sent while the previous packet is unacknowledged waits for the
    broker's delayed ACK (40 ms on Linux): an Ack right after paho's PUBACK of the entry did, on every commit."""
    import socket as socket_mod

    link = MqttLink(lambda: _address(amqtt_server), LinkOptions("nodelay"))
    try:
        await link.start()
        await link.wait_connected(TIMEOUT)
        sock = link._client.socket()
        assert isinstance(sock, socket_mod.socket)
        assert sock.getsockopt(socket_mod.IPPROTO_TCP, socket_mod.TCP_NODELAY) != 0
    finally:
        await link.stop()


async def _address(server: Any) -> tuple[str, int]:
    return tuple(server.address)  # type: ignore[return-value]
