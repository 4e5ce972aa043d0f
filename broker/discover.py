"""Find the farm's broker from outside the farm (the CLI): browse the node adverts, try their brokers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from broker.advert import SERVICE_TYPE, advert_from_properties
from broker.choice import Address, Advert
from broker.host import tcp_reachable
from shared.errors import BrokerError, ProtocolError

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def browse_adverts(interfaces: Sequence[str] | None,
                         on_advert: Callable[[AsyncServiceInfo, Advert], None]) -> AsyncIterator[None]:
    """While the block runs, browse the nodes' zeroconf adverts on ``interfaces`` (all when None) and call
    ``on_advert`` with each one that resolves and parses (a malformed advert is skipped); everything it
    started is stopped on the way out."""
    zc = AsyncZeroconf(interfaces=list(interfaces) if interfaces else None,  # type: ignore[arg-type]
                       ip_version=IPVersion.V4Only)
    tasks: set[asyncio.Task[None]] = set()

    async def lookup(zeroconf: Zeroconf, name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, 1000):
            return
        try:
            advert = advert_from_properties(info.decoded_properties)
        except ProtocolError:
            return
        on_advert(info, advert)

    def on_service(zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        if state_change is not ServiceStateChange.Removed:
            task = asyncio.get_running_loop().create_task(lookup(zeroconf, name))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    browser = AsyncServiceBrowser(zc.zeroconf, [SERVICE_TYPE], handlers=[on_service])
    try:
        yield
    finally:
        await browser.async_cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await zc.async_close()


async def discover_broker(interfaces: Sequence[str] | None, timeout: float = 4.0,
                          farm: str | None = None) -> Address:
    """The address of a reachable broker advertised by a node; BrokerError if none is found in ``timeout``."""
    adverts: dict[str, Advert] = {}
    found = asyncio.Event()

    def on_advert(_info: AsyncServiceInfo, advert: Advert) -> None:
        if advert.broker is not None and (farm is None or advert.farm == farm):
            adverts[advert.node_id] = advert
            found.set()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with browse_adverts(interfaces, on_advert):
        while loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await found.wait()
            found.clear()
            # A crashed host's record lingers: the broker that answers is the one in use.
            for advert in sorted(adverts.values(), key=lambda a: (-a.priority, a.node_id)):
                assert advert.broker is not None
                if await tcp_reachable(advert.broker, 1.0):
                    return advert.broker
    raise BrokerError(f"no reachable netqueues broker found on the network within {timeout:g}s "
                      "(is a node running? give --broker mqtt://HOST:PORT to name one)")
