"""What the consensus keeps on disk besides the objects: its hard state, one row of the replica's metadata each.

Row names and JSON shapes are those replicas have always written: ``farm`` (the farm id), ``term``, ``vote``
(``[term, candidate]``), ``applied`` and ``base`` (stamps as ``[term, seq]``), ``boot`` (this node's boot number),
``peer_boots`` (node id → the highest boot seen of it) and ``unconfirmed`` (the records of a split, safety mode
``available``: a list of :class:`shared.merge.MergeRecord`). Only :class:`node.consensus.replica.Replica`
writes them, for the consensus.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from node.consensus.meta import MetaRecord, Slot
from shared.merge import MergeRecord
from shared.models import ZERO_STAMP, Stamp

Vote = tuple[int, str]
"""``(term, candidate)``: the vote this node cast last."""

Boot = Annotated[int, Field(gt=0)]

FARM: Slot[str | None] = Slot("farm", str | None, None)
TERM: Slot[int] = Slot("term", Annotated[int, Field(ge=0)], 0)
VOTE: Slot[Vote | None] = Slot("vote", Vote | None, None)
APPLIED: Slot[Stamp] = Slot("applied", Stamp, ZERO_STAMP)
BASE: Slot[Stamp] = Slot("base", Stamp, ZERO_STAMP)
BOOT: Slot[int] = Slot("boot", Annotated[int, Field(ge=0)], 0)
PEER_BOOTS: Slot[dict[str, int]] = Slot("peer_boots", dict[str, Boot], {})
UNCONFIRMED: Slot[tuple[MergeRecord, ...]] = Slot("unconfirmed", tuple[MergeRecord, ...], ())


class HardState(MetaRecord):
    """The consensus's durable state, as :meth:`node.consensus.replica.Replica.hard_state` reads it."""

    farm: str | None = None  # None: not yet in a farm
    term: int = 0
    vote: Vote | None = None
    applied: Stamp = ZERO_STAMP  # the stamp of the last entry (or snapshot) applied to the objects
    base: Stamp = ZERO_STAMP  # the first stamp of the snapshot the objects were last replaced with
    boot: int = 0  # this node's last boot number (0: never booted)
    peer_boots: dict[str, Boot] = Field(default_factory=dict)
    unconfirmed: tuple[MergeRecord, ...] = ()
