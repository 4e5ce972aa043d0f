"""Adapter from the replicated farm state to the scheduler (:mod:`shared.scheduling`)."""

from __future__ import annotations

from collections.abc import Sequence

from shared.claims import Chooser, Pick
from shared.models import Capabilities, CopyState
from shared.settings import Settings
from shared.state import FarmState


def make_chooser(settings: Settings) -> Chooser:
    def choose(state: FarmState, node: str, caps: Capabilities, namespaces: Sequence[str], now: float) -> Pick | None:
        order = list(namespaces) or state.namespaces()
        for ns in order:
            if state.queue(ns).paused:
                continue
            for job in state.jobs(ns):
                if any(s.profiles and caps.profile not in s.profiles for s in job.sets):
                    continue
                for copy in job.copies:
                    if copy.state == CopyState.QUEUED:
                        return Pick(ns, job.id, copy.index)
        return None

    return choose
