"""What both links share: argument checks, the subscription table, and safe calls into handlers.

A handler that raises must never stop a link (it runs inside the broker connection's read path): its
exception is logged once per handler, then at debug level, and delivery goes on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from shared.errors import LinkError

from .base import ConnectionHandler, Message, MessageHandler, topic_matches

_LOGGER = logging.getLogger(__name__)

MAX_TOPIC_BYTES = 65535  # MQTT 3.1.1 §1.5.3: UTF-8 strings are length-prefixed with two bytes


def check_topic(topic: str) -> None:
    """A topic name one can publish to (MQTT 3.1.1 §4.7.3): non-empty, no wildcards, no NUL."""
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise LinkError(f"invalid topic name to publish to: {topic!r}")
    if len(topic.encode()) > MAX_TOPIC_BYTES:
        raise LinkError("topic name too long")


def check_filter(filter_: str) -> None:
    """A valid topic filter (MQTT 3.1.1 §4.7.1): ``#`` only last and alone in its level, ``+`` alone."""
    if not filter_ or "\0" in filter_ or len(filter_.encode()) > MAX_TOPIC_BYTES:
        raise LinkError(f"invalid topic filter: {filter_!r}")
    levels = filter_.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise LinkError(f"invalid topic filter: {filter_!r}")
        if "+" in level and level != "+":
            raise LinkError(f"invalid topic filter: {filter_!r}")


def check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise LinkError(f"invalid QoS {qos!r}")


def preview(payload: bytes, limit: int = 64) -> str:
    """A payload shortened for debug logs."""
    text = repr(payload[:limit])
    return text + ("…" if len(payload) > limit else "")


@dataclass(slots=True)
class _Subscription:
    filter: str
    handler: MessageHandler
    qos: int
    failed: bool = False  # the handler has raised once (and was logged at error level)


class HandlerTable:
    """The filters a link subscribed to, their handlers, and the connection-state handlers."""

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._subs: list[_Subscription] = []
        self._conn_handlers: list[ConnectionHandler] = []
        self._conn_failed: list[ConnectionHandler] = []

    def add(self, filter_: str, handler: MessageHandler, qos: int) -> None:
        self._subs.append(_Subscription(filter_, handler, qos))

    def add_connection_handler(self, handler: ConnectionHandler) -> None:
        self._conn_handlers.append(handler)

    def filters(self) -> dict[str, int]:
        """Each distinct filter with the highest QoS asked for it, in order of first subscription."""
        out: dict[str, int] = {}
        for sub in self._subs:
            out[sub.filter] = max(out.get(sub.filter, 0), sub.qos)
        return out

    def matches(self, topic: str) -> bool:
        return any(topic_matches(sub.filter, topic) for sub in self._subs)

    def dispatch(self, message: Message) -> int:
        """Call every distinct handler with a filter matching the topic, once; return how many were called."""
        called: list[MessageHandler] = []
        for sub in list(self._subs):
            if not topic_matches(sub.filter, message.topic) or sub.handler in called:
                continue
            called.append(sub.handler)
            try:
                sub.handler(message)
            except Exception:
                level = logging.DEBUG if sub.failed else logging.ERROR
                sub.failed = True
                _LOGGER.log(
                    level,
                    "%s: handler %r for %r raised on %r (logged once, then at debug level)",
                    self._owner,
                    sub.handler,
                    sub.filter,
                    message.topic,
                    exc_info=True,
                )
        return len(called)

    def notify(self, connected: bool) -> None:
        for handler in list(self._conn_handlers):
            self._call_safely(handler, connected)

    def _call_safely(self, handler: ConnectionHandler, connected: bool) -> None:
        try:
            handler(connected)
        except Exception:
            level = logging.DEBUG if handler in self._conn_failed else logging.ERROR
            if level == logging.ERROR:
                self._conn_failed.append(handler)
            _LOGGER.log(level, "%s: connection handler %r raised", self._owner, handler, exc_info=True)
