"""Discovery payloads checked against Home Assistant's documented rules.

The rules are Home Assistant's own (``homeassistant/components/mqtt``): the abbreviations of
``abbreviations.py`` (entity keys, ``dev`` and ``o`` keys), ``~`` expanded only in keys ending in ``topic`` and
in availability entries (``discovery.py``), the discovery topic pattern ``TOPIC_MATCHER``, the schemas
(``schemas.py``: a device needs ``identifiers`` or ``connections``, an origin needs ``name``, an availability
entry needs ``topic``; ``config.py``: read-only platforms need ``state_topic``, read-write ones
``command_topic``; ``select.py``: ``options``, at least two in older releases; ``event.py``: ``event_types``;
``sensor.py``: ``options`` only with device class ``enum`` and never with a unit or state class). Availability
entries are kept per topic (``entity.py``), so two entries must not share a topic.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from node.integrations.homeassistant import discovery as D
from node.integrations.homeassistant.summary import HA_STATES
from shared.topics import Topics

ABBREVIATIONS = {
    "avty": "availability", "avty_mode": "availability_mode", "avty_t": "availability_topic",
    "avty_tpl": "availability_template", "cmd_t": "command_topic", "cmd_tpl": "command_template",
    "dev": "device", "dev_cla": "device_class", "e": "encoding", "en": "enabled_by_default",
    "ent_cat": "entity_category", "ent_pic": "entity_picture", "evt_typ": "event_types",
    "exp_aft": "expire_after", "frc_upd": "force_update", "ic": "icon", "json_attr_t": "json_attributes_topic",
    "json_attr_tpl": "json_attributes_template", "name": "name", "o": "origin", "obj_id": "object_id",
    "ops": "options", "opt": "optimistic", "pl_avail": "payload_available", "pl_not_avail": "payload_not_available",
    "pl_off": "payload_off", "pl_on": "payload_on", "pl_prs": "payload_press", "ret": "retain",
    "stat_cla": "state_class", "stat_off": "state_off", "stat_on": "state_on", "stat_t": "state_topic",
    "sug_dsp_prc": "suggested_display_precision", "t": "topic", "uniq_id": "unique_id",
    "unit_of_meas": "unit_of_measurement", "val_tpl": "value_template", "def_ent_id": "default_entity_id",
}
DEVICE_ABBREVIATIONS = {"cns": "connections", "cu": "configuration_url", "ids": "identifiers", "name": "name",
                        "mf": "manufacturer", "mdl": "model", "mdl_id": "model_id", "hw": "hw_version",
                        "sw": "sw_version", "sa": "suggested_area", "sn": "serial_number"}
ORIGIN_ABBREVIATIONS = {"name": "name", "sw": "sw_version", "url": "support_url"}

COMMON = {"availability", "availability_mode", "device", "origin", "enabled_by_default", "entity_category",
          "icon", "json_attributes_topic", "json_attributes_template", "unique_id", "name", "qos", "encoding",
          "entity_picture"}
OPTIONS = {
    "sensor": {"state_topic", "value_template", "device_class", "expire_after", "force_update", "options",
               "suggested_display_precision", "state_class", "unit_of_measurement"},
    "button": {"command_topic", "command_template", "payload_press", "retain", "device_class"},
    "switch": {"command_topic", "state_topic", "value_template", "payload_on", "payload_off", "state_on",
               "state_off", "optimistic", "retain", "device_class"},
    "select": {"command_topic", "command_template", "options", "state_topic", "value_template", "optimistic",
               "retain"},
    "event": {"state_topic", "value_template", "event_types", "device_class"},
}
REQUIRED = {"sensor": {"state_topic"}, "button": {"command_topic"}, "switch": {"command_topic"},
            "select": {"command_topic", "options"}, "event": {"state_topic", "event_types"}}
DEVICE_KEYS = {"identifiers", "connections", "manufacturer", "model", "model_id", "name", "hw_version",
               "sw_version", "serial_number", "via_device", "suggested_area", "configuration_url"}
TOPIC_MATCHER = re.compile(r"(?P<component>\w+)/(?:(?P<node_id>[a-zA-Z0-9_-]+)/)?(?P<object_id>[a-zA-Z0-9_-]+)/config")

TOPICS = Topics()


def expand(payload: dict[str, Any]) -> dict[str, Any]:
    """What Home Assistant makes of a discovery payload: abbreviations expanded, then ``~`` replaced."""
    for key in payload:
        assert key == "~" or key in ABBREVIATIONS or key in ABBREVIATIONS.values() or key == "qos", \
            f"unknown key {key!r}"
        assert key not in set(ABBREVIATIONS.values()) - set(ABBREVIATIONS), f"{key!r} has an abbreviation"
    out = {ABBREVIATIONS.get(k, k): v for k, v in payload.items()}
    if "availability" in out:
        out["availability"] = [{ABBREVIATIONS.get(k, k): v for k, v in a.items()} for a in out["availability"]]
    if "device" in out:
        assert all(k in DEVICE_ABBREVIATIONS or k == "via_device" for k in out["device"]), out["device"]
        out["device"] = {DEVICE_ABBREVIATIONS.get(k, k): v for k, v in out["device"].items()}
    if "origin" in out:
        assert all(k in ORIGIN_ABBREVIATIONS for k in out["origin"]), out["origin"]
        out["origin"] = {ORIGIN_ABBREVIATIONS.get(k, k): v for k, v in out["origin"].items()}
    if "~" in out:
        base = out.pop("~")
        for key, value in out.items():
            if isinstance(value, str) and value and key.endswith("topic"):
                if value[0] == "~":
                    out[key] = base + value[1:]
                if value[-1] == "~":
                    out[key] = value[:-1] + base
        for a in out.get("availability", []):
            if a["topic"][0] == "~":
                a["topic"] = base + a["topic"][1:]
    return out


def valid_publish_topic(topic: str) -> bool:
    return bool(topic) and "+" not in topic and "#" not in topic and "\0" not in topic and "~" not in topic


def info(node: str = "n1", farm: str = "f00d", tools: int = 2, options: tuple[str, ...] = ("none", "PLA", "PETG"),
         version: str = "0.1.0") -> D.NodeInfo:
    return D.NodeInfo(farm=farm, node_id=node, name=f"printer {node}", model="MK4", version=version,
                      material_options=options, tools=tools)


def everything(farm: str = "f00d") -> dict[str, dict[str, Any]]:
    configs: dict[str, dict[str, Any]] = {}
    for node, tools in (("n1", 1), ("n2", 2), ("a_b-3", 3)):
        configs.update(D.node_configs(TOPICS, info(node, farm, tools)))
    configs.update(D.farm_configs(TOPICS, farm, "0.1.0", ["default", "my.queue", "my_queue", "Q-2"]))
    return configs


def test_every_payload_follows_home_assistants_schema() -> None:
    configs = everything()
    assert len(configs) == 3 * 10 + (1 + 2 + 3) + 3 + 4
    for topic, payload in configs.items():
        match = TOPIC_MATCHER.fullmatch(topic.removeprefix("homeassistant/"))
        assert match is not None, topic
        component = match["component"]
        full = expand(payload)
        assert set(full) <= COMMON | OPTIONS[component], (topic, set(full) - COMMON - OPTIONS[component])
        assert REQUIRED[component] <= set(full), topic
        assert full["device"].get("identifiers") and set(full["device"]) <= DEVICE_KEYS
        assert full["origin"]["name"] == "netqueues" and full["origin"]["sw_version"]
        assert full["availability_mode"] in ("all", "any", "latest")
        topics_ = [a["topic"] for a in full["availability"]]
        assert len(set(topics_)) == len(topics_), f"{topic}: availability entries must not share a topic"
        for key, value in full.items():
            if key.endswith("topic"):
                assert valid_publish_topic(value) and value.startswith("netq/"), (topic, key, value)
        for a in full["availability"]:
            assert set(a) <= {"topic", "payload_available", "payload_not_available", "value_template"}
        if component == "sensor" and "options" in full:
            assert full["device_class"] == "enum" and full["options"]
            assert "unit_of_measurement" not in full and "state_class" not in full
        if component == "select":
            assert len(full["options"]) >= 2 and len(set(full["options"])) == len(full["options"])
        if component == "switch":
            # payload_on is JSON: the state must not be compared with it
            assert full["state_on"] == "ON" and full["state_off"] == "OFF"
        if component == "event":
            assert set(full["event_types"]) == {"started", "finished", "failed"}


def test_topics_and_unique_ids_are_unique_and_derived_from_farm_node_and_object() -> None:
    configs = everything()
    ids = [p["uniq_id"] for p in configs.values()]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"netq\.f00d\.(node\.[A-Za-z0-9_-]+|farm)\.[A-Za-z0-9_.-]+", i) for i in ids)
    state = configs["homeassistant/sensor/netq_n1/state/config"]
    assert state["uniq_id"] == "netq.f00d.node.n1.state"
    queue_topics = [t for t in configs if "/netq/queue_" in t]
    assert len(queue_topics) == 4  # my.queue and my_queue stay apart
    assert "homeassistant/sensor/netq/queue_default/config" in queue_topics


def test_unique_ids_are_stable_across_restarts_and_versions() -> None:
    a = D.node_configs(TOPICS, info(version="0.1.0", options=("none", "PLA")))
    b = D.node_configs(TOPICS, info(version="0.2.0", options=("none", "PLA", "ASA")))
    assert a.keys() == b.keys()
    assert [p["uniq_id"] for p in a.values()] == [p["uniq_id"] for p in b.values()]
    assert D.node_configs(TOPICS, info()) == D.node_configs(TOPICS, info())  # same inputs, same bytes
    again = D.node_configs(TOPICS, info(version="0.1.0", options=("none", "PLA")))  # after a restart
    assert {t: D.encode(p) for t, p in a.items()} == {t: D.encode(p) for t, p in again.items()}
    other_farm = D.node_configs(TOPICS, info(farm="beef"))
    assert not {p["uniq_id"] for p in other_farm.values()} & {p["uniq_id"] for p in a.values()}


def test_availability_needs_the_node_online_and_for_printer_entities_its_printer_reachable() -> None:
    configs = D.node_configs(TOPICS, info(tools=1))
    node_state = {"topic": "netq/nodes/n1/state", "value_template": "{{ value_json.state }}"}
    printer = {"topic": "netq/nodes/n1/summary", "value_template": "{{ value_json.printer }}"}
    node_level = {"state", "accept_jobs", "pause", "resume"}
    for topic, payload in configs.items():
        full = expand(payload)
        obj = topic.split("/")[3]
        assert full["availability_mode"] == "all"
        expected = [node_state] if obj in node_level else [node_state, printer]
        assert full["availability"] == expected, topic
    farm = expand(D.farm_configs(TOPICS, "f00d", "1", ["default"])["homeassistant/sensor/netq/arbiter/config"])
    assert farm["availability"] == [{"topic": "netq/bridge/state", "value_template": "{{ value_json.state }}"}]


def test_state_sensor_and_topics_point_at_the_summaries() -> None:
    configs = D.node_configs(TOPICS, info(tools=1))
    state = expand(configs["homeassistant/sensor/netq_n1/state/config"])
    assert state["options"] == list(HA_STATES)
    assert state["state_topic"] == D.node_summary_topic(TOPICS, "n1") == "netq/nodes/n1/summary"
    finish = expand(configs["homeassistant/sensor/netq_n1/finish/config"])
    assert finish["device_class"] == "timestamp"
    event = expand(configs["homeassistant/event/netq_n1/job_events/config"])
    assert event["state_topic"] == "netq/nodes/n1/events"
    button = expand(configs["homeassistant/button/netq_n1/bed_cleared/config"])
    assert button["command_topic"] == "netq/request/node/bed_cleared" and button["payload_press"] == "n1"
    arbiter = expand(D.farm_configs(TOPICS, "f00d", "1", [])["homeassistant/sensor/netq/arbiter/config"])
    assert arbiter["state_topic"] == "netq/bridge/summary"


def test_other_prefix_and_base_topic() -> None:
    topics = Topics(base="farm/two", ha_prefix="ha")
    configs = D.node_configs(topics, info(tools=1))
    disc = D.discovery_node(topics, "n1")
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", disc) and disc != D.discovery_node(Topics(base="farm_two"), "n1")
    for topic, payload in configs.items():
        assert topic.startswith("ha/") and TOPIC_MATCHER.fullmatch(topic.removeprefix("ha/")), topic
        full = expand(payload)
        assert all(v.startswith("farm/two/") for k, v in full.items() if k.endswith("topic"))
    assert D.status_topic(topics) == "ha/status"


def test_removal_covers_every_config_a_node_can_publish() -> None:
    topics = set(D.node_config_topics(TOPICS, "n1"))
    assert set(D.node_configs(TOPICS, info(tools=D.MAX_TOOLS))) <= topics
    assert len(topics) == 10 + D.MAX_TOOLS


@pytest.mark.parametrize("ns", ["default", "my.queue", "x-1"])
def test_queue_sensor_reads_its_namespace(ns: str) -> None:
    configs = D.farm_configs(TOPICS, "f00d", "1", [ns])
    (queue,) = [p for t, p in configs.items() if "/queue_" in t]
    assert f"'{ns}'" in queue["val_tpl"] and queue["uniq_id"] == f"netq.f00d.farm.queue.{ns}"
