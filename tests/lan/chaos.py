"""Seeded fault schedules on the namespace LAN, their runner, and the checker's verdict.

One seed gives one deterministic :class:`Schedule`: how many hosts, which faults start and end when (over a
short window), and which client operations happen when. A fault may name its target by role ("the arbiter",
"the broker host"); the runner resolves that at the moment the fault starts. The runner:

1. builds the LAN and starts a node on every host, and the client in its own namespace;
2. waits until an arbiter serves with every node enrolled, uploads the G-code pool to every node;
3. plays the timeline: faults and their heals, job adds (each with its own transaction, retried with it),
   queue reads; every client operation and outcome goes to ``history.jsonl``;
4. at the end of the window heals everything (links up, one bridge, no shaping, every node running);
5. waits (bounded) for the queue to drain and the replicas to converge, then runs :mod:`tests.lan.checker`.

Run one seed by hand (root): ``.venv/bin/python -m tests.lan.chaos --seed 7 --workdir /tmp/chaos-7``; the last
line printed is the JSON report. ``docs/chaos.md`` tells how to read it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.lan import checker
from tests.lan.netns import (
    CHAOS_TIMING,
    PYTHON,
    REPO,
    Lan,
    LanFarm,
    LanNode,
    die_with_parent,
    sweep_stale,
)

log = logging.getLogger("chaos")

TIME_SCALE = 60.0  # simulated seconds per real second
POOL_SECONDS = (30.0, 60.0, 90.0, 150.0)  # simulated print times of the G-code pool: 0.5 .. 2.5 s real
READY_TIMEOUT_S = 45.0
DRAIN_TIMEOUT_S = 60.0
CONVERGE_TIMEOUT_S = 20.0
OP_DEADLINE_S = 20.0
HARD_TIMEOUT_S = 180.0  # one seed, everything included

KINDS: dict[str, float] = {"kill": 3.0, "crash": 1.0, "pause": 2.0, "partition": 2.0, "link_down": 2.0,
                           "slow": 1.0, "flaky": 1.0}


# --- schedules ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Episode:
    """One fault: starts at ``at`` (seconds into the window), healed ``duration`` later."""

    at: float
    kind: str  # kill (then restart), crash (kill and restart at once), pause, partition, link_down, slow, flaky
    target: str  # "arbiter", "broker" or a node id; "all" for a slow link everywhere
    duration: float
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ClientOp:
    at: float  # seconds into the window (negative: before the first fault)
    kind: str  # add | list
    job: dict[str, Any] = field(default_factory=dict)  # for add: id, count, sets [(pool index, set count)]


@dataclass(frozen=True)
class Schedule:
    seed: int
    hosts: int
    window: float
    episodes: tuple[Episode, ...]
    ops: tuple[ClientOp, ...]

    def describe(self) -> str:
        faults = ", ".join(f"{e.kind}({e.target})@{e.at:.1f}+{e.duration:.1f}" for e in self.episodes)
        adds = sum(1 for o in self.ops if o.kind == "add")
        return f"seed {self.seed}: {self.hosts} hosts, {self.window:g}s, {adds} adds; {faults}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_schedule(seed: int, *, hosts: int | None = None, window: float | None = None) -> Schedule:
    """The schedule of ``seed``: deterministic, bounded, every fault healed by the end of the window."""
    rng = random.Random(seed)
    hosts = hosts or rng.choice((3, 3, 4, 5))
    window = window or round(rng.uniform(10.0, 16.0), 1)
    lease = CHAOS_TIMING["lease_s"] + CHAOS_TIMING["lock_delay_s"]
    episodes: list[Episode] = []
    busy_until: dict[str, float] = {}  # kinds that must not overlap themselves (partition, slow "all")
    t = rng.uniform(0.5, 2.0)
    kinds, weights = zip(*KINDS.items(), strict=True)
    while t < window - 1.0:
        kind = rng.choices(kinds, weights)[0]
        roll = rng.random()
        target = "arbiter" if roll < 0.35 else "broker" if roll < 0.55 else f"n{rng.randint(1, hosts)}"
        params: dict[str, Any] = {}
        if kind == "kill":
            duration = rng.uniform(0.3, 4.0)
        elif kind == "crash":
            duration = 0.0
        elif kind == "pause":
            duration = rng.uniform(lease + 0.5, lease + 2.5)  # longer than a lease (and its lock delay)
        elif kind == "partition":
            if busy_until.get("partition", -1.0) > t:
                kind, duration = "link_down", rng.uniform(1.0, 4.0)
            else:
                duration = rng.uniform(2.0, 6.0)
                minority = rng.randint(1, max(1, (hosts - 1) // 2))
                params = {"minority": minority, "three_way": hosts >= 4 and rng.random() < 0.25,
                          "pick": rng.random()}
                busy_until["partition"] = t + duration
        elif kind == "link_down":
            duration = rng.uniform(1.0, 4.0)
        elif kind == "flaky":  # the link flaps: bursts of loss, never a reset
            duration = rng.uniform(2.0, 5.0)
            params = {"down_ms": rng.choice(((50, 200), (100, 400), (200, 800))),
                      "up_ms": rng.choice(((100, 400), (200, 800), (400, 1500))), "flap_seed": rng.randrange(2**31)}
        else:  # slow: a congested link (token bucket, tail drop); sch_netem is not in every kernel
            duration = rng.uniform(2.0, 6.0)
            if rng.random() < 0.4 and busy_until.get("slow-all", -1.0) <= t:
                target = "all"
                busy_until["slow-all"] = t + duration
            params = {"rate_kbit": rng.choice((32, 128, 512)), "latency_ms": rng.choice((50, 200, 500))}
        duration = max(0.0, min(duration, window - t))
        episodes.append(Episode(round(t, 2), kind, target, round(duration, 2), params))
        t += rng.uniform(0.8, 3.5)
    ops: list[ClientOp] = []
    adds = rng.randint(8, 14)
    times = sorted([-1.0] * 3 + [round(rng.uniform(0.0, window), 2) for _ in range(adds - 3)])
    for i, at in enumerate(times):
        sets = [(rng.randrange(len(POOL_SECONDS)), rng.choice((1, 1, 1, 2)))
                for _ in range(rng.choice((1, 1, 1, 2)))]
        ops.append(ClientOp(at, "add", {"id": f"s{seed}j{i:02d}", "count": rng.choice((1, 1, 2, 2, 3)),
                                        "sets": sets}))
    for _ in range(rng.randint(2, 4)):
        ops.append(ClientOp(round(rng.uniform(0.0, window), 2), "list"))
    ops.sort(key=lambda o: o.at)
    return Schedule(seed, hosts, window, tuple(episodes), tuple(ops))


# --- the client process ------------------------------------------------------------------------------------
class ClientProc:
    """``tests/lan/client.py`` running in the client namespace, spoken to over its stdin and stdout."""

    def __init__(self, lan: Lan, history: Path, log_path: Path, key: str) -> None:
        self.lan = lan
        self.key = key
        self.history = history
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None

    async def start(self, timeout: float = 20.0) -> None:
        argv = die_with_parent() + self.lan.exec_argv(self.lan.client, [str(PYTHON), "-m", "tests.lan.client", "--interface",
                                                     self.lan.client.addr, "--history", str(self.history)])
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO), NETQ_LAN_FARM_KEY=self.key)
        self._stderr = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, cwd=str(REPO), env=env,
            start_new_session=True, limit=16 << 20)
        self._ready = asyncio.get_running_loop().create_future()
        self._reader = asyncio.create_task(self._read())
        await asyncio.wait_for(self._ready, timeout)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if msg.get("ready") and self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
                continue
            fut = self._pending.pop(msg.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the chaos client exited"))
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError("the chaos client exited before it was ready"))

    def send(self, cmd: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        assert self.proc is not None and self.proc.stdin is not None
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        self.proc.stdin.write((json.dumps({**cmd, "id": self._next}) + "\n").encode())
        return fut

    async def call(self, cmd: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        msg = await asyncio.wait_for(self.send(cmd), timeout)
        if not msg.get("ok"):
            raise RuntimeError(f"client command {cmd.get('op')} failed: {msg.get('error')}")
        return dict(msg["result"])

    async def request(self, path: str, body: dict[str, Any] | None = None, deadline_s: float = 5.0,
                      label: str | None = None) -> dict[str, Any]:
        return await self.call({"op": "request", "path": path, "body": body or {}, "deadline_s": deadline_s,
                                "label": label or path}, timeout=deadline_s + 15)

    async def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(b'{"op": "quit"}\n')
            await self.proc.stdin.drain()
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        self._stderr.close()


# --- waiting for conditions --------------------------------------------------------------------------------
async def wait_for(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
            last = value
        except Exception as exc:  # noqa: BLE001 - a failed probe is just "not yet"
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout:g}s (last: {last!r})")
        await asyncio.sleep(interval)


async def farm_ready(client: ClientProc, hosts: int) -> bool:
    r = await client.request("node/list", deadline_s=2.0, label="ready")
    if r["type"] != "ok":
        return False
    nodes = r["data"]["nodes"]
    return sum(1 for n in nodes if n.get("enrolled") and n.get("state") == "online") >= hosts


UNSETTLED = {"queued", "claimed", "printing", "orphaned"}


async def drained(client: ClientProc) -> list[dict[str, Any]] | None:
    r = await client.request("queue/list", {"include_done": True}, deadline_s=3.0, label="drain")
    if r["type"] != "ok":
        return None
    jobs = r["data"]["jobs"]
    if any(c["state"] in UNSETTLED for j in jobs for c in j["copies"]):
        return None
    return list(jobs) or None


# --- the runner --------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, schedule: Schedule, workdir: Path, *, safety: str = "quorum") -> None:
        self.s = schedule
        self.workdir = workdir
        self.safety = safety
        self.rng = random.Random(schedule.seed * 7919 + 1)  # resolves runtime choices deterministically
        self.events: list[dict[str, Any]] = []  # what the runner did, when
        self.t0 = 0.0
        self.pool: list[str] = []
        self.op_futures: list[asyncio.Future[dict[str, Any]]] = []

    def note(self, what: str, **kw: Any) -> None:
        rec = {"t": round(time.time(), 4), "rel": round(time.monotonic() - self.t0, 3), "what": what, **kw}
        self.events.append(rec)
        log.info("seed %d +%.2fs %s %s", self.s.seed, rec["rel"], what, kw or "")

    # --- faults ------------------------------------------------------------------------------------------
    def resolve(self, farm: LanFarm, target: str) -> LanNode:
        node: LanNode | None = None
        if target == "arbiter":
            node = farm.arbiter() or farm.broker_host()
        elif target == "broker":
            node = farm.broker_host() or farm.arbiter()
        else:
            node = farm.node(target)
        if node is None:
            node = farm.nodes[self.rng.randrange(len(farm.nodes))]
        return node

    def begin(self, farm: LanFarm, e: Episode) -> Callable[[], None]:
        """Start the fault; return what heals it."""
        lan = farm.lan
        if e.kind == "slow" and e.target == "all":
            hosts = list(lan.hosts)
            for h in hosts:
                lan.set_slow(h, e.params["rate_kbit"], e.params["latency_ms"])
            self.note("slow links", nodes="all", **e.params)

            def heal_all() -> None:
                for h in hosts:
                    lan.clear_netem(h)
                self.note("slow links cleared", nodes="all")
            return heal_all
        node = self.resolve(farm, e.target)
        if e.kind in ("kill", "crash"):
            farm.kill(node)
            self.note("kill -9", node=node.node_id, role=e.target)

            def restart() -> None:
                if not node.alive:
                    farm.start_node(node)
                    node.restarts += 1
                    self.note("restart", node=node.node_id)
            if e.kind == "crash":
                restart()
                return lambda: None
            return restart
        if e.kind == "pause":
            farm.pause(node)
            self.note("SIGSTOP", node=node.node_id, role=e.target)

            def resume() -> None:
                if node.stopped:
                    farm.resume(node)
                    self.note("SIGCONT", node=node.node_id)
            return resume
        if e.kind == "link_down":
            lan.link_down(node.host)
            self.note("link down", node=node.node_id, role=e.target)

            def up() -> None:
                lan.link_up(node.host)
                self.note("link up", node=node.node_id)
            return up
        if e.kind == "slow":
            lan.set_slow(node.host, e.params["rate_kbit"], e.params["latency_ms"])
            self.note("slow link", node=node.node_id, role=e.target, **e.params)

            def clear() -> None:
                lan.clear_netem(node.host)
                self.note("slow link cleared", node=node.node_id)
            return clear
        if e.kind == "flaky":
            task = asyncio.get_running_loop().create_task(self._flap(lan, node, e))
            self.note("flaky link", node=node.node_id, role=e.target)

            def steady() -> None:
                task.cancel()
                lan.link_up(node.host)
                self.note("flaky link steady", node=node.node_id)
            return steady
        if e.kind == "partition":
            others = [n for n in farm.nodes if n is not node]
            self.rng.shuffle(others)
            minority = [node] + others[: e.params["minority"] - 1]
            rest = others[e.params["minority"] - 1:]
            if e.params.get("three_way") and len(rest) >= 2:
                groups = [rest[1:], minority, rest[:1]]
            else:
                groups = [rest, minority]
            lan.partition([[n.host for n in g] for g in groups])
            self.note("partition", sides=[[n.node_id for n in g] for g in groups], role=e.target)

            def heal() -> None:
                lan.heal_partition()
                self.note("partition healed")
            return heal
        raise ValueError(e.kind)

    async def _flap(self, lan: Lan, node: LanNode, e: Episode) -> None:
        """The fault's own timeline: the link goes down and up at seeded random intervals until healed."""
        rng = random.Random(e.params["flap_seed"])
        while True:
            lan.link_down(node.host)
            await asyncio.sleep(rng.uniform(*e.params["down_ms"]) / 1000)
            lan.link_up(node.host)
            await asyncio.sleep(rng.uniform(*e.params["up_ms"]) / 1000)

    def heal_everything(self, farm: LanFarm) -> None:
        farm.lan.heal_all()
        for node in farm.nodes:
            if node.stopped:
                farm.resume(node)
                self.note("SIGCONT", node=node.node_id)
            if not node.alive:
                farm.start_node(node)
                node.restarts += 1
                self.note("restart", node=node.node_id)
        self.note("healed all")

    # --- client ops --------------------------------------------------------------------------------------
    def job_body(self, op: ClientOp) -> dict[str, Any]:
        sets = [{"file": f"pool{p}.gcode", "sha256": self.pool[p], "count": c,
                 "holders": [f"n{i}" for i in range(1, self.s.hosts + 1)]} for p, c in op.job["sets"]]
        return {"namespace": "default", "id": op.job["id"], "name": op.job["id"], "count": op.job["count"],
                "sets": sets}

    def launch(self, client: ClientProc, op: ClientOp) -> None:
        if op.kind == "add":
            fut = client.send({"op": "add", "job": self.job_body(op), "txn": uuid.uuid4().hex,
                               "deadline_s": OP_DEADLINE_S})
        else:
            fut = client.send({"op": "request", "path": "queue/list", "body": {"include_done": True},
                               "deadline_s": 5.0, "txn": uuid.uuid4().hex, "label": "list"})
        self.op_futures.append(fut)

    # --- the whole run -----------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.workdir / "nodes", ignore_errors=True)  # a fresh farm: no replica of an earlier run
        (self.workdir / "schedule.json").write_text(json.dumps(self.s.to_json(), indent=1))
        history = self.workdir / "history.jsonl"
        history.unlink(missing_ok=True)
        self.t0 = time.monotonic()
        result: dict[str, Any] = {"seed": self.s.seed, "hosts": self.s.hosts, "schedule": self.s.describe(),
                                  "workdir": str(self.workdir)}
        sweep_stale()
        with Lan(self.s.hosts) as lan:
            result["run_id"] = lan.run_id
            farm = LanFarm(lan, self.workdir / "nodes", time_scale=TIME_SCALE, safety=self.safety)
            client = ClientProc(lan, history, self.workdir / "client.log", farm.key)
            try:
                await self._run(farm, client, result)
            except Exception as exc:  # noqa: BLE001 - any failure of the run is reported, then cleaned up
                result["error"] = f"{type(exc).__name__}: {exc}"
                self.note("error", error=result["error"])
            finally:
                with contextlib.suppress(Exception):
                    await client.stop()
                farm.stop()
                (self.workdir / "runner.jsonl").write_text("".join(json.dumps(e) + "\n" for e in self.events))
            records = _read_jsonl(history)
            journals = {n: [r.name for r in recs] for n, recs in farm.journals().items()}
            replicas = result.pop("_replicas", None) or farm.replicas()
            kills: dict[str, list[float]] = {}
            for e in self.events:
                if e["what"] == "kill -9":
                    kills.setdefault(e["node"], []).append(e["t"])
            report = checker.check(records, journals, replicas, safety=self.safety, kills=kills)
            if "error" in result:
                report.violations.insert(0, f"run error: {result['error']}")
            if result.get("drain") == "timeout":
                report.violations.append(f"did not drain within {DRAIN_TIMEOUT_S:g}s after the faults healed: "
                                         f"{result.get('unsettled')}")
            result.update(report.as_dict())
            result["seconds"] = round(time.monotonic() - self.t0, 1)
            if not report.ok:
                result["logs"] = farm.logs(25)
        (self.workdir / "report.json").write_text(json.dumps(result, indent=1))
        return result

    async def _run(self, farm: LanFarm, client: ClientProc, result: dict[str, Any]) -> None:
        farm.start()
        await client.start()
        await wait_for(lambda: farm_ready(client, self.s.hosts), READY_TIMEOUT_S, "every node enrolled", 0.3)
        result["ready_s"] = round(time.monotonic() - self.t0, 1)
        urls = await wait_for(lambda: (u := farm.files_urls()) and len(u) == self.s.hosts and u, 10, "files urls")
        for i, seconds in enumerate(POOL_SECONDS):
            r = await client.call({"op": "upload", "urls": sorted(urls.values()), "seconds": seconds,
                                   "label": f"pool-{i}"})
            self.pool.append(r["sha256"])
        # The timeline: faults, their heals and client ops in time order (heals first at equal times).
        timeline: list[tuple[float, int, int, Callable[[], None]]] = []
        order = itertools.count()
        for op in self.s.ops:
            def send(op: ClientOp = op) -> None:
                self.launch(client, op)
            timeline.append((op.at, 1, next(order), send))
        for e in self.s.episodes:
            def start(e: Episode = e) -> None:
                heapq.heappush(timeline, (e.at + e.duration, -1, next(order), self.begin(farm, e)))
            timeline.append((e.at, 0, next(order), start))
        heapq.heapify(timeline)
        window_start = time.monotonic() + 1.0
        self.note("window starts", at=round(window_start - self.t0, 3))
        while timeline:
            at, _, _, action = heapq.heappop(timeline)
            await _sleep_until(window_start + at)
            action()
        await _sleep_until(window_start + self.s.window)
        self.heal_everything(farm)
        # Every operation ends by its own deadline; then the queue must drain and the replicas converge.
        await asyncio.wait_for(asyncio.gather(*self.op_futures, return_exceptions=True), OP_DEADLINE_S + 20)
        t_drain = time.monotonic()
        try:
            await wait_for(lambda: drained(client), DRAIN_TIMEOUT_S, "queue drained", 0.5)
            result["drain"] = "ok"
        except TimeoutError:
            result["drain"] = "timeout"
            r = await client.request("queue/list", {"include_done": True}, deadline_s=3.0, label="final")
            with contextlib.suppress(Exception):
                result["client_brokers"] = await client.call({"op": "brokers"}, timeout=5)
            if r["type"] == "ok":
                result["unsettled"] = [(j["id"], c["index"], c["state"], c.get("node"))
                                       for j in r["data"]["jobs"] for c in j["copies"] if c["state"] in UNSETTLED]
            else:
                result["unsettled"] = f"no answer to queue/list: {r.get('error')}"
        result["drain_s"] = round(time.monotonic() - t_drain, 1)
        self.note("drained", outcome=result["drain"])
        try:
            await wait_for(lambda: not checker.divergence(farm.replicas()), CONVERGE_TIMEOUT_S,
                           "replicas converged", 0.3)
        except TimeoutError:
            pass  # the checker reports the divergence
        result["_replicas"] = farm.replicas()
        # Which broker each node ended on (from its runtime.json): more than one means a split farm.
        result["brokers"] = {n.node_id: (n.runtime() or {}).get("broker") for n in farm.nodes}
        result["restarts"] = sum(n.restarts for n in farm.nodes)


async def _sleep_until(when: float) -> None:
    """The fault schedule's own timeline (not synchronisation): sleep until its next instant."""
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


async def run_seed(seed: int, workdir: Path, *, safety: str = "quorum", hosts: int | None = None,
                   window: float | None = None) -> dict[str, Any]:
    schedule = make_schedule(seed, hosts=hosts, window=window)
    runner = Runner(schedule, workdir, safety=safety)
    try:
        return await asyncio.wait_for(runner.run(), HARD_TIMEOUT_S)
    except TimeoutError:
        return {"seed": seed, "ok": False, "violations": [f"run exceeded {HARD_TIMEOUT_S:g}s"], "counts": {},
                "schedule": schedule.describe(), "workdir": str(workdir)}


# --- many seeds, one process each --------------------------------------------------------------------------
def run_many(seeds: Sequence[int], root: Path, *, parallel: int = 2, safety: str = "quorum",
             on_result: Callable[[dict[str, Any]], None] | None = None) -> dict[int, dict[str, Any]]:
    """Run each seed in its own process (``python -m tests.lan.chaos``), ``parallel`` at a time."""
    pending = list(seeds)
    running: dict[int, tuple[subprocess.Popen[bytes], Path, float]] = {}
    results: dict[int, dict[str, Any]] = {}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        while pending or running:
            while pending and len(running) < parallel:
                seed = pending.pop(0)
                workdir = root / f"seed-{seed}"
                workdir.mkdir(parents=True, exist_ok=True)
                with (workdir / "runner.log").open("wb") as out:
                    proc = subprocess.Popen([*die_with_parent(), str(PYTHON), "-m", "tests.lan.chaos", "--seed",
                                             str(seed), "--workdir", str(workdir), "--safety", safety],
                                            stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO), env=env)
                running[seed] = (proc, workdir, time.monotonic())
            for seed, (proc, workdir, began) in list(running.items()):
                if proc.poll() is None and time.monotonic() - began < HARD_TIMEOUT_S + 60:
                    continue
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(20)
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                del running[seed]
                try:
                    result = json.loads((workdir / "report.json").read_text())
                except (OSError, ValueError):
                    tail = (workdir / "runner.log").read_text(errors="replace")[-3000:]
                    why = f"the seed's runner ended (exit {proc.returncode}) without a report:\n{tail}"
                    result = {"seed": seed, "ok": False, "counts": {}, "workdir": str(workdir),
                              "violations": [why]}
                results[seed] = result
                if on_result is not None:
                    on_result(result)
            time.sleep(0.2)  # polling child processes
    finally:
        for proc, _, _ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def summary_line(results: dict[int, dict[str, Any]]) -> str:
    t = checker.totals(results.values())
    keys = ("runs", "failed_runs", "acknowledged", "printed", "lost", "double_starts", "conflicts_reported",
            "unfinished", "needs_operator", "indeterminate", "diverged_keys", "stale_reads")
    return "chaos totals: " + ", ".join(f"{k}={t.get(k, 0)}" for k in keys)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one seeded fault schedule on a namespace LAN.")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--safety", default="quorum", choices=("quorum", "available"))
    parser.add_argument("--hosts", type=int)
    parser.add_argument("--window", type=float)
    parser.add_argument("--print-schedule", action="store_true", help="print the schedule and exit")
    args = parser.parse_args(argv)
    if args.print_schedule:
        print(json.dumps(make_schedule(args.seed, hosts=args.hosts, window=args.window).to_json(), indent=1))
        return 0
    if args.workdir is None:
        parser.error("--workdir is required to run a seed")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # SIGTERM (from run_many's deadline) must still tear the LAN down: turn it into an exception.
    signal.signal(signal.SIGTERM, _interrupt)
    result = asyncio.run(run_seed(args.seed, args.workdir, safety=args.safety, hosts=args.hosts,
                                  window=args.window))
    print(json.dumps({k: v for k, v in result.items() if k != "logs"}))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
