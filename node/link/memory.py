"""The in-memory twin of an MQTT broker and link, so that many nodes can run in one process in a test.

:class:`MemoryBroker` keeps retained messages and clean (non-persistent) sessions, like an anonymous client
on amqtt. Every delivery goes through ``loop.call_soon``: nothing is delivered inside ``publish()``, and
since the loop's ready queue is FIFO, the messages of one publisher arrive in the order they were published.

Fault hooks, for tests:

* ``disconnect(client_id)``: the connection drops (the last will fires); the link reconnects at once.
* ``kill(client_id)`` or ``link.crash()``: the client dies without DISCONNECT; its will fires, it never returns.
* ``refuse(client_id)`` / ``admit(client_id)``: the client cannot (re)connect until admitted.
* ``stop()`` / ``start()``: the broker goes away (every link disconnected, retained messages lost) and comes back.
* ``drop(predicate)``: deliveries for which ``predicate(Delivery)`` is true are lost; returns a remover.
* ``partition({...}, ...)`` / ``heal()``: clients in different groups (everyone unlisted is one more group)
  no longer see each other's messages, retained ones and last wills included.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from shared.errors import LinkError

from .base import ConnectionHandler, LinkOptions, Message, MessageHandler, topic_matches
from .dispatch import HandlerTable, check_filter, check_qos, check_topic

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message on its way from a publisher to one receiving client (what ``drop`` predicates see)."""

    sender: str
    receiver: str
    message: Message


DropRule = Callable[[Delivery], bool]


@dataclass(frozen=True, slots=True)
class _Retained:
    sender: str
    message: Message


class MemoryBroker:
    """An in-process MQTT broker for :class:`MemoryLink`; see the module docstring for the fault hooks.

    With ``foreign_retained=True`` it reproduces amqtt 0.12.1's bug: a connecting client is pushed the
    retained messages matching any connected client's filters, at QoS 0, once per matching filter.
    """

    def __init__(self, *, foreign_retained: bool = False) -> None:
        self._foreign_retained = foreign_retained
        self._up = True
        self._links: dict[str, MemoryLink] = {}  # connected clients, in order of connection
        self._subs: dict[str, dict[str, int]] = {}  # client id -> filter -> QoS, for this connection
        self._retained: dict[str, _Retained] = {}
        self._waiting: list[MemoryLink] = []  # links that tried to connect and could not
        self._refused: set[str] = set()
        self._rules: list[DropRule] = []
        self._groups: list[frozenset[str]] = []

    # -- inspection --------------------------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._up

    @property
    def clients(self) -> list[str]:
        """Ids of the connected clients, in order of connection."""
        return list(self._links)

    @property
    def retained(self) -> dict[str, Message]:
        return {topic: r.message for topic, r in self._retained.items()}

    # -- fault hooks -------------------------------------------------------------------------------------

    def stop(self) -> None:
        """The broker goes away: every client is disconnected (no wills), retained messages are lost."""
        self._up = False
        for link in list(self._links.values()):
            self._detach(link, will=False)
        self._retained.clear()

    def start(self) -> None:
        """The broker comes back; waiting links reconnect."""
        self._up = True
        self._retry_waiting()

    def restart(self) -> None:
        self.stop()
        self.start()

    def disconnect(self, client_id: str, *, will: bool = True) -> None:
        """Drop a client's connection as a network failure would (its will fires); it reconnects."""
        link = self._links.get(client_id)
        if link is not None:
            self._detach(link, will=will)

    def kill(self, client_id: str) -> None:
        """The client dies without DISCONNECT: its will fires and it never reconnects."""
        link = self._links.get(client_id)
        if link is None:
            link = next((w for w in self._waiting if w.client_id == client_id), None)
        if link is None:
            raise KeyError(client_id)
        self._kill(link)

    def refuse(self, client_id: str) -> None:
        """Refuse (re)connection of this client until :meth:`admit`; a live connection is not touched."""
        self._refused.add(client_id)

    def admit(self, client_id: str) -> None:
        self._refused.discard(client_id)
        self._retry_waiting()

    def drop(self, predicate: DropRule) -> Callable[[], None]:
        """Lose every delivery for which ``predicate`` is true, until the returned function is called."""
        self._rules.append(predicate)

        def remove() -> None:
            if predicate in self._rules:
                self._rules.remove(predicate)

        return remove

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the clients: each group, and everyone not listed, see only their own side's messages."""
        self._groups = [frozenset(g) for g in groups]

    def heal(self) -> None:
        self._groups = []

    # -- what links call ---------------------------------------------------------------------------------

    def _connect(self, link: MemoryLink) -> bool:
        if not self._up or link.client_id in self._refused:
            if link not in self._waiting:
                self._waiting.append(link)
            return False
        if link in self._waiting:
            self._waiting.remove(link)
        old = self._links.get(link.client_id)
        if old is not None and old is not link:
            # MQTT 3.1.1 §3.1.4: a second connection with the same client id takes over. The old link stays
            # down: two live links with one id would otherwise take the connection from each other forever.
            _LOGGER.warning("client id %r connected twice: the older link is disconnected", link.client_id)
            self._detach(old, will=False, notify=False)
            old._taken_over()
        self._links[link.client_id] = link
        self._subs[link.client_id] = {}
        if self._foreign_retained:
            for filters in list(self._subs.values()):
                for filter_ in filters:
                    self._push_retained(link, filter_, 0, foreign=True)
        return True

    def _disconnect(self, link: MemoryLink) -> None:
        """Clean disconnect (DISCONNECT sent): no will."""
        if link in self._waiting:
            self._waiting.remove(link)
        if self._links.get(link.client_id) is link:
            self._detach(link, will=False, notify=False)

    def _subscribe(self, link: MemoryLink, filter_: str, qos: int) -> None:
        self._subs[link.client_id][filter_] = min(qos, 1)
        self._push_retained(link, filter_, qos)

    def _publish(self, sender: MemoryLink, message: Message) -> None:
        self._route(sender.client_id, message)

    def _kill(self, link: MemoryLink) -> None:
        if link in self._waiting:
            self._waiting.remove(link)
        link._die()
        if self._links.get(link.client_id) is link:
            self._detach(link, will=True, notify=False)

    # -- internals ---------------------------------------------------------------------------------------

    def _detach(self, link: MemoryLink, *, will: bool, notify: bool = True) -> None:
        del self._links[link.client_id]
        del self._subs[link.client_id]
        if will and link.options.will is not None:
            w = link.options.will
            self._route(link.client_id, Message(w.topic, w.payload, retain=w.retain, qos=w.qos))
        if notify:
            link._lost()

    def _route(self, sender: str, message: Message) -> None:
        if message.retain:
            if message.payload:
                self._retained[message.topic] = _Retained(sender, replace(message, retain=True))
            else:  # MQTT 3.1.1 §3.3.1.3: a zero-length retained message clears the topic
                self._retained.pop(message.topic, None)
        for client_id, link in list(self._links.items()):
            granted = [q for f, q in self._subs[client_id].items() if topic_matches(f, message.topic)]
            if granted:
                qos = min(message.qos, max(granted), 1)
                self._deliver(sender, link, replace(message, retain=False, qos=qos))

    def _push_retained(self, link: MemoryLink, filter_: str, qos: int, *, foreign: bool = False) -> None:
        for topic, r in list(self._retained.items()):
            if topic_matches(filter_, topic):
                self._deliver(
                    r.sender, link, replace(r.message, qos=0 if foreign else min(r.message.qos, qos, 1))
                )

    def _deliver(self, sender: str, link: MemoryLink, message: Message) -> None:
        if self._separated(sender, link.client_id):
            return
        if self._rules:
            delivery = Delivery(sender, link.client_id, message)
            if any(rule(delivery) for rule in list(self._rules)):
                _LOGGER.debug("dropped %s -> %s on %r", sender, link.client_id, message.topic)
                return
        link._schedule_receive(message)

    def _separated(self, a: str, b: str) -> bool:
        if not self._groups or a == b:
            return False
        return self._group_of(a) != self._group_of(b)

    def _group_of(self, client_id: str) -> int:
        for i, group in enumerate(self._groups):
            if client_id in group:
                return i
        return -1

    def _retry_waiting(self) -> None:
        for link in list(self._waiting):
            if self._up and link.client_id not in self._refused:
                self._waiting.remove(link)
                link._schedule_connect()


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    DEAD = "dead"  # killed by the broker's fault hook: behaves like a crashed process


class MemoryLink:
    """A :class:`~node.link.base.Link` to a :class:`MemoryBroker`."""

    def __init__(self, broker: MemoryBroker, options: LinkOptions) -> None:
        self._broker = broker
        self.options = options
        self._table = HandlerTable(options.client_id)
        self._state = _State.NEW
        self._attached = False  # the broker holds a connection for this link
        self._epoch = 0  # connection number: deliveries to an older connection are lost
        self._outbox: deque[Message] = deque()  # QoS 1 messages published while disconnected
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def client_id(self) -> str:
        return self.options.client_id

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        if self._state is not _State.NEW:
            raise LinkError(f"{self.client_id}: link already started")
        self._loop = asyncio.get_running_loop()
        self._state = _State.RUNNING
        self._schedule_connect()

    async def stop(self) -> None:
        """Disconnect cleanly (no last will). Idempotent."""
        if self._state is _State.RUNNING:
            self._broker._disconnect(self)
        if self._state is not _State.DEAD:
            self._state = _State.STOPPED
        self._attached = False
        self._outbox.clear()
        self._set_connected(False)

    def crash(self) -> None:
        """Die without DISCONNECT, as a killed process would: the will fires, the link is dead for good."""
        self._broker._kill(self)

    def subscribe(self, filter_: str, handler: MessageHandler, qos: int = 1) -> None:
        check_filter(filter_)
        check_qos(qos)
        self._table.add(filter_, handler, qos)
        if self._attached:
            self._broker._subscribe(self, filter_, qos)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        check_topic(topic)
        check_qos(qos)
        message = Message(topic, bytes(payload), retain=retain, qos=qos)
        if self._attached:
            self._broker._publish(self, message)
        elif qos > 0 and self._state in (_State.NEW, _State.RUNNING):
            self._outbox.append(message)

    def on_connection(self, handler: ConnectionHandler) -> None:
        self._table.add_connection_handler(handler)

    async def wait_connected(self, timeout: float | None = None) -> None:
        if self._connected.is_set():
            return
        if self._state in (_State.STOPPED, _State.DEAD):
            raise LinkError(f"{self.client_id}: link is stopped")
        try:
            async with asyncio.timeout(timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise LinkError(f"{self.client_id}: not connected within {timeout} s") from exc

    # -- called by the broker ----------------------------------------------------------------------------

    def _schedule_connect(self) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._try_connect)

    def _try_connect(self) -> None:
        if self._state is not _State.RUNNING or self._attached:
            return
        self._epoch += 1  # before connecting: the broker may push retained messages at once
        if not self._broker._connect(self):
            return  # the broker calls _schedule_connect again once it would accept us
        self._attached = True
        for filter_, qos in self._table.filters().items():
            self._broker._subscribe(self, filter_, qos)
        for birth in self.options.birth:
            self._broker._publish(self, birth)
        while self._outbox and self._attached:
            self._broker._publish(self, self._outbox.popleft())
        if self._attached:
            self._set_connected(True)

    def _lost(self) -> None:
        self._attached = False
        self._set_connected(False)
        if self._state is _State.RUNNING:
            self._schedule_connect()

    def _taken_over(self) -> None:
        self._attached = False
        self._set_connected(False)

    def _die(self) -> None:
        self._state = _State.DEAD
        self._attached = False
        self._outbox.clear()
        self._set_connected(False)

    def _schedule_receive(self, message: Message) -> None:
        assert self._loop is not None
        self._loop.call_soon(self._receive, self._epoch, message)

    def _receive(self, epoch: int, message: Message) -> None:
        if not self._attached or epoch != self._epoch:
            return  # sent to a connection that is gone: clean sessions lose it (MQTT 3.1.1 §3.1.2.4)
        if not self._table.matches(message.topic):
            _LOGGER.debug("%s: ignored %r (no filter of ours matches)", self.client_id, message.topic)
            return
        self._table.dispatch(message)

    def _set_connected(self, value: bool) -> None:
        if value == self._connected.is_set():
            return
        if value:
            self._connected.set()
        else:
            self._connected.clear()
        self._table.notify(value)
