"""The fault tests' checker: pure functions over a client history, printer journals and final replicas.

Inputs, all plain data (so the checker is tested on hand-made cases, see ``test_checker.py``):

* ``history``: the client's records (``tests/lan/client.py``): ``invoke`` then one of ``ok`` / ``fail`` /
  ``info`` per operation; an ``add`` carries ``job``, ``namespace`` and ``count``.
* ``journals``: per node, the names its simulated printer was asked to start, in order. A name is
  ``<job>-c<copy>-s<set>-r<run>-<file>``, one per print of one set of one copy.
* ``replicas``: per live node, its SQLite replica after the drain: ``{"applied": [t, s], "objects": {key:
  {"stamp": [t, s], "value": ...}}}`` (see ``netns.read_replica``).

What it asserts (``Report.violations``):

* **lost**: an acknowledged copy (``ok`` add; copies ``0 .. count-1``) that is missing from the final state,
  cancelled, or ``done`` although its printer never started all of its prints. A copy still ``queued``,
  ``claimed`` or ``printing`` is not lost (that is a drain problem, reported as ``unfinished``); ``orphaned`` and
  ``failed`` copies whose outcome an operator must settle are counted as ``needs_operator``.
* **double start** (``quorum`` mode): the same name in the journals twice, on one node or two.
  In ``available`` mode a double start is allowed only if the final state reports it (``conflict`` on the
  copy); an unreported one is a violation.
* **divergence**: live replicas whose live objects differ in value. Stamps are ignored: a new arbiter
  re-stamps everything with its term, and a member may still hold the older stamp of the same value.

``Report.counts`` are the totals quoted in the issue: acknowledged, printed, lost, double starts, conflicts.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

START_NAME = re.compile(r"^(?P<job>.+?)-c(?P<copy>\d+)-s(?P<set>\d+)-r(?P<run>\d+)-(?P<file>.*)$")
ACTIVE = {"queued", "claimed", "printing"}
NEEDS_OPERATOR = {"orphaned", "failed"}


def start_name(job: str, copy: int, set_index: int, run: int, file: str) -> str:
    return f"{job}-c{copy}-s{set_index}-r{run}-{file}"


def parse_start_name(name: str) -> tuple[str, int, int, int, str] | None:
    m = START_NAME.match(name)
    if m is None:
        return None
    return m["job"], int(m["copy"]), int(m["set"]), int(m["run"]), m["file"]


@dataclass
class Report:
    counts: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "counts": self.counts, "violations": self.violations, "notes": self.notes}


# --- pieces ------------------------------------------------------------------------------------------------
def operations(history: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each operation's invoke record merged with its completion (by transaction); ``type`` is the outcome,
    ``pending`` when there is none."""
    ops: dict[str, dict[str, Any]] = {}
    for rec in history:
        txn = rec.get("txn")
        kind = rec.get("type")
        if not isinstance(txn, str) or kind not in ("invoke", "ok", "fail", "info"):
            continue
        if kind == "invoke":
            ops[txn] = {**rec, "type": "pending", "invoked_at": rec.get("t")}
        elif txn in ops:
            ops[txn].update({**rec, "invoked_at": ops[txn]["invoked_at"], "completed_at": rec.get("t")})
    return ops


def acknowledged_copies(history: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """(namespace, job) -> copies acknowledged, from ``ok`` adds."""
    out: dict[tuple[str, str], int] = {}
    for op in operations(history).values():
        if op.get("op") == "add" and op["type"] == "ok":
            data = op.get("data") or {}
            job = str(data.get("id") or op.get("job"))
            ns = str(data.get("namespace") or op.get("namespace") or "default")
            out[(ns, job)] = int(data.get("copies") or op.get("count") or 1)
    return out


def live_objects(replica: Mapping[str, Any]) -> dict[str, Any]:
    return {k: o["value"] for k, o in replica.get("objects", {}).items() if o.get("value") is not None}


def reference_state(replicas: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The live objects of the most advanced replica (highest applied stamp): the farm's final state."""
    if not replicas:
        return {}
    best = max(replicas.values(), key=lambda r: tuple(r.get("applied") or (0, 0)))
    return live_objects(best)


def divergence(replicas: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Keys whose live value differs between replicas (or exists in some only), with who holds what."""
    views = {node: live_objects(r) for node, r in replicas.items()}
    keys = set().union(*[set(v) for v in views.values()]) if views else set()
    out = []
    for key in sorted(keys):
        values = {node: v.get(key) for node, v in views.items()}
        distinct = {json.dumps(x, sort_keys=True) for x in values.values()}
        if len(distinct) > 1:
            holders = sorted(n for n, x in values.items() if x is not None)
            out.append(f"{key}: differs (held by {', '.join(holders) or 'none'} of {', '.join(sorted(values))})")
    return out


def double_starts(journals: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Names started more than once, with the nodes that started them (in journal order)."""
    where: dict[str, list[str]] = {}
    for node, names in journals.items():
        for name in names:
            where.setdefault(name, []).append(node)
    return {name: nodes for name, nodes in where.items() if len(nodes) > 1}


# --- the check ---------------------------------------------------------------------------------------------
def check(history: Sequence[Mapping[str, Any]], journals: Mapping[str, Sequence[str]],
          replicas: Mapping[str, Mapping[str, Any]], *, safety: str = "quorum",
          kills: Mapping[str, Sequence[float]] | None = None) -> Report:
    """``kills``: when each node was killed (wall clock), if known: a copy failed as "restarted during this
    print" on a node that was not killed after the copy started is a false failure."""
    report = Report()
    state = reference_state(replicas)
    started = Counter(name for names in journals.values() for name in names)
    acked = acknowledged_copies(history)
    ops = operations(history)

    # Nothing acknowledged is lost.
    printed = lost = unfinished = needs_operator = 0
    for (ns, job_id), copies in sorted(acked.items()):
        job = state.get(f"job/{ns}/{job_id}")
        if job is None:
            lost += copies
            report.violations.append(f"lost: acknowledged job {ns}/{job_id} ({copies} copies) is not in the "
                                     "final state")
            continue
        by_index = {c["index"]: c for c in job.get("copies", [])}
        for i in range(copies):
            copy = by_index.get(i)
            if copy is None:
                lost += 1
                report.violations.append(f"lost: copy {i} of acknowledged job {ns}/{job_id} is missing")
                continue
            st = copy.get("state")
            names = [start_name(job_id, i, si, r, s["file"])
                     for si, s in enumerate(job["sets"]) for r in range(int(s.get("count", 1)))]
            if st == "done":
                missing = [n for n in names if started[n] == 0]
                if missing:
                    lost += 1
                    report.violations.append(f"lost: copy {i} of {ns}/{job_id} is done but its printer never "
                                             f"started {', '.join(missing)}")
                else:
                    printed += 1
            elif st in ACTIVE:
                unfinished += 1
            elif st in NEEDS_OPERATOR:
                needs_operator += 1
                node = copy.get("node")
                report.notes.append(f"copy {i} of {ns}/{job_id} is {st} on {node}: {copy.get('reason')}")
                began = copy.get("started_at")
                if kills is not None and st == "failed" and "restarted" in str(copy.get("reason")) \
                        and began is not None and not any(t >= began - 1.0 for t in kills.get(str(node), ())):
                    report.violations.append(
                        f"false failure: copy {i} of {ns}/{job_id} is failed as restarted during its print, but "
                        f"{node} was not killed after it started (at {began})")
            else:
                lost += 1
                report.violations.append(f"lost: copy {i} of acknowledged job {ns}/{job_id} is {st}")

    # No copy is started twice (quorum); every double start is reported (available).
    doubles = double_starts(journals)
    conflicts = 0
    conflicting: set[tuple[str, str, int]] = set()
    for key, job in state.items():
        if not key.startswith("job/"):
            continue
        for c in job.get("copies", []):
            if c.get("conflict"):
                conflicts += 1
                conflicting.add((job["namespace"], job["id"], c["index"]))
    event_conflicts = sum(1 for r in history if r.get("type") == "event"
                          and (r.get("event") or {}).get("event") == "conflict")
    for name, nodes in sorted(doubles.items()):
        parsed = parse_start_name(name)
        if safety == "quorum":
            report.violations.append(f"double start: {name} started {len(nodes)} times, by {', '.join(nodes)}")
        elif parsed is None or not any(job == parsed[0] and idx == parsed[1] for _, job, idx in conflicting):
            report.violations.append(f"unreported double start: {name} started by {', '.join(nodes)} and no "
                                     "conflict was reported")

    # Replicas converge.
    diverged = divergence(replicas)
    for line in diverged:
        report.violations.append(f"divergence: {line}")

    # Reads: a queue listed after an add was acknowledged should show it (informational).
    stale = 0
    acked_at = {(o.get("namespace") or "default", o.get("job")): o.get("completed_at")
                for o in ops.values() if o.get("op") == "add" and o["type"] == "ok"}
    for o in ops.values():
        if o.get("path") != "queue/list" or o["type"] != "ok":
            continue
        listed = {(j.get("namespace"), j.get("id")) for j in (o.get("data") or {}).get("jobs", [])}
        for ref, at in acked_at.items():
            if at is not None and o.get("invoked_at") is not None and at < o["invoked_at"] and ref not in listed:
                stale += 1
                report.notes.append(f"stale read: queue/list invoked at {o['invoked_at']} misses {ref[1]}, "
                                    f"acknowledged at {at}")
                break

    adds = [o for o in ops.values() if o.get("op") == "add"]
    indeterminate = [o for o in adds if o["type"] in ("info", "pending")]
    applied_anyway = sum(1 for o in indeterminate
                         if f"job/{o.get('namespace') or 'default'}/{o.get('job')}" in state)
    report.counts = {
        "adds": len(adds),
        "acknowledged_jobs": len(acked),
        "acknowledged": sum(acked.values()),
        "printed": printed,
        "unfinished": unfinished,
        "needs_operator": needs_operator,
        "lost": lost,
        "refused": sum(1 for o in adds if o["type"] == "fail"),
        "indeterminate": len(indeterminate),
        "indeterminate_applied": applied_anyway,
        "starts": sum(started.values()),
        "double_starts": sum(len(n) - 1 for n in doubles.values()),
        "conflicts_reported": max(conflicts, event_conflicts),
        "diverged_keys": len(diverged),
        "stale_reads": stale,
    }
    return report


def totals(reports: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Sum the counts of many runs' ``Report.as_dict()``; ``runs`` and ``failed_runs`` added."""
    out: Counter[str] = Counter()
    for r in reports:
        out["runs"] += 1
        out["failed_runs"] += 0 if r.get("ok") else 1
        for k, v in (r.get("counts") or {}).items():
            out[k] += int(v)
    return dict(out)
