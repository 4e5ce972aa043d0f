"""Without network namespaces the LAN tier skips and says why, except in CI, where it fails."""

from __future__ import annotations

import pytest

from tests.lan import conftest


def test_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "_unsupported", lambda: "the LAN tier needs root (network namespaces)")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        conftest.require_lan()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="must run in CI"):
        conftest.require_lan()


def test_runs_when_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conftest, "_unsupported", lambda: None)
    monkeypatch.setenv("CI", "true")
    conftest.require_lan()  # neither skips nor fails
