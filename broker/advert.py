"""Zeroconf adverts of netqueues nodes: publish our own, browse everyone's (``_netqueues._tcp.local.``).

TXT keys: ``proto`` (protocol version), ``farm`` (the farm id, ``shared.security.farm_id``, or ``open``),
``node`` (node id, also the service instance name), ``prio`` (broker priority, 0 = never host) and
``broker=host:port`` while hosting.

Zeroconf only says who *was* there: a crashed node's record lingers for many minutes, so liveness never
comes from here (see :mod:`broker.choice`). Zeroconf errors become :class:`shared.errors.BrokerError`,
malformed peer adverts are ignored (logged once per peer record, then at debug level).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType

from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from broker.choice import Address, Advert
from shared.errors import BrokerError, ProtocolError

log = logging.getLogger(__name__)

SERVICE_TYPE = "_netqueues._tcp.local."
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
_MAX_PRIORITY = 1_000_000


def service_name(node_id: str) -> str:
    """The zeroconf service instance name of a node."""
    return f"{node_id}.{SERVICE_TYPE}"


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it can name a zeroconf service (one DNS label, 1 to 63 characters)."""
    if not _NODE_ID.match(node_id):
        raise ProtocolError(f"invalid node id {node_id!r}: use 1 to 63 letters, digits, '-' or '_'")
    return node_id


def format_address(address: Address) -> str:
    """``host:port`` as in the ``broker`` TXT key."""
    return f"{address[0]}:{address[1]}"


def parse_address(text: str) -> Address:
    """Parse ``host:port`` where host is an IPv4 address (the adverts are IPv4 only)."""
    host, sep, port_text = text.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        port = int(port_text)
    except ValueError as exc:
        raise ProtocolError(f"invalid broker address {text!r}") from exc
    if not sep or not 0 < port < 65536:
        raise ProtocolError(f"invalid broker address {text!r}")
    return host, port


def advert_to_properties(advert: Advert) -> dict[str, str]:
    """The TXT properties of an advert."""
    props = {
        "proto": str(advert.proto),
        "farm": advert.farm,
        "node": advert.node_id,
        "prio": str(advert.priority),
    }
    if advert.broker is not None:
        props["broker"] = format_address(advert.broker)
    return props


def advert_from_properties(props: Mapping[str, str | None]) -> Advert:
    """Parse TXT properties; raises :class:`ProtocolError` when a key is missing or malformed."""
    try:
        proto, farm, node, prio = (props[key] for key in ("proto", "farm", "node", "prio"))
    except KeyError as exc:
        raise ProtocolError(f"advert lacks TXT key {exc.args[0]!r}") from exc
    if proto is None or farm is None or node is None or prio is None or not farm:
        raise ProtocolError("advert has an empty TXT key")
    try:
        proto_n, prio_n = int(proto), int(prio)
    except ValueError as exc:
        raise ProtocolError(f"advert has non-integer proto {proto!r} or prio {prio!r}") from exc
    if not 0 <= prio_n <= _MAX_PRIORITY:
        raise ProtocolError(f"advert priority {prio_n} out of range")
    broker_text = props.get("broker")
    broker = parse_address(broker_text) if broker_text else None
    return Advert(node_id=check_node_id(node), priority=prio_n, farm=farm, proto=proto_n, broker=broker)


class Adverts:
    """Our own advert on zeroconf, and a live view of every node's advert (ours included).

    ``start()`` may be called once; ``close()`` is idempotent and sends the goodbye.
    """

    def __init__(
        self, interfaces: Sequence[str], *, service_port: int = 0, request_timeout: float = 1.0
    ) -> None:
        """``interfaces``: IPv4 addresses to advertise and browse on (never implied: tests use 127.0.0.1).
        ``service_port``: the SRV port (the node's HTTP port, or 0)."""
        try:
            self._addresses = [ipaddress.IPv4Address(i).packed for i in interfaces]
        except ValueError as exc:
            raise BrokerError(f"interfaces must be IPv4 addresses: {list(interfaces)!r}") from exc
        if not self._addresses:
            raise BrokerError("at least one interface address is needed")
        self._interfaces = list(interfaces)
        self._service_port = service_port
        self._request_timeout_ms = int(request_timeout * 1000)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._own: Advert | None = None
        self._own_info: AsyncServiceInfo | None = None
        self._epoch = time.time_ns() // 1_000_000  # a restarted node's adverts differ from its last life's too
        self._sent = 0
        self._broadcast: Awaitable[object] | None = None
        self._by_node: dict[str, Advert] = {}
        self._generation: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._listeners: list[Callable[[], None]] = []
        self._warned: set[str] = set()
        self._state = "new"

    @property
    def adverts(self) -> Mapping[str, Advert]:
        """Live read-only view: node id -> latest advert seen (including our own once it is browsed)."""
        return MappingProxyType(self._by_node)

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback()`` after every change of :attr:`adverts`; returns a function that removes it."""
        self._listeners.append(callback)

        def remove() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return remove

    async def start(self, own: Advert) -> None:
        """Open zeroconf on the interfaces, browse, and register ``own`` (about 1.2 s of name probing)."""
        if self._state != "new":
            raise BrokerError(f"adverts cannot start when {self._state}")
        self._state = "starting"
        check_node_id(own.node_id)
        try:
            self._zc = AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service]
            )
            info = self._info(own)
            self._broadcast = await self._zc.async_register_service(info)
        except (ZeroconfError, OSError) as exc:
            await self.close()
            raise BrokerError(f"cannot advertise node {own.node_id!r}: {exc!r}") from exc
        self._own, self._own_info = own, info
        self._state = "running"
        log.info("advertising %s on %s", own, self._interfaces)

    async def update(self, own: Advert) -> None:
        """Replace our advert's TXT (a new ServiceInfo with the same name); a no-op when nothing changed."""
        if self._state != "running" or self._zc is None:
            raise BrokerError(f"adverts cannot be updated when {self._state}")
        if own == self._own:
            return
        if self._own is not None and own.node_id != self._own.node_id:
            raise BrokerError("the node id of an advert cannot change")
        # A broadcast still running would re-send the previous TXT after this one.
        self._cancel_broadcast()
        info = self._info(own)
        try:
            self._broadcast = await self._zc.async_update_service(info)
        except (ZeroconfError, OSError) as exc:
            raise BrokerError(f"cannot update advert of {own.node_id!r}: {exc!r}") from exc
        self._own, self._own_info = own, info
        log.debug("advert updated: %s", own)

    async def refresh(self) -> None:
        """Announce our current advert again. mDNS sends a change once (three packets, about a second): a node
        cut off from us then (a partition, a pulled cable) keeps our previous advert in its cache until it
        happens to ask, which can be an hour. Repeating the announcement lets two sides of a healed split learn
        each other's brokers, and so merge onto one. A no-op while an announcement is still being sent."""
        if self._state != "running" or self._zc is None or self._own_info is None:
            return
        if isinstance(self._broadcast, asyncio.Future) and not self._broadcast.done():
            return
        try:
            self._broadcast = await self._zc.async_update_service(self._own_info)
        except (ZeroconfError, OSError) as exc:
            raise BrokerError(f"cannot announce advert of {self._own_info.name!r}: {exc!r}") from exc

    async def close(self) -> None:
        """Withdraw our advert (goodbye sent and awaited), stop browsing, close zeroconf. Idempotent."""
        if self._state in ("closing", "closed"):
            return
        self._state = "closing"
        zc, self._zc = self._zc, None
        try:
            broadcast = self._broadcast
            if broadcast is not None and self._cancel_broadcast():
                with contextlib.suppress(asyncio.CancelledError, ZeroconfError):
                    await broadcast
            if self._browser is not None:
                await self._browser.async_cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            if zc is not None:
                if self._own_info is not None:
                    with contextlib.suppress(ZeroconfError, OSError):
                        goodbye: Awaitable[object] = await zc.async_unregister_service(self._own_info)
                        await goodbye
                await zc.async_close()
        except (ZeroconfError, OSError) as exc:
            raise BrokerError(f"closing zeroconf failed: {exc!r}") from exc
        finally:
            self._state = "closed"
            self._by_node.clear()

    def _cancel_broadcast(self) -> bool:
        if isinstance(self._broadcast, asyncio.Future) and not self._broadcast.done():
            self._broadcast.cancel()
            return True
        return False

    def _next_generation(self) -> str:
        self._sent += 1
        return f"{self._epoch:x}.{self._sent}"

    def _info(self, own: Advert) -> AsyncServiceInfo:
        host_label = re.sub(r"[^A-Za-z0-9-]", "-", own.node_id)
        return AsyncServiceInfo(
            SERVICE_TYPE,
            service_name(own.node_id),
            addresses=self._addresses,
            port=self._service_port,
            # ``gen`` changes with every advert we send: zeroconf's browser reports no update for a TXT record
            # identical to one it still caches, so broker=X → none → X again would go unseen (found by the
            # LAN chaos tests: the farm split across brokers and never merged back).
            properties={**advert_to_properties(own), "gen": self._next_generation()},
            server=f"netq-{host_label}.local.",
        )

    def _on_service(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Called by zeroconf in the event loop; the lookup itself is async.
        generation = self._generation.get(name, 0) + 1
        self._generation[name] = generation
        if state_change is ServiceStateChange.Removed:
            self._forget(name)
            return
        task = asyncio.get_running_loop().create_task(self._fetch(zeroconf, service_type, name, generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch(self, zeroconf: Zeroconf, service_type: str, name: str, generation: int) -> None:
        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(zeroconf, self._request_timeout_ms)
        except (ZeroconfError, OSError) as exc:
            log.debug("lookup of %s failed: %r", name, exc)
            return
        if self._generation.get(name) != generation or self._state not in ("starting", "running"):
            return  # a newer event for this name is being handled
        if not found:
            log.debug("no answer for %s", name)
            return
        try:
            advert = advert_from_properties(info.decoded_properties)
            if service_name(advert.node_id).lower() != name.lower():
                raise ProtocolError(f"TXT node {advert.node_id!r} does not match the service name")
        except ProtocolError as exc:
            self._warn_once(name, exc)
            self._forget(name)
            return
        if self._by_node.get(advert.node_id) != advert:
            self._by_node[advert.node_id] = advert
            log.debug("advert seen: %s", advert)
            self._notify()

    def _forget(self, name: str) -> None:
        for node_id in [n for n in self._by_node if service_name(n).lower() == name.lower()]:
            del self._by_node[node_id]
            log.debug("advert removed: %s", node_id)
            self._notify()

    def _warn_once(self, name: str, exc: ProtocolError) -> None:
        if name in self._warned:
            log.debug("ignoring advert %s: %s", name, exc)
        else:
            self._warned.add(name)
            log.warning("ignoring advert %s: %s", name, exc)

    def _notify(self) -> None:
        for callback in list(self._listeners):
            try:
                callback()
            except Exception:
                log.exception("advert listener failed")
