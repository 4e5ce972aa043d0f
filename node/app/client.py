"""A small async client of the farm's MQTT API, used by the CLI, the demo, the benchmarks and the tests.

It speaks only the public API (``request/…`` → ``response/…``, retained topics), as a script would. Given
the farm's public state key (``state_key``, ``nqp1-…``), it ignores answers and retained state that are not
signed by the farm for their topic (:mod:`node.link.signing`), counting them in ``dropped``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Self

from node.link.base import LinkOptions, Message
from node.link.mqtt import MqttLink
from node.link.signing import StateVerifier
from shared import farm_api
from shared.errors import NetqError, RequestError
from shared.topics import Topics

Address = tuple[str, int]
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # answers and retained states decoded (nesting: farm_api.MAX_DEPTH)


class FarmClient:
    def __init__(self, address: Address, *, base_topic: str = "netq", client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 provider: Callable[[], Awaitable[Address]] | None = None,
                 state_key: str | None = None) -> None:
        """``provider``, when given, is asked for the broker's address on every (re)connect: the broker of an
        embedded farm moves when its host dies. ``state_key``: the farm's public state key
        (``security.state_public_key``); None (an open farm) accepts unsigned answers and state."""
        self.address = address
        self._provider = provider
        self.topics = Topics(base_topic)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscribed: set[str] = set()
        self.retained: dict[str, bytes] = {}
        self._watchers: list[Callable[[Message], None]] = []
        self._verifier = None if state_key is None else StateVerifier(state_key, self.topics, MAX_RESPONSE_BYTES)

        async def current() -> Address:
            if self._provider is not None:
                self.address = await self._provider()
            return self.address

        self.link = MqttLink(current, LinkOptions(client_id=client_id or f"netq-cli-{uuid.uuid4().hex[:8]}",
                                                   username=username, password=password))

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect; NetqError at once if the broker refuses our credentials, else after ``timeout``."""
        refused: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.link.on_refused(lambda reason: None if refused.done() else refused.set_result(reason))
        await self.link.start()
        waiter = asyncio.ensure_future(self.link.wait_connected(timeout))
        either: set[asyncio.Future[Any]] = {waiter, refused}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            outcome = (await asyncio.gather(waiter, return_exceptions=True))[0]
        if outcome is None:
            return
        await self.link.stop()
        where = f"{self.address[0]}:{self.address[1]}"
        if refused.done():
            who = f"as {self.link.options.username}" if self.link.options.username else "without credentials"
            raise NetqError(f"the farm's broker at {where} refused this client ({who}: {refused.result()}): "
                            "is the farm key in the config this farm's?")
        cause = outcome if isinstance(outcome, BaseException) else None
        raise NetqError(f"cannot reach the farm's broker at {where}") from cause

    async def close(self) -> None:
        await self.link.stop()

    # --- requests ----------------------------------------------------------------------------------------
    @property
    def dropped(self) -> dict[str, int]:
        """Answers and retained messages ignored for want of a valid signature, by reason (security.Drop)."""
        return {} if self._verifier is None else dict(self._verifier.drops)

    def _decode(self, msg: Message) -> Any:
        """The JSON of a message, or None if it is not JSON or (with a state key) not signed by the farm."""
        if self._verifier is not None:
            return self._verifier.decode(msg.topic, msg.payload)
        try:
            return farm_api.loads_bounded(msg.payload, max_bytes=MAX_RESPONSE_BYTES, what="answer")
        except RequestError:
            return None

    def _on_response(self, msg: Message) -> None:
        body = self._decode(msg)  # a forged early answer is ignored here: the future waits for the real one
        txn = body.get("transaction") if isinstance(body, dict) else None
        fut = self._pending.get(txn) if isinstance(txn, str) else None
        if fut is not None and not fut.done():
            fut.set_result(body)

    async def request_raw(self, path: str, body: dict[str, Any] | None = None, *, timeout: float = 10.0,
                          transaction: str | None = None) -> dict[str, Any]:
        """Send a request and return the whole response envelope."""
        topic = self.topics.response(path)
        if topic not in self._subscribed:
            self._subscribed.add(topic)
            self.link.subscribe(topic, self._on_response)
            await asyncio.sleep(0)  # let the SUBSCRIBE go out before the request
        txn = transaction or uuid.uuid4().hex
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[txn] = fut
        refused = sum(self.dropped.values())
        try:
            payload = dict(body or {}, transaction=txn)
            self.link.publish(self.topics.request(path), json.dumps(payload).encode(), qos=1)
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                if sum(self.dropped.values()) > refused:
                    raise NetqError(f"no answer to {path} signed by this farm within {timeout:g}s; answers "
                                    "that were not were ignored (another farm's, or one without a key? "
                                    "docs/security.md, \"Signed state\")") from None
                raise NetqError(f"no answer to {path} within {timeout:g}s: is an arbiter elected? "
                                "(`netq nodes` shows the farm)") from None
        finally:
            self._pending.pop(txn, None)

    async def request(self, path: str, body: dict[str, Any] | None = None, *, timeout: float = 10.0,
                      transaction: str | None = None) -> dict[str, Any]:
        """Send a request; return its ``data``, or raise RequestError with the farm's error message."""
        resp = await self.request_raw(path, body, timeout=timeout, transaction=transaction)
        if resp.get("status") != "ok":
            raise RequestError(str(resp.get("error", "unknown error")))
        data = resp.get("data", {})
        if not isinstance(data, dict):  # a network answer: checked, not asserted (asserts vanish under -O)
            raise RequestError(f"malformed answer to {path}: its data is not an object")
        return data

    # --- retained state ----------------------------------------------------------------------------------
    def watch(self, filter_: str, callback: Callable[[Message], None] | None = None) -> None:
        def on(msg: Message) -> None:
            v = self._verifier
            if msg.payload and v is not None and not v.accepts(msg.topic, msg.payload):
                return  # not the farm's: the state we hold (if any) stays
            if msg.payload:
                self.retained[msg.topic] = msg.payload
            else:
                self.retained.pop(msg.topic, None)
            if callback is not None:
                callback(msg)

        self.link.subscribe(filter_, on)

    def node_states(self) -> dict[str, dict[str, Any]]:
        out = {}
        for topic, payload in self.retained.items():
            node = self.topics.parse_node_state(topic)
            if node is not None:
                try:
                    out[node] = farm_api.loads_bounded(payload, max_bytes=MAX_RESPONSE_BYTES, what="node state")
                except RequestError:
                    continue
        return out
