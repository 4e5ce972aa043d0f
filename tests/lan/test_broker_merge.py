"""Two brokers that came up on the two sides of a cut merge back onto one once the hosts see each other again.

mDNS announces a change once: a host that was cut off then keeps the other side's previous advert. Here the
winning side starts its broker while the losing side cannot hear it; only the adverts' periodic
re-announcement (``Adverts.refresh``) tells the loser, found by the chaos tests (seeds 8, 16 and 24 once ended
with a node alone on its own broker).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.lan.netns import Lan, LanFarm, LanNode

pytestmark = pytest.mark.lan

MERGE_BOUND_S = 40.0  # a bound on a stuck test, not a speed target: the refresh interval is 4 s


def _broker(node: LanNode) -> tuple[str, int] | None:
    rt = node.runtime() if node.alive else None
    broker = rt.get("broker") if rt else None
    return (str(broker[0]), int(broker[1])) if broker else None


def _wait_for(what: str, check: object, farm: LanFarm, bound: float = MERGE_BOUND_S) -> None:
    deadline = time.monotonic() + bound
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            brokers = {n.node_id: _broker(n) for n in farm.nodes}
            logs = "\n".join(f"--- {n.node_id}\n{n.log_tail(15)}" for n in farm.nodes)
            pytest.fail(f"{what} within {bound:.0f} s; brokers in use: {brokers}\n{logs}")
        time.sleep(0.2)


def test_brokers_started_on_both_sides_of_a_cut_merge_after_it_heals(tmp_path: Path) -> None:
    with Lan(2) as lan:
        farm = LanFarm(lan, tmp_path)
        n1, n2 = farm.nodes
        try:
            # n2 starts first and hosts; n1 joins and uses it (a newcomer never moves a broker). Then n2 is cut
            # off, and n1 hosts one of its own: the announcement of that is lost to n2, whose cache keeps n1's
            # advert without a broker (and known-answer suppression keeps it so when n2 asks).
            farm.start_node(n2)
            _wait_for("n2 hosts a broker", lambda: _broker(n2) == (n2.host.addr, 1883), farm)
            farm.start_node(n1)
            _wait_for("n1 uses n2's broker", lambda: _broker(n1) == (n2.host.addr, 1883), farm)
            lan.link_down(n2.host)
            _wait_for("n1 hosts its own broker", lambda: _broker(n1) == (n1.host.addr, 1883), farm)
            assert _broker(n2) == (n2.host.addr, 1883)
            # Not a synchronisation: the fault itself. n1's announcement of its broker (three packets within
            # about a second) must be over, unheard, before n2 is back.
            time.sleep(2.0)
            lan.link_up(n2.host)
            # n1 ranks first (same priority, lower id): both end on n1's broker.
            _wait_for("both nodes use n1's broker", lambda: _broker(n1) == _broker(n2) == (n1.host.addr, 1883),
                      farm)
        finally:
            farm.stop()
