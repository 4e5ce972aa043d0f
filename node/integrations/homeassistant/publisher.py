"""Puts the Home Assistant view of a node (and, on the arbiter, of the farm) on the broker.

Every node publishes its printer's discovery configs and its retained summary; the serving arbiter also
publishes the farm device and ``<base>/bridge/summary``, and each job event about a printer on that printer's
event topic (:func:`node_event`) as it commits it, so that no node needs to receive every farm event. Only
what changed is published, at most every ``min_interval`` seconds. When Home Assistant announces ``online`` on
``<prefix>/status`` everything is published again after a random delay of up to two seconds (so a farm does
not answer all at once), and so it is after every (re)connect, since a new broker holds no retained messages.

Stale entities are removed with an empty retained config (Home Assistant's documented removal): each node
watches the retained configs under its own discovery node (and the arbiter those of the farm) and clears
any it no longer publishes, e.g. a tool that is gone or a namespace without jobs.
:func:`remove_node_entities` does the same for a retired node, from any client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any

from node.app.node_view import NodeView
from node.integrations.homeassistant import discovery as D
from node.integrations.homeassistant import summary as S
from node.link.base import Link, Message
from node.link.signing import StateSigning
from shared.models import job_key
from shared.topics import Topics

log = logging.getLogger(__name__)

ANNOUNCE_DELAY_S = 2.0  # republish within a random delay of up to this after Home Assistant comes online
MIN_INTERVAL_S = 0.5
_FORWARDED_EVENTS = frozenset(D.EVENT_TYPES)


def node_event(topics: Topics, ev: dict[str, Any]) -> tuple[str, bytes] | None:
    """The message for a printer's event entity, for a farm event about that printer (else None)."""
    node = ev.get("node")
    if not isinstance(node, str) or ev.get("event") not in _FORWARDED_EVENTS:
        return None
    out = {"event_type": ev["event"], "namespace": ev.get("namespace"), "job": ev.get("job"),
           "copy": ev.get("copy"), "reason": ev.get("reason")}
    return D.node_events_topic(topics, node), json.dumps(out).encode()


def remove_node_entities(link: Link, topics: Topics, node_id: str) -> list[str]:
    """Remove a (retired) node's Home Assistant entities: an empty retained config on every config topic
    the node may have used, and its retained summary cleared. Returns the topics cleared."""
    cleared = [*D.node_config_topics(topics, node_id), D.node_summary_topic(topics, node_id)]
    for topic in cleared:
        link.publish(topic, b"", qos=1, retain=True)  # MQTT 3.1.1 §3.3.1.3: an empty retained payload clears
    return cleared


class HomeAssistantPublisher:
    def __init__(self, agent: NodeView, *, rng: random.Random | None = None,
                 min_interval: float = MIN_INTERVAL_S, announce_delay: float = ANNOUNCE_DELAY_S) -> None:
        self.agent = agent
        self.topics: Topics = agent.topics
        self.node_id = agent.node_id
        self.enabled = agent.settings.homeassistant.enabled
        # The summaries are signed like all retained state (node/link/signing.py); discovery configs are Home
        # Assistant's format and are not.
        self._signing = StateSigning.for_farm(agent.settings.farm)
        self._rng = rng or random.Random()
        self._min_interval = min_interval
        self._announce_delay = announce_delay
        self._published: dict[str, bytes] = {}  # retained topic -> payload we last published there
        self._retained_configs: set[str] = set()  # our config topics that hold a retained config now
        self._timer: asyncio.TimerHandle | None = None
        self._announce: asyncio.TimerHandle | None = None
        self._last_flush = -1e9
        self._running = False
        # Views over every job are recomputed only after the replicated state changed (heartbeats also
        # wake the publisher): the generation counts applied changes.
        self._generation = 0
        self._required: tuple[int, list[Any]] = (-1, [])
        self._farm_view: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        self.republished = 0  # full republications (Home Assistant announcements and reconnects)

    # --- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        if not self.enabled or self._running:
            return
        self._running = True
        link = self.agent.link
        # QoS 0: node states are retained (the latest one comes again after any reconnect); QoS 1 would add an
        # acknowledgement per node to every message of the farm.
        link.subscribe(self.topics.node_state_filter, self._on_trigger, qos=0)
        link.subscribe(D.status_topic(self.topics), self._on_ha_status)
        link.subscribe(D.node_config_filter(self.topics, self.node_id), self._on_config)
        link.subscribe(D.farm_config_filter(self.topics), self._on_config)
        link.on_connection(self._on_connection)
        self.agent.consensus.listeners.append(self.schedule)
        self.agent.consensus.on_applied.append(self._on_applied)
        self.agent.consensus.on_role.append(lambda _role: self.schedule())

    async def stop(self) -> None:
        self._running = False
        for handle in (self._timer, self._announce):
            if handle is not None:
                handle.cancel()
        self._timer = self._announce = None

    # --- triggers ----------------------------------------------------------------------------------------
    def schedule(self) -> None:
        """Publish what changed, soon (coalesced; at most every ``min_interval`` seconds)."""
        if not self._running or self._timer is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_flush + self._min_interval - loop.time())
        self._timer = loop.call_later(delay, self._flush)

    def republish(self) -> None:
        """Publish everything again now: discovery configs, summaries and the node state."""
        self._announce = None
        if not self._running:
            return
        self.republished += 1
        self._published.clear()
        self.agent.schedule_publish()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush()

    def _on_trigger(self, msg: Message) -> None:
        self.schedule()

    def _on_applied(self, _writes: Any, _snapshot: bool) -> None:
        self._generation += 1
        self.schedule()

    def _on_connection(self, connected: bool) -> None:
        if connected and self._running:
            self.republish()  # a new broker holds none of our retained messages

    def _on_ha_status(self, msg: Message) -> None:
        # HA's birth message is not retained by default; a retained one is already covered by our own
        # (re)connect, and amqtt 0.12.1 re-sends retained messages when other clients connect.
        if msg.retain or msg.payload.strip() != b"online" or not self._running or self._announce is not None:
            return
        delay = self._rng.uniform(0.0, self._announce_delay)
        log.debug("%s: Home Assistant is online; republishing in %.2f s", self.node_id, delay)
        self._announce = asyncio.get_running_loop().call_later(delay, self.republish)

    def _on_config(self, msg: Message) -> None:
        if msg.payload:
            self._retained_configs.add(msg.topic)
        else:
            self._retained_configs.discard(msg.topic)
        self.schedule()

    # --- publishing --------------------------------------------------------------------------------------
    def _flush(self) -> None:
        self._timer = None
        if not self._running:
            return
        self._last_flush = asyncio.get_running_loop().time()
        farm = self.agent.consensus.farm
        if farm is None:
            return  # unique ids derive from the farm id: wait until this node belongs to a farm
        desired: dict[str, bytes] = {}
        own_configs: set[str] = set()
        farm_configs: set[str] = set()
        summary_topic = D.node_summary_topic(self.topics, self.node_id)
        # A retired node has no entities: the arbiter removed them; one still running must not bring them back
        # (its configs go as stale ones, below; its summary here, in case it outran the arbiter's removal).
        retired = self.node_id in self.agent.consensus.state.retired()
        if self.agent.worker is not None and not retired:
            node_summary, info = self._node_view(farm)
            desired[summary_topic] = self._signing.encode(summary_topic, node_summary, sort_keys=True)
            configs = D.node_configs(self.topics, info)
            own_configs = set(configs)
            desired.update((t, D.encode(p)) for t, p in configs.items())
        elif retired and self._published.pop(summary_topic, None) is not None:
            self.agent.link.publish(summary_topic, b"", qos=1, retain=True)
        arbiter = self.agent.arbiter
        if arbiter.active:
            info_ = arbiter.info()
            online = sum(1 for st in self.agent.nodes.values() if st.get("state") == "online")
            key = (self._generation, online, *(str(info_.get(k)) for k in ("arbiter", "term", "safety", "warning")))
            if self._farm_view[0] != key:
                self._farm_view = (key, S.farm_summary(self.agent.consensus.state, self.agent.nodes, info_))
            farm_view = self._farm_view[1]
            farm_topic = D.farm_summary_topic(self.topics)
            desired[farm_topic] = self._signing.encode(farm_topic, farm_view, sort_keys=True)
            configs = D.farm_configs(self.topics, farm, str(info_.get("version", "")), list(farm_view["queues"]))
            farm_configs = set(configs)
            desired.update((t, D.encode(p)) for t, p in configs.items())
        link = self.agent.link
        for topic, payload in desired.items():
            if self._published.get(topic) != payload:
                self._published[topic] = payload
                link.publish(topic, payload, qos=1, retain=True)
        own_filter = D.discovery_node(self.topics, self.node_id)
        farm_node = D.farm_discovery_node(self.topics)
        for topic in sorted(self._retained_configs):
            level = topic.split("/")[-3]
            stale = (level == own_filter and topic not in own_configs) or (
                level == farm_node and arbiter.active and topic not in farm_configs)
            if stale:
                self._retained_configs.discard(topic)
                self._published.pop(topic, None)
                link.publish(topic, b"", qos=1, retain=True)

    def _node_view(self, farm: str) -> tuple[dict[str, Any], D.NodeInfo]:
        agent = self.agent
        worker = agent.worker
        assert worker is not None
        node = agent.node_state()
        job = agent.consensus.state.job(job_key(node.namespace, node.job)) if node.job and node.namespace else None
        p = agent.settings.printer
        operator_clears = not p.clear_script and not p.self_clearing
        view = S.node_summary(node, job=job, paused=worker.paused, operator_clears=operator_clears,
                              now=time.time())
        loaded = list(worker.capabilities.materials)
        if self._required[0] != self._generation:
            self._required = (self._generation, S.required_materials(agent.consensus.state))
        options = S.material_options(loaded, self._required[1])
        info = D.NodeInfo(farm=farm, node_id=self.node_id, name=p.name or self.node_id,
                          model=p.model or p.profile or f"{p.driver} printer", version=_version(),
                          material_options=tuple(options), tools=S.tools_of(loaded))
        return view, info


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("netqueues")
    except PackageNotFoundError:
        return "0+unknown"
