"""The seam between a node and its MQTT broker.

A *link* publishes and receives MQTT messages. The real one drives paho-mqtt from the asyncio loop
(:mod:`node.link.mqtt`); the in-memory twin (:mod:`node.link.memory`) lets many nodes run in one process.
Both honour the same contract, checked by ``tests/unit/test_link_contract.py``:

* ``await start()`` connects (and keeps reconnecting until ``stop()``); ``await stop()`` disconnects cleanly
  (no last will) and is idempotent.
* ``subscribe(filter)`` is remembered and re-applied after every reconnect (paho's session may be gone).
* ``publish()`` never raises for a disconnected link: QoS 1 messages are queued and sent on reconnect,
  QoS 0 messages are dropped (MQTT 3.1.1 semantics).
* Handlers get every message whose topic matches *one of this link's own filters*, at most once per
  delivery (amqtt 0.12.1 pushes retained messages of other clients' filters too; the link filters them out).
* ``on_connection(cb)`` callbacks are called with ``True``/``False`` on each change of connection state.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    retain: bool = True
    qos: int = 1


MessageHandler = Callable[[Message], None]
ConnectionHandler = Callable[[bool], None]


@dataclass(slots=True)
class LinkOptions:
    client_id: str
    will: Will | None = None
    username: str | None = None
    password: str | None = None
    keepalive: int = 5
    # Messages published on connect (after re-subscribing), e.g. the retained "online" state that
    # replaces the last will.
    birth: list[Message] = field(default_factory=list)


def topic_matches(filter_: str, topic: str) -> bool:
    """MQTT 3.1.1 §4.7 topic filter matching (``+`` one level, ``#`` the rest, ``$`` topics excluded)."""
    if topic.startswith("$") and not filter_.startswith("$"):
        return False
    f_parts = filter_.split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return True
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


class Link(Protocol):
    """What a node needs from MQTT."""

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, filter_: str, handler: MessageHandler, qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def on_connection(self, handler: ConnectionHandler) -> None: ...

    async def wait_connected(self, timeout: float | None = None) -> None: ...


BrokerAddress = tuple[str, int]
AddressProvider = Callable[[], Awaitable[BrokerAddress]]
