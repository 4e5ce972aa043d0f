"""A small async client of the farm's MQTT API, used by the CLI, the demo, the benchmarks and the tests.

It speaks only the public API (``request/…`` → ``response/…``, retained topics), as a script would.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from node.link.base import LinkOptions, Message
from node.link.mqtt import MqttLink
from shared.errors import NetqError, RequestError
from shared.topics import Topics

Address = tuple[str, int]


class FarmClient:
    def __init__(self, address: Address, *, base_topic: str = "netq", client_id: str | None = None,
                 username: str | None = None, password: str | None = None,
                 provider: Callable[[], Awaitable[Address]] | None = None) -> None:
        """``provider``, when given, is asked for the broker's address on every (re)connect: the broker of an
        embedded farm moves when its host dies."""
        self.address = address
        self._provider = provider
        self.topics = Topics(base_topic)
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._subscribed: set[str] = set()
        self.retained: dict[str, bytes] = {}
        self._watchers: list[Callable[[Message], None]] = []

        async def provider() -> Address:
            if self._provider is not None:
                self.address = await self._provider()
            return self.address

        self.link = MqttLink(provider, LinkOptions(client_id=client_id or f"netq-cli-{uuid.uuid4().hex[:8]}",
                                                   username=username, password=password))

    async def __aenter__(self) -> FarmClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self, timeout: float = 10.0) -> None:
        await self.link.start()
        try:
            await self.link.wait_connected(timeout)
        except (TimeoutError, NetqError) as exc:
            await self.link.stop()
            raise NetqError(f"cannot reach the farm's broker at {self.address[0]}:{self.address[1]}") from exc

    async def close(self) -> None:
        await self.link.stop()

    # --- requests ----------------------------------------------------------------------------------------
    def _on_response(self, msg: Message) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
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
        try:
            payload = dict(body or {}, transaction=txn)
            self.link.publish(self.topics.request(path), json.dumps(payload).encode(), qos=1)
            try:
                return await asyncio.wait_for(fut, timeout)
            except TimeoutError:
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
        assert isinstance(data, dict)
        return data

    # --- retained state ----------------------------------------------------------------------------------
    def watch(self, filter_: str, callback: Callable[[Message], None] | None = None) -> None:
        def on(msg: Message) -> None:
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
                    out[node] = json.loads(payload)
                except ValueError:
                    continue
        return out
