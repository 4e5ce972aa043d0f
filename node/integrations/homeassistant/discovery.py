"""Home Assistant MQTT discovery payloads: one retained config per entity. Pure.

Topics are ``<prefix>/<component>/<discovery node>/<object>/config``, the form every Home Assistant release of
the last years understands (``<discovery node>`` and ``<object>`` match ``[a-zA-Z0-9_-]+``). A printer's
discovery node is ``<base>_<node_id>`` (``netq_n1``); the farm's is ``<base>`` (``netq``), so that two farms
on one broker (different base topics) never share a config topic.

Keys are abbreviated where Home Assistant documents an abbreviation (``stat_t``, ``uniq_id``, ``dev`` …);
``~`` is the farm's base topic. Unique ids are ``netq.<farm>.node.<node_id>.<object>`` and
``netq.<farm>.farm.<object>``: derived, never random, so a restarted node updates its entities in place.

Availability: Home Assistant keeps one availability entry per *topic* (``_avail_topics`` is a dict keyed by
topic in its ``entity.py``), so the two conditions a printer entity needs — its node is online (the node's
last will on ``<base>/nodes/<id>/state``) and its printer is reachable — come from two topics: the node state
and the node's summary, with ``avty_mode: all``. The state sensor has only the first, so it can say
``offline`` when the printer is unreachable; node-level controls (accept jobs, pause, resume) too.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from node.integrations.homeassistant.summary import HA_STATES
from shared.topics import Topics

MANUFACTURER = "netqueues"
PROJECT_URL: str | None = None  # origin support URL: set once the project has a public home
MAX_TOOLS = 16  # Capabilities.materials holds at most 16 tools
EVENT_TYPES = ("started", "finished", "failed")
_SAFE = re.compile(r"[^a-zA-Z0-9_-]")

Configs = dict[str, dict[str, Any]]  # config topic -> payload


# --- topics ------------------------------------------------------------------------------------------------
def node_summary_topic(topics: Topics, node_id: str) -> str:
    return topics.node_state(node_id).rsplit("/", 1)[0] + "/summary"


def node_events_topic(topics: Topics, node_id: str) -> str:
    return topics.node_state(node_id).rsplit("/", 1)[0] + "/events"


def farm_summary_topic(topics: Topics) -> str:
    return f"{topics.base}/bridge/summary"


def status_topic(topics: Topics) -> str:
    """Where Home Assistant announces ``online`` (its birth message) and ``offline``."""
    return f"{topics.ha_prefix}/status"


def _slug(text: str) -> str:
    """A discovery topic level: invalid characters become ``_``, plus a short hash when any did, so two
    names that differ only in such characters stay apart."""
    safe = _SAFE.sub("_", text)
    if safe != text:
        safe += "_" + hashlib.sha256(text.encode()).hexdigest()[:6]
    return safe


def discovery_node(topics: Topics, node_id: str) -> str:
    return f"{_slug(topics.base)}_{node_id}"


def farm_discovery_node(topics: Topics) -> str:
    return _slug(topics.base)


def config_topic(topics: Topics, component: str, disc_node: str, object_id: str) -> str:
    return f"{topics.ha_prefix}/{component}/{disc_node}/{object_id}/config"


def node_config_filter(topics: Topics, node_id: str) -> str:
    return f"{topics.ha_prefix}/+/{discovery_node(topics, node_id)}/+/config"


def farm_config_filter(topics: Topics) -> str:
    return f"{topics.ha_prefix}/+/{farm_discovery_node(topics)}/+/config"


# --- shared parts ------------------------------------------------------------------------------------------
def _origin(version: str) -> dict[str, str]:
    origin = {"name": "netqueues", "sw": version}
    if PROJECT_URL:
        origin["url"] = PROJECT_URL
    return origin


def _node_available(topics: Topics, node_id: str) -> dict[str, str]:
    return {"t": topics.node_state(node_id), "val_tpl": "{{ value_json.state }}"}


def _printer_available(topics: Topics, node_id: str) -> dict[str, str]:
    return {"t": node_summary_topic(topics, node_id), "val_tpl": "{{ value_json.printer }}"}


def _farm_available(topics: Topics) -> dict[str, str]:
    return {"t": topics.bridge_state, "val_tpl": "{{ value_json.state }}"}


@dataclass(frozen=True)
class NodeInfo:
    """What a printer's discovery payloads depend on (any change republishes them)."""

    farm: str
    node_id: str
    name: str
    model: str
    version: str
    material_options: tuple[str, ...]
    tools: int = 1


def node_unique_id(farm: str, node_id: str, obj: str) -> str:
    return f"netq.{farm}.node.{node_id}.{obj}"


def farm_unique_id(farm: str, obj: str) -> str:
    return f"netq.{farm}.farm.{obj}"


# --- one device per printer --------------------------------------------------------------------------------
def node_configs(topics: Topics, info: NodeInfo) -> Configs:
    """Every entity of one printer node: config topic -> discovery payload."""
    n = info.node_id
    node_only = [_node_available(topics, n)]
    both = [_node_available(topics, n), _printer_available(topics, n)]
    summary = node_summary_topic(topics, n).removeprefix(topics.base)
    device = {"ids": [f"netq.{info.farm}.node.{n}"], "name": info.name, "mdl": info.model,
              "mf": MANUFACTURER, "sw": info.version, "via_device": f"netq.{info.farm}.farm"}
    disc = discovery_node(topics, n)
    out: Configs = {}

    def add(component: str, obj: str, name: str, avty: list[dict[str, str]], **keys: Any) -> None:
        out[config_topic(topics, component, disc, obj)] = {
            "~": topics.base, "name": name, "uniq_id": node_unique_id(info.farm, n, obj), "dev": device,
            "o": _origin(info.version), "avty": avty, "avty_mode": "all", "qos": 1, **keys}

    def request(path: str) -> str:
        return f"~/request/{path}"

    add("sensor", "state", "State", node_only, stat_t="~" + summary, val_tpl="{{ value_json.state }}",
        dev_cla="enum", ops=list(HA_STATES), ic="mdi:printer-3d", json_attr_t="~" + summary,
        json_attr_tpl="{{ {'node': value_json.node_id, 'reason': value_json.reason} | tojson }}")
    add("sensor", "progress", "Progress", both, stat_t="~" + summary, val_tpl="{{ value_json.progress }}",
        unit_of_meas="%", stat_cla="measurement", ic="mdi:progress-clock")
    add("sensor", "finish", "Estimated finish", both, stat_t="~" + summary,
        val_tpl="{{ value_json.finish }}", dev_cla="timestamp")
    add("sensor", "job", "Current job", both, stat_t="~" + summary, val_tpl="{{ value_json.job }}",
        ic="mdi:file-document-outline", json_attr_t="~" + summary,
        json_attr_tpl="{{ value_json.job_info | tojson }}")
    add("button", "bed_cleared", "Bed cleared", both, cmd_t=request("node/bed_cleared"), pl_prs=n,
        ic="mdi:broom")
    add("button", "pause", "Pause queue work", node_only, cmd_t=request("node/pause"), pl_prs=n,
        ic="mdi:pause-circle-outline")
    add("button", "resume", "Resume queue work", node_only, cmd_t=request("node/resume"), pl_prs=n,
        ic="mdi:play-circle-outline")
    add("button", "release", "Release claim", both, cmd_t=request("node/release"), pl_prs=n,
        ic="mdi:hand-back-left-outline")
    add("switch", "accept_jobs", "Accept jobs", node_only, cmd_t=request("node/accept_jobs"),
        pl_on=json.dumps({"node": n, "accept": True}), pl_off=json.dumps({"node": n, "accept": False}),
        stat_t="~" + summary, val_tpl="{{ 'ON' if value_json.accept_jobs else 'OFF' }}",
        stat_on="ON", stat_off="OFF", ic="mdi:tray-arrow-down")
    for tool in range(min(max(info.tools, 1), MAX_TOOLS)):
        add("select", f"material_{tool}", f"Material tool {tool + 1}", both, cmd_t=request("node/material"),
            cmd_tpl=f'{{"node": "{n}", "tool": {tool}, "material": "{{{{ value }}}}"}}',
            ops=list(info.material_options), stat_t="~" + summary,
            val_tpl=f"{{{{ value_json.materials[{tool}] if value_json.materials | length > {tool} else 'none' }}}}",
            ic="mdi:printer-3d-nozzle")
    add("event", "job_events", "Job events", both,
        stat_t="~" + node_events_topic(topics, n).removeprefix(topics.base), evt_typ=list(EVENT_TYPES),
        ic="mdi:printer-3d")
    return out


def node_config_topics(topics: Topics, node_id: str) -> list[str]:
    """Every config topic a printer node may have published (all tools), for removing its entities."""
    disc = discovery_node(topics, node_id)
    pairs = [("sensor", "state"), ("sensor", "progress"), ("sensor", "finish"), ("sensor", "job"),
             ("button", "bed_cleared"), ("button", "pause"), ("button", "resume"), ("button", "release"),
             ("switch", "accept_jobs"), ("event", "job_events")]
    pairs += [("select", f"material_{t}") for t in range(MAX_TOOLS)]
    return [config_topic(topics, c, disc, o) for c, o in pairs]


# --- one device for the farm -------------------------------------------------------------------------------
def farm_configs(topics: Topics, farm: str, version: str, namespaces: list[str]) -> Configs:
    """The farm device's entities (published by the serving arbiter only)."""
    avty = [_farm_available(topics)]
    summary = "~" + farm_summary_topic(topics).removeprefix(topics.base)
    name = "netqueues farm" if topics.base == "netq" else f"netqueues farm {topics.base}"
    device = {"ids": [f"netq.{farm}.farm"], "name": name, "mdl": "print farm", "mf": MANUFACTURER,
              "sw": version}
    disc = farm_discovery_node(topics)
    out: Configs = {}

    def add(obj: str, topic_obj: str, name: str, val_tpl: str, **keys: Any) -> None:
        out[config_topic(topics, "sensor", disc, topic_obj)] = {
            "~": topics.base, "name": name, "uniq_id": farm_unique_id(farm, obj), "dev": device,
            "o": _origin(version), "avty": avty, "avty_mode": "all", "qos": 1, "stat_t": summary,
            "val_tpl": val_tpl, "json_attr_t": summary, **keys}

    add("arbiter", "arbiter", "Arbiter", "{{ value_json.arbiter }}", ic="mdi:gavel",
        json_attr_tpl="{{ {'term': value_json.term, 'safety': value_json.safety, 'warning': value_json.warning,"
                      " 'members': value_json.members, 'nodes_online': value_json.nodes_online} | tojson }}")
    add("printing", "printing", "Copies printing", "{{ value_json.printing }}", stat_cla="measurement",
        ic="mdi:printer-3d-nozzle", json_attr_tpl="{{ {} | tojson }}")
    add("attention", "attention", "Copies orphaned or in conflict", "{{ value_json.attention }}",
        stat_cla="measurement", ic="mdi:alert-circle-outline",
        json_attr_tpl="{{ {'orphaned': value_json.orphaned, 'conflicts': value_json.conflicts} | tojson }}")
    for ns in namespaces:
        # Namespaces match [A-Za-z0-9][A-Za-z0-9_.-]*: safe inside a quoted template string.
        q = f"value_json.queues['{ns}']"
        add(f"queue.{ns}", f"queue_{_slug(ns)}", f"Queue {ns}",
            f"{{{{ {q}.waiting if '{ns}' in value_json.queues else 0 }}}}", stat_cla="measurement",
            ic="mdi:tray-full", json_attr_tpl=f"{{{{ ({q} if '{ns}' in value_json.queues else {{}}) | tojson }}}}")
    return out


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes of a discovery payload: deterministic, so an unchanged config is never republished."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
