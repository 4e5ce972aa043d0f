"""The arbiter's bridge to the scheduler: farm state in, compatible picks and readable refusals out."""

from __future__ import annotations

import re
from typing import Any

import pytest
from pydantic import ValidationError

from node.app.config import load_settings
from node.arbiter.scheduler_bridge import Scheduling
from shared import farm_api
from shared import scheduling as S
from shared.errors import ConfigError, RequestError
from shared.models import Capabilities, Material, StoredObject
from shared.settings import Settings
from shared.state import FarmState

SHA = "a" * 64


def _state(*jobs: dict[str, Any]) -> FarmState:
    state = FarmState()
    for i, body in enumerate(jobs, start=1):
        ctx = farm_api.Context(now=1000.0 + i, new_id=lambda i=i: f"j{i}")
        out = farm_api.job_add(state, body, ctx)
        state.apply(StoredObject(key=k, stamp=(1, i), value=v) for k, v in out.writes)
    return state


def _job(profiles: list[str] | None = None, material: str | None = None, nozzle: float | None = None,
         hours: float | None = None) -> dict[str, Any]:
    s: dict[str, Any] = {"file": "x.gcode", "sha256": SHA, "holders": ["n1"]}
    if hours is not None:
        s["duration_s"] = hours * 3600
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
    ctx = farm_api.Context(now=1.0, new_id=lambda: "jx",
                      unprintable=lambda job: sched.why_unprintable(job, printers))
    with pytest.raises(RequestError, match="no printer of the farm can print"):
        farm_api.job_add(FarmState(), _job(profiles=["Prusa MK4"]), ctx)
    ok = farm_api.job_add(FarmState(), _job(profiles=["Prusa Mini"]), ctx)
    assert ok.data["id"] == "jx"


def test_a_waiting_job_says_why_when_no_online_printer_can_print_it(sched: Scheduling) -> None:
    state = _state(_job(nozzle=0.6))
    nodes = {"n1": _node(None, [None], nozzle=0.4)}
    ctx = farm_api.Context(now=1.0, new_id=lambda: "unused", waiting_reason=lambda job: sched.why_unprintable(
        job, sched.printers(nodes, ["n1"], online_only=True)))
    jobs = farm_api.queue_list(state, {}, ctx).data["jobs"]
    assert jobs[0]["state"] == "queued"
    assert jobs[0]["waiting"] and "0.6" in jobs[0]["waiting"]


MONDAY = 1_704_067_200.0  # 2024-01-01 00:00 UTC, a Monday
H = 3600.0


def _settings(**scheduler: Any) -> Settings:
    return Settings(node_id="n1", data_dir="/tmp/unused", scheduler=scheduler)


def test_the_operator_schedule_from_the_settings_changes_the_choice() -> None:
    # A printer that needs an operator after each print asks at 20:00: the 3 h job is first in the queue, the
    # 10 h one second. With operators round the clock, queue order decides; with operators until 22:00, the
    # 3 h print would end at 23:00 and stand until 06:00, the 10 h one ends at 06:00.
    state = _state(_job(hours=3), _job(hours=10))
    caps = Capabilities(nozzle_mm=0.4, self_clearing=False)
    evening = MONDAY + 20 * H

    def pick(settings: Settings, now: float = evening) -> str | None:
        p = Scheduling(settings).chooser()(state, "n1", caps, [], now)
        return None if p is None else p.job

    assert pick(_settings()) == "j1"
    shifts = _settings(operator_shifts=["daily 06:00-22:00"])
    assert pick(shifts) == "j2"
    assert pick(shifts, MONDAY + 8 * H) == "j1"  # in the morning both end while an operator is there
    # Shifts are local time: at 20:00 UTC it is 12:00 in Denver (UTC-7 in January), so queue order decides
    # again; at 20:00 UTC in Berlin it is 21:00 and the long print is chosen.
    assert pick(_settings(operator_shifts=["daily 06:00-22:00"], timezone="America/Denver")) == "j1"
    assert pick(_settings(operator_shifts=["daily 06:00-22:00"], timezone="Europe/Berlin")) == "j2"
    assert pick(_settings(operator_shifts=["daily 06:00-22:00"], timezone="-07:00")) == "j1"
    # Lights-out: nobody clears the bed, so both cost the same wait and queue order decides.
    assert Scheduling(_settings(operator_shifts=[])).operators(evening).is_never


def test_scheduler_parameters_come_from_the_settings() -> None:
    sched = Scheduling(_settings(swap_cost_s=60, max_wait_s=10 * H, overdue_window_s=H))
    assert (sched.params.swap_cost_s, sched.params.max_wait_s, sched.params.overdue_window_s) == (60, 10 * H, H)
    assert Scheduling(_settings()).params == S.SchedulerParams()
    assert Scheduling(_settings()).operators(MONDAY).is_always


def test_the_timezone_offset_in_force_is_used() -> None:
    sched = Scheduling(_settings(operator_shifts=["Mon-Fri 06:00-22:00"], timezone="Europe/Berlin"))
    winter, summer = MONDAY, MONDAY + 26 * 7 * 86_400  # Mondays in January and July
    assert sched.operators(winter).utc_offset_s == 3600
    assert sched.operators(summer).utc_offset_s == 7200
    # 04:30 UTC is 05:30 in Berlin in January (before the shift) and 06:30 in July (on shift).
    assert not sched.operators(winter).available(winter + 4.5 * H)
    assert sched.operators(summer).available(summer + 4.5 * H)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ({"operator_shifts": ["Mon-Fry 06:00-22:00"]}, "unknown day name in shift 'Mon-Fry 06:00-22:00'"),
        ({"operator_shifts": ["Mon-Fri 6-22"]}, "expected e.g. 'Mon-Fri 06:00-14:00'"),
        ({"operator_shifts": ["Sat 08:00-25:00"]}, "not a time of day: '25:00' in shift 'Sat 08:00-25:00'"),
        ({"timezone": "Mars/Olympus_Mons"}, "unknown timezone 'Mars/Olympus_Mons'"),
        ({"timezone": "+15:00"}, "not a UTC offset"),
        ({"overdue_window_s": 100 * H, "max_wait_s": 10 * H}, "overdue_window_s must not exceed max_wait_s"),
        ({"swap_cost": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_scheduler_settings_are_clear_errors(scheduler: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        _settings(**scheduler)


def test_a_bad_shift_in_the_config_file_is_a_config_error(tmp_path: Any) -> None:
    path = tmp_path / "netq.toml"
    path.write_text('node_id = "n1"\n[scheduler]\noperator_shifts = ["Mon-Fri 06:00-22:00", "Sunday noon"]\n')
    with pytest.raises(ConfigError, match=r"scheduler\.operator_shifts: .*not a shift .*'Sunday noon'"):
        load_settings(path, environ={})
    path.write_text('node_id = "n1"\n[scheduler]\noperator_shifts = ["Mon-Fri 06:00-22:00"]\ntimezone = "+01:00"\n')
    settings = load_settings(path, environ={"NETQ_SCHEDULER__SWAP_COST_S": "3600"})
    assert settings.scheduler.operators(MONDAY).utc_offset_s == 3600
    assert settings.scheduler.params().swap_cost_s == 3600


def test_with_the_farm_in_view_a_scarce_capability_goes_to_the_work_only_it_can_print(sched: Scheduling) -> None:
    # First in the queue: PLA any printer can print; second: a job only the 0.6 mm nozzle (n1) can print.
    state = _state(_job(hours=2), _job(nozzle=0.6, hours=2))
    caps = Capabilities(nozzle_mm=0.6)
    alone = sched.chooser()(state, "n1", caps, [], 2000.0)
    assert alone is not None and alone.job == "j1"  # no farm in view: queue order decides

    nodes = {"n1": dict(_node(None, [], nozzle=0.6), node_id="n1")}
    nodes |= {f"n{i}": dict(_node(None, [], nozzle=0.4), node_id=f"n{i}") for i in range(2, 6)}
    view = sched.farm_view(nodes, nodes, state.namespaces())
    assert view is not None and len(view) == 5
    assert sched.farm_view(nodes, nodes, state.namespaces()) is view  # unchanged printers: the same view, its counts cached
    pick = sched.chooser(lambda: view)(state, "n1", caps, [], 2000.0)
    assert pick is not None and pick.job == "j2"  # four other printers can print j1; only n1 can print j2
