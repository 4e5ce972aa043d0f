"""A LAN made of Linux network namespaces, and real node agents running on it.

Layout of one :class:`Lan` (run id ``R``, six hex digits, so that concurrent runs never share a name):

```
nq-R-br   the switch: bridges br0 (the LAN) and br1, br2 (the far sides of partitions), one port per host
nq-R-h1   a host: lo, and eth0 (10.77.0.11/24) whose peer is port h1 of the switch
...
nq-R-c    the client: eth0 (10.77.0.2/24) on br0, where test clients talk to the farm as a LAN client would
```

Every address exists only inside these namespaces; the machine's own interfaces and routes are never touched,
and no traffic leaves them. Faults act on the switch (a port down, a port moved to another bridge) or on a
link's queueing discipline (netem), so a cut-off host sees no connection reset, just silence.

Clean-up: :meth:`Lan.destroy` kills every process in the run's namespaces and deletes them; it runs from the
context manager, from ``atexit``, and (for runs whose owner died, e.g. ``kill -9`` of pytest) from
:func:`sweep_stale` at the start of the next run. Node processes also get ``PR_SET_PDEATHSIG`` so that they die
with the harness process. Each run writes ``/run/netqueues-lan/R.pid`` before it creates anything: a namespace
whose run has no live owner is stale.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from node.demo.farm import render_toml
from node.worker.printers.simulated import StartRecord, read_journal
from shared import security

log = logging.getLogger(__name__)

PREFIX = "nq-"
LOCK_DIR = Path("/run/netqueues-lan")
SUBNET = "10.77.0"
CLIENT_ADDR = f"{SUBNET}.2"
REPO = Path(__file__).resolve().parents[2]
PYTHON = Path(sys.executable)
IP_TIMEOUT_S = 10.0
BRIDGES = 3  # br0 is the LAN; br1, br2 are the far sides of partitions

# Timing for fault tests: fast failover, a lease short enough that a pause outlives it.
CHAOS_TIMING: dict[str, float] = {"heartbeat_s": 0.2, "election_timeout_s": 0.8, "lease_s": 2.5,
                                  "lock_delay_s": 0.5, "node_timeout_s": 2.0, "work_retry_s": 0.5}


class LanError(RuntimeError):
    """The namespace LAN could not be built or driven."""


# --- ip(8) -------------------------------------------------------------------------------------------------
def run(argv: Sequence[str], *, check: bool = True, timeout: float = IP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LanError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["ip", *(["-n", ns] if ns else []), *args], check=check)


def tc(*args: str, ns: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["tc", "-n", ns, *args], check=check)


def namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lan_unsupported() -> str | None:
    """Why the LAN tier cannot run here (None: it can): root, ip(8), tc(8), and a namespace that can be made."""
    if os.geteuid() != 0:
        return "the LAN tier needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the LAN tier needs {tool}(8) (iproute2)"
    probe = f"{PREFIX}p{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        ip("netns", "add", probe)
        ip("link", "add", "name", "p0", "type", "veth", "peer", "name", "p1", ns=probe)
        ip("link", "add", "name", "b0", "type", "bridge", ns=probe)
        tc("qdisc", "add", "dev", "p0", "root", "tbf", "rate", "1mbit", "burst", "1600", "latency", "50ms",
           ns=probe)
    except (LanError, OSError, subprocess.TimeoutExpired) as exc:
        return f"network namespaces with veth and bridge are not available here: {exc}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def netem_supported() -> bool:
    """Whether this kernel has sch_netem (some minimal kernels lack it; :meth:`Lan.set_slow` works anyway)."""
    probe = f"{PREFIX}p{os.getpid()}-probe{secrets.token_hex(2)}"
    try:
        ip("netns", "add", probe)
        ip("link", "add", "name", "p0", "type", "veth", "peer", "name", "p1", ns=probe)
        return tc("qdisc", "add", "dev", "p0", "root", "netem", "delay", "1ms", ns=probe, check=False).returncode == 0
    except LanError:
        return False
    finally:
        ip("netns", "del", probe, check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace(ns: str) -> None:
    """SIGKILL every process in ``ns`` (they were all started by this harness), then delete it."""
    for _ in range(5):
        pids = [int(p) for p in ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)  # a stopped process must be able to die
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    ip("netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete the namespaces of earlier runs whose owner process is gone; returns what was removed."""
    removed = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        parts = ns.split("-")
        run_id = parts[1] if len(parts) >= 3 else ""
        if run_id[:1] == "p" and run_id[1:].isdigit():  # a probe of lan_unsupported(): its owner is in its name
            owner_alive = _pid_alive(int(run_id[1:]))
        else:
            lock = LOCK_DIR / f"{run_id}.pid"
            try:
                owner_alive = _pid_alive(int(lock.read_text().strip()))
            except (OSError, ValueError):
                owner_alive = False
        if not owner_alive:
            _kill_namespace(ns)
            removed.append(ns)
    if LOCK_DIR.exists():
        live_runs = {ns.split("-")[1] for ns in namespaces() if ns.startswith(PREFIX) and ns.count("-") >= 2}
        for lock in LOCK_DIR.glob("*.pid"):
            if lock.stem not in live_runs:
                with contextlib.suppress(OSError, ValueError):
                    if _pid_alive(int(lock.read_text().strip())):
                        continue
                lock.unlink(missing_ok=True)
    if removed:
        log.warning("removed %d stale namespaces of crashed LAN runs: %s", len(removed), ", ".join(removed))
    return removed


# --- the LAN -----------------------------------------------------------------------------------------------
@dataclass
class Host:
    index: int
    name: str  # h1, h2, ...; also the switch port's interface name
    ns: str
    addr: str


class Lan:
    """N host namespaces and a client namespace on a switch namespace. A context manager; see the module doc."""

    def __init__(self, hosts: int, *, run_id: str | None = None) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("1..200 hosts")
        self.run_id = run_id or secrets.token_hex(3)
        self.switch = f"{PREFIX}{self.run_id}-br"
        self.hosts = [Host(i, f"h{i}", f"{PREFIX}{self.run_id}-h{i}", f"{SUBNET}.{10 + i}")
                      for i in range(1, hosts + 1)]
        self.client = Host(0, "cl", f"{PREFIX}{self.run_id}-c", CLIENT_ADDR)
        self.lock = LOCK_DIR / f"{self.run_id}.pid"
        self._made: list[str] = []
        self._destroyed = False
        self.down: set[str] = set()  # switch ports that are down
        self.groups: dict[str, int] = {}  # switch port -> bridge index, for ports not on br0
        self.netem: set[str] = set()

    def __enter__(self) -> Self:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    @property
    def all_hosts(self) -> list[Host]:
        return [*self.hosts, self.client]

    def create(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        self.lock.write_text(str(os.getpid()))
        atexit.register(self.destroy)
        try:
            self._add_ns(self.switch)
            for b in range(BRIDGES):
                ip("link", "add", "name", f"br{b}", "type", "bridge", "forward_delay", "0", "mcast_snooping", "0",
                   ns=self.switch)
                ip("link", "set", "dev", f"br{b}", "up", ns=self.switch)
            for host in self.all_hosts:
                self._add_ns(host.ns)
                # Both ends are created inside namespaces: nothing ever appears in the root namespace.
                ip("link", "add", "name", host.name, "type", "veth", "peer", "name", "eth0", "netns", host.ns,
                   ns=self.switch)
                ip("link", "set", "dev", host.name, "master", "br0", ns=self.switch)
                ip("link", "set", "dev", host.name, "up", ns=self.switch)
                ip("addr", "add", f"{host.addr}/24", "dev", "eth0", ns=host.ns)
                ip("link", "set", "dev", "eth0", "up", ns=host.ns)
                # mDNS goes out of eth0 even without a default route (there is none: nothing leaves the LAN).
                ip("route", "add", "224.0.0.0/4", "dev", "eth0", ns=host.ns)
        except BaseException:
            self.destroy()
            raise

    def _add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self._made.append(ns)
        ip("link", "set", "dev", "lo", "up", ns=ns)

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        for ns in reversed(self._made):
            _kill_namespace(ns)
        self.lock.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            atexit.unregister(self.destroy)

    def host(self, name: str) -> Host:
        for h in self.all_hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def exec_argv(self, host: Host, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host.ns, *argv]

    # --- faults ------------------------------------------------------------------------------------------
    def link_down(self, host: Host) -> None:
        """Pull the host's cable at the switch: its eth0 loses carrier, nothing is reset, packets vanish."""
        ip("link", "set", "dev", host.name, "down", ns=self.switch)
        self.down.add(host.name)

    def link_up(self, host: Host) -> None:
        ip("link", "set", "dev", host.name, "up", ns=self.switch)
        self.down.discard(host.name)

    def partition(self, groups: Sequence[Sequence[Host]]) -> None:
        """Split the LAN: ``groups[0]`` (and the client) stays on br0, ``groups[k]`` moves to bridge k."""
        if len(groups) > BRIDGES:
            raise ValueError(f"at most {BRIDGES} sides")
        for b, group in enumerate(groups):
            for host in group:
                ip("link", "set", "dev", host.name, "master", f"br{b}", ns=self.switch)
                if b:
                    self.groups[host.name] = b
                else:
                    self.groups.pop(host.name, None)

    def heal_partition(self) -> None:
        for name in list(self.groups):
            ip("link", "set", "dev", name, "master", "br0", ns=self.switch)
            del self.groups[name]

    def set_netem(self, host: Host, delay_ms: int, jitter_ms: int, loss_pct: float) -> None:
        """Random delay and loss on the host's link, both ways (needs the kernel's sch_netem: see
        :func:`netem_supported`; the switch port shapes what the host receives, eth0 what it sends)."""
        spec = ["netem", "delay", f"{delay_ms}ms", f"{jitter_ms}ms", "loss", f"{loss_pct}%"]
        self._qdisc(host, spec)

    def set_slow(self, host: Host, rate_kbit: int, latency_ms: int) -> None:
        """A slow, congested link both ways: a token bucket (tbf) that queues up to ``latency_ms`` and drops the
        rest at the tail. Works without sch_netem."""
        spec = ["tbf", "rate", f"{rate_kbit}kbit", "burst", "1600", "latency", f"{latency_ms}ms"]
        self._qdisc(host, spec)

    def _qdisc(self, host: Host, spec: list[str]) -> None:
        tc("qdisc", "replace", "dev", host.name, "root", *spec, ns=self.switch)
        tc("qdisc", "replace", "dev", "eth0", "root", *spec, ns=host.ns)
        self.netem.add(host.name)

    def clear_netem(self, host: Host) -> None:
        """Remove delay, loss or rate limits from the host's link."""
        tc("qdisc", "del", "dev", host.name, "root", ns=self.switch, check=False)
        tc("qdisc", "del", "dev", "eth0", "root", ns=host.ns, check=False)
        self.netem.discard(host.name)

    def heal_all(self) -> None:
        """Every link up, one bridge, no netem."""
        self.heal_partition()
        for name in list(self.down):
            self.link_up(self.host(name))
        for name in list(self.netem):
            self.clear_netem(self.host(name))


# --- node agents on the LAN --------------------------------------------------------------------------------
def die_with_parent() -> list[str]:
    """A command prefix that makes the child die with the harness (PR_SET_PDEATHSIG, kept across the exec of
    ``ip netns exec`` and python), so a harness killed with -9 leaves no node running; [] without setpriv."""
    return ["setpriv", "--pdeathsig", "KILL"] if shutil.which("setpriv") else []


@dataclass
class LanNode:
    host: Host
    node_id: str
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False  # SIGSTOPped
    restarts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.data_dir / "netq.toml"

    @property
    def journal(self) -> Path:
        return self.data_dir / "printer-journal.jsonl"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    @property
    def replica_path(self) -> Path:
        return self.data_dir / "replica.db"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def runtime(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads((self.data_dir / "runtime.json").read_text()))
        except (OSError, ValueError):
            return None

    def starts(self) -> list[StartRecord]:
        return read_journal(self.journal)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


class LanFarm:
    """One node agent process per host of a :class:`Lan`, each in its namespace, bound to its own address."""

    def __init__(self, lan: Lan, root: Path, *, time_scale: float = 60.0, timing: dict[str, float] | None = None,
                 safety: str = "quorum", verbose: bool = False, key: str | None = None) -> None:
        self.lan = lan
        self.key = key or security.new_farm_key()  # every farm has a key (docs/security.md)
        self.root = root
        self.time_scale = time_scale
        self.timing = dict(CHAOS_TIMING if timing is None else timing)
        self.safety = safety
        self.verbose = verbose
        self.nodes = [LanNode(h, f"n{h.index}", root / f"n{h.index}") for h in lan.hosts]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        for name in [k for k in self.env if k.startswith("NETQ_")]:
            del self.env[name]  # a node takes its settings from its file only

    def node(self, node_id: str) -> LanNode:
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(node_id)

    def by_addr(self, addr: str) -> LanNode | None:
        for n in self.nodes:
            if n.host.addr == addr:
                return n
        return None

    def config(self, node: LanNode) -> dict[str, Any]:
        addr = node.host.addr
        return {
            "node_id": node.node_id, "data_dir": str(node.data_dir),
            "farm": {"base_topic": "netq", "safety": self.safety, "key": self.key},
            "broker": {"bind": addr, "port": 1883, "interfaces": [addr], "priority": 10},
            "timing": self.timing,
            "printer": {"driver": "simulated", "time_scale": self.time_scale, "journal": str(node.journal),
                        "self_clearing": True},
            "files": {"bind": addr, "port": 8080},
            "homeassistant": {"enabled": False},
        }

    def start_node(self, node: LanNode) -> None:
        if node.alive:
            raise LanError(f"{node.node_id} is already running")
        node.data_dir.mkdir(parents=True, exist_ok=True)
        node.config_path.write_text(render_toml(self.config(node)))
        (node.data_dir / "runtime.json").unlink(missing_ok=True)
        argv = [str(PYTHON), "-m", "tests.lan.node_main", "run", "--config", str(node.config_path)]
        if self.verbose:
            argv.append("-vv")
        with node.log_path.open("ab") as out:
            out.write(f"=== start {node.node_id} at {time.time():.3f} ===\n".encode())
            out.flush()
            node.proc = subprocess.Popen(
                [*die_with_parent(), *self.lan.exec_argv(node.host, argv)], stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=self.env, cwd=str(REPO), start_new_session=True,
            )
        node.stopped = False

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)

    def kill(self, node: LanNode) -> None:
        """``kill -9``: no goodbye, no DISCONNECT, the kernel closes its sockets."""
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(signal.SIGKILL)
            if node.stopped:
                node.proc.send_signal(signal.SIGCONT)
            node.proc.wait(timeout=10)
        node.stopped = False

    def restart(self, node: LanNode) -> None:
        """Start it again on the same data directory: it comes back from its SQLite replica."""
        self.kill(node)
        node.restarts += 1
        self.start_node(node)

    def pause(self, node: LanNode) -> None:
        if node.alive and not node.stopped:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
            node.stopped = True

    def resume(self, node: LanNode) -> None:
        if node.alive and node.stopped:
            assert node.proc is not None
            node.proc.send_signal(signal.SIGCONT)
        node.stopped = False

    def stop(self) -> None:
        """SIGTERM every node (a clean stop), then SIGKILL what is left."""
        for node in self.nodes:
            if node.alive:
                assert node.proc is not None
                if node.stopped:
                    node.proc.send_signal(signal.SIGCONT)
                node.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=5)

    # --- observing ---------------------------------------------------------------------------------------
    def files_urls(self) -> dict[str, str]:
        out = {}
        for node in self.nodes:
            rt = node.runtime() if node.alive else None
            if rt and rt.get("files_url"):
                out[node.node_id] = str(rt["files_url"])
        return out

    def broker_host(self) -> LanNode | None:
        """The node whose broker most live nodes use (from their runtime files), if any."""
        seen: dict[str, int] = {}
        for node in self.nodes:
            rt = node.runtime() if node.alive and not node.stopped else None
            if rt and rt.get("broker"):
                seen[str(rt["broker"][0])] = seen.get(str(rt["broker"][0]), 0) + 1
        if not seen:
            return None
        addr = max(seen, key=lambda a: seen[a])
        return self.by_addr(addr)

    def journals(self) -> dict[str, list[StartRecord]]:
        return {node.node_id: node.starts() for node in self.nodes}

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Each node's replica as ``{"applied": [term, seq], "objects": {key: {"stamp", "value"}}}``."""
        return {node.node_id: read_replica(node.replica_path) for node in self.nodes}

    def arbiter(self) -> LanNode | None:
        """The running node that says (in its log) it is arbiter of the highest term, if any."""
        best: tuple[int, LanNode] | None = None
        for node in self.nodes:
            if not node.alive:
                continue
            try:
                term = arbiter_from_log(node.log_path.read_text(errors="replace"))
            except OSError:
                continue
            if term is not None and (best is None or term > best[0]):
                best = (term, node)
        return best[1] if best else None

    def logs(self, lines: int = 30) -> str:
        return "\n".join(f"--- {n.node_id} ({'alive' if n.alive else 'dead'}) ---\n{n.log_tail(lines)}"
                         for n in self.nodes)


def read_replica(path: Path) -> dict[str, Any]:
    """A node's SQLite replica, read-only (the node may be running: WAL lets us read a consistent snapshot)."""
    if not path.exists():
        return {"applied": [0, 0], "objects": {}, "meta": {}}
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        objects = {}
        for key, term, seq, value in conn.execute("SELECT key, term, seq, value FROM objects"):
            objects[key] = {"stamp": [term, seq], "value": None if value is None else json.loads(value)}
        meta = {name: json.loads(value) for name, value in conn.execute("SELECT name, value FROM meta")}
    except sqlite3.Error:
        return {"applied": [0, 0], "objects": {}, "meta": {}}
    finally:
        conn.close()
    return {"applied": meta.get("applied", [0, 0]), "objects": objects, "meta": meta}


@contextlib.contextmanager
def lan_farm(hosts: int, root: Path, **kw: Any) -> Iterator[LanFarm]:
    """A LAN and a node on each host; everything is torn down on exit, whatever happened."""
    sweep_stale()
    with Lan(hosts) as lan:
        farm = LanFarm(lan, root, **kw)
        try:
            yield farm
        finally:
            farm.stop()


_ROLE_LINE = re.compile(r": (?P<node>[A-Za-z0-9_-]+): (?:arbiter of term (?P<term>\d+)|(?P<was>\w+) → follower)")


def arbiter_from_log(text: str) -> int | None:
    """The term this node is arbiter of, according to its own log (since its last start), or None."""
    term: int | None = None
    for line in text.splitlines():
        if line.startswith("=== start "):
            term = None
            continue
        m = _ROLE_LINE.search(line)
        if m is None:
            continue
        if m["term"] is not None:
            term = int(m["term"])
        elif m["was"] == "arbiter":
            term = None
    return term
