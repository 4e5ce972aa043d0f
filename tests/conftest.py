"""Fixtures shared by every tier: a real amqtt broker on 127.0.0.1, and guards."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

THREAD_GRACE = 5.0  # seconds a test's helper threads get to finish after it ends
_IGNORED_THREAD_PREFIXES = ("asyncio_", "ThreadPoolExecutor")  # default-executor workers, reused across tests


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


ANONYMOUS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}


def amqtt_config(host: str, port: int, plugins: dict[str, Any] | None = None) -> dict[str, Any]:
    """The smallest amqtt 0.12.1 config: one TCP listener, only the given plugins (default: anonymous
    clients allowed; no $SYS, no packet logger)."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": ANONYMOUS if plugins is None else plugins,
    }


class AmqttServer:
    """An amqtt broker on a fixed address that can be stopped and started again (a new instance each time)."""

    def __init__(
        self, host: str = "127.0.0.1", port: int | None = None, plugins: dict[str, Any] | None = None
    ) -> None:
        self.host = host
        self.port = port if port is not None else free_port()
        self.plugins = plugins
        self.broker: Any = None  # amqtt.broker.Broker while running

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def start(self) -> None:
        from amqtt.broker import Broker  # type: ignore[import-untyped]

        assert self.broker is None, "already running"
        broker = Broker(amqtt_config(self.host, self.port, self.plugins))
        await broker.start()
        self.broker = broker

    async def stop(self) -> None:
        if self.broker is not None:
            broker, self.broker = self.broker, None
            with amqtt_server_leaks():
                await broker.shutdown()  # a second shutdown() of one instance raises: only ever once
                # Let the loop run what closing its connections scheduled (a transport's close() finishes in a
                # callback): a test's loop closed before that leaves sockets unclosed, reported in a later test.
                for _ in range(3):
                    await asyncio.sleep(0)


@contextmanager
def amqtt_server_leaks() -> Iterator[None]:
    """Around stopping a client of amqtt or amqtt itself: amqtt 0.12.1 never closes the server side of a
    connection whose client disconnects while a QoS 1 delivery to it is in flight (a stopping node publishes its
    retained "offline" state to a topic it is subscribed to, then disconnects), and now and then its session
    handler dies of "dictionary changed size during iteration" with the same effect. Those sockets are
    collected here, their ResourceWarning ignored: it is not ours, and must not fail whichever later test the
    garbage collector runs in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()


@pytest.fixture
async def amqtt_server() -> AsyncIterator[AmqttServer]:
    """A running amqtt broker on 127.0.0.1 and a free port, restartable on the same port."""
    server = AmqttServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def amqtt_broker(amqtt_server: AmqttServer) -> tuple[str, int]:
    """``(host, port)`` of a running amqtt broker on 127.0.0.1."""
    return amqtt_server.address


@pytest.fixture(autouse=True)
def verify_threads_ended() -> Iterator[None]:
    """Fail a test that leaves threads running (python-zeroconf's guard of the same name)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE
    leftover = []
    for thread in threading.enumerate():
        if thread in before or thread.name.startswith(_IGNORED_THREAD_PREFIXES):
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leftover.append(thread)
    assert not leftover, f"threads left running: {leftover}"
