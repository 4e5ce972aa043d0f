"""The fault tests' checker on hand-made histories: it must catch what it is there to catch."""

from __future__ import annotations

from typing import Any

from tests.lan.checker import check, divergence, parse_start_name, start_name, totals


def _add(txn: str, job: str, count: int, outcome: str = "ok", t: float = 1.0) -> list[dict[str, Any]]:
    invoke = {"t": t, "type": "invoke", "op": "add", "path": "job/add", "txn": txn, "job": job,
              "namespace": "default", "count": count}
    done: dict[str, Any] = {"t": t + 0.5, "type": outcome, "op": "add", "path": "job/add", "txn": txn,
                            "job": job, "namespace": "default", "count": count}
    if outcome == "ok":
        done["data"] = {"id": job, "namespace": "default", "copies": count}
    return [invoke, done]


def _job(job: str, states: list[str], file: str = "a.gcode", set_count: int = 1, **copy: Any) -> dict[str, Any]:
    return {"id": job, "namespace": "default", "name": job,
            "sets": [{"file": file, "sha256": "0" * 64, "count": set_count}],
            "copies": [{"index": i, "state": s, "node": "n1", **copy} for i, s in enumerate(states)]}


def _replica(*jobs: dict[str, Any], applied: tuple[int, int] = (3, 9), term: int = 3) -> dict[str, Any]:
    objects = {f"job/default/{j['id']}": {"stamp": [term, 2], "value": j} for j in jobs}
    objects["member/n1"] = {"stamp": [term, 1], "value": {"node_id": "n1", "weight": 1}}
    return {"applied": list(applied), "objects": objects}


def _names(job: str, copies: int, file: str = "a.gcode") -> list[str]:
    return [start_name(job, i, 0, 0, file) for i in range(copies)]


def test_a_clean_run_passes_and_counts() -> None:
    history = _add("t1", "j1", 2) + _add("t2", "j2", 1)
    replicas = {n: _replica(_job("j1", ["done", "done"]), _job("j2", ["done"])) for n in ("n1", "n2", "n3")}
    report = check(history, {"n1": _names("j1", 2), "n2": _names("j2", 1)}, replicas)
    assert report.ok, report.violations
    assert report.counts["acknowledged"] == 3 and report.counts["printed"] == 3
    assert report.counts["lost"] == 0 and report.counts["double_starts"] == 0


def test_catches_a_lost_job() -> None:
    history = _add("t1", "j1", 1) + _add("t2", "j2", 2)
    replicas = {n: _replica(_job("j1", ["done"])) for n in ("n1", "n2")}  # j2 vanished
    report = check(history, {"n1": _names("j1", 1)}, replicas)
    assert not report.ok
    assert report.counts["lost"] == 2
    assert any("lost" in v and "j2" in v for v in report.violations)


def test_catches_a_lost_copy_and_a_done_copy_never_printed() -> None:
    history = _add("t1", "j1", 3)
    job = _job("j1", ["done", "done"])  # copy 2 missing; copy 1 done without a start
    report = check(history, {"n1": [start_name("j1", 0, 0, 0, "a.gcode")]}, {"n1": _replica(job)})
    assert report.counts["lost"] == 2
    assert any("never started" in v for v in report.violations)
    assert any("copy 2" in v and "missing" in v for v in report.violations)


def test_unacknowledged_adds_may_vanish() -> None:
    history = _add("t1", "j1", 1, outcome="info") + _add("t2", "j2", 1, outcome="fail")
    report = check(history, {}, {"n1": _replica()})
    assert report.ok
    assert report.counts["indeterminate"] == 1 and report.counts["refused"] == 1


def test_queued_copies_are_not_lost_but_unfinished() -> None:
    history = _add("t1", "j1", 2)
    report = check(history, {}, {"n1": _replica(_job("j1", ["queued", "claimed"]))})
    assert report.ok and report.counts["unfinished"] == 2 and report.counts["lost"] == 0


def test_catches_a_double_start_across_nodes_and_on_one_node() -> None:
    history = _add("t1", "j1", 2)
    replicas = {"n1": _replica(_job("j1", ["done", "done"]))}
    name0, name1 = _names("j1", 2)
    report = check(history, {"n1": [name0, name1], "n2": [name0]}, replicas)
    assert not report.ok and report.counts["double_starts"] == 1
    assert any("double start" in v and name0 in v for v in report.violations)
    again = check(history, {"n1": [name0, name1, name1]}, replicas)  # the same node, e.g. after a restart
    assert again.counts["double_starts"] == 1


def test_available_mode_accepts_only_reported_double_starts() -> None:
    history = _add("t1", "j1", 1)
    name = _names("j1", 1)[0]
    unreported = check(history, {"n1": [name], "n2": [name]}, {"n1": _replica(_job("j1", ["done"]))},
                       safety="available")
    assert any("unreported double start" in v for v in unreported.violations)
    reported = check(history, {"n1": [name], "n2": [name]},
                     {"n1": _replica(_job("j1", ["done"], conflict=True))}, safety="available")
    assert reported.ok and reported.counts["conflicts_reported"] == 1


def test_multi_set_copies_need_every_print() -> None:
    history = _add("t1", "j1", 1)
    job = _job("j1", ["done"], set_count=2)
    partial = check(history, {"n1": [start_name("j1", 0, 0, 0, "a.gcode")]}, {"n1": _replica(job)})
    assert partial.counts["lost"] == 1
    full = check(history, {"n1": [start_name("j1", 0, 0, r, "a.gcode") for r in range(2)]}, {"n1": _replica(job)})
    assert full.ok and full.counts["printed"] == 1


def test_replicas_must_converge_but_stamps_may_differ() -> None:
    history = _add("t1", "j1", 1)
    a = _replica(_job("j1", ["done"]), term=3)
    b = _replica(_job("j1", ["done"]), term=2, applied=(2, 40))  # same values, older stamps
    c = _replica(_job("j1", ["printing"]))
    assert not divergence({"n1": a, "n2": b})
    report = check(history, {"n1": _names("j1", 1)}, {"n1": a, "n2": b, "n3": c})
    assert any(v.startswith("divergence: job/default/j1") for v in report.violations)


def test_false_failure_needs_a_kill_after_the_start() -> None:
    history = _add("t1", "j1", 1)
    job = _job("j1", ["failed"], reason="the node restarted during this print", started_at=100.0)
    replicas = {"n1": _replica(job)}
    assert not check(history, {"n1": _names("j1", 1)}, replicas, kills={"n1": [50.0]}).ok
    assert check(history, {"n1": _names("j1", 1)}, replicas, kills={"n1": [100.5]}).ok


def test_stale_reads_are_noted() -> None:
    history = _add("t1", "j1", 1, t=1.0) + [
        {"t": 5.0, "type": "invoke", "op": "list", "path": "queue/list", "txn": "r1"},
        {"t": 5.1, "type": "ok", "op": "list", "path": "queue/list", "txn": "r1", "data": {"jobs": []}},
    ]
    report = check(history, {"n1": _names("j1", 1)}, {"n1": _replica(_job("j1", ["done"]))})
    assert report.ok and report.counts["stale_reads"] == 1


def test_start_names_round_trip_and_totals_add_up() -> None:
    assert parse_start_name(start_name("s1j02", 3, 1, 0, "pool-2.gcode")) == ("s1j02", 3, 1, 0, "pool-2.gcode")
    t = totals([{"ok": True, "counts": {"lost": 0, "acknowledged": 3}},
                {"ok": False, "counts": {"lost": 1, "acknowledged": 2}}])
    assert t == {"runs": 2, "failed_runs": 1, "lost": 1, "acknowledged": 5}
