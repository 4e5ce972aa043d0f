"""``netq`` for the LAN tests: the same CLI, with the loggers that explain a fault run turned up to DEBUG
(broker choice and adverts, consensus, arbiter, worker), and a trace of what consensus applies and merges
(logger ``lan.trace``), so a failing seed's node logs show why. The node's code is not changed: the trace wraps
two methods from outside."""

from __future__ import annotations

import logging
from typing import Any

from node.app.cli import main
from node.consensus.consensus import Consensus

DEBUG_LOGGERS = ("broker.host", "broker.advert", "node.consensus.consensus", "node.arbiter.services", "node.worker.worker", "lan.trace")
trace = logging.getLogger("lan.trace")


def _keys(objects: Any) -> str:
    return " ".join(f"{o.key.rsplit('/', 1)[-1]}@{o.stamp[0]}.{o.stamp[1]}{'' if o.value is not None else '(del)'}"
                    for o in objects if not o.key.startswith("txn/"))


def _install_trace() -> None:
    apply, take_over = Consensus._apply, Consensus._take_over

    def traced_apply(self: Consensus, stamp: Any, writes: Any, *, snapshot: bool, **kw: Any) -> None:
        trace.debug("%s: apply %s%s term=%d base=%s: %s", self.node_id, stamp, " SNAPSHOT" if snapshot else "",
                    self.term, self.base, _keys(writes))
        apply(self, stamp, writes, snapshot=snapshot, **kw)

    def traced_take_over(self: Consensus, **kw: Any) -> None:
        trace.debug("%s: take over term %d: own base=%s applied=%s objects: %s", self.node_id, self.term,
                    self.base, self.applied, _keys(self.state.objects.values()))
        for v in self._votes.values():
            trace.debug("%s:   vote of %s: base=%s last=%s objects: %s", self.node_id, v.voter, tuple(v.base),
                        tuple(v.last), _keys(v.objects))
        take_over(self, **kw)

    Consensus._apply = traced_apply  # type: ignore[method-assign]
    Consensus._take_over = traced_take_over  # type: ignore[method-assign]


if __name__ == "__main__":
    for name in DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    _install_trace()
    main()
