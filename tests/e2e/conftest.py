"""End-to-end fixtures: real OctoPrint servers (``tests/octoprint_fixture.py``)."""

from __future__ import annotations

from tests.octoprint_fixture import OctoPrintFactory, OctoPrintServer, octoprint_factory, octoprint_server

__all__ = ["OctoPrintFactory", "OctoPrintServer", "octoprint_factory", "octoprint_server"]
