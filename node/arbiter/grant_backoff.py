"""The arbiter's memory of copies a node gave back, so that it does not hand them straight back to it.

A node gives a claimed copy back when it cannot print it now: its file cannot be fetched, its printer went
offline, an operator released it, the G-code policy refused it at the printer. Granted again at once, the
same node would give it back again: a loop of two commits per try (found with a job whose only holder was
gone: ~80 log lines a second, the commit index climbing by thousands, the arbiter at 69 % of a core). So a
copy a node gave back twice in a row is kept from *that* node for a while, doubling with each further
give-back of the same copy by the same node, up to a cap; other nodes may take it at once, and the node takes
other work. The first give-back costs nothing: an operator's ``node/release`` (which pauses the node anyway)
or a printer that was offline for a moment does not keep the node from the copy once it is back.

Pure: the arbiter passes its monotonic clock in. In memory only: a new arbiter starts with none (the worst
that costs is one more try per node).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

CopyRef = tuple[str, str, int]  # namespace, job id, copy index
BASE_S: Final = 10.0
CAP_S: Final = 600.0
MAX_PER_NODE: Final = 1000  # copies remembered per node; the oldest are forgotten first


@dataclass
class _Entry:
    count: int
    until: float


class GrantBackoff:
    """Copies kept from the nodes that gave them back: none after the first give-back, ``base_s`` after the
    second, doubling with each further one up to ``cap_s``. A pair not given back again within ``cap_s`` after
    its back-off ended starts over."""

    def __init__(self, base_s: float = BASE_S, cap_s: float = CAP_S, max_per_node: int = MAX_PER_NODE) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.max_per_node = max_per_node
        self._nodes: dict[str, OrderedDict[CopyRef, _Entry]] = {}

    def gave_back(self, node: str, copy: CopyRef, now: float) -> float:
        """``node`` gave ``copy`` back at ``now``; return until when it is kept from that node."""
        entries = self._nodes.setdefault(node, OrderedDict())
        old = entries.pop(copy, None)
        count = 1 if old is None or now > old.until + self.cap_s else old.count + 1
        until = now if count == 1 else now + min(self.cap_s, self.base_s * 2.0 ** min(count - 2, 30))
        entries[copy] = _Entry(count, until)
        while len(entries) > self.max_per_node:
            entries.popitem(last=False)
        return until

    def excluded(self, node: str, now: float) -> frozenset[CopyRef]:
        """The copies not to grant to ``node`` at ``now``."""
        entries = self._nodes.get(node)
        if not entries:
            return frozenset()
        for copy in [c for c, e in entries.items() if now > e.until + self.cap_s]:
            del entries[copy]  # long over: forgotten
        return frozenset(c for c, e in entries.items() if now < e.until)

    def clear(self) -> None:
        self._nodes.clear()
