"""The arbiter's bridge to the scheduler: farm state in, compatible picks and readable refusals out."""

from __future__ import annotations

from typing import Any

import pytest

from node.scheduling import Scheduling
from shared import api
from shared.errors import RequestError
from shared.models import Capabilities, Material, StoredObject
from shared.settings import Settings
from shared.state import FarmState

SHA = "a" * 64


def _state(*jobs: dict[str, Any]) -> FarmState:
    state = FarmState()
    for i, body in enumerate(jobs, start=1):
        ctx = api.Context(now=1000.0 + i, new_id=lambda i=i: f"j{i}")
        out = api.job_add(state, body, ctx)
        state.apply(StoredObject(key=k, stamp=(1, i), value=v) for k, v in out.writes)
    return state


def _job(profiles: list[str] | None = None, material: str | None = None, nozzle: float | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"file": "x.gcode", "sha256": SHA, "holders": ["n1"]}
    if profiles:
        s["profiles"] = profiles
    if material:
        s["materials"] = [{"type": material}]
    if nozzle:
        s["nozzle_mm"] = nozzle
    return {"namespace": "default", "sets": [s]}


def _node(profile: str | None, materials: list[Material | None], nozzle: float = 0.4) -> dict[str, Any]:
    caps = Capabilities(profile=profile, nozzle_mm=nozzle, materials=materials)
    return {"node_id": "n1", "state": "online", "worker": "requesting", "capabilities": caps.model_dump(mode="json")}


@pytest.fixture
def sched() -> Scheduling:
    return Scheduling(Settings(node_id="n1", data_dir="/tmp/unused"))


def test_a_printer_is_only_given_jobs_it_can_print(sched: Scheduling) -> None:
    state = _state(_job(profiles=["Prusa MK4"]), _job(profiles=["Prusa Mini"]))
    choose = sched.chooser()
    caps = Capabilities(profile="Prusa Mini", nozzle_mm=0.4)
    pick = choose(state, "n1", caps, [], 2000.0)
    assert pick is not None and pick.job == "j2"
    nobody = choose(state, "n1", Capabilities(profile="Creality Ender 3", nozzle_mm=0.4), [], 2000.0)
    assert nobody is None


def test_paused_queues_are_skipped(sched: Scheduling) -> None:
    state = _state(_job())
    state.apply([StoredObject(key="queue/default", stamp=(1, 9), value={"namespace": "default", "paused": True})])
    assert sched.chooser()(state, "n1", Capabilities(nozzle_mm=0.4), [], 2000.0) is None


def test_job_no_enrolled_printer_can_print_is_refused_with_the_reason(sched: Scheduling) -> None:
    nodes = {"n1": _node("Prusa Mini", [Material(type="PLA")])}
    printers = sched.printers(nodes, ["n1"], online_only=False)
    ctx = api.Context(now=1.0, new_id=lambda: "jx",
                      unprintable=lambda job: sched.why_unprintable(job, printers))
    with pytest.raises(RequestError, match="no printer of the farm can print"):
        api.job_add(FarmState(), _job(profiles=["Prusa MK4"]), ctx)
    ok = api.job_add(FarmState(), _job(profiles=["Prusa Mini"]), ctx)
    assert ok.data["id"] == "jx"


def test_a_waiting_job_says_why_when_no_online_printer_can_print_it(sched: Scheduling) -> None:
    state = _state(_job(nozzle=0.6))
    nodes = {"n1": _node(None, [None], nozzle=0.4)}
    ctx = api.Context(now=1.0, new_id=lambda: "unused", waiting_reason=lambda job: sched.why_unprintable(
        job, sched.printers(nodes, ["n1"], online_only=True)))
    jobs = api.queue_list(state, {}, ctx).data["jobs"]
    assert jobs[0]["state"] == "queued"
    assert jobs[0]["waiting"] and "0.6" in jobs[0]["waiting"]
