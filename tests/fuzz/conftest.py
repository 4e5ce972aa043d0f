"""Fuzzing with hypothesis: the settings profiles and the count of inputs run.

``HYPOTHESIS_PROFILE`` picks the profile: ``ci`` (the default; a bounded run in every ``make test``) or
``fuzz`` (``make fuzz``: a long run). The profile is applied by each fuzz test (``@FUZZ``), not loaded
globally, so that the other property tests of the suite keep their own settings. At the end of the session
the number of inputs each fuzz test ran is printed (and kept in pytest's cache, key ``fuzz/inputs``).
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings

_COMMON: dict[str, Any] = {
    "deadline": None,  # the farm and the HTTP server run real event loops: timing varies on a shared CI box
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,  # a failure prints how to reproduce it
}
settings.register_profile("ci", max_examples=200, **_COMMON)
settings.register_profile("fuzz", max_examples=20_000, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings(settings.get_profile(PROFILE))

INPUTS: Counter[str] = Counter()  # fuzz test -> inputs run (every call, shrinking included)


def ran(test: str) -> None:
    """Count one input of ``test`` (called from inside the property)."""
    INPUTS[test] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not INPUTS:
        return
    total = sum(INPUTS.values())
    terminalreporter.write_sep("-", f"fuzz ({PROFILE} profile): {total} inputs run")
    for test, n in sorted(INPUTS.items()):
        terminalreporter.write_line(f"{n:8d}  {test}")
    cache = getattr(terminalreporter.config, "cache", None)
    if cache is not None:
        cache.set("fuzz/inputs", {"profile": PROFILE, "total": total, "tests": dict(INPUTS)})

