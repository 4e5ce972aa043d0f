"""A real OctoPrint 1.11 with its virtual printer, for tests.

OctoPrint lives in a virtual environment of its own, ``.octoprint-venv/`` (``scripts/install-octoprint.sh``):
it pins psutil<7, zeroconf<0.137 and Click<8.3, so it cannot share netqueues' environment. Without that
environment the fixtures skip, or fail when ``CI=true`` (CI must run these tests, never skip them).

* :func:`start_octoprint` sets up a temporary base directory headlessly (admin user with a known API key, no
  first-run wizard, no online check, no zeroconf ``discovery`` plugin, virtual printer enabled, no serial
  autoconnect) and runs ``octoprint serve`` on 127.0.0.1 and a free port until ``/api/version`` answers 200.
* ``octoprint_factory`` (session) starts as many servers as a test needs (two nodes, two OctoPrints) and stops
  them all at the end of the session; ``octoprint_server`` (session) is one of them.

Import the fixtures into a ``conftest.py`` (``from tests.octoprint_fixture import octoprint_server``) or into a
test module.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

# Settings of OctoPrint's bundled virtual_printer plugin (octoprint/plugins/virtual_printer/__init__.py).
# Moves already run at a tenth of their real duration and G4 dwells in full, so test files control their
# own length with G4. What we change: no periodic "wait" lines when idle, no simulated transmission errors,
# and no "busy" echoes during dwells. (``throttle`` is among the defaults but unused by 1.11's virtual.py.)
VIRTUAL_PRINTER_SETTINGS: dict[str, Any] = {
    "enabled": True,
    "okAfterResend": True,
    "resend_ratio": 0,
    "sendWait": False,
    "sendBusy": False,
    "simulateReset": True,
    "throttle": 0,
    "locked": False,
}

# Plugins that reach out to the network or nag on first run; ``discovery`` would advertise over zeroconf.
DISABLED_PLUGINS = [
    "discovery",
    "tracking",
    "announcements",
    "softwareupdate",
    "errortracking",
    "pi_support",
    "achievements",
    "firmware_check",
    "pluginmanager",
    "backup",
    "health_check",
]


def octoprint_venv() -> Path:
    return Path(os.environ.get("OCTOPRINT_VENV", REPO_ROOT / ".octoprint-venv"))


def octoprint_executable() -> Path | None:
    exe = octoprint_venv() / "bin" / "octoprint"
    return exe if exe.is_file() and os.access(exe, os.X_OK) else None


def require_octoprint() -> Path:
    """The ``octoprint`` executable; skip the test without it, or fail it when ``CI=true``."""
    exe = octoprint_executable()
    if exe is None:
        reason = f"OctoPrint is not installed in {octoprint_venv()}: run `bash scripts/install-octoprint.sh`"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason + " (CI=true: these tests must run)")
        pytest.skip(reason)
    return exe


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def setup_basedir(
    exe: Path, basedir: Path, api_key: str, *, virtual_printer: dict[str, Any] | None = None
) -> None:
    """Headless set-up: an admin user holding ``api_key``, and a config.yaml that skips every wizard."""
    basedir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            str(exe),
            "--basedir",
            str(basedir),
            "user",
            "add",
            "--password",
            secrets.token_urlsafe(16),
            "--admin",
            "admin",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    users_file = basedir / "users.yaml"
    users = yaml.safe_load(users_file.read_text())
    users["admin"]["apikey"] = api_key
    users_file.write_text(yaml.safe_dump(users))

    config_file = basedir / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) if config_file.exists() else None) or {}
    config.setdefault("server", {}).update(
        {
            "firstRun": False,
            "onlineCheck": {"enabled": False},
            "pluginBlacklist": {"enabled": False},
            "pythonEolCheck": {"enabled": False},
        }
    )
    serial = config.setdefault("serial", {})
    serial["autoconnect"] = False
    # On pause OctoPrint sends M400 then M114 and waits for the position, up to positionLogWait (10 s). With
    # the virtual printer the M114 is sometimes held back until that timer fires when the pause lands during
    # a G4 dwell (1.11.8): Pausing then lasts 10 s. A real printer answers; tests bound the wait instead.
    serial.setdefault("timeout", {})["positionLogWait"] = 1.0
    plugins = config.setdefault("plugins", {})
    plugins["_disabled"] = list(DISABLED_PLUGINS)
    plugins["virtual_printer"] = {**VIRTUAL_PRINTER_SETTINGS, **(virtual_printer or {})}
    config_file.write_text(yaml.safe_dump(config))


@dataclass
class OctoPrintServer:
    """One running ``octoprint serve``; :meth:`stop` and :meth:`start` may be called repeatedly."""

    exe: Path
    basedir: Path
    api_key: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    startup_seconds: float | None = None
    _log: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.basedir / "serve.log"

    def log_tail(self, lines: int = 60) -> str:
        # serve.log holds stdout and stderr: OctoPrint's log plus anything printed before logging started.
        if not self.log_path.exists():
            return "(no log)"
        text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.log_path} ---\n" + "\n".join(text)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Start ``octoprint serve`` and wait (bounded) for a 200 on /api/version."""
        if self.running:
            return
        cmd = [
            str(self.exe),
            "serve",
            "--basedir",
            str(self.basedir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        if os.geteuid() == 0:
            cmd.append("--iknowwhatimdoing")
        self._log = self.log_path.open("ab")
        began = time.monotonic()
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.basedir
        )
        deadline = began + timeout
        with requests.Session() as http:
            while True:
                if self.process.poll() is not None:
                    self._close_log()
                    raise RuntimeError(
                        f"octoprint serve exited with {self.process.returncode} during start-up\n"
                        + self.log_tail()
                    )
                try:
                    reply = http.get(
                        f"{self.url}/api/version", headers={"X-Api-Key": self.api_key}, timeout=2
                    )
                    if reply.status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"OctoPrint did not answer 200 on /api/version within {timeout:.0f}s\n"
                        + self.log_tail()
                    )
                time.sleep(0.1)  # polling interval of a bounded wait, not synchronisation
        self.startup_seconds = time.monotonic() - began

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if OctoPrint has not exited within ``timeout``. Idempotent."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def start_octoprint(
    basedir: Path,
    *,
    exe: Path | None = None,
    virtual_printer: dict[str, Any] | None = None,
    timeout: float = STARTUP_TIMEOUT,
    attempts: int = 3,
) -> OctoPrintServer:
    """Set up ``basedir`` (it should be empty) and start an OctoPrint in it on a free port of 127.0.0.1."""
    exe = exe or require_octoprint()
    api_key = secrets.token_hex(16)
    setup_basedir(exe, basedir, api_key, virtual_printer=virtual_printer)
    last: Exception | None = None
    for _ in range(attempts):
        # Another process may take the port between free_port() and OctoPrint's bind: try another one.
        server = OctoPrintServer(exe=exe, basedir=basedir, api_key=api_key, port=free_port())
        try:
            server.start(timeout)
            return server
        except RuntimeError as exc:
            last = exc
            if "Address already in use" not in str(exc):
                raise
    assert last is not None
    raise last


OctoPrintFactory = Callable[..., OctoPrintServer]


@pytest.fixture(scope="session")
def octoprint_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OctoPrintFactory]:
    """``make(**kwargs) -> OctoPrintServer``: start a fresh OctoPrint; all are stopped after the session."""
    exe = require_octoprint()
    servers: list[OctoPrintServer] = []

    def make(**kwargs: Any) -> OctoPrintServer:
        server = start_octoprint(tmp_path_factory.mktemp("octoprint"), exe=exe, **kwargs)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
    for server in servers:
        shutil.rmtree(server.basedir, ignore_errors=True)


@pytest.fixture(scope="session")
def octoprint_server(octoprint_factory: OctoPrintFactory) -> OctoPrintServer:
    """One OctoPrint shared by the session; tests leave its printer connected and idle."""
    return octoprint_factory()
