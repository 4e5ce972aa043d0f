"""Topic building and parsing. The base topic is configurable (default ``netq``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.errors import ProtocolError

_LEVEL = re.compile(r"^[^/#+\x00]{1,100}$")


def _check_level(level: str, what: str) -> str:
    if not _LEVEL.match(level) or level.startswith("$"):
        raise ProtocolError(f"invalid {what} in topic: {level!r}")
    return level


@dataclass(frozen=True, slots=True)
class Topics:
    """All topics of one farm, derived from its base topic."""

    base: str = "netq"
    ha_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        for part in self.base.split("/"):
            _check_level(part, "base topic")

    # --- readable, retained view -------------------------------------------------------------------------
    @property
    def bridge_state(self) -> str:
        return f"{self.base}/bridge/state"

    @property
    def bridge_info(self) -> str:
        return f"{self.base}/bridge/info"

    def node_state(self, node_id: str) -> str:
        return f"{self.base}/nodes/{_check_level(node_id, 'node id')}/state"

    @property
    def node_state_filter(self) -> str:
        return f"{self.base}/nodes/+/state"

    def job(self, namespace: str, job_id: str) -> str:
        return f"{self.base}/queues/{_check_level(namespace, 'namespace')}/jobs/{_check_level(job_id, 'job id')}"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    # --- API -----------------------------------------------------------------------------------------------
    def request(self, path: str) -> str:
        return f"{self.base}/request/{path}"

    def response(self, path: str) -> str:
        return f"{self.base}/response/{path}"

    @property
    def request_filter(self) -> str:
        return f"{self.base}/request/#"

    def request_path(self, topic: str) -> str | None:
        """The ``<path>`` of a ``<base>/request/<path>`` topic, or None for any other topic."""
        prefix = f"{self.base}/request/"
        if not topic.startswith(prefix):
            return None
        return topic[len(prefix):]

    def parse_node_state(self, topic: str) -> str | None:
        parts = topic[len(self.base) + 1:].split("/") if topic.startswith(self.base + "/") else []
        if len(parts) == 3 and parts[0] == "nodes" and parts[2] == "state":
            return parts[1]
        return None

    # --- internal protocol ---------------------------------------------------------------------------------
    @property
    def proto(self) -> str:
        return f"{self.base}/_proto"

    @property
    def log(self) -> str:
        """Arbiter → members, in order: entries, heartbeats (one topic, so MQTT keeps them in order, §4.6)."""
        return f"{self.base}/_proto/log"

    @property
    def election(self) -> str:
        return f"{self.base}/_proto/election"

    def to_arbiter(self, arbiter: str) -> str:
        """Members → the arbiter ``arbiter``: acks, work requests, start/finish reports, sync requests, joins.

        One inbox per arbiter, so that only the arbiter receives them: on a shared topic every node would get
        every ack, a fan-out of n² messages per entry."""
        return f"{self.base}/_proto/arbiter/{_check_level(arbiter, 'node id')}"

    def to_node(self, node_id: str) -> str:
        return f"{self.base}/_proto/node/{_check_level(node_id, 'node id')}"
