"""Which MQTT broker a node uses: chosen among the nodes (zeroconf + amqtt), or fixed by ``broker.url``.

:class:`BrokerHost` carries out the decisions of :mod:`broker.choice`: it advertises this node, probes the
brokers that others advertise (a TCP connect: reachability, never the zeroconf record, says a broker is
alive), starts and stops the embedded broker, and keeps ``broker=`` in its TXT record up to date.
:class:`FixedBroker` is the same interface for a configured broker (mosquitto, EMQX, ...).

Both are single-use: ``start()`` once (a second call raises :class:`shared.errors.BrokerError`), ``stop()``
is idempotent. ``current()`` waits for a broker; ``on_change()`` callbacks get each new address (``None``
while no broker is chosen), so the node's MQTT link can reconnect to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Protocol
from urllib.parse import urlsplit

from broker.advert import Adverts, check_node_id
from broker.auth import FarmAccess
from broker.choice import Action, Address, Advert, ChoiceState, Decision, Observation, Timing, counts, decide
from broker.embedded import DEFAULT_MAX_PACKET_BYTES, EmbeddedBroker
from shared.errors import BrokerError, ConfigError, ProtocolError

log = logging.getLogger(__name__)

ChangeCallback = Callable[[Address | None], None]
MQTT_PORT = 1883


class BrokerSource(Protocol):
    """Where the node's MQTT link connects."""

    @property
    def address(self) -> Address | None: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def current(self, timeout: float | None = None) -> Address: ...

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]: ...


def parse_broker_url(url: str) -> Address:
    """``mqtt://host[:port]`` -> ``(host, port)``; raises :class:`ConfigError` for anything else."""
    try:
        parts = urlsplit(url)
        port = parts.port or MQTT_PORT
    except ValueError as exc:
        raise ConfigError(f"invalid broker url {url!r}: {exc}") from exc
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"invalid broker url {url!r}: expected mqtt://host[:port]")
    return parts.hostname, port


class _Chosen:
    """The chosen address, its waiters and its change callbacks."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.address: Address | None = None
        self.closed = False
        self._ready = asyncio.Event()
        self._callbacks: list[ChangeCallback] = []

    def set(self, address: Address | None) -> None:
        if address == self.address:
            return
        log.info("%s: broker now %s", self.label, address)
        self.address = address
        if address is None:
            self._ready.clear()
        else:
            self._ready.set()
        for callback in list(self._callbacks):
            try:
                callback(address)
            except Exception:
                log.exception("broker change callback failed")

    def close(self) -> None:
        self.set(None)
        self.closed = True
        self._ready.set()  # wake current() waiters so they raise

    def subscribe(self, callback: ChangeCallback) -> Callable[[], None]:
        self._callbacks.append(callback)

        def remove() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return remove

    async def wait(self, timeout: float | None) -> Address:
        async with asyncio.timeout(timeout):
            while True:
                if self.closed:
                    raise BrokerError("the broker source is stopped")
                if self.address is not None:
                    return self.address
                await self._ready.wait()


class FixedBroker:
    """A configured broker (``broker.url``): no zeroconf, no embedded broker."""

    def __init__(self, url: str) -> None:
        self._url_address = parse_broker_url(url)
        self._chosen = _Chosen("fixed")
        self._state = "new"

    @property
    def address(self) -> Address | None:
        """The broker's address while started."""
        return self._chosen.address

    async def start(self) -> None:
        """Make the configured address current."""
        if self._state != "new":
            raise BrokerError(f"broker source cannot start when {self._state}")
        self._state = "running"
        self._chosen.set(self._url_address)

    async def stop(self) -> None:
        """Idempotent."""
        self._state = "stopped"
        self._chosen.close()

    async def current(self, timeout: float | None = None) -> Address:
        """The configured address (waits for ``start()``)."""
        return await self._chosen.wait(timeout)

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(address)`` on start and stop; returns a function that removes it."""
        return self._chosen.subscribe(callback)


class _Probes:
    """Reachability per broker address, with hysteresis: ``failures`` failed probes in a row make it dead."""

    def __init__(self, timeout: float, failures: int) -> None:
        self._timeout = timeout
        self._failures = failures
        self._ok: dict[Address, bool] = {}
        self._failed: dict[Address, int] = {}

    async def run(self, addresses: set[Address]) -> Mapping[Address, bool]:
        for gone in set(self._ok) - addresses:
            del self._ok[gone]
        for gone in set(self._failed) - addresses:
            del self._failed[gone]
        ordered = sorted(addresses)
        results = await asyncio.gather(*(self._probe(a) for a in ordered))
        for address, ok in zip(ordered, results, strict=True):
            if ok:
                self._ok[address] = True
                self._failed.pop(address, None)
            else:
                self._failed[address] = self._failed.get(address, 0) + 1
                if self._failed[address] >= self._failures:
                    self._ok[address] = False
        return dict(self._ok)

    async def _probe(self, address: Address) -> bool:
        return await tcp_reachable(address, self._timeout)


async def tcp_reachable(address: Address, timeout: float) -> bool:
    """Whether a TCP connection to ``address`` opens within ``timeout`` (closed again at once)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(*address)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


class BrokerHost:
    """Chooses the farm's broker with the other nodes, and hosts it when this node is chosen."""

    def __init__(
        self,
        *,
        node_id: str,
        priority: int,
        farm: str,
        proto: int,
        interfaces: Sequence[str],
        broker_host: str | None = None,
        broker_port: int = 0,
        timing: Timing | None = None,
        settle: float = 1.0,
        probe_interval: float = 0.5,
        probe_timeout: float = 0.5,
        probe_failures: int = 2,
        refresh_interval: float = 4.0,
        service_port: int = 0,
        max_packet_bytes: int = DEFAULT_MAX_PACKET_BYTES,
        access: FarmAccess | None = None,
        broker_plugins: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        """``farm``: the farm id (``FarmSettings.farm_id``) or ``open``; ``proto``: ``shared.PROTOCOL_VERSION``.
        ``access``: the farm's broker credentials and topic rules for the embedded broker (None: an open farm,
        anonymous clients admitted). ``max_packet_bytes``: the bound on packets from clients that are not members.
        ``interfaces``: IPv4 addresses for zeroconf. ``broker_host``: where the embedded broker binds and
        what it advertises (default: the first interface). ``settle``: after registering, how long to look
        for other nodes before hosting. ``probe_failures``: failed probes in a row before a broker is dead.
        ``refresh_interval``: how often our advert is announced again (see :meth:`Adverts.refresh`)."""
        try:
            check_node_id(node_id)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        if (priority < 0 or probe_interval <= 0 or probe_timeout <= 0 or probe_failures < 1 or settle < 0
                or refresh_interval <= 0):
            raise ConfigError("priority, settle and probe settings must be positive")
        if not interfaces:
            raise ConfigError("at least one zeroconf interface address is needed")
        self._me = Advert(node_id=node_id, priority=priority, farm=farm, proto=proto)
        self._interfaces = list(interfaces)
        self._broker_host = broker_host or self._interfaces[0]
        self._broker_port = broker_port
        self._timing = timing if timing is not None else Timing()
        self._settle = settle
        self._interval = probe_interval
        self._refresh_interval = refresh_interval
        self._probes = _Probes(probe_timeout, probe_failures)
        self._service_port = service_port
        self._max_packet_bytes = max_packet_bytes
        self._access = access
        self._broker_plugins = broker_plugins
        self._adverts: Adverts | None = None
        self._embedded: EmbeddedBroker | None = None
        self._choice = ChoiceState()
        self._decision: Decision | None = None
        self._chosen = _Chosen(node_id)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failures_logged: set[str] = set()
        self._state = "new"

    @property
    def address(self) -> Address | None:
        """The broker in use now, or ``None``."""
        return self._chosen.address

    @property
    def hosting(self) -> Address | None:
        """Our embedded broker's address while it runs (also while it drains after losing)."""
        return self._embedded.address if self._embedded is not None else None

    @property
    def decision(self) -> Decision | None:
        """The latest decision (for status pages and tests)."""
        return self._decision

    async def start(self) -> None:
        """Advertise this node (about 1.2 s of zeroconf probing) and start choosing. Once only."""
        if self._state != "new":
            raise BrokerError(f"broker host cannot start when {self._state}")
        self._state = "starting"
        adverts = Adverts(self._interfaces, service_port=self._service_port)
        adverts.add_listener(self._wake.set)
        self._adverts = adverts
        try:
            await adverts.start(self._me)
        except BrokerError:
            self._state = "stopped"
            self._chosen.close()
            raise
        loop = asyncio.get_running_loop()
        self._choice = ChoiceState(host_not_before=loop.time() + self._settle)
        self._task = loop.create_task(self._run(), name=f"broker-host-{self._me.node_id}")
        self._state = "running"

    async def stop(self) -> None:
        """Withdraw the advert (goodbye), stop our broker if it runs. Idempotent."""
        if self._state in ("stopping", "stopped"):
            return
        self._state = "stopping"
        try:
            await self._halt()
        finally:
            try:
                if self._adverts is not None:
                    await self._adverts.close()
            finally:
                self._state = "stopped"
                self._chosen.close()

    async def abort(self) -> None:
        """Stop deciding and stop our broker at once, *leaving the advert and its broker= record up*: what
        the other nodes see when this node crashes. For tests and drills; call ``stop()`` afterwards."""
        if self._state == "running":
            self._state = "aborted"
            await self._halt()
            self._chosen.set(None)

    async def current(self, timeout: float | None = None) -> Address:
        """The broker to connect to, waiting until one is chosen; :class:`TimeoutError` after ``timeout``."""
        return await self._chosen.wait(timeout)

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback(address)`` whenever the chosen broker changes; returns a function that removes it."""
        return self._chosen.subscribe(callback)

    async def _halt(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        embedded, self._embedded = self._embedded, None
        if embedded is not None:
            await embedded.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        refreshed = loop.time()
        while True:
            self._wake.clear()
            try:
                await self._step(loop.time)
                if loop.time() - refreshed >= self._refresh_interval:
                    refreshed = loop.time()
                    assert self._adverts is not None
                    await self._adverts.refresh()
            except BrokerError as exc:
                self._log_failure(str(exc))
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a bug; logged with traceback
                self._log_failure(f"step failed: {exc!r}", exc)
            timeout = self._interval
            if self._decision is not None and self._decision.until is not None:
                timeout = min(timeout, max(0.0, self._decision.until - loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    async def _step(self, clock: Callable[[], float]) -> None:
        assert self._adverts is not None
        me = replace(self._me, broker=self.hosting)
        adverts = tuple(self._adverts.adverts.values())
        wanted = {a.broker for a in adverts if a.broker and a.node_id != me.node_id and counts(me, a)}
        probes = await self._probes.run(wanted)
        clients = self._embedded.client_count if self._embedded is not None else 0
        observation = Observation(adverts=adverts, probes=probes, hosted_clients=clients)
        self._choice, decision = decide(me, self._choice, observation, clock(), self._timing)
        if decision != self._decision:
            log.debug("%s: %s", me.node_id, decision)
        self._decision = decision
        await self._apply(decision)

    async def _apply(self, decision: Decision) -> None:
        assert self._adverts is not None
        if decision.action is Action.HOST:
            embedded = EmbeddedBroker(
                self._broker_host,
                self._broker_port,
                access=self._access,
                max_packet_bytes=self._max_packet_bytes,
                plugins=self._broker_plugins,
            )
            address = await embedded.start()
            self._embedded = embedded
            self._failures_logged.clear()
            log.info("%s hosts the broker at %s", self._me.node_id, address)
            await self._adverts.update(replace(self._me, broker=address))
            self._chosen.set(address)
        elif decision.action is Action.STOP_HOSTING:
            await self._adverts.update(self._me)
            stopping, self._embedded = self._embedded, None
            if stopping is not None:
                log.info("%s stops hosting: %s won", self._me.node_id, decision.broker)
                await stopping.stop()
            self._chosen.set(decision.broker)
        elif decision.action is Action.USE:
            own = self.hosting
            # While draining after losing, our broker runs but is no longer advertised.
            await self._adverts.update(replace(self._me, broker=own if own == decision.broker else None))
            self._chosen.set(decision.broker)
        else:
            self._chosen.set(None)

    def _log_failure(self, message: str, exc: Exception | None = None) -> None:
        # Once per distinct failure at warning level (with the traceback of a bug), then at debug level:
        # the loop retries every probe interval.
        first = message not in self._failures_logged
        self._failures_logged.add(message)
        log.log(
            logging.WARNING if first else logging.DEBUG,
            "%s: %s",
            self._me.node_id,
            message,
            exc_info=exc if first else None,
        )
