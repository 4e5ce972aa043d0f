"""The replica's metadata: one typed model per owner, through a real SQLite replica.

Each owner's rows round-trip; rows as earlier versions wrote them still read, and are written again in the same
JSON shape; a row that is malformed, of the wrong shape or NULL reads as its default (with one warning), never
raises, and never stops a node.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from node.app.node_commands import SAVED_STATE, NodeCommands, NodeCommandsState, SavedConfig
from node.consensus import hard_state as H
from node.consensus.consensus import Consensus
from node.consensus.meta import Slot
from node.consensus.replica import Replica
from node.link.base import LinkOptions
from node.link.memory import MemoryBroker, MemoryLink
from node.worker import recovery
from node.worker.recovery import LocalCopy
from node.worker.worker import BED_DIRTY, ENDED, LOCAL_COPY, EndedCopy
from shared import protocol as P
from shared.merge import MergeRecord
from shared.models import Capabilities, CopyState, JobCopy, Material, job_key
from shared.settings import Settings
from tests.memfarm import MemFarm, gcode

KEY = job_key("default", "j1")
RECORD = MergeRecord(key=KEY, ancestor=None, value={"id": "j1", "count": 2})


def _raw(replica: Replica, name: str, value: str | None) -> None:
    """Put ``value`` (JSON text, or anything else) in row ``name`` as it is: what a disk may hold."""
    with replica.db.conn:
        replica.db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", [name, value])


def _stored(replica: Replica, name: str) -> Any:
    row = replica.db.execute("SELECT value FROM meta WHERE name = ?", [name]).fetchone()
    return None if row is None else json.loads(row[0])


# --- round trips -------------------------------------------------------------------------------------------
def test_the_consensus_hard_state_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    replica = Replica(path)
    assert replica.hard_state() == H.HardState()  # a new replica: every default
    replica.set_farm("f1")
    replica.record_vote(7, "n2")
    replica.set_term(8)
    boot = replica.next_boot(at_least=1000)
    replica.set_peer_boots({"n2": 41, "n3": 5})
    replica.apply((8, 3), [], snapshot=True, base=(8, 1), records=[RECORD])
    replica.close()

    again = Replica(path)
    try:
        assert again.hard_state() == H.HardState(
            farm="f1", term=8, vote=(7, "n2"), applied=(8, 3), base=(8, 1), boot=boot,
            peer_boots={"n2": 41, "n3": 5}, unconfirmed=(RECORD,))
        assert boot == 1000 and again.next_boot() == 1001
        again.store_records([])
        again.apply((8, 4), [])  # an entry: applied moves, base and records stay
        assert (again.hard_state().applied, again.hard_state().base, again.hard_state().unconfirmed) == \
            ((8, 4), (8, 1), ())
    finally:
        again.close()


def test_the_workers_rows_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    replica = Replica(path)
    assert (replica.read(LOCAL_COPY), replica.read(ENDED), replica.read(BED_DIRTY)) == (None, (), False)
    local = LocalCopy(key=KEY, copy_index=1, grant=(4, 8), set_index=0, run=2, phase="printing")
    ended = (EndedCopy(key=KEY, copy_index=0, grant=(4, 8), outcome=P.Outcome.REQUEUE, reason="lost"),
             EndedCopy(key=KEY, copy_index=1, grant=(5, 2), outcome=P.Outcome.DONE))
    replica.write(LOCAL_COPY.of(local), ENDED.of(ended), BED_DIRTY.of(True))
    replica.close()

    again = Replica(path)
    try:
        assert (again.read(LOCAL_COPY), again.read(ENDED), again.read(BED_DIRTY)) == (local, ended, True)
        again.write(LOCAL_COPY.of(None))
        assert again.read(LOCAL_COPY) is None
    finally:
        again.close()


def test_node_commands_state_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r.db"
    replica = Replica(path)
    assert replica.read(SAVED_STATE) is None
    state = NodeCommandsState(config=SavedConfig(accept_jobs=True, materials=[Material(type="PLA")]),
                              accept_jobs=False, paused=True, materials=[Material(type="PETG", color="red"), None])
    replica.write(SAVED_STATE.of(state))
    replica.close()
    again = Replica(path)
    try:
        assert again.read(SAVED_STATE) == state
    finally:
        again.close()


# --- rows as earlier versions wrote them ---------------------------------------------------------------------
EARLIER: list[tuple[Slot[Any], Any]] = [
    (H.FARM, "f0000000000000001"),
    (H.TERM, 12),
    (H.VOTE, [12, "n3"]),
    (H.APPLIED, [12, 40]),
    (H.BASE, [12, 1]),
    (H.BOOT, 1_780_000_000),
    (H.PEER_BOOTS, {"n2": 1_780_000_100, "n3": 3}),
    (H.UNCONFIRMED, [{"key": KEY, "ancestor": {"id": "j1"}, "value": None}]),
    (LOCAL_COPY, {"key": KEY, "copy": 0, "grant": [4, 8], "set": 1, "run": 2, "phase": "ok", "reason": None}),
    (ENDED, [{"key": KEY, "copy": 0, "grant": [4, 8], "outcome": "failed", "reason": "r"}]),
    (BED_DIRTY, True),
    (SAVED_STATE, {"config": {"accept_jobs": True, "materials": [{"type": "PLA", "color": None}, None]},
             "accept_jobs": False, "paused": True, "materials": [{"type": "PETG", "color": "red"}, None]}),
]


@pytest.mark.parametrize(("slot", "earlier"), EARLIER, ids=[s.name for s, _ in EARLIER])
def test_rows_written_by_earlier_versions_read_and_are_written_in_the_same_shape(
        tmp_path: Path, slot: Slot[Any], earlier: Any, caplog: pytest.LogCaptureFixture) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        _raw(replica, slot.name, json.dumps(earlier))  # as get_meta/set_meta wrote it
        value = replica.read(slot)
        assert value != slot.default
        replica.write(slot.of(value))
        assert _stored(replica, slot.name) == earlier
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        replica.close()


def test_a_local_copy_record_of_the_first_versions_reads(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        _raw(replica, "local_copy", json.dumps({"key": KEY, "copy": 0, "set": 1, "run": 0}))  # no grant, no phase
        local = replica.read(LOCAL_COPY)
        assert local == LocalCopy(key=KEY, copy_index=0, set_index=1, run=0)
        assert recovery.record_of(local, KEY, 0, (4, 8)) == recovery.Record(1, 0, "printing")
    finally:
        replica.close()


# --- malformed rows ------------------------------------------------------------------------------------------
MALFORMED = {"half-written": '{"key": ', "not JSON": "not json", "a string": '"a string"', "short list": "[1]",
             "an object": '{"unknown": true}', "negative": "-3", "NULL": None}
CASES = [pytest.param(slot, raw, id=f"{slot.name}: {what}")
         for slot, _ in EARLIER for what, raw in MALFORMED.items()
         if not (slot is H.FARM and what == "a string")]  # a farm id is a string


@pytest.mark.parametrize(("slot", "raw"), CASES)
def test_a_malformed_row_reads_as_its_default_with_one_warning(
        tmp_path: Path, slot: Slot[Any], raw: str | None, caplog: pytest.LogCaptureFixture) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        _raw(replica, slot.name, raw)
        caplog.set_level(logging.DEBUG, logger="node.consensus.replica")
        assert replica.read(slot) == slot.default
        assert replica.read(slot) == slot.default
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and slot.name in warnings[0].getMessage(), warnings
        assert replica.read(slot, unreadable="unreadable") == "unreadable"
    finally:
        replica.close()


def test_a_default_is_never_shared_between_reads(tmp_path: Path) -> None:
    """The opener adds peer boots to the dict it was given: a later read must not see them."""
    replica = Replica(tmp_path / "r.db")
    try:
        replica.peer_boots["n2"] = 7
        assert replica.peer_boots == {}
    finally:
        replica.close()


def test_an_unreadable_term_is_the_highest_one_known(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        replica.apply((5, 3), [])
        replica.record_vote(7, "n2")
        _raw(replica, "term", "{")
        assert replica.term == 7 and replica.hard_state().term == 7
        _raw(replica, "vote", "null")
        assert replica.term == 5  # the applied stamp's
    finally:
        replica.close()


def test_an_unreadable_vote_is_a_vote_in_the_current_term_so_no_second_one_is_cast(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        replica.record_vote(9, "n2")
        _raw(replica, "vote", '[9, "n2"')
        assert replica.voted_for == (9, "")  # voted in term 9, for someone: not for another candidate of it
        assert _stored(replica, "vote") == [9, ""]  # stored: the next term is free again
        replica.set_term(10)
        assert replica.voted_for == (9, "")
    finally:
        replica.close()


async def test_a_consensus_starts_on_a_replica_whose_rows_are_all_malformed(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db")
    replica.apply((6, 2), [])
    replica.record_vote(6, "n1")
    for name in ("farm", "term", "vote", "base", "boot", "peer_boots", "unconfirmed"):
        _raw(replica, name, '{"half')
    settings = Settings(node_id="n1", data_dir=tmp_path, farm={"open": True, "safety": "available"})
    try:
        link = MemoryLink(MemoryBroker(), LinkOptions(client_id="n1"))
        c = Consensus(settings, link, replica, wall=lambda: 500.0)
        assert (c.farm, c.term, c.applied, c.base, c.boot, c.records) == (None, 6, (6, 2), (0, 0), 500, {})
        assert replica.voted_for == (6, "")
        assert replica.hard_state().boot == 500
    finally:
        replica.close()


# --- the owners, on malformed rows ---------------------------------------------------------------------------
def _node_commands(tmp_path: Path, replica: Replica) -> tuple[NodeCommands, SimpleNamespace]:
    settings = Settings(node_id="n1", data_dir=tmp_path, farm={"open": True},
                        printer={"driver": "simulated", "materials": [{"type": "PLA"}]})
    w = SimpleNamespace(paused=False, accept_jobs=True,
                        capabilities=Capabilities(materials=[Material(type="PLA")]))
    agent = SimpleNamespace(node_id="n1", topics=None, settings=settings, replica=replica, worker=w)
    return NodeCommands(agent), w  # type: ignore[arg-type]


def test_node_commands_restore_what_they_saved_and_nothing_from_a_malformed_row(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        commands, w = _node_commands(tmp_path, replica)
        w.paused, w.accept_jobs = True, False
        w.capabilities = Capabilities(materials=[Material(type="PETG", color="red")])
        commands._save(w)  # type: ignore[arg-type]
        restored, fresh = _node_commands(tmp_path, replica)
        restored._restore()
        assert (fresh.paused, fresh.accept_jobs, fresh.capabilities.materials) == \
            (True, False, [Material(type="PETG", color="red")])

        _raw(replica, "node_api", '{"config": {"accept_jobs": true}, "paused": "yes"}')
        untouched, fresh = _node_commands(tmp_path, replica)
        untouched._restore()
        assert (fresh.paused, fresh.accept_jobs, fresh.capabilities.materials) == \
            (False, True, [Material(type="PLA")])
    finally:
        replica.close()


async def test_a_node_whose_metadata_rows_are_all_malformed_founds_its_farm_and_prints(tmp_path: Path) -> None:
    """Every row of every owner unreadable: the node starts (each row taken as its default) and founds a farm.
    Its local copy record might have been of the first copy it finds in hand, so that copy is not printed on the
    node's word but reported for an operator (recovery row 10); the next is printed once."""
    farm = MemFarm(tmp_path, 1, time_scale=300)
    replica = Replica(tmp_path / "n1" / "replica.db")
    for name in ("farm", "term", "vote", "applied", "base", "boot", "peer_boots", "unconfirmed", "local_copy",
                 "ended", "bed_dirty", "node_api"):
        _raw(replica, name, "[")
    replica.close()
    await farm.start()
    try:
        await farm.ready(1)
        node = farm.nodes[0]

        async def print_one(name: str) -> JobCopy:
            sha = farm.add_file(gcode(30, name))
            answer = await farm.request("job/add", {"namespace": "default", "sets": [
                {"file": f"{name}.gcode", "sha256": sha, "holders": ["n1"]}]}, name)
            assert answer["status"] == "ok", answer
            key = job_key("default", answer["data"]["id"])
            await farm.wait_for(lambda: (j := node.consensus.state.job(key)) is not None and j.done
                                and node.replica.read(LOCAL_COPY, unreadable="unreadable") is None, 20,
                                f"{name} to end and the worker's record of it to be cleared")
            job = node.consensus.state.job(key)
            assert job is not None
            return job.copies[0]

        first = await print_one("j1")
        assert (first.state, first.reason, farm.starts()) == (CopyState.FAILED, recovery.UNKNOWN_OUTCOME, [])
        second = await print_one("j2")
        assert second.state == CopyState.DONE and len(farm.starts()) == 1
        assert len(node.replica.read(ENDED)) == 2
    finally:
        await farm.stop()
