"""Broker hosts (broker.host) in one process, zeroconf on 127.0.0.1 only: convergence and failover."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.choice import Action, Address, Decision, Timing
from broker.host import BrokerHost, FixedBroker
from shared.errors import BrokerError
from tests import paho_thread

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]

LOOPBACK = ["127.0.0.1"]
TIMING = Timing(wait_timeout=1.0, drain_timeout=2.0)


async def wait_until(predicate: Callable[[], bool], timeout: float) -> float:
    """Poll ``predicate`` until it holds; return the time it took; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)
    return loop.time() - start


def mqtt_connects(address: Address) -> bool:
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv311
    )
    try:
        return client.connect(*address, keepalive=5) == mqtt.MQTT_ERR_SUCCESS and client.loop(timeout=2) == 0
    finally:
        paho_thread.stop(client)


@pytest.fixture
def farm() -> str:
    # Unique per test: other test processes on this machine may browse 127.0.0.1 at the same time.
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make_host(farm: str) -> AsyncIterator[Callable[..., BrokerHost]]:
    made: list[BrokerHost] = []
    prefix = uuid.uuid4().hex[:6]

    def make(name: str, priority: int = 1) -> BrokerHost:
        host = BrokerHost(
            node_id=f"{name}-{prefix}",
            priority=priority,
            farm=farm,
            proto=1,
            interfaces=LOOPBACK,
            timing=TIMING,
            settle=0.3,
            probe_interval=0.2,
            probe_timeout=0.3,
        )
        made.append(host)
        return host

    yield make
    await asyncio.gather(*(h.stop() for h in made))


async def test_three_nodes_converge_on_one_broker_host(make_host: Callable[..., BrokerHost]) -> None:
    hosts = [make_host("a", 1), make_host("b", 5), make_host("c", 5)]
    changes: list[Address | None] = []
    hosts[0].on_change(changes.append)
    await asyncio.gather(*(h.start() for h in hosts))
    addresses = await asyncio.gather(*(h.current(timeout=10) for h in hosts))
    assert len(set(addresses)) == 1
    hosting = [h for h in hosts if h.hosting is not None]
    assert hosting == [hosts[1]]  # priority 5 beats 1; "b" < "c" breaks the tie
    assert hosts[1].hosting == addresses[0]
    assert changes == [addresses[0]]
    assert await asyncio.to_thread(mqtt_connects, addresses[0])


async def test_a_newcomer_does_not_move_a_live_broker(make_host: Callable[..., BrokerHost]) -> None:
    first = make_host("z", 1)
    await first.start()
    address = await first.current(timeout=10)
    newcomer = make_host("a", 9)
    await newcomer.start()
    assert await newcomer.current(timeout=10) == address
    assert newcomer.hosting is None and first.hosting == address


@pytest.mark.parametrize("how", ["crash", "stop"])
async def test_after_the_host_goes_the_others_choose_a_new_one(
    make_host: Callable[..., BrokerHost], how: str
) -> None:
    hosts = [make_host("a", 3), make_host("b", 2), make_host("c", 1)]
    await asyncio.gather(*(h.start() for h in hosts))
    old = await hosts[0].current(timeout=10)
    await wait_until(lambda: all(h.address == old for h in hosts), timeout=10)
    assert hosts[0].hosting == old

    if how == "crash":
        await hosts[
            0
        ].abort()  # broker gone, but its advert (broker=old) stays up like a crashed node's record
    else:
        await hosts[0].stop()  # goodbye sent
    survivors = hosts[1:]
    took = await wait_until(
        lambda: (
            all(h.address is not None and h.address != old for h in survivors)
            and len({h.address for h in survivors}) == 1
        ),
        timeout=5,
    )
    new = survivors[0].address
    assert new is not None and survivors[0].hosting == new and survivors[1].hosting is None
    assert took < 3.0
    assert await asyncio.to_thread(mqtt_connects, new)


async def test_two_live_brokers_converge_and_the_loser_drains(make_host: Callable[..., BrokerHost]) -> None:
    loser, winner = make_host("z", 1), make_host("a", 9)
    await loser.start()
    old = await loser.current(timeout=10)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="stays", protocol=mqtt.MQTTv311)
    await asyncio.to_thread(client.connect, *old, 5)
    client.loop_start()
    try:
        await wait_until(lambda: loser.hosting is not None and loser._embedded.client_count == 1, timeout=5)  # type: ignore[union-attr]
        await winner.start()
        assert await winner.current(timeout=10) == old  # sticky
        # A healed split: the winner has been hosting on its side all along.
        await winner._apply(Decision(Action.HOST))
        new = winner.hosting
        assert new is not None and new != old
        await wait_until(lambda: loser.address == new and winner.address == new, timeout=5)
        assert loser.hosting == old  # still draining: a client is connected
        took = await wait_until(lambda: loser.hosting is None, timeout=TIMING.drain_timeout + 2)
        assert took > 0.5
    finally:
        paho_thread.stop(client)
    assert winner.address == loser.address == new and winner.hosting == new


async def test_lifecycle(make_host: Callable[..., BrokerHost]) -> None:
    host = make_host("a", 1)
    await host.start()
    with pytest.raises(BrokerError):
        await host.start()
    await host.current(timeout=10)
    await host.stop()
    await host.stop()
    assert host.address is None and host.hosting is None
    with pytest.raises(BrokerError):
        await host.current(timeout=1)
    with pytest.raises(BrokerError):
        await host.start()
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not leftover, leftover


async def test_priority_zero_waits_and_never_hosts(make_host: Callable[..., BrokerHost]) -> None:
    host = make_host("a", 0)
    await host.start()
    with pytest.raises(TimeoutError):
        await host.current(timeout=1.0)
    assert host.hosting is None


async def test_a_fixed_broker_url_skips_the_choice() -> None:
    fixed = FixedBroker("mqtt://127.0.0.1:1884")
    seen: list[Address | None] = []
    fixed.on_change(seen.append)
    waiter = asyncio.create_task(fixed.current(timeout=5))
    await fixed.start()
    assert await waiter == ("127.0.0.1", 1884) == fixed.address
    await fixed.stop()
    await fixed.stop()
    assert seen == [("127.0.0.1", 1884), None]
    with pytest.raises(BrokerError):
        await fixed.current()
