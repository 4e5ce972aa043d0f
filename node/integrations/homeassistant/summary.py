"""The retained views that Home Assistant (and scripts) read: one per node, one for the farm. Pure.

Logic lives here, in Python, so that the discovery payloads only pick fields with trivial value templates
(``{{ value_json.progress }}``): a template is hard to test, a function is not.

``<base>/nodes/<node_id>/summary`` (retained, published by the node itself)::

    {"node_id": "n1", "state": "printing", "printer": "online", "progress": 42.5,
     "finish": "2026-01-02T10:00:00+00:00", "job": "benchy", "job_info": {...},
     "accept_jobs": true, "paused": false, "materials": ["PLA:red", "none"], "reason": null}

``<base>/bridge/summary`` (retained, published by the serving arbiter)::

    {"farm": "…", "arbiter": "n1", "term": 3, "safety": "quorum", "warning": null, "members": 3,
     "nodes_online": 3, "printing": 2, "orphaned": 0, "conflicts": 0, "attention": 0,
     "queues": {"default": {"waiting": 4, "printing": 1, "remaining": 5, "jobs": 3, "paused": false}}}

In a farm with a key both also carry ``"sig"``, the farm's signature of the view for its topic, added by the
publisher (:mod:`node.link.signing`); the views here are built without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from shared.models import FINAL_COPY_STATES, CopyState, Job, JobCopy, Material, NodeState, WorkerState
from shared.state import FarmState

# The state enum of a printer, as Home Assistant shows it (the sensor's ``options``).
HA_STATES = ("idle", "printing", "paused", "awaiting_bed_clear", "awaiting_material", "error", "offline")

_HA_STATE = {
    WorkerState.IDLE: "idle",
    WorkerState.REQUESTING: "idle",
    WorkerState.FETCHING: "printing",  # a copy is held and its files are on their way
    WorkerState.PRINTING: "printing",
    WorkerState.CLEARING: "awaiting_bed_clear",
    WorkerState.PAUSED: "paused",
    WorkerState.AWAITING_MATERIAL: "awaiting_material",
    WorkerState.ERROR: "error",
    WorkerState.OFFLINE: "offline",
}

NO_MATERIAL = "none"
NO_JOB = "none"
# Offered in every material select, next to what is loaded and what queued jobs ask for.
COMMON_MATERIALS = ("PLA", "PETG", "ABS", "ASA", "TPU", "PA", "PC")
MAX_MATERIAL_OPTIONS = 64
MIN_PROGRESS_FOR_ESTIMATE = 0.01  # below 1 % an extrapolated finish time is noise


def ha_state(worker: WorkerState | str, *, online: bool = True, operator_clears: bool = True) -> str:
    """The Home Assistant state of a printer. A bed cleared by a script (or a self-clearing printer) is
    busy, not waiting for anybody, so only operator-confirmed clearing reads ``awaiting_bed_clear``."""
    if not online:
        return "offline"
    state = _HA_STATE.get(WorkerState(worker), "error")
    if state == "awaiting_bed_clear" and not operator_clears:
        return "printing"
    return state


def material_label(material: Material | None) -> str:
    """``PLA``, ``PLA:red`` or ``none``: the form of the CLI's ``--material`` and of the select options."""
    if material is None:
        return NO_MATERIAL
    return f"{material.type}:{material.color}" if material.color else material.type


def parse_material(label: str) -> Material | None:
    """Inverse of :func:`material_label`; ``none``, ``-`` and the empty string mean an empty tool.
    Raises ValueError for a label that is not a valid material."""
    text = label.strip()
    if text.lower() in ("", "-", NO_MATERIAL):
        return None
    mtype, _, color = text.partition(":")
    return Material(type=mtype.strip(), color=color.strip() or None)


def material_options(loaded: Sequence[Material | None], required: Iterable[Material | None] = ()) -> list[str]:
    """Options of a tool's material select: ``none``, what is loaded, what queued jobs need, common types.

    Always at least two entries (older Home Assistant releases refuse a select with fewer)."""
    out = [NO_MATERIAL]
    for label in [*(material_label(m) for m in loaded), *(material_label(m) for m in required),
                  *COMMON_MATERIALS]:
        if label not in out:
            out.append(label)
    return out[:MAX_MATERIAL_OPTIONS]


def required_materials(state: FarmState) -> list[Material]:
    """Materials that unfinished jobs ask for, in queue order, each once."""
    seen: list[Material] = []
    for job in state.jobs():
        if job.done:
            continue
        for s in job.sets:
            for m in s.materials:
                if m is not None and m not in seen:
                    seen.append(m)
    return seen


def estimate_finish(started_at: float | None, progress: float | None, now: float) -> float | None:
    """When a copy started at ``started_at`` (wall clock) and ``progress`` (0..1) done now will finish,
    by linear extrapolation; None while there is too little to go on."""
    if started_at is None or progress is None or progress < MIN_PROGRESS_FOR_ESTIMATE or now < started_at:
        return None
    if progress >= 1.0:
        return now
    return started_at + (now - started_at) / progress


def iso(ts: float | None) -> str | None:
    """An ISO 8601 timestamp with its offset (what a ``timestamp`` sensor needs), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def tools_of(materials: Sequence[Material | None]) -> int:
    """Tools to offer a material select for: one per loaded slot, at least one."""
    return max(1, len(materials))


def node_summary(node: NodeState, *, job: Job | None, paused: bool, operator_clears: bool,
                 now: float) -> dict[str, Any]:
    """The view of one printer node that its Home Assistant entities read."""
    caps = node.capabilities
    loaded: list[Material | None] = list(caps.materials) if caps is not None else []
    labels = [material_label(m) for m in loaded] or [NO_MATERIAL]
    copy: JobCopy | None = None
    if job is not None and node.copy_index is not None and node.copy_index < len(job.copies):
        copy = job.copies[node.copy_index]
    printing = node.worker == WorkerState.PRINTING and copy is not None and copy.state == CopyState.PRINTING
    progress = node.progress if printing else None
    finish = estimate_finish(copy.started_at if copy else None, progress, now) if printing else None
    job_info: dict[str, Any] = {}
    if node.job is not None:
        job_info = {"job_id": node.job, "namespace": node.namespace, "copy": node.copy_index,
                    "name": job.name if job else None,
                    "started": iso(copy.started_at) if copy else None}
    return {
        "node_id": node.node_id,
        "state": ha_state(node.worker, online=node.state == "online", operator_clears=operator_clears),
        "printer": "offline" if node.worker == WorkerState.OFFLINE else "online",
        "progress": round(progress * 100.0, 1) if progress is not None else None,
        "finish": iso(finish),
        "job": (job.name if job is not None else node.job) if node.job is not None else NO_JOB,
        "job_info": job_info,
        "accept_jobs": node.accept_jobs,
        "paused": paused,
        "materials": labels,
        "reason": node.reason,
    }


def _queue_counts(copies: Sequence[JobCopy]) -> dict[str, int]:
    return {
        "waiting": sum(1 for c in copies if c.state in (CopyState.QUEUED, CopyState.CLAIMED)),
        "printing": sum(1 for c in copies if c.state == CopyState.PRINTING),
        "remaining": sum(1 for c in copies if c.state not in FINAL_COPY_STATES),
    }


def farm_namespaces(state: FarmState) -> list[str]:
    """Namespaces with live jobs, or with queue settings (a paused queue with no jobs is still a queue)."""
    names = set(state.namespaces())
    names.update(k.split("/", 1)[1] for k, o in state.objects.items() if k.startswith("queue/") and o.value)
    return sorted(names)


def farm_summary(state: FarmState, nodes: Mapping[str, Mapping[str, Any]], info: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """The view of the whole farm that the farm device's entities read (published by the arbiter)."""
    queues: dict[str, dict[str, Any]] = {}
    every: list[JobCopy] = []
    for ns in farm_namespaces(state):
        jobs = state.jobs(ns)
        copies = [c for j in jobs for c in j.copies]
        every += copies
        queues[ns] = {**_queue_counts(copies), "jobs": sum(1 for j in jobs if not j.done),
                      "paused": state.queue(ns).paused}
    orphaned = sum(1 for c in every if c.state == CopyState.ORPHANED)
    conflicts = sum(1 for c in every if c.conflict)
    return {
        "farm": info.get("farm"),
        "arbiter": info.get("arbiter"),
        "term": info.get("term"),
        "safety": info.get("safety"),
        "warning": info.get("warning"),
        "members": len(state.members()),
        "nodes_online": sum(1 for st in nodes.values() if st.get("state") == "online"),
        "printing": sum(1 for c in every if c.state == CopyState.PRINTING),
        "orphaned": orphaned,
        "conflicts": conflicts,
        "attention": sum(1 for c in every if c.state == CopyState.ORPHANED or c.conflict),
        "queues": queues,
    }
