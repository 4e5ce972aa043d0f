"""Pure protocol code: models, topics, codec, merge and quorum rules, API envelope, claim rules."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import claims, farm_api
from shared import protocol as P
from shared.errors import ProtocolError, RequestError
from shared.models import Capabilities, CopyState, Job, Member, StoredObject
from shared.state import FarmState, committed_seq, has_quorum, merge_newest, quorum_weight
from shared.topics import Topics

SHA = "b" * 64


# --- topics -----------------------------------------------------------------------------------------------
def test_topics_build_and_parse() -> None:
    t = Topics("farm1/netq")
    assert t.job("default", "abc") == "farm1/netq/queues/default/jobs/abc"
    assert t.request_path("farm1/netq/request/job/add") == "job/add"
    assert t.request_path("farm1/netq/response/job/add") is None
    assert t.parse_node_state("farm1/netq/nodes/n7/state") == "n7"
    assert t.parse_node_state("farm1/netq/nodes/n7/other") is None


@pytest.mark.parametrize("bad", ["a/+", "a/#", "", "$SYS", "x/\x00"])
def test_topics_refuse_wildcards_and_system_levels(bad: str) -> None:
    with pytest.raises(ProtocolError):
        Topics().job(bad, "id")


# --- models and codec -------------------------------------------------------------------------------------
def test_codec_round_trips_every_message_kind() -> None:
    obj = StoredObject(key="job/default/x", stamp=(3, 4), value={"a": 1})
    messages = [
        P.Entry(farm="f", term=3, seq=4, commit=2, writes=[obj]),
        P.Heartbeat(farm="f", term=3, arbiter="n1", seq=4, commit=4, serving=True),
        P.VoteRequest(farm="f", term=3, candidate="n1", last=(2, 9), pre=True),
        P.VoteReply(farm="f", term=3, voter="n2", candidate="n1", granted=True, last=(2, 9), objects=[obj]),
        P.Ack(node="n2", term=3, seq=4),
        P.WorkRequest(node="n2", capabilities=Capabilities(profile="Prusa Mini"), namespaces=["a", "b"]),
        P.StartRequest(node="n2", namespace="a", job="j", copy_index=0, grant=(3, 5)),
        P.FinishReport(node="n2", namespace="a", job="j", copy_index=0, grant=(3, 5), outcome=P.Outcome.DONE),
        P.Replicate(sha256=SHA, holders=["n1"]),
        P.Holding(node="n2", sha256=SHA),
    ]
    for m in messages:
        assert P.decode(P.encode(m)) == m


@pytest.mark.parametrize("payload", [
    b"{", b"[]", b'{"kind": "nope"}', b'{"kind": "ack", "node": "n1", "term": "1", "seq": 2}',
    b'{"kind": "ack", "node": "../x", "term": 1, "seq": 2}',
])
def test_codec_refuses_malformed_messages(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        P.decode(payload)


def test_codec_refuses_oversized_payloads() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        P.decode(b" " * 100, max_size=10)


def test_object_keys_are_checked() -> None:
    with pytest.raises(ValueError):
        StoredObject(key="jobs/../../etc", stamp=(1, 1), value=None)


# --- merge and quorum -------------------------------------------------------------------------------------
stamps = st.tuples(st.integers(1, 5), st.integers(1, 50))
objects = st.lists(st.builds(lambda k, s, v: StoredObject(key=f"job/ns/{k}", stamp=s, value=v),
                             st.sampled_from("abcdef"), stamps, st.one_of(st.none(), st.just({"v": 1}))),
                   max_size=12)


@given(st.lists(st.tuples(stamps, objects), min_size=1, max_size=4))
def test_merge_keeps_the_newest_stamp_of_each_key_above_the_highest_base(sources) -> None:  # type: ignore[no-untyped-def]
    merged = merge_newest(sources)
    floor = max(base for base, _ in sources)
    for key, obj in merged.items():
        assert obj.stamp >= floor
        assert obj.stamp == max(o.stamp for _, objs in sources for o in objs if o.key == key)
    for _, objs in sources:
        for o in objs:
            if o.stamp >= floor:
                assert merged[o.key].stamp >= o.stamp


@given(objects, objects)
def test_merge_is_order_independent(a, b) -> None:  # type: ignore[no-untyped-def]
    # Distinct writes never share a stamp (one arbiter per term), so make stamps unique per key first.
    seen: dict[tuple[int, int], StoredObject] = {}
    for o in a + b:
        seen.setdefault(o.stamp, o)
    a = [o for o in a if seen[o.stamp] is o]
    b = [o for o in b if seen[o.stamp] is o]
    assert merge_newest([((0, 0), a), ((0, 0), b)]) == merge_newest([((0, 0), b), ((0, 0), a)])


@given(st.lists(st.integers(0, 3), min_size=1, max_size=7))
def test_any_two_quorums_intersect(weights) -> None:  # type: ignore[no-untyped-def]
    members = {f"n{i}": Member(node_id=f"n{i}", weight=w) for i, w in enumerate(weights)}
    if sum(weights) == 0:
        return
    names = sorted(members)
    subsets = [{n for j, n in enumerate(names) if mask >> j & 1} for mask in range(1 << len(names))]
    quorums = [s for s in subsets if has_quorum(s, members)]
    for q1 in quorums:
        for q2 in quorums:
            assert sum(members[n].weight for n in q1 & q2) > 0


def test_quorum_weights_and_commit() -> None:
    members = {n: Member(node_id=n) for n in ("a", "b", "c")}
    assert quorum_weight(members) == 2
    assert quorum_weight({"a": members["a"]}) == 1
    assert committed_seq({"a": 7, "b": 5, "c": 2}, members) == 5
    assert committed_seq({"a": 7}, members) == 0
    assert committed_seq({"a": 7, "x": 7}, members) == 0  # a non-member's ack does not count


# --- API envelope and handlers ----------------------------------------------------------------------------
def _add(state: FarmState, body: dict[str, object], i: int = 1) -> farm_api.Outcome:
    out = farm_api.job_add(state, body, farm_api.Context(now=float(i), new_id=lambda: f"j{i}"))
    state.apply(StoredObject(key=k, stamp=(1, i), value=v) for k, v in out.writes)
    return out


def _body(**kw: object) -> dict[str, object]:
    return {"sets": [{"file": "a.gcode", "sha256": SHA, "holders": ["n1"]}], **kw}


def test_envelope_echoes_transaction_and_accepts_bare_values() -> None:
    assert farm_api.parse_envelope("job/add", b'{"count": 2, "transaction": "t-1"}') == ({"count": 2}, "t-1")
    assert farm_api.parse_envelope("queue/list", b"default") == ({"namespace": "default"}, None)
    assert farm_api.parse_envelope("queue/list", b'"my-queue"') == ({"namespace": "my-queue"}, None)
    assert farm_api.parse_envelope("health_check", b"") == ({}, None)


@pytest.mark.parametrize("payload,message", [
    (b"{nope", "JSON"), (b"[1, 2]", "object"), (b'{"transaction": 5}', "transaction"),
    (b"x" * (farm_api.MAX_REQUEST_BYTES + 1), "exceeds"),
])
def test_envelope_refuses_bad_payloads(payload: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        farm_api.parse_envelope("job/add", payload)


def test_job_add_validates_strictly() -> None:
    state = FarmState()
    for bad in [_body(count="2"), _body(count=0), _body(namespace="a/b"), _body(extra=1),
                {"sets": [{"file": "a", "sha256": "short", "holders": ["n1"]}]},
                {"sets": [{"file": "a", "sha256": SHA, "holders": []}]}]:
        with pytest.raises(RequestError):
            farm_api.job_add(state, bad, farm_api.Context(now=0.0, new_id=lambda: "x"))


def test_job_update_move_and_remove() -> None:
    state = FarmState()
    _add(state, _body(count=2), 1)
    _add(state, _body(), 2)
    _add(state, _body(), 3)
    order = lambda: [j.id for j in state.jobs("default")]
    assert order() == ["j1", "j2", "j3"]
    out = farm_api.job_move(state, {"id": "j3", "position": 0}, farm_api.Context(now=0, new_id=str))
    state.apply(StoredObject(key=k, stamp=(1, 9), value=v) for k, v in out.writes)
    assert order() == ["j3", "j1", "j2"]
    out = farm_api.job_move(state, {"id": "j3", "after": "j2"}, farm_api.Context(now=0, new_id=str))
    state.apply(StoredObject(key=k, stamp=(1, 10), value=v) for k, v in out.writes)
    assert order() == ["j1", "j2", "j3"]
    out = farm_api.job_update(state, {"id": "j1", "count": 3, "priority": 5}, farm_api.Context(now=0, new_id=str))
    state.apply(StoredObject(key=k, stamp=(1, 11), value=v) for k, v in out.writes)
    job = state.job("job/default/j1")
    assert job is not None and len(job.copies) == 3 and job.priority == 5
    out = farm_api.job_remove(state, {"id": "j2"}, farm_api.Context(now=0, new_id=str))
    state.apply(StoredObject(key=k, stamp=(1, 12), value=v) for k, v in out.writes)
    assert order() == ["j1", "j3"]
    with pytest.raises(RequestError, match="already exists"):  # a removed id cannot come back
        farm_api.job_add(state, _body(id="j2"), farm_api.Context(now=0, new_id=str))


# --- claim rules ------------------------------------------------------------------------------------------
def _first(state: FarmState, node: str, caps: Capabilities, ns: object, now: float) -> claims.Pick | None:
    for job in state.jobs():
        for c in job.copies:
            if c.state == CopyState.QUEUED:
                return claims.Pick(job.namespace, job.id, c.index)
    return None


def _apply(state: FarmState, ch: claims.Change, seq: int) -> None:
    state.apply(StoredObject(key=k, stamp=(1, seq), value=v) for k, v in ch.writes)


def test_claim_life_cycle_and_fences() -> None:
    state = FarmState()
    _add(state, _body(), 1)
    granted = claims.grant(state, "n1", Capabilities(), [], 0.0, (1, 2), _first)
    assert granted is not None
    _apply(state, granted[0], 2)
    assert claims.grant(state, "n1", Capabilities(), [], 0.0, (1, 3), _first) is None  # one copy at a time
    with pytest.raises(RequestError):  # only the holder of the grant can start it
        claims.start(state, "n2", "default", "j1", 0, (1, 2), 1.0)
    with pytest.raises(RequestError):
        claims.start(state, "n1", "default", "j1", 0, (1, 99), 1.0)
    _apply(state, claims.release(state, "n1", "default", "j1", 0, (1, 2), "lease expired"), 3)
    with pytest.raises(RequestError):  # a released grant can never be started
        claims.start(state, "n1", "default", "j1", 0, (1, 2), 1.0)
    granted = claims.grant(state, "n2", Capabilities(), [], 0.0, (1, 4), _first)
    assert granted is not None
    _apply(state, granted[0], 4)
    _apply(state, claims.start(state, "n2", "default", "j1", 0, (1, 4), 1.0), 5)
    gone = claims.node_gone(state, "n2", 2.0)
    _apply(state, gone, 6)
    job = state.job("job/default/j1")
    assert job is not None and job.copies[0].state == CopyState.ORPHANED  # never handed out again
    _apply(state, claims.finish(state, "n2", "default", "j1", 0, (1, 4), "done", None, 3.0), 7)
    job = state.job("job/default/j1")
    assert job is not None and job.copies[0].state == CopyState.DONE


def test_a_grant_can_be_the_start_only_when_asked_and_the_node_holds_the_files() -> None:
    state = FarmState()
    _add(state, _body(), 1)  # the file is held by n1 only

    def holds(node: str) -> object:
        return lambda job: all(node in s.holders for s in job.sets)

    granted = claims.grant(state, "n2", Capabilities(), [], 5.0, (1, 2), _first, holds("n2"))
    assert granted is not None
    change, _, started = granted
    assert not started  # n2 must fetch the file first: a plain grant
    assert [e["event"] for e in change.events] == ["claimed"]
    _apply(state, change, 2)
    _apply(state, claims.release(state, "n2", "default", "j1", 0, (1, 2), "gave it back"), 3)

    granted = claims.grant(state, "n1", Capabilities(), [], 6.0, (1, 4), _first, holds("n1"))
    assert granted is not None
    change, _, started = granted
    assert started and [e["event"] for e in change.events] == ["claimed", "started"]
    _apply(state, change, 4)
    job = state.job("job/default/j1")
    assert job is not None
    copy = job.copies[0]
    assert (copy.state, copy.node, copy.grant, copy.attempts, copy.started_at) == (CopyState.PRINTING, "n1",
                                                                                    (1, 4), 1, 6.0)
    with pytest.raises(RequestError):  # already started: a start request for it is refused, not repeated
        claims.start(state, "n1", "default", "j1", 0, (1, 4), 7.0)
    _apply(state, claims.finish(state, "n1", "default", "j1", 0, (1, 4), "done", None, 8.0), 5)
    job = state.job("job/default/j1")
    assert job is not None and job.copies[0].state == CopyState.DONE


def test_failed_prints_are_requeued_up_to_the_retry_limit() -> None:
    state = FarmState()
    _add(state, _body(), 1)
    seq = 1
    for attempt in range(3):
        g = claims.grant(state, "n1", Capabilities(), [], 0.0, (1, seq + 1), _first)
        assert g is not None
        _apply(state, g[0], seq + 1)
        _apply(state, claims.start(state, "n1", "default", "j1", 0, (1, seq + 1), 0.0), seq + 2)
        _apply(state, claims.finish(state, "n1", "default", "j1", 0, (1, seq + 1), "requeue", "cancelled", 0.0,
                                    max_attempts=3), seq + 3)
        seq += 3
    job = state.job("job/default/j1")
    assert isinstance(job, Job) and job.copies[0].state == CopyState.FAILED and job.copies[0].attempts == 3


def test_job_view_is_json() -> None:
    state = FarmState()
    _add(state, _body(count=2), 1)
    job = state.job("job/default/j1")
    assert job is not None
    view = farm_api.job_view(job)
    assert json.loads(json.dumps(view))["remaining"] == 2 and view["state"] == "queued"


@settings(max_examples=50)
@given(st.lists(st.sampled_from(["grant", "start", "finish", "release", "gone"]), max_size=30))
def test_no_sequence_of_claim_operations_starts_a_copy_twice(ops) -> None:  # type: ignore[no-untyped-def]
    """Whatever order grants, starts, releases, node losses and finishes come in, a copy moves from claimed to
    printing at most once per grant, and a printing copy only leaves by its own finish."""
    state = FarmState()
    _add(state, _body(), 1)
    seq, starts = 1, 0
    grants: list[tuple[str, tuple[int, int]]] = []
    for i, op in enumerate(ops):
        node = f"n{i % 2}"
        seq += 1
        try:
            if op == "grant":
                g = claims.grant(state, node, Capabilities(), [], 0.0, (1, seq), _first)
                if g:
                    _apply(state, g[0], seq)
                    grants.append((node, (1, seq)))
            elif op == "start" and grants:
                n, gr = grants[-1]
                _apply(state, claims.start(state, n, "default", "j1", 0, gr, 0.0), seq)
                starts += 1
            elif op == "finish" and grants:
                n, gr = grants[-1]
                _apply(state, claims.finish(state, n, "default", "j1", 0, gr, "done", None, 0.0), seq)
            elif op == "release" and grants:
                n, gr = grants[-1]
                _apply(state, claims.release(state, n, "default", "j1", 0, gr, "x"), seq)
            elif op == "gone":
                _apply(state, claims.node_gone(state, node, 0.0), seq)
        except RequestError:
            continue
    assert starts <= 1


def test_safety_mode_is_quorum_unless_available_is_chosen() -> None:
    from pydantic import ValidationError

    from shared.settings import SafetyMode, Settings

    assert Settings(node_id="n1", data_dir="/tmp/unused").farm.safety == SafetyMode.QUORUM
    s = Settings(node_id="n1", data_dir="/tmp/unused", farm={"safety": "available"})
    assert s.farm.safety == SafetyMode.AVAILABLE
    with pytest.raises(ValidationError, match="safety"):
        Settings(node_id="n1", data_dir="/tmp/unused", farm={"safety": "sometimes"})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.sampled_from(list(CopyState)),
                          st.sampled_from(["n1", "n2", None])), max_size=30))
def test_farm_state_indexes_match_a_full_scan(steps: list[tuple[int, int, CopyState, str | None]]) -> None:
    """The queue order, "anything queued" and each node's held jobs are indexes kept per write: after any
    sequence of writes (removals included) they say what a scan of every job says."""
    from shared.models import ACTIVE_COPY_STATES, JobCopy

    state = FarmState()
    for seq, (j, c, copy_state, node) in enumerate(steps, start=1):
        key = f"job/default/j{j}"
        job = state.job(key)
        if copy_state == CopyState.CANCELLED and node is None:  # now and then: remove the job
            state.apply([StoredObject(key=key, stamp=(1, seq), value=None)])
            continue
        copies = list(job.copies) if job else [JobCopy(index=i) for i in range(3)]
        copies[c] = JobCopy(index=c, state=copy_state, node=node if copy_state != CopyState.QUEUED else None)
        new = Job(id=f"j{j}", namespace="default", name="x", sets=[{"file": "a.gcode", "sha256": "a" * 64}],
                  count=3, rank=float(-j), created=float(j), copies=copies)
        state.apply([StoredObject(key=key, stamp=(1, seq), value=new.model_dump(mode="json"))])
        scan = sorted(state._jobs.values(), key=lambda x: (x.namespace, x.rank, x.created, x.id))
        assert [x.id for x in state.jobs()] == [x.id for x in scan]
        assert state.has_queued() == any(cp.state == CopyState.QUEUED for x in scan for cp in x.copies)
        for n in ("n1", "n2"):
            held = [x.id for x in scan if any(cp.node == n and cp.state in ACTIVE_COPY_STATES for cp in x.copies)]
            assert [x.id for x in state.held_jobs(n)] == held
