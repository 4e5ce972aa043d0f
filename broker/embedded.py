"""The embedded MQTT broker (amqtt 0.12.1), with a lifecycle of its own and a bound on packet size.

We own the listening socket (amqtt's ``external`` listener type) instead of letting amqtt bind it:

* binding port 0 is race-free and its real port is known at once (``start()`` returns it);
* a connection that closes before sending a byte (a reachability probe) never reaches amqtt, which would
  log an error for each;
* every packet's *remaining length* is checked before amqtt reads its body: a client that announces a
  packet above ``max_packet_bytes`` is disconnected (amqtt has no limit of its own, MQTT 3.1.1 has no
  way to tell the client why: the server closes the connection, as for a protocol violation, §4.8).
  The client's will is published. A paho client that queued the oversized message at QoS 1 or 2 resends it
  after reconnecting, and is disconnected again: bound sizes before publishing.

One instance runs once: ``start()`` again raises, ``stop()`` is idempotent. amqtt errors become
:class:`shared.errors.BrokerError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

from amqtt.adapters import ReaderAdapter, StreamWriterAdapter  # type: ignore[import-untyped]
from amqtt.broker import Broker  # type: ignore[import-untyped]
from amqtt.errors import AMQTTError  # type: ignore[import-untyped]

from broker.choice import Address
from shared.errors import BrokerError

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET_BYTES = 1024 * 1024
"""Largest MQTT packet accepted (remaining length: topic, packet id and payload). Files never travel over MQTT."""

ANONYMOUS_PLUGINS: Mapping[str, Mapping[str, Any]] = {
    "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
}
"""The plugin set of an open farm. A farm key replaces it with an auth plugin (and ACLs) of its own."""

_LISTENER = "default"
STOP_GRACE_S = 3.0  # stop(): how long clients get to close before their connections are aborted


class _Oversize(Exception):
    pass


class _BoundedReader(ReaderAdapter):  # type: ignore[misc]
    """Reads a client's stream for amqtt while following MQTT framing (§2.2.3) to refuse oversized packets."""

    def __init__(self, reader: asyncio.StreamReader, first: bytes, limit: int) -> None:
        self._reader = reader
        self._pending = first
        self._limit = limit
        self._in_length = False
        self._length = 0
        self._multiplier = 1
        self._body_left = 0
        self.oversize: int | None = None

    async def read(self, n: int = -1) -> bytes:
        if self.oversize is not None:
            raise asyncio.IncompleteReadError(b"", n if n >= 0 else None)  # amqtt: "no more data"
        if n < 0:
            data, self._pending = self._pending + await self._reader.read(), b""
        else:
            head, self._pending = self._pending[:n], self._pending[n:]
            rest = n - len(head)
            data = head + (await self._reader.readexactly(rest) if rest > 0 else b"")
        try:
            self._follow(data)
        except _Oversize:
            raise asyncio.IncompleteReadError(b"", n if n >= 0 else None) from None
        return data

    def feed_eof(self) -> None:
        self._reader.feed_eof()

    def _follow(self, data: bytes) -> None:
        i = 0
        while i < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - i)
                self._body_left -= step
                i += step
                continue
            byte = data[i]
            i += 1
            if not self._in_length:  # first byte of a fixed header: packet type and flags
                self._in_length, self._length, self._multiplier = True, 0, 1
                continue
            self._length += (byte & 0x7F) * self._multiplier
            self._multiplier *= 128
            if byte & 0x80 and self._multiplier <= 128**3:
                continue
            self._in_length = False
            if self._length > self._limit or byte & 0x80:
                self.oversize = self._length
                raise _Oversize
            self._body_left = self._length


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker, without its bug 1 (LIBRARIES.md): on connect it pushes to the new client the retained
    messages matching *every* session's filters. A retained message is sent only for a filter that this
    session itself holds, as MQTT 3.1.1 §3.3.1.3 says, so ``mosquitto_sub -C 1`` gets what it asked for."""

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter = subscription[0]
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        await super()._publish_retained_messages_for_subscription(subscription, session)


class EmbeddedBroker:
    """An amqtt broker listening on ``host:port`` (port 0: any free port), for one run."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        plugins: Mapping[str, Mapping[str, Any]] | None = None,
        first_byte_timeout: float = 10.0,
    ) -> None:
        """``host`` is one address (never implied: ``0.0.0.0`` only if asked for). ``plugins``: amqtt plugin
        paths and their settings, replacing :data:`ANONYMOUS_PLUGINS` (e.g. a farm-key auth plugin).
        ``first_byte_timeout``: a connection silent this long is closed."""
        if not host:
            raise BrokerError("the broker needs an explicit bind address")
        self._host = host
        self._port = port
        self._max_packet_bytes = max_packet_bytes
        self._plugins = {
            k: dict(v) for k, v in (plugins if plugins is not None else ANONYMOUS_PLUGINS).items()
        }
        self._first_byte_timeout = first_byte_timeout
        self._server: asyncio.Server | None = None
        self._broker: Broker | None = None
        self._address: Address | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._warned_oversize = False
        self._state = "new"

    @property
    def address(self) -> Address | None:
        """``(host, port)`` while running, else ``None``."""
        return self._address if self._state == "running" else None

    @property
    def running(self) -> bool:
        """Whether the broker accepts clients."""
        return self._state == "running"

    @property
    def client_count(self) -> int:
        """MQTT clients connected now (reachability probes, which never send CONNECT, do not count)."""
        if self._broker is None or self._state != "running":
            return 0
        return sum(1 for session, _ in self._broker.sessions.values() if session.transitions.is_connected())

    def config(self, port: int) -> dict[str, Any]:
        """The complete amqtt configuration (never amqtt's defaults: no ``$SYS``, no 0.0.0.0)."""
        return {
            "listeners": {_LISTENER: {"type": "external", "bind": f"{self._host}:{port}"}},
            "plugins": {k: dict(v) for k, v in self._plugins.items()},
        }

    async def start(self) -> Address:
        """Bind, start amqtt, and return the address clients connect to. Raises :class:`BrokerError`."""
        if self._state != "new":
            raise BrokerError(f"an embedded broker runs once (it is {self._state})")
        self._state = "starting"
        try:
            self._server = await asyncio.start_server(
                self._accept, self._host, self._port, reuse_address=True, start_serving=False
            )
            port = self._server.sockets[0].getsockname()[1]
            self._broker = _Broker(self.config(port))
            await self._broker.start()
            await self._server.start_serving()
        except Exception as exc:  # amqtt raises errors of several unrelated trees (config: dacite)
            await self._teardown()
            self._state = "stopped"
            raise BrokerError(
                f"embedded broker on {self._host}:{self._port} failed to start: {exc!r}"
            ) from exc
        self._address = (self._host, port)
        self._state = "running"
        log.info("embedded broker listening on %s:%d", self._host, port)
        return self._address

    async def stop(self) -> None:
        """Disconnect every client and close the listener. Idempotent; a no-op before ``start()``."""
        if self._state in ("new", "stopping", "stopped"):
            self._state = "stopped" if self._state == "new" else self._state
            return
        self._state = "stopping"
        try:
            await self._teardown()
        finally:
            self._state = "stopped"
        log.info("embedded broker on %s stopped", self._address)

    async def _teardown(self) -> None:
        server, self._server = self._server, None
        broker, self._broker = self._broker, None
        if server is not None:
            # Python 3.11: a connection accepted by the loop but not yet handed to us when Server.close()
            # runs leaks its socket (its transport fails Server._attach). So stop accepting first, let
            # those in flight reach _accept (which closes them: we are stopping), then close.
            loop = asyncio.get_running_loop()
            for sock in server.sockets:
                loop.remove_reader(sock.fileno())
            for _ in range(3):  # transport creation, then connection_made
                await asyncio.sleep(0)
            server.close()
        try:
            if broker is not None and broker.transitions.state == "started":
                await self._shutdown(broker)
        except Exception as exc:  # e.g. transitions.MachineError: guarded above, converted here anyway
            raise BrokerError(f"embedded broker failed to stop: {exc!r}") from exc
        finally:
            connections = dict(self._connections)
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            for writer in connections.values():  # also those whose task was cancelled before it ran
                writer.close()
            if server is not None:
                await server.wait_closed()

    async def _shutdown(self, broker: Any) -> None:
        """amqtt's shutdown, bounded. It closes each client's stream and waits until the stream is closed, which
        for a client cut off with unsent data in its buffer is TCP's retransmission timeout, many minutes (found
        by the LAN tests: a node that lost the broker-host choice across a partition waited in here, and so never
        connected to the broker that won). After a grace period our clients' connections are aborted."""
        shutdown = asyncio.ensure_future(broker.shutdown())
        done, _ = await asyncio.wait({shutdown}, timeout=STOP_GRACE_S)
        if not done:
            log.warning("embedded broker on %s: clients did not close within %.0f s (cut off?): aborting them",
                        self._address, STOP_GRACE_S)
            for writer in list(self._connections.values()):
                writer.transport.abort()
            done, _ = await asyncio.wait({shutdown}, timeout=STOP_GRACE_S)
        if not done:
            shutdown.cancel()
            await asyncio.gather(shutdown, return_exceptions=True)
            log.error("embedded broker on %s: shutdown still waiting after aborting its clients; abandoned",
                      self._address)
            return
        shutdown.result()  # raises what amqtt raised

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback (not a coroutine) so that every connection is tracked from its first moment.
        if self._state not in ("starting", "running"):
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._connections[task] = writer
        task.add_done_callback(lambda t: self._connections.pop(t, None))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        adapter = StreamWriterAdapter(writer)
        try:
            try:
                first = await asyncio.wait_for(reader.read(1), self._first_byte_timeout)
            except (TimeoutError, OSError):
                first = b""
            broker = self._broker
            if not first or broker is None or self._state != "running":
                return  # a probe, a silent client, or we are stopping
            bounded = _BoundedReader(reader, first, self._max_packet_bytes)
            try:
                await broker.external_connected(bounded, adapter, _LISTENER)
            except (AMQTTError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("client connection ended: %r", exc)
            if bounded.oversize is not None:
                self._log_oversize(writer, bounded.oversize)
        finally:
            with contextlib.suppress(Exception):
                await adapter.close()
            writer.close()  # the adapter skips this when its drain fails (peer gone)

    def _log_oversize(self, writer: asyncio.StreamWriter, size: int) -> None:
        level = logging.DEBUG if self._warned_oversize else logging.WARNING
        self._warned_oversize = True
        log.log(
            level,
            "disconnected %s: packet of %d bytes exceeds the limit of %d",
            writer.get_extra_info("peername"),
            size,
            self._max_packet_bytes,
        )
