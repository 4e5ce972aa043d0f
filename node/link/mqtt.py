"""The real link: paho-mqtt 2.x driven from the asyncio event loop (never from paho's own thread).

The pattern is aiomqtt's and Home Assistant's: paho's socket callbacks register its socket with the loop
(``add_reader`` → ``loop_read``, ``add_writer`` → ``loop_write``), ``loop_misc`` runs every second for
keepalive, and only the blocking TCP connect runs in the default executor. While that connect runs, the loop
thread does not touch the client, and socket callbacks made from the worker thread are ignored: the socket
is registered from the loop once ``connect()`` returns.

A supervisor task owns the connection: it awaits the address provider (the broker may have moved), connects,
waits for the socket to close, and reconnects with a capped backoff until :meth:`MqttLink.stop`.

Ordering (MQTT 3.1.1 §4.6): paho re-sends its in-flight messages only when CONNACK arrives, so anything
published between a connection loss and the end of CONNACK processing is held here and handed to paho after
that re-send; per-publisher order survives reconnects.

Every paho error (``ValueError`` for bad arguments, result codes) becomes :class:`~shared.errors.LinkError`
in :func:`_paho`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.client import ConnectFlags, DisconnectFlags
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from shared.errors import LinkError

from .base import AddressProvider, BrokerAddress, ConnectionHandler, LinkOptions, Message, MessageHandler
from .dispatch import HandlerTable, check_filter, check_qos, check_topic, preview

_LOGGER = logging.getLogger(__name__)

MAX_INFLIGHT = 100
MISC_INTERVAL = 1.0  # seconds between loop_misc() calls (keepalive and CONNACK timeout)
CLOSE_TIMEOUT = 2.0  # wait for paho to close the socket after DISCONNECT, then shut it down

_T = TypeVar("_T")


def _paho(what: str, call: Callable[..., _T], *args: Any) -> _T:
    """Call paho, turning its errors into LinkError (the one conversion boundary of this module)."""
    try:
        return call(*args)
    except (ValueError, TypeError) as exc:
        raise LinkError(f"{what}: {exc}") from exc


def _no_delay(sock: Any) -> None:
    """Turn off Nagle's algorithm on a TCP socket (paho does not; asyncio does for its own sockets).

    With it on, a small packet sent while the previous one is unacknowledged (an Ack publish just after the
    PUBACK of the entry it acknowledges) waits for the broker's delayed ACK: 40 ms on Linux, on every commit.
    """
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:  # not fatal: only slower
            _LOGGER.debug("TCP_NODELAY not set: %s", exc)


def _check_rc(what: str, rc: MQTTErrorCode) -> None:
    # NO_CONN is not an error here: QoS 1 stays queued in paho and goes out after reconnect.
    if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
        raise LinkError(f"{what}: {mqtt.error_string(rc)}")


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class MqttLink:
    """A :class:`~node.link.base.Link` over MQTT 3.1.1 (amqtt or mosquitto)."""

    def __init__(
        self,
        address_provider: AddressProvider,
        options: LinkOptions,
        *,
        backoff_min: float = 0.1,
        backoff_max: float = 2.0,
        connect_timeout: float = 5.0,
        drain_timeout: float = 2.0,
    ) -> None:
        self._address_provider = address_provider
        self.options = options
        self._backoff_min = backoff_min
        self._backoff_max = backoff_max
        self._drain_timeout = drain_timeout
        self._table = HandlerTable(options.client_id)
        self._client = self._make_client(connect_timeout)

        self._state = _State.NEW
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._supervisor: asyncio.Task[None] | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._kick = asyncio.Event()  # something the supervisor may be waiting for happened
        self._ready = asyncio.Event()  # CONNACK'd, subscriptions SUBACK'd, held messages handed to paho

        self._address: BrokerAddress | None = None
        self._in_provider = False
        self._connecting = False  # paho's connect() is running in a worker thread
        self._reconnect_requested = False
        self._attempt = 0
        self._connack_ok = False  # on_connect succeeded on the current socket
        self._session_up = False  # ... and its re-send of in-flight messages is over: publish directly
        self._had_session = False
        self._sub_mid: int | None = None  # the SUBSCRIBE sent on connect, awaited before "connected"
        self._held: deque[Message] = deque()
        self._unacked: set[int] = set()  # mids of QoS>0 publishes handed to paho and not yet acknowledged
        self._sock: Any = None  # the socket registered with the loop
        self._fd = -1
        self._writing = False
        self._warned: set[str] = set()
        self.refusal: str | None = None  # why the broker last refused our CONNECT (None once one is accepted)
        self._refusal_handlers: list[Callable[[str], None]] = []

    # -- Link --------------------------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self.options.client_id

    @property
    def connected(self) -> bool:
        return self._ready.is_set()

    @property
    def address(self) -> BrokerAddress | None:
        """The broker address of the current (or last) connection attempt."""
        return self._address

    async def start(self) -> None:
        """Start connecting in the background; use :meth:`wait_connected` to wait for the connection."""
        if self._state is not _State.NEW:
            raise LinkError(f"{self.client_id}: link already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._state = _State.RUNNING
        self._misc = self._loop.call_later(MISC_INTERVAL, self._on_misc)
        self._supervisor = self._loop.create_task(self._supervise(), name=f"mqtt-link:{self.client_id}")
        self._supervisor.add_done_callback(self._supervisor_done)

    async def stop(self) -> None:
        """Deliver what is in flight (up to ``drain_timeout``), send DISCONNECT (no will). Idempotent."""
        if self._state is _State.NEW:
            self._state = _State.STOPPED
        if self._state is _State.RUNNING:
            self._state = _State.STOPPING
            self._kick.set()
            if self._in_provider and self._supervisor is not None:
                self._supervisor.cancel()
        if self._supervisor is not None:
            await asyncio.wait([self._supervisor])
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        self._unregister()
        lost = len(self._held) + len(self._unacked)
        if lost:
            _LOGGER.warning("%s: stopped with %d QoS>0 message(s) unacknowledged", self.client_id, lost)
        self._held.clear()
        self._unacked.clear()
        self._state = _State.STOPPED
        self._set_ready(False)

    def reconnect_now(self) -> None:
        """Drop the current connection (cleanly) and ask the address provider again, without backoff."""
        if self._state is _State.RUNNING:
            self._reconnect_requested = True
            self._kick.set()

    def subscribe(self, filter_: str, handler: MessageHandler, qos: int = 1) -> None:
        check_filter(filter_)
        check_qos(qos)
        self._table.add(filter_, handler, qos)
        if self._connack_ok:
            # Always (re)send: a new handler on a known filter gets the retained messages too.
            # The highest QoS any handler asked for this filter: a later, lower one must not downgrade it.
            rc, _mid = _paho("subscribe", self._client.subscribe, filter_, self._table.filters()[filter_])
            _check_rc("subscribe", rc)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        check_topic(topic)
        check_qos(qos)
        if self._state in (_State.STOPPING, _State.STOPPED):
            _LOGGER.debug("%s: link stopped, dropped %r", self.client_id, topic)
        elif self._session_up:
            self._publish_now(topic, bytes(payload), qos, retain)
        elif qos > 0:
            self._held.append(Message(topic, bytes(payload), retain=retain, qos=qos))
        else:
            _LOGGER.debug("%s: not connected, dropped QoS 0 %r", self.client_id, topic)

    def on_connection(self, handler: ConnectionHandler) -> None:
        self._table.add_connection_handler(handler)

    def on_refused(self, handler: Callable[[str], None]) -> None:
        """Call ``handler(reason)`` each time the broker refuses our CONNECT (§3.2.2.3: bad credentials, not
        authorized, ...). The link keeps retrying: the broker may change (another node hosts it)."""
        self._refusal_handlers.append(handler)

    async def wait_connected(self, timeout: float | None = None) -> None:
        if self._ready.is_set():
            return
        if self._state in (_State.STOPPING, _State.STOPPED):
            raise LinkError(f"{self.client_id}: link is stopped")
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError as exc:
            raise LinkError(f"{self.client_id}: not connected within {timeout} s") from exc

    # -- supervisor --------------------------------------------------------------------------------------

    async def _supervise(self) -> None:
        backoff = self._backoff_min
        while self._state is _State.RUNNING:
            self._reconnect_requested = False
            self._had_session = False
            try:
                self._in_provider = True
                try:
                    host, port = await self._address_provider()
                finally:
                    self._in_provider = False
                if self._state is not _State.RUNNING:
                    break
                await self._open(host, port)
            except (OSError, LinkError) as exc:
                self._warn_once(
                    "connect", "%s: cannot connect to %s: %s", self.client_id, self._address or "broker", exc
                )
            except Exception:  # a bug in the address provider must not end the link: keep trying
                _LOGGER.exception("%s: connection attempt failed", self.client_id)
            else:
                await self._hold_connection()
            if self._state is not _State.RUNNING:
                break
            if self._reconnect_requested:
                continue
            if self._had_session:
                backoff = self._backoff_min
            await self._pause(backoff)
            if not self._had_session:
                backoff = min(backoff * 2, self._backoff_max)
        if self._client.socket() is not None:  # stopped while connecting
            await self._close()

    async def _open(self, host: str, port: int) -> None:
        assert self._loop is not None
        self._unregister()  # paho may close a leftover socket from the worker thread: not ours any more
        self._address = (host, port)
        self._attempt += 1
        self._connack_ok = self._session_up = False
        self._connecting = True
        try:
            rc = await self._loop.run_in_executor(
                None, self._client.connect, host, port, self.options.keepalive
            )
        finally:
            self._connecting = False
            sock = self._client.socket()
            if sock is not None:
                self._register(sock)
        _check_rc("connect", rc)

    async def _hold_connection(self) -> None:
        """Return once the socket is closed: lost, or closed here on stop() or reconnect_now()."""
        while True:
            self._kick.clear()
            if self._client.socket() is None:
                return
            if self._state is not _State.RUNNING or self._reconnect_requested:
                if self._state is _State.STOPPING:
                    await self._wait_for(
                        lambda: not self._session_up or not self._unacked, self._drain_timeout
                    )
                await self._close()
                return
            await self._kick.wait()

    async def _close(self) -> None:
        """Send DISCONNECT (so the broker drops the will) and wait for paho to close the socket."""
        self._client.disconnect()
        if await self._wait_for(lambda: self._client.socket() is None, CLOSE_TIMEOUT):
            return
        sock = self._client.socket()
        _LOGGER.warning(
            "%s: DISCONNECT not written in %.1f s, shutting the socket", self.client_id, CLOSE_TIMEOUT
        )
        if isinstance(sock, socket.socket):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # the reader sees EOF and paho closes it the usual way
            except OSError:
                pass
        if not await self._wait_for(lambda: self._client.socket() is None, CLOSE_TIMEOUT):
            _LOGGER.error("%s: socket still open after shutdown", self.client_id)
            self._unregister()

    async def _pause(self, delay: float) -> None:
        await self._wait_for(lambda: self._state is not _State.RUNNING or self._reconnect_requested, delay)

    async def _wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    self._kick.clear()
                    if predicate():
                        return True
                    await self._kick.wait()
        except TimeoutError:
            return predicate()

    # -- paho callbacks (on the loop thread, from loop_read / loop_write / loop_misc) ---------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: ConnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason.is_failure:
            hint = " (are farm.key and its credentials this farm's?)" if self.options.username else ""
            self._warn_once(
                "refused", "%s: broker %s refused the connection: %s%s", self.client_id, self._address, reason, hint
            )
            self.refusal = str(reason)
            for handler in list(self._refusal_handlers):
                try:
                    handler(self.refusal)
                except Exception:
                    _LOGGER.exception("%s: refusal handler failed", self.client_id)
            return  # the broker closes the socket (MQTT 3.1.1 §3.2.2.3); the supervisor retries
        self.refusal = None
        self._connack_ok = True
        self._had_session = True
        self._warned.clear()
        filters = self._table.filters()
        self._sub_mid = None
        if filters:
            rc, mid = _paho("subscribe", client.subscribe, list(filters.items()))
            _check_rc("subscribe", rc)
            self._sub_mid = mid
        for birth in self.options.birth:
            self._publish_now(birth.topic, birth.payload, birth.qos, birth.retain)
        assert self._loop is not None
        # After _handle_connack has re-sent paho's in-flight messages: only then are held ones newer.
        self._loop.call_soon(self._after_connack, self._attempt)

    def _after_connack(self, attempt: int) -> None:
        if attempt != self._attempt or not self._connack_ok:
            return
        self._session_up = True
        while self._held:
            m = self._held.popleft()
            self._publish_now(m.topic, m.payload, m.qos, m.retain)
        if self._sub_mid is None:
            self._set_ready(True)

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reasons: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            self._warn_once("suback", "%s: broker refused a subscription: %s", self.client_id, failed)
        if mid == self._sub_mid:
            self._sub_mid = None
            if self._session_up:
                self._set_ready(True)

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._unacked.discard(mid)
        if not self._unacked:
            self._kick.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            self._warn_once("utf8", "%s: dropped a message whose topic is not UTF-8", self.client_id)
            return
        if not self._table.matches(topic):
            # amqtt 0.12.1 pushes retained messages matching other clients' filters on connect.
            _LOGGER.debug("%s: ignored %r (no filter of ours matches)", self.client_id, topic)
            return
        message = Message(topic, bytes(msg.payload), retain=bool(msg.retain), qos=msg.qos)
        _LOGGER.debug("%s: received %r %s", self.client_id, topic, preview(message.payload))
        self._table.dispatch(message)

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: DisconnectFlags,
        reason: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not self._on_loop_thread():  # not expected: paho only calls it from loop_* here
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._on_disconnect, client, userdata, flags, reason, properties)
            return
        if self._ready.is_set() and self._state is _State.RUNNING and not self._reconnect_requested:
            _LOGGER.warning("%s: connection to %s lost (%s)", self.client_id, self._address, reason)
        self._connack_ok = self._session_up = False
        self._sub_mid = None
        self._set_ready(False)
        self._kick.set()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            self._register(sock)
        # From the connect worker thread: registered by _open() once connect() returns.

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            if sock is self._sock:
                self._unregister()
            self._kick.set()

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and sock is self._sock and not self._writing:
            assert self._loop is not None
            self._loop.add_writer(self._fd, self._on_writable)
            self._writing = True

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread() and sock is self._sock and self._writing:
            assert self._loop is not None
            self._loop.remove_writer(self._fd)
            self._writing = False

    # -- plumbing ----------------------------------------------------------------------------------------

    def _make_client(self, connect_timeout: float) -> mqtt.Client:
        o = self.options
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=o.client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,  # else paho may reconnect() (blocking) from inside loop_read
        )
        client.enable_logger(logging.getLogger(__name__ + ".paho"))
        client.connect_timeout = connect_timeout
        client.max_inflight_messages_set(MAX_INFLIGHT)  # must precede connect()
        if o.will is not None:
            w = o.will
            _paho("will", client.will_set, w.topic, w.payload, w.qos, w.retain)
        if o.username is not None:
            _paho("credentials", client.username_pw_set, o.username, o.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write
        return client

    def _publish_now(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        info = _paho("publish", self._client.publish, topic, payload, qos, retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise LinkError(f"{self.client_id}: paho's outgoing queue is full, {topic!r} not sent")
        if qos > 0:
            self._unacked.add(info.mid)

    def _register(self, sock: Any) -> None:
        assert self._loop is not None
        if self._sock is sock:
            return
        self._unregister()
        self._sock = sock
        self._fd = sock.fileno()
        _no_delay(sock)
        self._loop.add_reader(self._fd, self._on_readable)
        # paho may have flagged "write registered" from the worker thread: always watch, loop_write sorts it out.
        self._loop.add_writer(self._fd, self._on_writable)
        self._writing = True

    def _unregister(self) -> None:
        if self._sock is None or self._loop is None:
            return
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._sock = None
        self._fd = -1
        self._writing = False

    def _supervisor_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error(
                "%s: link supervisor failed, link is down", self.client_id, exc_info=task.exception()
            )

    def _on_readable(self) -> None:
        self._client.loop_read()

    def _on_writable(self) -> None:
        self._client.loop_write()

    def _on_misc(self) -> None:
        assert self._loop is not None
        if not self._connecting and self._client.socket() is not None:
            self._client.loop_misc()
        self._misc = self._loop.call_later(MISC_INTERVAL, self._on_misc)

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _set_ready(self, value: bool) -> None:
        if value == self._ready.is_set():
            return
        if value:
            self._ready.set()
            _LOGGER.info("%s: connected to %s:%s", self.client_id, *(self._address or ("?", "?")))
        else:
            self._ready.clear()
        self._table.notify(value)

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        """Log at warning level the first time per outage, then at debug level."""
        level = logging.DEBUG if key in self._warned else logging.WARNING
        self._warned.add(key)
        _LOGGER.log(level, msg, *args)
