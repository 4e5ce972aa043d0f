"""Seeded fault schedules on a LAN of network namespaces; the checker's verdict for each.

CI runs the fixed set ``CI_SEEDS``; ``make chaos SEEDS=200`` (``NETQ_CHAOS_SEEDS=200``) runs seeds 1..200;
``NETQ_CHAOS_SEED=7,12`` runs just those. Seeds run in separate processes, ``NETQ_CHAOS_PARALLEL`` at a time
(default 4). Each seed leaves its history, schedule, node logs, journals and replicas under the pytest temp
dir, or ``$NETQ_CHAOS_DIR`` (``seed-N/``); the totals go to ``chaos-summary.json`` there (and to
``$NETQ_CHAOS_SUMMARY`` if set).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest

from tests.lan import checker
from tests.lan.chaos import HARD_TIMEOUT_S, run_many, summary_line
from tests.lan.conftest import SUMMARY, require_lan

CI_SEEDS = list(range(1, 25))


def _seeds() -> list[int]:
    if os.environ.get("NETQ_CHAOS_SEED"):
        return [int(s) for s in os.environ["NETQ_CHAOS_SEED"].split(",") if s.strip()]
    if os.environ.get("NETQ_CHAOS_SEEDS"):
        return list(range(1, int(os.environ["NETQ_CHAOS_SEEDS"]) + 1))
    return CI_SEEDS


SEEDS = _seeds()
PARALLEL = max(1, int(os.environ.get("NETQ_CHAOS_PARALLEL", "4")))
SAFETY = os.environ.get("NETQ_CHAOS_SAFETY", "quorum")  # "available": every double start must be reported
# Bounded: every seed is killed after HARD_TIMEOUT_S (+ a grace); this is the whole set's worst case.
BUDGET_S = 120 + math.ceil(len(SEEDS) / PARALLEL) * (HARD_TIMEOUT_S + 70)


@pytest.fixture(scope="session")
def chaos_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    require_lan()
    keep = os.environ.get("NETQ_CHAOS_DIR")  # outlives pytest's rotation of its temp dirs
    root = Path(keep) if keep else tmp_path_factory.mktemp("chaos")
    root.mkdir(parents=True, exist_ok=True)
    results = run_many(SEEDS, root, parallel=PARALLEL, safety=SAFETY)
    totals = checker.totals(results.values())
    summary = {"seeds": SEEDS, "parallel": PARALLEL, "safety": SAFETY, "totals": totals, "line": summary_line(results),
               "runs": {str(s): {k: r.get(k) for k in ("ok", "counts", "violations", "schedule", "seconds",
                                                       "workdir")} for s, r in sorted(results.items())}}
    text = json.dumps(summary, indent=1)
    (root / "chaos-summary.json").write_text(text)
    if os.environ.get("NETQ_CHAOS_SUMMARY"):
        Path(os.environ["NETQ_CHAOS_SUMMARY"]).write_text(text)
    SUMMARY.update(summary, path=str(root / "chaos-summary.json"))
    return results


def _explain(result: dict[str, Any]) -> str:
    lines = [f"seed {result.get('seed')}: {result.get('schedule')}", f"workdir: {result.get('workdir')}",
             *[f"  VIOLATION {v}" for v in result.get("violations", [])],
             f"counts: {json.dumps(result.get('counts'))}"]
    if result.get("logs"):
        lines.append(str(result["logs"]))
    return "\n".join(lines)


@pytest.mark.lan
@pytest.mark.timeout(BUDGET_S)
@pytest.mark.parametrize("seed", SEEDS)
def test_schedule_keeps_every_promise(chaos_results: dict[int, dict[str, Any]], seed: int) -> None:
    """Nothing acknowledged is lost, no copy starts twice, replicas converge, the queue drains."""
    result = chaos_results[seed]
    assert result.get("ok"), _explain(result)


@pytest.mark.lan
@pytest.mark.timeout(BUDGET_S)
def test_totals(chaos_results: dict[int, dict[str, Any]]) -> None:
    totals = checker.totals(chaos_results.values())
    print(summary_line(chaos_results))
    assert totals["runs"] == len(SEEDS)
    assert totals.get("acknowledged", 0) > 0, "no add was acknowledged in any run: the harness is not testing"
    assert totals.get("lost", 0) == 0, summary_line(chaos_results)
    if SAFETY == "quorum":
        assert totals.get("double_starts", 0) == 0, summary_line(chaos_results)
