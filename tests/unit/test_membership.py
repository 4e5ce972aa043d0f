"""Retiring a member, as pure rules: what it changes, what is refused, and how it changes the quorums."""

from __future__ import annotations

import pytest

from shared import claims, farm_api, membership
from shared.errors import RequestError
from shared.models import Capabilities, CopyState, Member, StoredObject, member_key
from shared.state import FarmState, committed_seq, has_quorum

SHA = "c" * 64


def _farm(*members: str, witnesses: tuple[str, ...] = ()) -> FarmState:
    state = FarmState()
    records = [Member(node_id=n) for n in members] + [Member(node_id=w, witness=True) for w in witnesses]
    state.apply(StoredObject(key=member_key(m.node_id), stamp=(1, 1), value=m.model_dump(mode="json"))
                for m in records)
    return state


def _apply(state: FarmState, writes: list[tuple[str, dict[str, object] | None]], seq: int) -> None:
    state.apply(StoredObject(key=k, stamp=(1, seq), value=v) for k, v in writes)


def _add_job(state: FarmState, job_id: str, seq: int) -> None:
    out = farm_api.job_add(state, {"id": job_id, "sets": [{"file": "a.gcode", "sha256": SHA, "holders": ["n1"]}]},
                      farm_api.Context(now=0.0, new_id=str))
    _apply(state, out.writes, seq)


def _pick(job_id: str) -> claims.Chooser:
    return lambda state, node, caps, ns, now: claims.Pick("default", job_id, 0)


def _claim(state: FarmState, node: str, job_id: str, seq: int, *, start: bool = False) -> None:
    granted = claims.grant(state, node, Capabilities(), [], 0.0, (1, seq), _pick(job_id))
    assert granted is not None
    _apply(state, granted[0].writes, seq)
    if start:
        _apply(state, claims.start(state, node, "default", job_id, 0, (1, seq), 1.0).writes, seq + 1)


def _retire(state: FarmState, node: str, *, arbiter: str = "n1", reachable: tuple[str, ...] | None = None,
            seq: int = 50) -> claims.Change:
    live = reachable if reachable is not None else tuple(state.members())
    change = membership.retire(state, node, arbiter=arbiter, reachable=live, now=1000.0)
    _apply(state, change.writes, seq)
    return change


def test_retiring_requeues_a_claimed_copy_orphans_a_printing_one_and_marks_the_member() -> None:
    state = _farm("n1", "n2", "n3", "n4")
    _add_job(state, "claimed", 2)
    _add_job(state, "printed", 3)
    _claim(state, "n3", "claimed", 10)
    _claim(state, "n4", "printed", 20, start=True)

    change = _retire(state, "n3", seq=30)
    job = state.job("job/default/claimed")
    assert job is not None and job.copies[0].state == CopyState.QUEUED and job.copies[0].node is None
    assert job.copies[0].reason == "n3 was retired"
    assert [e["event"] for e in change.events] == ["released", "retired"]

    change = _retire(state, "n4", seq=31)
    job = state.job("job/default/printed")
    assert job is not None and job.copies[0].state == CopyState.ORPHANED and job.copies[0].node == "n4"
    assert membership.summary(change) == {"released": [],
                                          "orphaned": [{"namespace": "default", "job": "printed", "copy": 0}]}
    # The print outlives its node: its own finish report is still accepted, nothing is started again.
    _apply(state, claims.finish(state, "n4", "default", "printed", 0, (1, 20), "done", None, 2.0).writes, 32)
    job = state.job("job/default/printed")
    assert job is not None and job.copies[0].state == CopyState.DONE

    assert set(state.members()) == {"n1", "n2"}
    assert set(state.retired()) == {"n3", "n4"} and state.retired()["n3"].retired_at == 1000.0
    assert membership.refuse_enrollment(state, "n3") is not None
    assert membership.refuse_enrollment(state, "n5") is None


def test_a_retired_member_counts_in_no_quorum() -> None:
    state = _farm("n1", "n2", "n3", "n4")
    assert not has_quorum({"n1", "n2"}, state.members())  # 2 of 4
    _retire(state, "n4")
    members = state.members()
    assert has_quorum({"n1", "n2"}, members)  # 2 of 3
    assert not has_quorum({"n1", "n4"}, members)  # the retired one's vote is worth nothing
    assert committed_seq({"n1": 9, "n4": 9, "n2": 3}, members) == 3


@pytest.mark.parametrize("node,kwargs,message", [
    ("n9", {}, "no member 'n9' in this farm; members: n1, n2, n3"),
    ("n1", {}, "n1 is the arbiter and cannot retire itself"),
    ("n2", {"reachable": ("n1", "n2")}, "leaves 2 members that need weight 2 to commit, but n3 is unreachable"),
])
def test_refusals_change_nothing(node: str, kwargs: dict[str, object], message: str) -> None:
    state = _farm("n1", "n2", "n3")
    before = dict(state.objects)
    with pytest.raises(RequestError, match=message):
        _retire(state, node, **kwargs)  # type: ignore[arg-type]
    assert state.objects == before


def test_a_down_member_can_be_retired_when_the_rest_make_a_quorum() -> None:
    state = _farm("n1", "n2", "n3")
    _retire(state, "n3", reachable=("n1", "n2"))  # n3 is the one that is down: the others hold the new quorum
    assert set(state.members()) == {"n1", "n2"}
    two = _farm("n1", "n2")
    _retire(two, "n2", reachable=("n1",))  # a two-printer farm whose second printer died keeps going alone
    assert set(two.members()) == {"n1"}


def test_the_last_printer_and_an_already_retired_member_are_refused() -> None:
    state = _farm("n1", "n2", witnesses=("w1",))
    _retire(state, "n2", seq=2)
    with pytest.raises(RequestError, match="already retired"):
        _retire(state, "n2", seq=3)
    with pytest.raises(RequestError, match="last printer"):
        _retire(state, "n1", arbiter="w9")
    two = _farm("n1", "n2")
    with pytest.raises(RequestError, match="n1 is the arbiter .* enroll another member first"):
        _retire(two, "n1")  # stopping it would leave n2 alone, without a quorum of the two
    _retire(state, "w1", arbiter="n1")  # a witness can go; the printer stays


def test_the_request_goes_through_the_api_with_a_bare_node_id() -> None:
    state = _farm("n1", "n2", "n3")
    body, txn = farm_api.parse_envelope("node/retire", b"n3")
    assert (body, txn) == ({"node": "n3"}, None)
    ctx = farm_api.Context(now=5.0, new_id=str, info={"arbiter": "n1"}, reachable=frozenset({"n1", "n2", "n3"}))
    out = farm_api.MUTATING["node/retire"](state, body, ctx)
    assert out.data == {"node": "n3", "members": ["n1", "n2"], "released": [], "orphaned": []}
    assert out.events == [{"event": "retired", "node": "n3", "witness": False}]
    with pytest.raises(RequestError, match="node"):
        farm_api.MUTATING["node/retire"](state, {"node": "../x"}, ctx)
    _apply(state, out.writes, 9)
    listed = farm_api.node_list(state, {}, farm_api.Context(now=6.0, new_id=str, nodes={
        "n3": {"node_id": "n3", "state": "online"}}))
    assert {n["node_id"]: (n["enrolled"], n["retired"]) for n in listed.data["nodes"]}["n3"] == (False, True)
    listed = farm_api.node_list(state, {}, farm_api.Context(now=6.0, new_id=str, nodes={
        "n3": {"node_id": "n3", "state": "offline"}}))
    assert "n3" not in {n["node_id"] for n in listed.data["nodes"]}  # gone for good: not listed at all
