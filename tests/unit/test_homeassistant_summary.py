"""The retained views Home Assistant reads, and how Home Assistant's commands reach the node API. Pure."""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from node.app import node_commands
from node.integrations.homeassistant import discovery as D
from node.integrations.homeassistant import summary as S
from shared import farm_api
from shared.errors import RequestError
from shared.models import (
    Capabilities,
    CopyState,
    Job,
    JobCopy,
    JobSet,
    Material,
    Member,
    NodeState,
    QueueSettings,
    StoredObject,
    WorkerState,
    job_key,
    member_key,
    queue_key,
)
from shared.state import FarmState
from shared.topics import Topics

SHA = "a" * 64
NOW = 1_800_000_000.0


def job(job_id: str, states: list[CopyState], ns: str = "default", materials: list[Material | None] | None = None,
        **copy: Any) -> Job:
    return Job(id=job_id, namespace=ns, name=f"part {job_id}",
               sets=[JobSet(file="p.gcode", sha256=SHA, holders=["n1"], materials=materials or [])],
               count=len(states), copies=[JobCopy(index=i, state=s, **copy) for i, s in enumerate(states)])


def farm_state(*jobs: Job, paused: tuple[str, ...] = ()) -> FarmState:
    objs = [StoredObject(key=job_key(j.namespace, j.id), stamp=(1, i + 1), value=j.model_dump(mode="json"))
            for i, j in enumerate(jobs)]
    objs += [StoredObject(key=queue_key(ns), stamp=(1, 99), value=QueueSettings(namespace=ns, paused=True)
                          .model_dump(mode="json")) for ns in paused]
    objs += [StoredObject(key=member_key(n), stamp=(1, 100), value=Member(node_id=n).model_dump(mode="json"))
             for n in ("n1", "n2")]
    return FarmState(objs)


def node(worker: WorkerState, **kw: Any) -> NodeState:
    return NodeState(node_id="n1", state="online", worker=worker,
                     capabilities=Capabilities(materials=kw.pop("materials", [Material(type="PLA", color="red"), None])),
                     **kw)


# --- node summary ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("worker", "operator", "expected"), [
    (WorkerState.IDLE, True, "idle"), (WorkerState.REQUESTING, True, "idle"),
    (WorkerState.FETCHING, True, "printing"), (WorkerState.PRINTING, True, "printing"),
    (WorkerState.PAUSED, True, "paused"), (WorkerState.CLEARING, True, "awaiting_bed_clear"),
    (WorkerState.CLEARING, False, "printing"), (WorkerState.AWAITING_MATERIAL, True, "awaiting_material"),
    (WorkerState.ERROR, True, "error"), (WorkerState.OFFLINE, True, "offline"),
])
def test_every_worker_state_maps_to_one_of_the_sensors_options(worker: WorkerState, operator: bool,
                                                                 expected: str) -> None:
    assert S.ha_state(worker, operator_clears=operator) == expected
    assert expected in S.HA_STATES
    assert S.ha_state(worker, online=False) == "offline"


def test_summary_of_a_printing_node_estimates_its_finish() -> None:
    j = job("j1", [CopyState.PRINTING], started_at=NOW - 600, node="n1")
    st = node(WorkerState.PRINTING, namespace="default", job="j1", copy_index=0, progress=0.25)
    view = S.node_summary(st, job=j, paused=False, operator_clears=True, now=NOW)
    assert view["state"] == "printing" and view["printer"] == "online"
    assert view["progress"] == 25.0
    assert datetime.fromisoformat(view["finish"]).timestamp() == NOW - 600 + 2400
    assert view["job"] == "part j1" and view["job_info"]["job_id"] == "j1"
    assert view["materials"] == ["PLA:red", "none"]
    json.dumps(view)  # plain JSON


def test_summary_of_an_idle_or_unreachable_node() -> None:
    idle = S.node_summary(node(WorkerState.REQUESTING, materials=[]), job=None, paused=True, operator_clears=True,
                          now=NOW)
    assert idle["state"] == "idle" and idle["progress"] is None and idle["finish"] is None
    assert idle["job"] == "none" and idle["materials"] == ["none"] and idle["paused"] is True
    off = S.node_summary(node(WorkerState.OFFLINE), job=None, paused=False, operator_clears=True, now=NOW)
    assert off["printer"] == "offline" and off["state"] == "offline"
    # fetching files: a progress that is not the print's, so no estimate
    st = node(WorkerState.FETCHING, namespace="default", job="j1", copy_index=0, progress=0.9)
    fetching = S.node_summary(st, job=job("j1", [CopyState.CLAIMED]), paused=False, operator_clears=True, now=NOW)
    assert fetching["progress"] is None and fetching["finish"] is None and fetching["state"] == "printing"


def test_estimate_finish_needs_some_progress() -> None:
    assert S.estimate_finish(None, 0.5, NOW) is None
    assert S.estimate_finish(NOW - 10, 0.001, NOW) is None
    assert S.estimate_finish(NOW - 100, 0.5, NOW) == NOW + 100
    assert S.estimate_finish(NOW - 100, 1.0, NOW) == NOW


def test_materials_labels_round_trip_and_options() -> None:
    for m in (None, Material(type="PLA"), Material(type="PETG", color="black")):
        assert S.parse_material(S.material_label(m)) == m
    assert S.parse_material(" none ") is None and S.parse_material("-") is None
    with pytest.raises(ValueError):
        S.parse_material(":red")
    opts = S.material_options([Material(type="ASA", color="grey")], [Material(type="PLA", color="red")])
    assert opts[:3] == ["none", "ASA:grey", "PLA:red"] and "PETG" in opts and len(opts) == len(set(opts))
    assert len(S.material_options([])) >= 2
    state = farm_state(job("a", [CopyState.QUEUED], materials=[Material(type="TPU")]),
                       job("b", [CopyState.DONE], materials=[Material(type="PC")]))
    assert S.required_materials(state) == [Material(type="TPU")]


# --- farm summary ------------------------------------------------------------------------------------------
def test_farm_summary_counts_queues_printing_and_attention() -> None:
    state = farm_state(
        job("a", [CopyState.QUEUED, CopyState.CLAIMED, CopyState.PRINTING, CopyState.DONE]),
        job("b", [CopyState.ORPHANED], ns="other"),
        job("c", [CopyState.DONE], ns="other", conflict=True),
        paused=("empty",),
    )
    nodes = {"n1": {"state": "online"}, "n2": {"state": "offline"}}
    view = S.farm_summary(state, nodes, {"farm": "f", "arbiter": "n1", "term": 3, "safety": "quorum"})
    assert view["queues"] == {
        "default": {"waiting": 2, "printing": 1, "remaining": 3, "jobs": 1, "paused": False},
        "empty": {"waiting": 0, "printing": 0, "remaining": 0, "jobs": 0, "paused": True},
        "other": {"waiting": 0, "printing": 0, "remaining": 1, "jobs": 1, "paused": False},
    }
    assert (view["printing"], view["orphaned"], view["conflicts"], view["attention"]) == (1, 1, 1, 2)
    assert (view["members"], view["nodes_online"], view["arbiter"], view["term"]) == (2, 1, "n1", 3)


# --- Home Assistant's commands are node API requests -------------------------------------------------------
def _request(path: str, payload: str) -> tuple[type[farm_api.Req], Any]:
    body, _, node = node_commands.addressee(path, payload.encode())
    assert node == "n1"
    return node_commands._MODELS[path], farm_api._model(node_commands._MODELS[path], body)


def test_button_switch_and_select_payloads_are_valid_node_requests() -> None:
    info = D.NodeInfo(farm="f", node_id="n1", name="n1", model="m", version="1", tools=2,
                      material_options=("none", "PLA", "PETG:black"))
    for topic, payload in D.node_configs(Topics(), info).items():
        if "cmd_t" not in payload:
            continue
        path = payload["cmd_t"].removeprefix("~/request/")
        assert path in node_commands.NODE_COMMANDS, topic
        if "pl_prs" in payload:
            _request(path, payload["pl_prs"])
        if "pl_on" in payload:
            assert _request(path, payload["pl_on"])[1].accept is True
            assert _request(path, payload["pl_off"])[1].accept is False
        if "cmd_tpl" in payload:
            for option in payload["ops"]:
                rendered = payload["cmd_tpl"].replace("{{ value }}", option)
                req = _request(path, rendered)[1]
                assert req.tool == int(topic.split("/")[3].removeprefix("material_"))
                assert S.parse_material(req.material) == S.parse_material(option)


@pytest.mark.parametrize("path", node_commands.BARE_NODE_COMMANDS)
def test_single_parameter_node_commands_take_a_bare_node_id(path: str) -> None:
    assert node_commands.addressee(path, b"n2\n")[2] == "n2"
    assert node_commands.addressee(path, b'"n2"')[2] == "n2"
    assert node_commands.addressee(path, b"42")[2] == "42"  # text, not a number
    with pytest.raises(RequestError):
        node_commands.addressee("node/accept_jobs", b"n2")  # two parameters: JSON only


def test_bare_values_of_the_arbiters_single_parameter_requests() -> None:
    assert farm_api.parse_envelope("queue/pause", b"my-queue") == ({"namespace": "my-queue"}, None)
    assert farm_api.parse_envelope("job/remove", b"123") == ({"id": "123"}, None)
    assert farm_api.parse_envelope("queue/list", b"") == ({}, None)
    with pytest.raises(RequestError):
        farm_api.parse_envelope("job/add", b"abc")
    with pytest.raises(RequestError):
        farm_api.parse_envelope("queue/pause", b"[1]")


def test_routing_errors_for_requests_no_node_answers() -> None:
    known = {"n1", "n2"}.__contains__
    assert node_commands.routing_error("node/pause", b"n1", known) is None
    assert node_commands.routing_error("node/accept_jobs", b'{"node": "n2", "accept": "x"}', known) is None  # n2 says
    assert "no node 'n9'" in (node_commands.routing_error("node/pause", b"n9", known) or "")
    assert "give the node" in (node_commands.routing_error("node/accept_jobs", b'{"accept": true}', known) or "")
    assert node_commands.routing_error("node/pause", b'{"node": "a/b"}', known)
    assert node_commands.routing_error("node/material", b"{oops", known)


# --- templates, rendered as Home Assistant does (Jinja) ----------------------------------------------------
def _jinja() -> Any:
    if os.environ.get("CI") == "true":
        import jinja2
    else:
        jinja2 = pytest.importorskip("jinja2")
    return jinja2.Environment(undefined=jinja2.StrictUndefined)


def _render(env: Any, template: str, payload: dict[str, Any]) -> str:
    return str(env.from_string(template).render(value_json=payload, value=json.dumps(payload)))


def test_value_templates_render_against_the_summaries() -> None:
    env = _jinja()
    info = D.NodeInfo(farm="f", node_id="n1", name="n1", model="m", version="1", tools=3,
                      material_options=("none", "PLA", "PLA:red"))
    j = job("j1", [CopyState.PRINTING], started_at=NOW - 60, node="n1")
    views = [S.node_summary(node(WorkerState.PRINTING, namespace="default", job="j1", copy_index=0, progress=0.5),
                            job=j, paused=False, operator_clears=True, now=NOW),
             S.node_summary(node(WorkerState.OFFLINE, materials=[]), job=None, paused=True, operator_clears=True,
                            now=NOW)]
    for view in views:
        for topic, payload in D.node_configs(Topics(), info).items():
            if not payload.get("stat_t", "").endswith("/summary"):
                continue
            value = _render(env, payload["val_tpl"], view)
            if "ops" in payload:
                assert value in payload["ops"], (topic, value)
            elif "stat_on" in payload:
                assert value in ("ON", "OFF")
            elif payload.get("dev_cla") == "timestamp":
                assert value == "None" or datetime.fromisoformat(value).tzinfo is not None
            elif payload.get("unit_of_meas") == "%":
                assert value == "None" or 0 <= float(value) <= 100
            if "json_attr_tpl" in payload:
                assert isinstance(json.loads(_render(env, payload["json_attr_tpl"], view)), dict)
            for a in payload["avty"]:
                if a["t"].endswith("/summary"):
                    assert _render(env, a["val_tpl"], view) in ("online", "offline")
    assert _render(env, "{{ value_json.state }}", {"node_id": "n1", "state": "offline"}) == "offline"  # the will


def test_farm_templates_render_against_the_farm_summary() -> None:
    env = _jinja()
    state = farm_state(job("a", [CopyState.QUEUED, CopyState.QUEUED], ns="my.queue"))
    view = S.farm_summary(state, {}, {"arbiter": "n2", "term": 1})
    for payload in D.farm_configs(Topics(), "f", "1", ["my.queue", "gone"]).values():
        value = _render(env, payload["val_tpl"], view)
        assert value == "n2" if payload["uniq_id"].endswith(".arbiter") else int(value) >= 0
        assert isinstance(json.loads(_render(env, payload["json_attr_tpl"], view)), dict)
    (queue,) = [p for p in D.farm_configs(Topics(), "f", "1", ["my.queue"]).values() if "queue" in p["uniq_id"]]
    assert _render(env, queue["val_tpl"], view) == "2"


def test_the_api_reference_covers_every_request_and_script() -> None:
    root = Path(__file__).resolve().parents[2]
    doc = (root / "docs" / "mqtt-api.md").read_text()
    for path in [*farm_api.MUTATING, *farm_api.READING, *node_commands.NODE_COMMANDS]:
        assert f"`{path}`" in doc or f"request/{path}" in doc, path
    for script in (root / "deploy" / "scripts").glob("netq-*.sh"):
        assert script.name in doc or script.name == "netq-lib.sh", script.name
