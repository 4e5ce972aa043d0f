"""A power cut at any point of persisting what a message changed leaves the replica's disk consistent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from node.consensus.consensus import Consensus
from node.consensus.meta import MetaWrite
from node.consensus.replica import Replica
from node.link.base import LinkOptions, Message
from node.link.memory import MemoryBroker, MemoryLink
from shared import protocol as P
from shared import security
from shared.models import StoredObject
from shared.settings import Settings
from shared.topics import Topics

KEY = security.new_farm_key()


def _job(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "namespace": "default", "name": job_id, "count": 1,
            "sets": [{"file": "x.gcode", "sha256": "a" * 64}], "copies": [{"index": 0, "state": "queued"}]}


OLD = StoredObject(key="job/default/old", stamp=(4, 2), value=_job("old"))
NEW = StoredObject(key="job/default/new", stamp=(7, 1), value=_job("new"))


class PowerCut(BaseException):
    """The process stops here: nothing after it runs (not an Exception, so no handler of the node catches it)."""


class CutReplica(Replica):
    """A replica whose ``cut_at``-th durable write (counting each transaction) never happens."""

    cut_at = 0
    writes = 0

    def _write(self) -> None:
        self.writes += 1
        if self.writes == self.cut_at:
            raise PowerCut

    def apply(self, *args: Any, **kwargs: Any) -> None:
        self._write()
        super().apply(*args, **kwargs)

    def write(self, *values: MetaWrite) -> None:
        self._write()
        super().write(*values)


def _snapshot_from_n2() -> Message:
    """The snapshot of term 7 that arbiter n2 sends n1, sealed by n2 as it would be on the wire."""
    snap = P.Snapshot(farm="f1", term=7, seq=1, commit=0, objects=[NEW])
    topic = Topics().to_node("n1")
    sealer = security.Sealer(security.parse_key(KEY), "n2", boot=1)
    return Message(topic=topic, payload=sealer.seal(topic, P.encode(snap)))


def _follower(path: Path, cut_at: int) -> Consensus:
    settings = Settings(node_id="n1", data_dir=str(path.parent), farm={"key": KEY})
    replica = CutReplica(path)
    c = Consensus(settings, MemoryLink(MemoryBroker(), LinkOptions(client_id="n1")), replica, clock=lambda: 100.0)
    c.farm = "f1"
    c._apply(OLD.stamp, [OLD], snapshot=True)  # what the node held before: the snapshot of term 4
    replica.writes, replica.cut_at = 0, cut_at
    return c


@pytest.mark.parametrize("cut_at", [1, 2, 3, 4])
async def test_a_power_cut_while_a_snapshot_is_persisted_leaves_objects_applied_and_base_together(
        tmp_path: Path, cut_at: int) -> None:
    """The snapshot's objects, ``applied`` and ``base`` are on disk together or not at all. Before they went in
    one transaction, a cut after the objects and before ``base`` left the base of the replaced state beside the
    new objects, and the next split's three-way merge took that stale base for the common ancestor."""
    path = tmp_path / "r.db"
    c = _follower(path, cut_at)
    try:
        c._on_direct(_snapshot_from_n2())
    except PowerCut:
        pass
    assert c.replica.writes >= 1, "the snapshot was not persisted at all: the test no longer tests anything"
    c.replica.db.conn.close()

    after = Replica(path)
    hard = after.hard_state()
    applied, base = hard.applied, hard.base
    objects = {o.key for o in after.load()}
    if applied == (7, 1):
        assert (base, objects) == ((7, 1), {NEW.key})
    else:
        assert (applied, base, objects) == ((4, 2), (4, 1), {OLD.key})
