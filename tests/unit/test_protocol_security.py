"""Rogue clients and forged protocol messages against a farm with a key (issue 12), through the real codec and
real seals: unsigned, forged, replayed and stale messages are dropped and counted, and the protocol refuses what
no honest member sends — each before any state (the term first) changes. Every test checks that nothing was
printed twice, no acknowledged job was lost and the state did not move, and that the drop was counted."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from node.app.agent import NodeAgent
from node.consensus.consensus import Consensus, Role
from node.consensus.replica import Replica
from node.link.base import LinkOptions, Message
from node.link.memory import MemoryBroker, MemoryLink
from shared import protocol as P
from shared import security
from shared.models import Capabilities, CopyState, JobCopy, Member, Model, StoredObject, job_key, member_key
from shared.settings import Settings
from shared.topics import Topics
from tests.memfarm import FAST, MemFarm, MemNode, Rogue, gcode
from tests.waiting import until

pytestmark = pytest.mark.security
NODES = ["n1", "n2", "n3"]


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[tuple[MemFarm, Rogue]]:
    farm = MemFarm(tmp_path, 3)
    rogue = Rogue(farm)
    await farm.start()
    await rogue.start()
    try:
        await farm.ready(3)
        yield farm, rogue
    finally:
        await rogue.stop()
        await farm.stop()


def _job(farm: MemFarm, seconds: float, tag: str) -> dict[str, Any]:
    sha = farm.add_file(gcode(seconds, tag))
    return {"namespace": "default", "name": tag, "count": 1,
            "sets": [{"file": f"{tag}.gcode", "sha256": sha, "holders": list(NODES)}]}


async def _add(farm: MemFarm, seconds: float, tag: str) -> str:
    r = await farm.request("job/add", _job(farm, seconds, tag), f"add-{tag}")
    assert r["status"] == "ok", r
    return str(r["data"]["id"])


def _copy(farm: MemFarm, job_id: str) -> JobCopy | None:
    arb = farm.arbiter()
    job = arb.consensus.state.job(job_key("default", job_id)) if arb is not None else None
    return job.copies[0] if job is not None else None


async def _printing(farm: MemFarm, job_id: str) -> JobCopy:
    copy: JobCopy = await farm.wait_for(
        lambda: (c := _copy(farm, job_id)) and c.state == CopyState.PRINTING and c, 10, f"{job_id} printing")
    return copy


async def _done(farm: MemFarm, job_id: str) -> None:
    await farm.wait_for(lambda: (c := _copy(farm, job_id)) and c.state == CopyState.DONE, 20, f"{job_id} done")


def _printed_once(farm: MemFarm) -> None:
    starts = farm.starts()
    assert starts and max(Counter(starts).values()) == 1, starts


async def _counted(nodes: list[MemNode], **least: int) -> None:
    """Wait until every node in ``nodes`` has dropped at least so many messages for each reason."""
    def enough() -> bool:
        return all(n.consensus.drops.get(reason, 0) >= count for n in nodes for reason, count in least.items())

    await until(enough, f"drops {least} counted on {[n.node_id for n in nodes]}", 10,
                context=lambda: str({n.node_id: n.consensus.dropped for n in nodes}))


def _running(farm: MemFarm) -> list[MemNode]:
    return [n for n in farm.nodes if n.started]


def _others(farm: MemFarm, node: MemNode) -> list[MemNode]:
    return [n for n in _running(farm) if n is not node]


def _values(node: MemNode) -> dict[str, Any]:
    return {k: o.value for k, o in node.consensus.state.objects.items()}


# --- joins and weights --------------------------------------------------------------------------------------
async def test_a_forged_join_enrolls_nobody_and_no_join_sets_a_weight(farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    inbox = rogue.topics.to_arbiter(arb.node_id)
    forged = json.dumps({"kind": "join", "node": "x9", "weight": 10, "witness": False}).encode()
    rogue.send(inbox, forged)  # anyone on the LAN: no seal
    rogue.send(inbox, forged, as_node="x9")  # a key holder: a join has no weight any more
    await _counted([arb], unsigned=1, malformed=1)
    assert all("x9" not in n.consensus.state.objects for n in f.nodes)
    assert all(member_key("x9") not in n.consensus.state.objects for n in f.nodes)

    # A key holder may be enrolled (that is how a paired node joins), with the farm's weight, not its own.
    rogue.send(inbox, P.Join(node="x9", witness=True), as_node="x9")
    member = await f.wait_for(lambda: arb.consensus.members.get("x9"), 5, "x9 enrolled")
    assert member.weight == 1 and member.witness
    assert (await f.request("job/add", _job(f, 10, "after"), "after"))["status"] == "ok"  # 3 of 4 commit


async def test_a_stored_member_weight_of_10_counts_as_1(tmp_path: Path) -> None:
    """Replicas that stored a forged join's weight of 10 (before joins lost the field) are not stuck: with
    n3 at weight 10, n1 and n2 could never make a quorum (2 of 12); counted as 1, they do (2 of 3)."""
    f = MemFarm(tmp_path, 3)
    await f.start()
    try:
        await f.ready(3)
        for node in f.nodes:
            await node.stop()
        for node in f.nodes:
            replica = Replica(node.settings.data_dir / "replica.db")
            heavy = Member(node_id="n3", weight=10, enrolled_at=1.0).model_dump(mode="json")
            replica.db.execute("UPDATE objects SET value = ? WHERE key = ?", [json.dumps(heavy), member_key("n3")])
            replica.db.conn.commit()
            replica.close()
        for node in f.nodes[:2]:
            await node.start()
        arb = await f.ready(3)
        assert arb.consensus.members["n3"].weight == 1
        r = await f.request("job/add", _job(f, 10, "heavy"), "heavy")
        assert r["status"] == "ok", r
    finally:
        await f.stop()


# --- elections ----------------------------------------------------------------------------------------------
async def test_forged_vote_requests_change_no_term(farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    fid, term = arb.consensus.farm, arb.consensus.term
    assert fid is not None
    n3 = next(n for n in f.nodes if n.node_id == "n3")
    election = rogue.topics.election
    huge = {"kind": "vote_request", "farm": fid, "term": 2**70, "candidate": "x9", "last": [0, 0]}
    rogue.send(election, json.dumps(huge).encode(), as_node="x9")  # past SQLite's INTEGER: not even a message
    for pre in (False, True):  # a non-member standing 1000 terms ahead, and asking for a pre-vote
        rogue.send(election, P.VoteRequest(farm=fid, term=term + 1000, candidate="x9", last=(term, 1), pre=pre),
                   as_node="x9")
    rogue.send(election, P.VoteRequest(farm=fid, term=term + 1000, candidate="n2", last=(term, 1)))  # unsigned
    # A member that stands out of every honest farm's reach (its own log is of our term).
    far = term + P.MAX_TERM_JUMP + 1
    rogue.send(election, P.VoteRequest(farm=fid, term=far, candidate="n3", last=n3.consensus.applied), by=n3)
    await _counted(_running(f), malformed=1, unsigned=1, refused=2)
    await _counted(_others(f, n3), refused=3)
    assert all(n.consensus.term < term + 1000 and n.replica.term < term + 1000 for n in f.nodes)
    assert all(n.replica.voted_for is None or n.replica.voted_for[1] in NODES for n in f.nodes)
    job = await _add(f, 10, "after-votes")
    await _done(f, job)
    _printed_once(f)


async def test_forged_votes_are_not_counted_and_move_no_term(farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    fid, term = arb.consensus.farm, arb.consensus.term
    assert fid is not None
    n2 = next(n for n in f.nodes if n.node_id == "n2")
    for node in f.nodes:
        inbox = rogue.topics.to_node(node.node_id)

        def vote(voter: str, to: str = node.node_id, **kw: Any) -> P.VoteReply:
            fields: dict[str, Any] = {"farm": fid, "term": term + 1000, "voter": voter, "candidate": to,
                                      "granted": True, "last": (term, 1), **kw}
            return P.VoteReply(**fields)

        rogue.send(inbox, vote("x9"), as_node="x9")  # a non-member's vote
        rogue.send(inbox, vote("n3"))  # unsigned, naming a member
        if node is not n2:
            elsewhere = "n1" if node.node_id != "n1" else "n3"
            rogue.send(inbox, vote("n3"), by=n2)  # sealed by n2, naming n3
            rogue.send(inbox, vote("n2", to=elsewhere), by=n2)  # n2's vote for another, sent here
            rogue.send(inbox, vote("n2", term=term + P.MAX_TERM_JUMP + 1), by=n2)  # out of reach
    await _counted([n2], refused=1, unsigned=1)
    await _counted(_others(f, n2), refused=4, unsigned=1)
    assert all(n.consensus.term < term + 1000 for n in f.nodes)
    assert f.arbiter() is not None


async def test_forged_heartbeats_neither_depose_the_arbiter_nor_delay_a_failover(
        farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    fid = arb.consensus.farm
    assert fid is not None
    log_topic = rogue.topics.log
    followed: set[str | None] = set()
    stop = asyncio.Event()

    async def flood() -> None:
        while not stop.is_set():
            term = max(n.consensus.term for n in _running(f)) + 1
            current = f.arbiter()
            name = current.node_id if current is not None else "n1"
            beat = P.Heartbeat(farm=fid, term=term, arbiter="x9", seq=9, commit=9, serving=True)
            rogue.send(log_topic, beat, as_node="x9")  # a key holder that is not a member
            rogue.send(log_topic, beat.model_copy(update={"arbiter": name}), as_node="x9")  # naming the arbiter
            rogue.send(log_topic, beat.model_copy(update={"arbiter": name}))  # unsigned
            followed.update(n.consensus.arbiter for n in _running(f))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(flood())
    try:
        first = await _add(f, 10, "during-flood")
        await _done(f, first)
        await _counted(_others(f, arb), refused=5, unsigned=5)
        # The arbiter dies while the forgeries go on: the others elect a new one within the failover target.
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await arb.stop(crash=True)
        new = await f.wait_for(lambda: (a := f.arbiter()) and a is not arb and a, 3.0, "a new arbiter")
        assert loop.time() - t0 <= 3.0 and new.node_id in NODES
        second = await _add(f, 10, "after-failover")
        await _done(f, second)
    finally:
        stop.set()
        await task
    assert "x9" not in followed
    assert sorted(farm_starts := f.starts()) == sorted(set(farm_starts)) and len(farm_starts) == 2
    # They asked the unknown "arbiter" for its state (it could have been enrolled while they were away).
    assert rogue.heard_kind(rogue.topics.to_arbiter("x9"), P.SyncRequest)


# --- entries and snapshots ----------------------------------------------------------------------------------
async def test_a_forged_snapshot_entry_from_a_non_member_changes_nothing(farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    job_id = await _add(f, 200, "real")  # 2 s at this time scale
    copy = await _printing(f, job_id)
    fid, term = arb.consensus.farm, arb.consensus.term
    assert fid is not None
    before = {n.node_id: _values(n) for n in f.nodes}
    key = job_key("default", job_id)
    real = arb.consensus.state.get(key)
    assert real is not None
    requeued = dict(real, copies=[{"index": 0, "state": "queued"}])  # the copy back in the queue: printed twice
    evil = dict(real, id="evil", name="evil")

    def entry(t: int, arbiter: str | None, snapshot: bool = True) -> P.Entry:
        stamp = (t, 1 if snapshot else 999)
        writes = [StoredObject(key=key, stamp=stamp, value=requeued),
                  StoredObject(key=job_key("default", "evil"), stamp=stamp, value=evil),
                  StoredObject(key=member_key("x9"), stamp=stamp,
                               value=Member(node_id="x9", weight=10).model_dump(mode="json"))]
        return P.Entry(farm=fid, term=t, seq=stamp[1], commit=0, writes=writes, snapshot=snapshot, arbiter=arbiter)

    log_topic = rogue.topics.log
    rogue.send(log_topic, entry(term + 1000, "x9"), as_node="x9")  # a non-member, a thousand terms on
    rogue.send(log_topic, entry(term + 1, "x9"), as_node="x9")  # a non-member, the next term
    rogue.send(log_topic, entry(term, arb.node_id, snapshot=False), as_node="x9")  # naming the arbiter
    rogue.send(log_topic, entry(term + 1000, arb.node_id))  # unsigned
    for node in f.nodes:  # a snapshot nobody asked for, straight to each node
        inbox = rogue.topics.to_node(node.node_id)
        e = entry(term + 1000, "x9")
        rogue.send(inbox, P.Snapshot(farm=fid, term=e.term, seq=1, commit=1, objects=e.writes), as_node="x9")
    await _counted(_others(f, arb), refused=4, unsigned=1)
    await _counted([arb], refused=1, unsigned=1)
    for node in f.nodes:
        now = _values(node)
        assert now.get(key) == before[node.node_id].get(key), node.node_id
        assert job_key("default", "evil") not in now and member_key("x9") not in now
        assert node.consensus.term < term + 1000 and node.consensus.arbiter != "x9"
    assert _copy(f, job_id) == copy
    await _done(f, job_id)
    _printed_once(f)
    assert f.starts() == [f.starts()[0]]


# --- reports ------------------------------------------------------------------------------------------------
async def test_a_forged_finish_with_requeue_from_a_non_holder_does_not_print_the_copy_twice(
        farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    job_id = await _add(f, 200, "held")
    copy = await _printing(f, job_id)
    grant = copy.grant
    assert copy.node is not None and grant is not None
    other = next(n for n in f.nodes if n.node_id != copy.node)
    inbox = rogue.topics.to_arbiter(arb.node_id)

    def finish(node: str) -> P.FinishReport:
        return P.FinishReport(node=node, namespace="default", job=job_id, copy_index=0, grant=grant,
                              outcome=P.Outcome.REQUEUE, reason="forged")

    rogue.send(inbox, finish(other.node_id), by=other)  # a member that does not hold it: claims refuse it
    rogue.send(inbox, P.Release(node=other.node_id, namespace="default", job=job_id, copy_index=0,
                                grant=grant, reason="forged"), by=other)
    rogue.send(inbox, finish(copy.node), by=other)  # sealed by the wrong node
    rogue.send(inbox, finish(copy.node), as_node="x9")  # a key holder naming the holder
    rogue.send(inbox, finish(copy.node))  # unsigned
    await _counted([arb], refused=4, unsigned=1)
    assert _copy(f, job_id) == copy  # still printing, by its holder, under its grant
    await _done(f, job_id)
    _printed_once(f)
    assert len(f.starts()) == 1


async def test_messages_sealed_by_the_wrong_node_or_unsigned_are_dropped(farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    follower = next(n for n in f.nodes if n is not arb)
    liar = next(n for n in f.nodes if n is not arb and n is not follower)
    inbox = rogue.topics.to_arbiter(arb.node_id)
    term = arb.consensus.term
    before = _values(arb)
    work = P.WorkRequest(node=follower.node_id, capabilities=Capabilities(), namespaces=[])
    rogue.send(inbox, work, by=liar)  # liar's seal, follower's name
    rogue.send(inbox, P.Ack(node=follower.node_id, term=term, seq=1), by=liar)
    rogue.send(inbox, P.Holding(node=follower.node_id, sha256="b" * 64), by=liar)
    rogue.send(inbox, P.Ack(node=liar.node_id, term=term, seq=10**9), by=liar)  # a seq never sent
    rogue.send(inbox, P.Ack(node=liar.node_id, term=term + P.MAX_TERM_JUMP + 1, seq=0), by=liar)  # out of reach
    rogue.send(inbox, P.Ack(node="x9", term=term + 5, seq=0), as_node="x9")  # a non-member's "you are stale"
    rogue.send(inbox, P.Heartbeat(farm=arb.consensus.farm or "", term=term, arbiter=arb.node_id, seq=1,
                                  commit=1, serving=True), by=liar)  # a kind that does not belong there
    other_farm = security.Sealer(security.parse_key(security.new_farm_key()), follower.node_id, boot=10**12)
    rogue.send(inbox, other_farm.seal(inbox, P.encode(P.Ack(node=follower.node_id, term=term, seq=1))))
    rogue.send(inbox, P.encode(P.Ack(node=follower.node_id, term=term, seq=1)))  # unsigned
    await _counted([arb], refused=7, forged=1, unsigned=1)
    assert arb.consensus.term == term and arb.consensus.role == Role.ARBITER
    assert _values(arb) == before
    assert (await f.request("job/add", _job(f, 10, "still"), "still"))["status"] == "ok"


# --- replays ------------------------------------------------------------------------------------------------
async def test_replayed_genuine_entries_and_finishes_are_dropped(farm: tuple[MemFarm, Rogue]) -> None:
    f, rogue = farm
    arb = f.arbiter()
    assert arb is not None
    heard_before = len(rogue.heard)
    job_id = await _add(f, 10, "once")
    await _done(f, job_id)
    await f.wait_for(lambda: all(_values(n) == _values(arb) for n in f.nodes), 5, "replicas equal")
    since = rogue.heard[heard_before:]
    entries = [m for m in rogue.heard_kind(rogue.topics.log, P.Entry) if m in since]
    finishes = rogue.heard_kind(rogue.topics.to_arbiter(arb.node_id), P.FinishReport)
    assert entries and finishes
    before = {n.node_id: _values(n) for n in f.nodes}
    replayed = {n.node_id: n.consensus.drops.get("replayed", 0) for n in f.nodes}
    for m in entries + finishes:
        rogue.send(m.topic, m.payload)  # the same bytes again
    followers = _others(f, arb)
    n = len(entries)
    await until(lambda: all(x.consensus.drops.get("replayed", 0) >= replayed[x.node_id] + n for x in followers)
                and arb.consensus.drops.get("replayed", 0) >= replayed[arb.node_id] + len(finishes),
                "the replays counted", 10)
    assert {n.node_id: _values(n) for n in f.nodes} == before
    _printed_once(f)

    # After its sender restarts, a message of its earlier run is stale, not merely replayed.
    acks = [m for m in rogue.heard_kind(rogue.topics.to_arbiter(arb.node_id), P.Ack)
            if m.payload.rpartition(b"\n")[2].split(b" ")[1] == followers[0].node_id.encode()]
    old = acks[-1]
    node = followers[0]
    await node.stop()
    await node.start()
    opener = arb.consensus._opener
    assert opener is not None
    await f.wait_for(lambda: opener.boots.get(node.node_id) == node.consensus.boot, 5, "its new boot seen")
    stale = arb.consensus.drops.get("stale", 0)
    rogue.send(old.topic, old.payload)
    await _counted([arb], stale=stale + 1)


# --- an open farm -------------------------------------------------------------------------------------------
async def test_an_open_farm_runs_unsealed(tmp_path: Path) -> None:
    """``[farm] open = true``: nothing is sealed, and nothing is verified (a rogue's word is taken)."""
    f = MemFarm(tmp_path, 3, key=None)
    await f.start()
    try:
        await f.ready(3)
        job = await _add(f, 10, "open")
        await _done(f, job)
        _printed_once(f)
        assert all(not n.consensus.drops for n in f.nodes)
    finally:
        await f.stop()


# --- one node, driven message by message: reach, catching up, one arbiter per term ---------------------------
class _One:
    """Node n1 of a farm {n1, n2, n3} at term 5 (its replica seeded), and a rogue link that seals as anyone."""

    def __init__(self, tmp_path: Path) -> None:
        self.key = security.new_farm_key()
        self.raw = security.parse_key(self.key)
        self.topics = Topics()
        replica = Replica(tmp_path / "replica.db")
        replica.apply((5, 1), [self._member(n, (5, 1)) for n in NODES], snapshot=True, base=(5, 1))
        replica.set_farm("f1")
        replica.set_term(5)
        self.broker = MemoryBroker()
        settings = Settings(node_id="n1", data_dir=tmp_path, timing=FAST, farm={"key": self.key})
        self.c = Consensus(settings, MemoryLink(self.broker, LinkOptions(client_id="n1")), replica)
        self.rogue = MemoryLink(self.broker, LinkOptions(client_id="rogue"))
        self.heard: list[Message] = []
        self._sealers: dict[str, security.Sealer] = {}

    @staticmethod
    def _member(node: str, stamp: tuple[int, int]) -> StoredObject:
        return StoredObject(key=member_key(node), stamp=stamp, value=Member(node_id=node).model_dump(mode="json"))

    async def start(self) -> None:
        self.rogue.subscribe("netq/_proto/#", self.heard.append)
        await self.c.start()
        await self.c.link.start()
        await self.rogue.start()
        await self.c.link.wait_connected(5)
        await self.rogue.wait_connected(5)

    async def stop(self) -> None:
        await self.c.stop()
        await self.c.link.stop()
        await self.rogue.stop()
        self.c.replica.close()

    def send(self, topic: str, msg: Model, sender: str) -> None:
        sealer = self._sealers.setdefault(sender, security.Sealer(self.raw, sender, boot=1))
        self.rogue.publish(topic, sealer.seal(topic, P.encode(msg)))

    def beat(self, sender: str, term: int) -> None:
        self.send(self.topics.log, P.Heartbeat(farm="f1", term=term, arbiter=sender, seq=1, commit=1,
                                               serving=True), sender)

    def snapshot(self, sender: str, term: int, members: list[str]) -> None:
        objects = [self._member(n, (term, 1)) for n in members]
        self.send(self.topics.to_node("n1"), P.Snapshot(farm="f1", term=term, seq=1, commit=1, objects=objects),
                  sender)

    def asked(self, of: str) -> list[Message]:
        return [m for m in self.heard if m.topic == self.topics.to_arbiter(of)
                and isinstance(P.decode(m.payload.rpartition(b"\n")[0]), P.SyncRequest)]

    async def wait(self, cond: Callable[[], Any], what: str) -> Any:
        return await until(cond, what, 5, context=lambda: f"term {self.c.term}, arbiter {self.c.arbiter}, "
                                                         f"drops {self.c.dropped}")


@pytest.fixture
async def one(tmp_path: Path) -> AsyncIterator[_One]:
    o = _One(tmp_path)
    await o.start()
    try:
        yield o
    finally:
        await o.stop()


async def test_a_term_out_of_reach_is_refused_until_its_arbiter_answers_for_it(one: _One) -> None:
    """A node that was away while the farm moved far on catches up: it does not follow a heartbeat of a term
    out of reach, but asks its sender for its state, and takes that snapshot (and only that one)."""
    far = 5 + P.MAX_TERM_JUMP + 1
    one.beat("n2", far)
    await one.wait(lambda: one.asked("n2"), "n1 to ask n2 for its state")
    assert one.c.term == 5 and one.c.arbiter is None
    one.snapshot("n3", far, NODES)  # not asked of n3: refused
    await one.wait(lambda: one.c.drops.get("refused", 0) >= 2, "the unasked snapshot refused")
    assert one.c.term == 5
    one.snapshot("n2", far, NODES)
    await one.wait(lambda: one.c.term == far, "n1 caught up")
    assert one.c.applied == (far, 1) and one.c.arbiter == "n2" and one.c.replica.term == far


async def test_an_unknown_arbiter_is_followed_only_once_its_state_enrolls_it(one: _One) -> None:
    """A node enrolled (and elected) while we were away is unknown to our replica: its heartbeat changes
    nothing, but we ask for its state, and follow it once that state lists it, and us, as members."""
    one.beat("x9", 6)
    await one.wait(lambda: one.asked("x9"), "n1 to ask x9 for its state")
    assert one.c.term == 5
    one.snapshot("x9", 6, ["n2", "n3", "x9"])  # a state without us: not ours to take
    await one.wait(lambda: one.c.drops.get("refused", 0) >= 2, "the snapshot without n1 refused")
    assert one.c.term == 5
    one.snapshot("x9", 6, [*NODES, "x9"])  # the answer it still waits for
    await one.wait(lambda: one.c.arbiter == "x9" and one.c.term == 6, "n1 following x9")
    # Now the arbiter of term 6 is known: nobody else's heartbeat of term 6 counts.
    refused = one.c.drops.get("refused", 0)
    one.beat("n2", 6)
    await one.wait(lambda: one.c.drops.get("refused", 0) > refused, "n2's heartbeat of term 6 refused")
    assert one.c.arbiter == "x9"


async def test_a_candidate_whose_log_is_far_ahead_gets_our_vote(one: _One) -> None:
    """The bound measures from the candidate's own log too: a node behind still votes in an election of the
    farm it lags, but not for a candidate standing far past its own log, nor for a non-member."""
    far = 5 + 3 * P.MAX_TERM_JUMP
    one.send(one.topics.election, P.VoteRequest(farm="f1", term=far + 2, candidate="x9", last=(far, 1)), "x9")
    one.send(one.topics.election, P.VoteRequest(farm="f1", term=far + 1, candidate="n3", last=(5, 1)), "n3")
    await one.wait(lambda: one.c.drops.get("refused", 0) >= 2, "both refused")
    assert one.c.term == 5 and one.c.replica.voted_for is None
    one.send(one.topics.election, P.VoteRequest(farm="f1", term=far + 1, candidate="n3", last=(far, 1)), "n3")
    await one.wait(lambda: one.c.term == far + 1, "n1 at the candidate's term")
    assert one.c.replica.voted_for == (far + 1, "n3")


# --- the counters, in the node's state ----------------------------------------------------------------------
async def test_a_node_agent_publishes_its_drop_counters(tmp_path: Path) -> None:
    broker = MemoryBroker()
    settings = Settings(node_id="a1", data_dir=tmp_path / "a1", farm={"key": security.new_farm_key()},
                        broker={"url": "mqtt://127.0.0.1:1"}, timing=FAST,
                        printer={"driver": "simulated", "time_scale": 600.0}, files={"bind": "127.0.0.1", "port": 0})
    agent = NodeAgent(settings, link=MemoryLink(broker, LinkOptions(client_id="netq-a1")))
    rogue = MemoryLink(broker, LinkOptions(client_id="rogue"))
    await agent.start()
    await rogue.start()
    try:
        await until(lambda: agent.consensus.serving, "a1 founding its farm", 10)
        inbox = Topics().to_arbiter("a1")
        rogue.publish(inbox, P.encode(P.Join(node="x9")))  # unsigned
        await until(lambda: agent.node_state().dropped == {"unsigned": 1}, "the drop in a1's state", 5)
        state = json.loads(agent.node_state().model_dump_json())
        assert state["dropped"] == {"unsigned": 1}
        assert "x9" not in agent.consensus.members
    finally:
        await rogue.stop()
        await agent.stop()
