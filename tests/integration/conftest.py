"""Guards for the integration tier."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def collect_garbage_after() -> Iterator[None]:
    """Collect garbage after each test, so that a socket or session it left unclosed is reported (as an error,
    under ``filterwarnings = error``) on that test, not on whichever later test the collector happens to run in.
    Only this tier: its tests open real sockets, and a full collection after each of the unit tests would cost
    about a minute of CPU."""
    yield
    gc.collect()
