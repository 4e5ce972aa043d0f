"""The embedded MQTT broker (amqtt 0.12.1), with a lifecycle of its own, the farm's access rules and bounds.

We own the listening socket (amqtt's ``external`` listener type) instead of letting amqtt bind it:

* binding port 0 is race-free and its real port is known at once (``start()`` returns it);
* a connection that closes before sending a byte (a reachability probe) never reaches amqtt, which would
  log an error for each;
* the CONNECT packet is read and admitted here (:meth:`broker.auth.FarmAccess.admit`) before amqtt sees it:
  anonymous clients, wrong passwords and wills the role may not publish get a refusing CONNACK (§3.2.2.3) and
  the connection is closed. amqtt 0.12.1 acts on a CONNECT before it authenticates it — it deletes the session
  of the same client id (clean session) or takes over its connection — so without this a client with no
  credentials could deafen any node by connecting with its client id. For the same reason a client that is not
  a member may not take over the client id of a connected member. The auth plugin checks again and remembers
  the role (broker/auth.py);
* every packet's *remaining length* is checked before amqtt reads its body: a client that announces a
  packet above its bound is disconnected (amqtt has no limit of its own, MQTT 3.1.1 has no
  way to tell the client why: the server closes the connection, as for a protocol violation, §4.8).
  The bound is ``max_packet_bytes`` (1 MiB), except for a connection admitted as ``node``: a member's protocol
  message (a snapshot of a large farm) may reach :data:`broker.auth.NODE_MAX_PACKET_BYTES`.
  The client's will is published. A paho client that queued the oversized message at QoS 1 or 2 resends it
  after reconnecting, and is disconnected again: bound sizes before publishing;
* retained messages are bounded (:data:`MAX_RETAINED_TOPICS`, :data:`MAX_RETAINED_BYTES`), refused from every
  client but members and on request, response and protocol topics from anyone; retained messages pushed on
  subscribe obey the reading rules like live ones; a persistent session's offline queue is bounded
  (:data:`MAX_QUEUED_MESSAGES`). Every refusal is counted (:attr:`EmbeddedBroker.drops`) and logged once.

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
from amqtt.contexts import Action  # type: ignore[import-untyped]
from amqtt.errors import AMQTTError  # type: ignore[import-untyped]

from broker.auth import (
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_UNACCEPTABLE_PROTOCOL,
    NODE_MAX_PACKET_BYTES,
    Admission,
    ConnectInfo,
    FarmAccess,
    Refusal,
    UnsupportedLevel,
    parse_connect,
    role_of,
)
from broker.choice import Address
from shared.errors import BrokerError, ProtocolError
from shared.security import Role

log = logging.getLogger(__name__)

DEFAULT_MAX_PACKET_BYTES = 1024 * 1024
"""Largest MQTT packet accepted (remaining length: topic, packet id and payload). Files never travel over MQTT."""

MAX_RETAINED_TOPICS = 20_000
MAX_RETAINED_BYTES = 64 * 1024 * 1024
"""Bounds on the retained store (topic and payload bytes). A farm keeps one retained message per node, per job
still listed and per Home Assistant entity (about twenty per node): a farm of 100 printers with 10,000 jobs stays
well below 20,000 topics, and 64 MiB holds them at over 3 KiB each. amqtt keeps retained messages in memory with
no bound of its own, so without these a member that misbehaves could grow the broker host without limit. Over the
bound a *new* retained topic is not kept (counted, logged once); updates of kept topics go on while the bytes fit."""

MAX_QUEUED_MESSAGES = 1000
"""Messages queued for one disconnected persistent session (mosquitto's default); newer ones are dropped."""

ANONYMOUS_PLUGINS: Mapping[str, Mapping[str, Any]] = FarmAccess().plugins()
"""The plugin set of an open farm. A farm key replaces it with an auth plugin and ACLs of its own (broker.auth)."""

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


class _Drops:
    """Counts of what the broker refused, by kind; the first of each kind is logged at warning level, the
    others at debug level (a hostile or broken client must not flood the log)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, kind: str, message: str, *args: Any) -> None:
        first = kind not in self.counts
        self.counts[kind] = self.counts.get(kind, 0) + 1
        log.log(logging.WARNING if first else logging.DEBUG, message, *args)


def _short(text: object, limit: int = 60) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[:limit] + "…"


def _retained_size(topic: str, data: bytes | bytearray | None) -> int:
    return len(topic.encode()) + len(data or b"")


class _Broker(Broker):  # type: ignore[misc]
    """amqtt's broker with the farm's rules on retained messages and deliveries, and without its bug 1
    (LIBRARIES.md): on connect it pushes to the new client the retained messages matching *every* session's
    filters. A retained message is sent only for a filter that this session itself holds, as MQTT 3.1.1
    §3.3.1.3 says, so ``mosquitto_sub -C 1`` gets what it asked for, and only if the session may read it."""

    def __init__(self, config: dict[str, Any], *, access: FarmAccess, drops: _Drops, max_retained_topics: int,
                 max_retained_bytes: int, max_queued_messages: int) -> None:
        self._nq_access = access
        self._nq_drops = drops
        self._nq_max_topics = max_retained_topics
        self._nq_max_bytes = max_retained_bytes
        self._nq_max_queued = max_queued_messages
        self._nq_retained_bytes = 0
        super().__init__(config)

    @property
    def retained_usage(self) -> tuple[int, int]:
        """(topics, bytes) of the retained store."""
        return len(self._retained_messages), self._nq_retained_bytes

    def _nq_role(self, session: Any) -> Role | None:
        # Every client of an open farm is a member (docs/security.md).
        return Role.NODE if self._nq_access.open else role_of(session)

    async def _topic_filtering(self, session: Any, topic: str, action: Action) -> bool:
        if role_of(session) is Role.NODE:
            return True  # a member may do everything, and most deliveries go to members: no plugin round trip
        allowed = bool(await super()._topic_filtering(session, topic, action))
        if not allowed and action != Action.RECEIVE:
            self._nq_drops.count(f"{action.value}_refused", "broker: %s (%s) may not %s %s",
                                 _short(session.client_id), role_of(session), action.value, _short(topic))
        return allowed

    async def _handle_message_delivery(self, client_session: Any, handler: Any, wait_deliver: Any) -> bool:
        message = wait_deliver.result()
        packet = getattr(message, "publish_packet", None)
        topic = getattr(message, "topic", None)
        if (packet is not None and packet.retain_flag and topic and "#" not in topic and "+" not in topic
                and not topic.startswith("$")):
            role = self._nq_role(client_session)
            if role is None or not self._nq_access.policy.may_retain(role, topic):
                self._nq_drops.count("retained_refused", "broker: dropped a retained publish on %s from %s (%s)",
                                     _short(topic), _short(client_session.client_id), role)
                return True  # the message is dropped; the connection stays
        return bool(await super()._handle_message_delivery(client_session, handler, wait_deliver))

    async def retain_message(self, source_session: Any, topic_name: str | None, data: bytes | bytearray | None,
                             qos: int | None = None) -> None:
        if topic_name is None:
            return
        old = self._retained_messages.get(topic_name)
        old_size = _retained_size(topic_name, old.data) if old is not None else 0
        if data:
            size = _retained_size(topic_name, data)
            if (old is None and len(self._retained_messages) >= self._nq_max_topics) or (
                    self._nq_retained_bytes - old_size + size > self._nq_max_bytes):
                self._nq_drops.count("retained_full", "broker: retained store full (%d topics, %d bytes): %s not "
                                     "kept", *self.retained_usage, _short(topic_name))
                return
        await super().retain_message(source_session, topic_name, data, qos)
        new = self._retained_messages.get(topic_name)
        self._nq_retained_bytes += (_retained_size(topic_name, new.data) if new is not None else 0) - old_size

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int, target_session: Any) -> None:
        if target_session.retained_messages.qsize() >= self._nq_max_queued:
            self._nq_drops.count("queue_full", "broker: offline queue of %s is full: message dropped",
                                 _short(target_session.client_id))
            return
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int], session: Any) -> None:
        topic_filter, qos = subscription
        holders = self._subscriptions.get(topic_filter, [])
        if not any(s.client_id == session.client_id for s, _ in holders):
            return
        handler = self._get_handler(session)
        role = self._nq_role(session)
        if handler is None or role is None:
            return
        policy = self._nq_access.policy
        tasks = [
            asyncio.ensure_future(handler.mqtt_publish(r.topic, r.data, min(qos, r.qos or qos), retain=True))
            for topic, r in list(self._retained_messages.items())
            if self._matches(topic, topic_filter) and policy.may_read(role, topic)
        ]
        if tasks:
            await asyncio.wait(tasks)


class EmbeddedBroker:
    """An amqtt broker listening on ``host:port`` (port 0: any free port), for one run."""

    def __init__(
        self,
        host: str,
        port: int = 0,
        *,
        access: FarmAccess | None = None,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        node_max_packet_bytes: int = NODE_MAX_PACKET_BYTES,
        max_retained_topics: int = MAX_RETAINED_TOPICS,
        max_retained_bytes: int = MAX_RETAINED_BYTES,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        plugins: Mapping[str, Mapping[str, Any]] | None = None,
        first_byte_timeout: float = 10.0,
    ) -> None:
        """``host`` is one address (never implied: ``0.0.0.0`` only if asked for). ``access``: the farm's
        credentials and topic policy (:meth:`FarmAccess.keyed`); None is an open farm, which admits anyone.
        ``plugins``: amqtt plugin paths and their settings, replacing the set ``access`` implies (tests).
        ``first_byte_timeout``: a connection silent this long, or whose CONNECT is not complete by then, is
        closed."""
        if not host:
            raise BrokerError("the broker needs an explicit bind address")
        self._host = host
        self._port = port
        self._access = access if access is not None else FarmAccess()
        self._max_packet_bytes = max_packet_bytes
        self._node_max_packet_bytes = max(node_max_packet_bytes, max_packet_bytes)
        self._retained_bounds = (max_retained_topics, max_retained_bytes, max_queued_messages)
        chosen = plugins if plugins is not None else self._access.plugins()
        self._plugins = {k: dict(v) for k, v in chosen.items()}
        self._first_byte_timeout = first_byte_timeout
        self._server: asyncio.Server | None = None
        self._broker: _Broker | None = None
        self._address: Address | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._drops = _Drops()
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

    @property
    def drops(self) -> dict[str, int]:
        """What was refused since start, by kind: ``connect_<refusal>`` (broker.auth.Refusal), ``oversize``,
        ``publish_refused``, ``subscribe_refused``, ``retained_refused``, ``retained_full``, ``queue_full``."""
        return dict(self._drops.counts)

    @property
    def retained_usage(self) -> tuple[int, int]:
        """(topics, bytes) in the retained store now."""
        return self._broker.retained_usage if self._broker is not None else (0, 0)

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
            topics, size, queued = self._retained_bounds
            self._broker = _Broker(self.config(port), access=self._access, drops=self._drops,
                                   max_retained_topics=topics, max_retained_bytes=size,
                                   max_queued_messages=queued)
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
        if self._access.open:
            log.warning("embedded broker on %s:%d is OPEN: it admits anonymous clients, who may read and steer "
                        "the farm (set farm.key to require credentials)", self._host, port)
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
            if not first or self._broker is None or self._state != "running":
                return  # a probe, a silent client, or we are stopping
            try:
                async with asyncio.timeout(self._first_byte_timeout):
                    connect = await self._read_connect(reader, writer, first)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                return
            broker = self._broker
            if connect is None or broker is None or self._state != "running":
                return
            packet, info = connect
            admission = self._admit(broker, info)
            if admission.role is None:
                self._drops.count(f"connect_{admission.refusal}", "broker: refused %s (client %s, user %s): %s",
                                  writer.get_extra_info("peername"), _short(info.client_id),
                                  _short(info.username), admission.refusal)
                await self._connack(writer, admission.code)
                return
            limit = self._node_max_packet_bytes if admission.large_packets else self._max_packet_bytes
            bounded = _BoundedReader(reader, packet, limit)
            try:
                await broker.external_connected(bounded, adapter, _LISTENER)
            except (AMQTTError, OSError, asyncio.IncompleteReadError) as exc:
                log.debug("client connection ended: %r", exc)
            if bounded.oversize is not None:
                self._log_oversize(writer, bounded.oversize, limit)
        finally:
            with contextlib.suppress(Exception):
                await adapter.close()
            writer.close()  # the adapter skips this when its drain fails (peer gone)

    async def _read_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                            first: bytes) -> tuple[bytes, ConnectInfo] | None:
        """The client's first packet, whole, and what admission needs from it; None (counted) when it is not a
        CONNECT we accept: the first packet must be one (§3.1.0-1), within the ordinary packet bound."""
        if first != b"\x10":  # CONNECT, flags 0 (§2.2.2)
            self._drops.count(f"connect_{Refusal.MALFORMED}", "broker: %s sent no CONNECT first",
                              writer.get_extra_info("peername"))
            return None
        header, length, multiplier = bytearray(first), 0, 1
        for _ in range(4):  # remaining length, §2.2.3
            byte = (await reader.readexactly(1))[0]
            header.append(byte)
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            if not byte & 0x80:
                break
        else:
            self._log_oversize(writer, length, self._max_packet_bytes)
            return None
        if length > self._max_packet_bytes:
            self._log_oversize(writer, length, self._max_packet_bytes)
            return None
        body = await reader.readexactly(length)
        try:
            info = parse_connect(body)
        except ProtocolError as exc:
            self._drops.count(f"connect_{Refusal.MALFORMED}", "broker: unreadable CONNECT from %s: %s",
                              writer.get_extra_info("peername"), exc)
            if isinstance(exc, UnsupportedLevel):
                await self._connack(writer, CONNACK_UNACCEPTABLE_PROTOCOL)
            return None
        return bytes(header) + body, info

    def _admit(self, broker: _Broker, info: ConnectInfo) -> Admission:
        admission = self._access.admit(info)
        if admission.role is None or admission.role is Role.NODE or self._access.open:
            return admission
        held = broker.sessions.get(info.client_id)
        session = held[0] if held else None
        if session is not None and role_of(session) is Role.NODE and session.transitions.is_connected():
            return Admission(None, Refusal.TAKEOVER, CONNACK_IDENTIFIER_REJECTED)
        return admission

    @staticmethod
    async def _connack(writer: asyncio.StreamWriter, code: int) -> None:
        """A refusing CONNACK (§3.2.2.3); the caller closes the connection."""
        writer.write(bytes((0x20, 0x02, 0x00, code)))
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.drain(), 1.0)

    def _log_oversize(self, writer: asyncio.StreamWriter, size: int, limit: int) -> None:
        self._drops.count("oversize", "disconnected %s: packet of %d bytes exceeds the limit of %d",
                          writer.get_extra_info("peername"), size, limit)
