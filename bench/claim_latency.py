"""Job added → print started, on a farm of 10 node agent processes on loopback.

Each node is a real `netq run` process (zeroconf on 127.0.0.1, the elected embedded amqtt broker, SQLite
replicas, simulated printers that journal every start with a wall-clock timestamp). For each job, the latency
is the printer's start timestamp minus the moment the client got `status: ok` for its `job/add` (the add is then
committed by a quorum and its file is on two nodes). Jobs are added one at a time while printers are idle.

The farm has a key, as every farm does: broker credentials, sealed protocol messages, signed state and answers.
The same run is repeated, side by side, with every node pointed at a real mosquitto broker (`broker.url`, with the
password and ACL files of `netq credentials mosquitto`) when mosquitto is installed, and, for what signing costs,
once on an open farm (no key: nothing sealed, signed or authenticated) unless ``--no-open``.

Usage: python bench/claim_latency.py [--nodes 10] [--jobs 100] [--no-mosquitto] [--no-open]
The last line printed is one JSON object with p50_ms and p99_ms (keyed farm, embedded broker) and the figures of
the mosquitto and open runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.demo.farm import ProcessFarm, gcode_for, mosquitto_broker
from node.worker.printers.simulated import read_journal
from shared import security

TIMING = {"heartbeat_s": 0.2, "election_timeout_s": 1.0, "lease_s": 10.0, "lock_delay_s": 1.0,
          "node_timeout_s": 3.0, "work_retry_s": 0.5}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def main(nodes: int, jobs: int, seed: int, broker_url: str | None = None, *, key: str | None = None,
               open_farm: bool = False) -> dict[str, object]:
    rng = random.Random(seed)
    # A 300 s print takes 0.3 s.
    farm = ProcessFarm(nodes, time_scale=1000, timing=TIMING, broker_url=broker_url, key=key, open_farm=open_farm)
    farm.start()
    try:
        client = await farm.client(timeout=90)
        await farm.wait_ready(client, nodes, timeout=120)
        workers = [n for n in farm.nodes if not n.witness]
        files = []
        for i in range(jobs):
            holder = workers[i % len(workers)]
            files.append((holder, await farm.upload(holder, gcode_for(300, f"lat-{seed}-{i}"))))
        await asyncio.sleep(1.0)  # let every printer report idle and ask for work
        latencies = []
        sizes: dict[str, int] = {}
        for i, (holder, sha) in enumerate(files):
            body = {"namespace": "bench", "name": f"lat-{i}",
                    "sets": [{"file": f"lat-{i}.gcode", "sha256": sha, "holders": [holder.node_id]}]}
            data = await client.request("job/add", body, timeout=15)
            acked = time.time()
            job_id = data["id"]
            deadline = time.monotonic() + 15
            started = None
            while started is None:
                for n in workers:
                    # Parse a journal only when it grew: this loop shares the machine's two cores with the farm.
                    size = n.journal.stat().st_size if n.journal.exists() else 0
                    if sizes.get(n.node_id) == size:
                        continue
                    sizes[n.node_id] = size
                    for rec in read_journal(n.journal):
                        if rec.name.startswith(f"{job_id}-"):
                            started = rec.ts
                if started is None:
                    if time.monotonic() > deadline:
                        raise SystemExit(f"job {job_id} did not start within 15 s\n{farm.logs()}")
                    await asyncio.sleep(0.005)
            latencies.append((started - acked) * 1000.0)
            await asyncio.sleep(rng.uniform(0.05, 0.15))
        await client.close()
        return {
            "bench": "claim_latency", "nodes": nodes, "jobs": jobs,
            "broker": "mosquitto" if broker_url else "embedded amqtt", "keyed": not open_farm,
            "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
            "mean_ms": round(statistics.fmean(latencies), 1), "max_ms": round(max(latencies), 1),
            "min_ms": round(min(latencies), 1), "double_starts": farm.double_starts(),
            "target": {"p50_ms": 50, "p99_ms": 200},
        }
    finally:
        farm.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-mosquitto", action="store_true", help="skip the side-by-side mosquitto run")
    parser.add_argument("--no-open", action="store_true", help="skip the side-by-side run of an open farm")
    args = parser.parse_args()
    figures = ("p50_ms", "p99_ms", "mean_ms", "max_ms", "double_starts")
    result = asyncio.run(main(args.nodes, args.jobs, args.seed))
    print(json.dumps(result), flush=True)
    if not args.no_open:
        other = asyncio.run(main(args.nodes, args.jobs, args.seed, open_farm=True))
        print(json.dumps(other), flush=True)
        result["open_farm"] = {k: other[k] for k in figures}
    if not args.no_mosquitto and shutil.which("mosquitto"):
        key = security.new_farm_key()
        with tempfile.TemporaryDirectory() as tmp, mosquitto_broker(Path(tmp), key=key) as (host, port):
            other = asyncio.run(main(args.nodes, args.jobs, args.seed, f"mqtt://{host}:{port}", key=key))
        print(json.dumps(other), flush=True)
        result["mosquitto"] = {k: other[k] for k in figures}
    print(json.dumps(result))
