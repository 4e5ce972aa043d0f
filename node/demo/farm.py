"""A farm of node agent processes on this machine, bound to 127.0.0.1: for the demo, tests and benchmarks.

Each node is a real ``netq run`` process with its own config, data directory, embedded-broker candidacy,
zeroconf bound to loopback, and a simulated printer whose start calls are journaled to disk, so that double
starts can be counted even across ``kill -9``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from node.app.client import FarmClient
from node.worker.printers.simulated import read_journal
from shared import security
from shared.errors import NetqError


@dataclass
class NodeProc:
    node_id: str
    root: Path
    priority: int = 10
    witness: bool = False
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # per section ("printer", "farm", "worker"): overrides

    @property
    def data_dir(self) -> Path:
        return self.root / self.node_id

    @property
    def config_path(self) -> Path:
        return self.data_dir / "netq.toml"

    @property
    def journal(self) -> Path:
        return self.data_dir / "printer-journal.jsonl"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    def runtime(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.data_dir / "runtime.json").read_text()))
        except (OSError, ValueError):
            return None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)


def render_toml(data: dict[str, Any]) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    sections = [f"\n[{k}]\n" + "\n".join(f"{kk} = {_toml_value(vv)}" for kk, vv in v.items() if vv is not None)
                for k, v in data.items() if isinstance(v, dict)]
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"


@contextlib.contextmanager
def mosquitto_broker(workdir: Path, exe: str = "mosquitto", *, key: str | None = None) -> Iterator[tuple[str, int]]:
    """A real mosquitto on 127.0.0.1 and a free port, for tests and benchmarks; stopped on exit.

    ``key``: the farm's key; mosquitto then admits only the farm's roles, with the password file and ACL file
    of `netq credentials mosquitto` (broker.auth). Without it, anonymous clients (an open farm).
    ``max_queued_messages 0``: its default of 1000 drops QoS 1 messages to a slow subscriber.
    ``set_tcp_nodelay true``: mosquitto leaves Nagle's algorithm on by default, which holds a small packet sent
    while the previous one is unacknowledged for up to 40 ms (the client's delayed ACK)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    conf = workdir / "mosquitto.conf"
    auth = None
    if key is None:
        listener = f"listener {port} 127.0.0.1\nallow_anonymous true\n"
    else:
        from broker.auth import TopicPolicy, write_mosquitto_files

        # A folder others may enter: mosquitto started as root reads the files as the user `mosquitto`.
        auth = Path(tempfile.mkdtemp(prefix="netq-mosquitto-"))
        auth.chmod(0o755)
        listener = write_mosquitto_files(auth, security.parse_key(key), TopicPolicy(), host="127.0.0.1",
                                         port=port)["conf"].read_text()
    conf.write_text(f"{listener}max_queued_messages 0\npersistence false\nset_tcp_nodelay true\n")
    log = workdir / "mosquitto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([exe, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise NetqError(f"mosquitto did not start: {log.read_text()}") from None
                time.sleep(0.02)
        yield ("127.0.0.1", port)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if auth is not None:
            shutil.rmtree(auth, ignore_errors=True)


def gcode_for(seconds: float, label: str) -> bytes:
    """A small G-code file whose Cura-style header tells the simulated printer how long it prints."""
    body = [";FLAVOR:Marlin", f";TIME:{seconds:.0f}", f"; netqueues demo part {label}", "G28",
            "M104 S200", "M140 S60"]
    body += [f"G1 X{10 + i % 50} Y{10 + (i * 7) % 50} Z{0.2 + i * 0.2:.1f} E{i * 0.5:.1f}" for i in range(40)]
    body += ["M104 S0", "M140 S0", "M84"]
    return ("\n".join(body) + "\n").encode()


class ProcessFarm:
    """Start, stop, kill and observe node agent processes."""

    def __init__(self, n: int, *, root: Path | None = None, time_scale: float = 60.0,
                 timing: dict[str, Any] | None = None, broker_url: str | None = None,
                 witnesses: int = 0, env: dict[str, str] | None = None, key: str | None = None,
                 open_farm: bool = False) -> None:
        """``key``: the farm key (default: a new one, as `netq init` makes); ``open_farm``: no key at all."""
        self._own_root = root is None
        self.key = None if open_farm else (key or security.new_farm_key())
        self.root = root or Path(tempfile.mkdtemp(prefix="netq-farm-"))
        self.time_scale = time_scale
        self.timing = timing or {}
        self.broker_url = broker_url
        self.env = dict(os.environ, **(env or {}))
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        # With zeroconf, node ids carry a tag of this farm: zeroconf names must be unique among the live nodes
        # on loopback, and another farm (a test, a demo) may be running on this machine at the same time.
        tag = "" if broker_url else "-" + uuid.uuid4().hex[:4]
        self.nodes = [NodeProc(f"n{i}{tag}", self.root) for i in range(1, n + 1)]
        self.nodes += [NodeProc(f"w{i}{tag}", self.root, witness=True, priority=0) for i in range(1, witnesses + 1)]
        self.acknowledged: dict[tuple[str, str], int] = {}  # (namespace, job id) -> copies acknowledged

    # --- processes ---------------------------------------------------------------------------------------
    def config(self, node: NodeProc) -> dict[str, Any]:
        broker: dict[str, Any] = {"bind": "127.0.0.1", "port": 0, "interfaces": ["127.0.0.1"],
                                  "priority": node.priority}
        if self.broker_url:
            broker = {"url": self.broker_url}
        printer: dict[str, Any] = {"driver": "none"} if node.witness else {
            "driver": "simulated", "time_scale": self.time_scale, "journal": str(node.journal),
            "self_clearing": True, **node.extra.get("printer", {})}
        return {
            "node_id": node.node_id, "data_dir": str(node.data_dir), "witness": node.witness,
            "farm": {"base_topic": "netq", **({"key": self.key} if self.key else {"open": True}),
                     **node.extra.get("farm", {})}, "broker": broker,
            "timing": dict(self.timing), "printer": printer, "files": {"bind": "127.0.0.1", "port": 0},
            "worker": dict(node.extra.get("worker", {})), "homeassistant": {"enabled": True},
        }

    def start_node(self, node: NodeProc) -> None:
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(render_toml(self.config(node)))
        (node.data_dir / "runtime.json").unlink(missing_ok=True)
        log = node.log_path.open("ab")
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "node.app.cli", "run", "--config", str(node.config_path),
             *(["-v"] if os.environ.get("NETQFARM_DEBUG") else [])],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True,
        )
        log.close()

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    def kill(self, node: NodeProc, sig: int = signal.SIGKILL) -> None:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                node.proc.wait(timeout=15)

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                node.proc.send_signal(signal.SIGTERM)
        for node in self.nodes:
            if node.proc is not None:
                try:
                    node.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.proc.kill()
                    node.proc.wait(timeout=5)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def logs(self, tail: int = 40) -> str:
        out = []
        for node in self.nodes:
            try:
                lines = node.log_path.read_text(errors="replace").splitlines()[-tail:]
            except OSError:
                lines = ["(no log)"]
            out.append(f"--- {node.node_id} ---\n" + "\n".join(lines))
        return "\n".join(out)

    # --- observing ---------------------------------------------------------------------------------------
    async def broker_address(self, timeout: float = 30.0, exclude: tuple[str, int] | None = None) -> tuple[str, int]:
        """The broker the live nodes use (from their runtime files), once one is up."""
        if self.broker_url:
            from broker.host import parse_broker_url

            return parse_broker_url(self.broker_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen: Counter[tuple[str, int]] = Counter()
            for node in self.nodes:
                rt = node.runtime() if node.alive else None
                if rt and rt.get("broker"):
                    seen[tuple(rt["broker"])] += 1
            for addr, _ in seen.most_common():
                if addr != exclude:
                    return (str(addr[0]), int(addr[1]))
            await asyncio.sleep(0.05)
        raise NetqError(f"no broker came up within {timeout:g}s\n{self.logs()}")

    async def client(self, timeout: float = 30.0, exclude: tuple[str, int] | None = None) -> FarmClient:
        """A client that follows the broker when it moves (it asks the live nodes on every reconnect)."""
        state_key = None if self.key is None else security.state_public_key(security.parse_key(self.key))
        client = FarmClient(await self.broker_address(timeout, exclude), provider=lambda: self.broker_address(timeout),
                            state_key=state_key, **self.credentials(security.Role.OPERATOR))
        await client.connect()
        return client

    def credentials(self, role: security.Role) -> dict[str, str]:
        """FarmClient's username and password for ``role`` (none for an open farm)."""
        if self.key is None:
            return {}
        key = security.parse_key(self.key)
        return {"username": role.value, "password": security.broker_password(key, role)}

    def file_headers(self, role: security.Role = security.Role.OPERATOR) -> dict[str, str]:
        """The file servers' bearer token header for ``role`` (none for an open farm)."""
        if self.key is None:
            return {}
        return {"Authorization": f"Bearer {security.file_token(security.parse_key(self.key), role)}"}

    async def wait_ready(self, client: FarmClient, members: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until an arbiter serves and ``members`` nodes are enrolled."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                data = await client.request("node/list", timeout=2.0)
                last = data
                if sum(1 for n in data["nodes"] if n["enrolled"]) >= members:
                    return data
            except NetqError as exc:
                last = exc
            await asyncio.sleep(0.1)
        raise NetqError(f"farm not ready within {timeout:g}s (last: {last})\n{self.logs()}")

    def starts(self) -> list[str]:
        """Every print start the simulated printers recorded (job-copy-set-run names)."""
        names = []
        for node in self.nodes:
            names += [r.name for r in read_journal(node.journal)]
        return names

    def double_starts(self) -> int:
        return sum(c - 1 for c in Counter(self.starts()).values() if c > 1)

    # --- driving -----------------------------------------------------------------------------------------
    async def upload(self, node: NodeProc, data: bytes) -> str:
        deadline = time.monotonic() + 15
        while not (rt := node.runtime() if node.alive else None):
            if time.monotonic() > deadline or not node.alive:
                raise NetqError(f"{node.node_id} is not running (no runtime.json)\n{self.logs()}")
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as session, \
                session.post(f"{rt['files_url']}/files", data=data, headers=self.file_headers()) as resp:
            if resp.status >= 300:
                raise NetqError(f"upload to {node.node_id} failed: {resp.status} {await resp.text()}")
            body = await resp.json()
        sha = str(body["sha256"])
        assert sha == hashlib.sha256(data).hexdigest()
        return sha

    async def add_jobs(self, client: FarmClient, count: int, *, seed: int = 1, copies: int = 1,
                       min_s: float = 120, max_s: float = 600, namespace: str = "default") -> list[str]:
        """Upload ``count`` generated G-code files round robin to live nodes and queue a job for each."""
        rng = random.Random(seed)
        live = [n for n in self.nodes if n.alive and not n.witness]
        ids = []
        for i in range(count):
            holder = live[i % len(live)]
            data = gcode_for(rng.uniform(min_s, max_s), f"{seed}-{i}")
            sha = await self.upload(holder, data)
            body = {"namespace": namespace, "name": f"part-{i + 1:03d}", "count": copies,
                    "sets": [{"file": f"part-{i + 1:03d}.gcode", "sha256": sha, "count": 1,
                              "holders": [holder.node_id]}]}
            data_ = await client.request("job/add", body, timeout=15)
            self.acknowledged[(namespace, data_["id"])] = copies
            ids.append(data_["id"])
        return ids

    async def queue(self, client: FarmClient) -> list[dict[str, Any]]:
        data = await client.request("queue/list", timeout=5.0)
        return list(data["jobs"])

    async def summary(self, client: FarmClient) -> dict[str, Any]:
        jobs = {(j["namespace"], j["id"]): j for j in await self.queue(client)}
        completed = sum(1 for j in jobs.values() for c in j["copies"] if c["state"] == "done")
        lost = 0  # acknowledged copies that are not (yet) printed: missing from the state, or not done
        for key, copies in self.acknowledged.items():
            job = jobs.get(key)
            done = 0 if job is None else sum(1 for c in job["copies"] if c["state"] == "done")
            lost += max(0, copies - done)
        unfinished = sum(1 for j in jobs.values() for c in j["copies"] if c["state"] != "done")
        return {"acknowledged": sum(self.acknowledged.values()), "completed": completed,
                "double_starts": self.double_starts(), "lost": lost, "unfinished": unfinished,
                "starts": len(self.starts())}
