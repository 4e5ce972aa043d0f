"""Two farms with different keys on one loopback: each sees only its own members and prints only its own jobs.

Before farms had keys, a second farm's fresh nodes joined the first one within two seconds, fetched its G-code
and printed its copies (issue "Nobody gets in who does not belong")."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from node.demo.farm import ProcessFarm
from node.demo.run import DEMO_TIMING
from shared import security
from shared.errors import NetqError
from tests.waiting import until as _until

pytestmark = [pytest.mark.integration, pytest.mark.security]


async def until(cond: Callable[[], Any], timeout: float, what: str, *farms: ProcessFarm) -> Any:
    return await _until(cond, what, timeout, interval=0.1, retry_on=(NetqError,),
                        context=lambda: "\n".join(f.logs() for f in farms))


@pytest.fixture
async def two_farms() -> AsyncIterator[tuple[ProcessFarm, ProcessFarm]]:
    a, b = ProcessFarm(2, time_scale=200, timing=DEMO_TIMING), ProcessFarm(2, time_scale=200, timing=DEMO_TIMING)
    assert a.key != b.key
    a.start()
    b.start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


async def test_two_farms_on_one_loopback_each_see_only_their_members_and_print_only_their_jobs(
        two_farms: tuple[ProcessFarm, ProcessFarm]) -> None:
    a, b = two_farms
    ca, cb = await a.client(timeout=60), await b.client(timeout=60)
    try:
        await a.wait_ready(ca, 2)
        await b.wait_ready(cb, 2)
        # Each farm elected its own broker: a node never uses (or even reaches with its credentials) the other's.
        brokers_a = {tuple(n.runtime()["broker"]) for n in a.nodes}  # type: ignore[index]
        brokers_b = {tuple(n.runtime()["broker"]) for n in b.nodes}  # type: ignore[index]
        assert len(brokers_a) == 1 and len(brokers_b) == 1 and brokers_a != brokers_b
        ids_a = await a.add_jobs(ca, 3, min_s=60, max_s=120)
        ids_b = await b.add_jobs(cb, 3, seed=2, min_s=60, max_s=120)

        async def drained(farm: ProcessFarm, client: Any) -> bool:
            return bool((await farm.summary(client))["unfinished"] == 0)

        await until(lambda: drained(a, ca), 90, "farm a's queue to drain", a, b)
        await until(lambda: drained(b, cb), 90, "farm b's queue to drain", a, b)
        members_a = {n["node_id"] for n in (await ca.request("node/list", timeout=3))["nodes"] if n["enrolled"]}
        members_b = {n["node_id"] for n in (await cb.request("node/list", timeout=3))["nodes"] if n["enrolled"]}
        assert members_a == {n.node_id for n in a.nodes}
        assert members_b == {n.node_id for n in b.nodes}
        # Every start on a farm's printers is one of its own jobs, each copy once.
        assert all(name.split("-")[0] in ids_a for name in a.starts()), a.starts()
        assert all(name.split("-")[0] in ids_b for name in b.starts()), b.starts()
        assert a.double_starts() == 0 and b.double_starts() == 0
        assert (await a.summary(ca))["lost"] == 0 and (await b.summary(cb))["lost"] == 0
    finally:
        await ca.close()
        await cb.close()


async def test_a_client_with_another_farms_credentials_is_refused(two_farms: tuple[ProcessFarm, ProcessFarm]) -> None:
    from node.app.client import FarmClient

    a, b = two_farms
    ca = await a.client(timeout=60)
    try:
        await a.wait_ready(ca, 2)
        assert b.key is not None
        key_b = security.parse_key(b.key)
        stranger = FarmClient(ca.address, username="operator",
                              password=security.broker_password(key_b, security.Role.OPERATOR))
        with pytest.raises(NetqError):
            await stranger.connect(timeout=3)
    finally:
        await ca.close()
