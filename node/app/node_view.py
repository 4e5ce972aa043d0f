"""What node commands (:mod:`node.app.node_commands`) and the Home Assistant publisher may read from, and ask of, the
node they run in. :class:`node.app.agent.NodeAgent` provides it; they depend on this, not on the agent, so that
neither imports the module that composes them (the agent imports both)."""

from __future__ import annotations

from typing import Any, Protocol

from node.consensus.consensus import Consensus
from node.consensus.replica import Replica
from node.link.base import Link
from node.worker.worker import Worker
from shared.models import NodeState
from shared.settings import Settings
from shared.topics import Topics


class FarmView(Protocol):
    """The arbiter's side, as far as Home Assistant's farm device needs it."""

    @property
    def active(self) -> bool:
        """Whether this node is the arbiter and serving."""
        ...

    def info(self) -> dict[str, Any]:
        """The farm's bridge info (arbiter, term, safety mode, version, warnings)."""
        ...


class NodeView(Protocol):
    @property
    def node_id(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def topics(self) -> Topics: ...

    @property
    def link(self) -> Link: ...

    @property
    def consensus(self) -> Consensus: ...

    @property
    def replica(self) -> Replica: ...

    @property
    def worker(self) -> Worker | None:
        """The node's worker, or None on a node without a printer (a witness)."""
        ...

    @property
    def arbiter(self) -> FarmView: ...

    @property
    def nodes(self) -> dict[str, dict[str, Any]]:
        """The retained node states seen, by node id."""
        ...

    def node_state(self) -> NodeState:
        """This node's state as it would publish it now."""
        ...

    def schedule_publish(self) -> None:
        """Publish this node's state again, soon."""
        ...
