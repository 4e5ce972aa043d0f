"""Failover time on a LAN of network namespaces: how long the farm stops serving grants when the node that
hosts both the broker and the arbiter dies (``kill -9``) or is cut off (its link goes down: no reset, silence).

Set-up: three node agents on the namespace LAN of ``tests/lan/netns.py`` (plus the client namespace), the
product's default timing, simulated printers, and a queue of one-copy jobs of ``PRINT_S`` seconds each, so
that every printer is busy and work is always waiting.

What is measured, per sample:

1. Wait until the farm is whole (three nodes enrolled and online, all on one broker) and the broker host is
   also the arbiter; call it the victim, the two others the survivors.
2. From the survivors' printer journals, find when their current prints end; schedule the fault ``LEAD_S``
   before the first of those ends. So a survivor becomes idle, and asks for work, right after the fault:
   the measurement does not wait for a print to finish.
3. Fault at wall time K (``kill -9`` of the victim, or its switch port down).
4. The sample is ``S - K`` where S is the first printer start on a survivor of a copy *granted in a newer
   term* than the victim's (read from the survivor's replica afterwards). A start follows its grant by one
   committed change (the start) and a printer call, a few milliseconds: so the sample is the time until the
   next grant is served, plus that (it never undercounts).
5. Tear the farm down; the next sample gets a fresh one (so that no sample inherits what an earlier fault
   left behind). A sample that fails (no farm whole in time, no grant within ``SAMPLE_TIMEOUT_S``) is listed
   in ``failures`` and retried on a fresh farm.

Prints ONE JSON line last: ``kill_median_s``, ``cutoff_median_s``, the raw samples, and the settings.
Needs root (network namespaces). ``--runs`` (default 10) samples of each kind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.lan.chaos import ClientProc, farm_ready, wait_for
from tests.lan.netns import (
    Lan,
    LanFarm,
    LanNode,
    arbiter_from_log,
    lan_unsupported,
    read_replica,
    sweep_stale,
)

PRINT_S = 1.0  # real seconds per print
TIME_SCALE = 60.0
LEAD_S = 0.05  # the fault comes this long before a survivor's print ends
QUEUE_JOBS = 15  # one-copy jobs queued on each farm: about 2 prints per node before the fault, more after
SAMPLE_TIMEOUT_S = 15.0
WHOLE_TIMEOUT_S = 20.0
DEFAULT_TIMING: dict[str, float] = {}  # the product's defaults (shared/settings.py TimingSettings)


def log(msg: str) -> None:
    print(f"[failover {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Bench:
    def __init__(self, root: Path, timing: dict[str, float]) -> None:
        self.root = root
        self.timing = timing
        self.lan: Lan | None = None
        self.farm: LanFarm | None = None
        self.client: ClientProc | None = None
        self.sha = ""
        self.jobs = 0
        self.builds = 0

    # --- farm lifecycle ----------------------------------------------------------------------------------
    async def build(self) -> None:
        await self.teardown()
        self.builds += 1
        sweep_stale()
        self.lan = Lan(3)
        self.lan.create()
        self.farm = LanFarm(self.lan, self.root / f"farm-{self.builds}", time_scale=TIME_SCALE,
                            timing=self.timing)
        self.client = ClientProc(self.lan, self.root / f"history-{self.builds}.jsonl",
                                 self.root / f"client-{self.builds}.log", self.farm.key)
        self.farm.start()
        await self.client.start()
        await wait_for(lambda: farm_ready(self.client, 3), 60, "three nodes enrolled", 0.3)  # type: ignore[arg-type]
        urls = await wait_for(lambda: (u := self.farm.files_urls()) and len(u) == 3 and u, 15,  # type: ignore[union-attr]
                              "files urls")
        r = await self.client.call({"op": "upload", "urls": sorted(urls.values()), "seconds": PRINT_S * TIME_SCALE,
                                    "label": "failover-bench"})
        self.sha = r["sha256"]
        self.jobs = 0
        await self.top_up(QUEUE_JOBS)
        log(f"farm {self.lan.run_id} ready")

    async def teardown(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.stop()
            self.client = None
        if self.farm is not None:
            self.farm.stop()
            self.farm = None
        if self.lan is not None:
            self.lan.destroy()
            self.lan = None

    async def top_up(self, n: int) -> None:
        assert self.client is not None and self.farm is not None
        holders = [node.node_id for node in self.farm.nodes]
        for _ in range(n):
            self.jobs += 1
            body = {"namespace": "default", "id": f"fo{self.builds}-{self.jobs:04d}", "count": 1,
                    "sets": [{"file": "part.gcode", "sha256": self.sha, "count": 1, "holders": holders}]}
            done = await self.client.call({"op": "add", "job": body, "txn": uuid.uuid4().hex, "deadline_s": 15},
                                          timeout=30)
            if done["type"] != "ok":
                raise RuntimeError(f"job add failed: {done}")

    async def whole(self) -> tuple[LanNode, int] | None:
        """(victim, its term) when the farm is whole and one node is both broker host and arbiter."""
        assert self.farm is not None and self.client is not None
        farm = self.farm
        if any(not n.alive for n in farm.nodes) or farm.lan.down:
            return None
        brokers = {tuple(rt["broker"]) for n in farm.nodes if (rt := n.runtime()) and rt.get("broker")}
        if len(brokers) != 1:
            return None
        r = await self.client.request("node/list", deadline_s=2)
        if r["type"] != "ok" or sum(1 for n in r["data"]["nodes"] if n.get("enrolled")
                                    and n.get("state") == "online") < 3:
            return None
        host, arbiter = farm.broker_host(), farm.arbiter()
        if host is None or host is not arbiter:
            return None
        term = arbiter_from_log(arbiter.log_path.read_text(errors="replace"))
        # Every survivor must be printing (so that one frees up right after the fault).
        now = time.time()
        for n in farm.nodes:
            if n is not arbiter:
                starts = n.starts()
                if not starts or now - starts[-1].ts > PRINT_S:
                    return None
        return (arbiter, term) if term is not None else None

    # --- one sample --------------------------------------------------------------------------------------
    async def sample(self, mode: str) -> float:
        assert self.farm is not None and self.lan is not None
        victim, term = await wait_for(self.whole, WHOLE_TIMEOUT_S, "the farm whole, broker host = arbiter", 0.2)
        survivors = [n for n in self.farm.nodes if n is not victim]
        # The fault's own timeline: just before the first survivor's print ends.
        ends = [n.starts()[-1].ts + PRINT_S for n in survivors]
        k_target = min(e for e in ends) - LEAD_S
        while k_target < time.time() + 0.05:
            k_target += PRINT_S  # that print is nearly over: aim at the end of the next one
        await asyncio.sleep(k_target - time.time())
        before = {n.node_id: len(n.starts()) for n in survivors}
        k = time.time()
        if mode == "kill":
            self.farm.kill(victim)
        else:
            self.lan.link_down(victim.host)
        log(f"{mode}: {victim.node_id} (broker host and arbiter of term {term}) at {k:.3f}")

        def first_new_grant() -> float | None:
            for n in survivors:
                replica = None
                for rec in n.starts()[before[n.node_id]:]:
                    if rec.ts < k:
                        continue
                    job = rec.name.split("-c", 1)[0]
                    copy = int(rec.name.split("-c", 1)[1].split("-", 1)[0])
                    if replica is None:
                        replica = read_replica(n.replica_path)
                    obj = replica["objects"].get(f"job/default/{job}")
                    grant = obj and obj["value"] and obj["value"]["copies"][copy].get("grant")
                    if grant and grant[0] > term:
                        return rec.ts
            return None

        s = await wait_for(first_new_grant, SAMPLE_TIMEOUT_S, "a grant of the new term served", 0.05)
        return float(s) - k

    async def run(self, runs: int) -> dict[str, Any]:
        """Alternate kill and cutoff samples, each on a fresh farm, so that no sample inherits the state an
        earlier fault left (a restarted or re-attached node); a failed sample is retried on another farm."""
        samples: dict[str, list[float]] = {"kill": [], "cutoff": []}
        failures: list[str] = []
        for i in range(runs * 2):
            mode = "kill" if i % 2 == 0 else "cutoff"
            for _attempt in range(3):
                try:
                    await self.build()
                    value = await self.sample(mode)
                    samples[mode].append(round(value, 3))
                    log(f"{mode} sample {len(samples[mode])}: {value:.3f} s")
                    break
                except (TimeoutError, RuntimeError) as exc:
                    failures.append(f"{mode}: {exc}")
                    log(f"{mode}: {exc}; trying again on a fresh farm")
                finally:
                    await self.teardown()
        return {"samples": samples, "failures": failures, "builds": self.builds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="samples of each kind (kill, cutoff)")
    parser.add_argument("--timing", choices=("default", "demo"), default="default",
                        help="default: the product's TimingSettings; demo: node/demo/run.py's DEMO_TIMING")
    parser.add_argument("--keep", action="store_true", help="keep the farms' directories (logs, journals)")
    args = parser.parse_args(argv)
    reason = lan_unsupported()
    if reason is not None:
        print(json.dumps({"error": reason}))
        return 2
    timing: dict[str, float] = DEFAULT_TIMING
    if args.timing == "demo":
        from node.demo.run import DEMO_TIMING

        timing = dict(DEMO_TIMING)
    root = Path(tempfile.mkdtemp(prefix="netq-failover-"))
    started = time.monotonic()
    bench = Bench(root, timing)
    try:
        result = asyncio.run(bench.run(args.runs))
    finally:
        if bench.lan is not None:  # an error left a farm up: tear it down
            if bench.farm is not None:
                bench.farm.stop()
            bench.lan.destroy()
    kill, cutoff = result["samples"]["kill"], result["samples"]["cutoff"]
    out = {
        "bench": "failover",
        "kill_median_s": round(statistics.median(kill), 3) if kill else None,
        "cutoff_median_s": round(statistics.median(cutoff), 3) if cutoff else None,
        "kill_samples": kill, "cutoff_samples": cutoff,
        "targets_s": {"kill": 3.0, "cutoff": 6.0},
        "nodes": 3, "timing": args.timing, "print_s": PRINT_S, "lead_s": LEAD_S,
        "failures": result["failures"], "farms_built": result["builds"],
        "seconds": round(time.monotonic() - started, 1),
        "dir": str(root) if args.keep else None,
    }
    if not args.keep:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
