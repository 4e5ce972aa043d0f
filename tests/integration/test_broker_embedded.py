"""The embedded amqtt broker (broker.embedded) on 127.0.0.1, port 0, with real paho clients."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.embedded import EmbeddedBroker
from shared.errors import BrokerError
from tests import paho_thread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


class PahoClient:
    """A paho client in its own network thread (the broker runs in the test's event loop)."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}", protocol=mqtt.MQTTv311
        )
        self.messages: list[mqtt.MQTTMessage] = []
        self.connects = 0
        self.disconnects = 0
        self.subacks = 0
        self._lock = threading.Lock()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, *args: object) -> None:
        self.connects += 1

    def _on_disconnect(self, *args: object) -> None:
        self.disconnects += 1

    def _on_subscribe(self, *args: object) -> None:
        self.subacks += 1

    def _on_message(self, client: object, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(message)

    async def connect(self) -> None:
        await asyncio.to_thread(self.client.connect, *self.address, 5)
        self.client.loop_start()
        await wait_until(lambda: self.connects >= 1)

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        before = self.subacks
        self.client.subscribe(topic, qos)
        await wait_until(lambda: self.subacks > before)

    async def close(self) -> None:
        await asyncio.to_thread(paho_thread.stop, self.client)


@pytest.fixture
async def broker() -> AsyncIterator[EmbeddedBroker]:
    embedded = EmbeddedBroker("127.0.0.1", 0, max_packet_bytes=4096)
    await embedded.start()
    yield embedded
    await embedded.stop()


async def test_publish_and_receive_through_the_embedded_broker(broker: EmbeddedBroker) -> None:
    assert broker.address is not None
    host, port = broker.address
    assert host == "127.0.0.1" and port > 0
    sub, pub = PahoClient(broker.address), PahoClient(broker.address)
    await sub.connect()
    await pub.connect()
    try:
        await sub.subscribe("netq/test/#")
        await wait_until(lambda: broker.client_count == 2)
        pub.client.publish("netq/test/a", b"hello", qos=1)
        pub.client.publish("netq/test/b", b"world", qos=0)
        await wait_until(lambda: len(sub.messages) == 2)
        assert sorted((m.topic, m.payload) for m in sub.messages) == [
            ("netq/test/a", b"hello"),
            ("netq/test/b", b"world"),
        ]
    finally:
        await sub.close()
        await pub.close()
    await wait_until(lambda: broker.client_count == 0)


async def test_an_oversized_packet_disconnects_its_sender_only(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    assert broker.address is not None
    sub, pub = PahoClient(broker.address), PahoClient(broker.address)
    pub.client.will_set("big/will", b"gone", qos=1)
    await sub.connect()
    await pub.connect()
    try:
        await sub.subscribe("big/#")
        with caplog.at_level(logging.WARNING, logger="broker.embedded"):
            pub.client.publish("big/x", b"x" * 5000, qos=0)
            await wait_until(lambda: pub.disconnects >= 1)
        assert "exceeds the limit of 4096" in caplog.text
        await wait_until(lambda: pub.connects >= 2)  # paho reconnects by itself (after about 1 s)
        pub.client.publish("big/y", b"small", qos=0)
        await wait_until(lambda: any(m.topic == "big/y" for m in sub.messages))
        assert [(m.topic, m.payload) for m in sub.messages] == [("big/will", b"gone"), ("big/y", b"small")]
        assert sub.disconnects == 0
    finally:
        await sub.close()
        await pub.close()


async def test_a_tcp_probe_is_quiet_and_not_a_client(
    broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    assert broker.address is not None
    with caplog.at_level(logging.DEBUG):
        for _ in range(3):
            _, writer = await asyncio.open_connection(*broker.address)
            writer.close()
            await writer.wait_closed()
        client = PahoClient(broker.address)
        await client.connect()
        await wait_until(lambda: broker.client_count == 1)
        await client.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_lifecycle() -> None:
    embedded = EmbeddedBroker("127.0.0.1")
    await embedded.stop()  # before start: a no-op, and the instance is spent
    with pytest.raises(BrokerError):
        await embedded.start()

    embedded = EmbeddedBroker("127.0.0.1")
    address = await embedded.start()
    assert embedded.running and embedded.address == address
    with pytest.raises(BrokerError):
        await embedded.start()
    await embedded.stop()
    await embedded.stop()
    assert not embedded.running and embedded.address is None
    with pytest.raises(OSError):
        socket.create_connection(address, timeout=1).close()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_a_port_in_use_is_a_broker_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        embedded = EmbeddedBroker("127.0.0.1", taken.getsockname()[1])
        with pytest.raises(BrokerError):
            await embedded.start()
        await embedded.stop()


async def test_a_bad_plugin_is_a_broker_error() -> None:
    embedded = EmbeddedBroker("127.0.0.1", plugins={"no.such.module.Plugin": {}})
    with pytest.raises(BrokerError):
        await embedded.start()
    assert not embedded.running


def test_config_is_explicit() -> None:
    config = EmbeddedBroker("127.0.0.1").config(1234)
    assert config["listeners"] == {"default": {"type": "external", "bind": "127.0.0.1:1234"}}
    assert list(config["plugins"]) == ["amqtt.plugins.authentication.AnonymousAuthPlugin"]
    assert "0.0.0.0" not in repr(config) and "sys" not in repr(config).lower()
    custom = EmbeddedBroker("127.0.0.1", plugins={"my.auth.FarmKeyAuth": {"key": "k"}}).config(1)
    assert custom["plugins"] == {"my.auth.FarmKeyAuth": {"key": "k"}}


def _mqtt(kind: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(length) + body


def _utf8(text: str) -> bytes:
    return len(text).to_bytes(2, "big") + text.encode()


async def test_stop_does_not_wait_for_a_client_that_stopped_reading() -> None:
    """A client that no longer reads (cut off, paused) keeps amqtt's shutdown waiting for its stream to close
    for as long as TCP retries. stop() aborts it after a grace period: found by the LAN tests, where a node that
    lost the broker-host choice across a partition never connected to the winner."""
    import socket as socket_mod

    from broker import embedded as E

    broker = E.EmbeddedBroker("127.0.0.1")
    host, port = await broker.start()
    loop = asyncio.get_running_loop()
    stuck = socket_mod.create_connection((host, port))
    sender = socket_mod.create_connection((host, port))
    try:
        stuck.setsockopt(socket_mod.SOL_SOCKET, socket_mod.SO_RCVBUF, 4096)
        connect = _utf8("MQTT") + b"\x04\x02\x00\x3c"
        stuck.sendall(_mqtt(0x10, connect + _utf8("stuck")) + _mqtt(0x82, b"\x00\x01" + _utf8("#") + b"\x00"))
        sender.sendall(_mqtt(0x10, connect + _utf8("sender")))
        chunk = _mqtt(0x30, _utf8("t") + b"x" * 200_000)
        sender.setblocking(False)
        # Fill the stuck client's buffers: it never reads; the broker's writes to it back up.
        deadline = loop.time() + 10
        sent = 0
        while sent < 40 and loop.time() < deadline:
            try:
                await asyncio.wait_for(loop.sock_sendall(sender, chunk), 1.0)
                sent += 1
            except TimeoutError:
                break
        started = loop.time()
        async with asyncio.timeout(4 * E.STOP_GRACE_S):
            await broker.stop()
        assert loop.time() - started < 3 * E.STOP_GRACE_S
        assert not broker.running
    finally:
        stuck.close()
        sender.close()
