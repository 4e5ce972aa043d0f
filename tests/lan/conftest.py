"""The LAN tier: network namespaces (root, iproute2). Without them it says why and skips, except in CI
(``CI=true``), where a LAN test that cannot run fails instead."""

from __future__ import annotations

import functools
import os

import pytest

from tests.lan.netns import lan_unsupported, sweep_stale


@functools.cache
def _unsupported() -> str | None:
    reason = lan_unsupported()
    if reason is None:
        sweep_stale()  # namespaces left by an earlier run that crashed
    return reason


def require_lan() -> None:
    """Skip (or, with CI=true, fail) when network namespaces cannot be used here."""
    reason = _unsupported()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the LAN tier must run in CI, but cannot: {reason}", pytrace=False)
    pytest.skip(f"LAN tier skipped: {reason}")


@pytest.fixture(autouse=True)
def _lan_guard(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("lan") is not None:
        require_lan()


SUMMARY: dict[str, object] = {}  # filled by the chaos run, printed at the end of the session


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if SUMMARY:
        terminalreporter.write_sep("=", "LAN fault tests")
        terminalreporter.write_line(str(SUMMARY.get("line")))
        terminalreporter.write_line(f"details: {SUMMARY.get('path')}")
