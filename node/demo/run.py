"""``netq demo``: a farm of node agent processes on this machine, shown live while it prints a queue."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from node.demo.farm import ProcessFarm
from shared import security
from shared.errors import NetqError

DEMO_TIMING = {"heartbeat_s": 0.2, "election_timeout_s": 0.8, "lease_s": 10.0, "lock_delay_s": 1.0,
               "node_timeout_s": 2.0, "work_retry_s": 1.0}


def _render(farm: ProcessFarm, states: dict[str, dict[str, Any]], jobs: list[dict[str, Any]],
            note: str) -> Group:
    nodes = Table(title="nodes", expand=True)
    for col in ("node", "process", "roles", "printer", "job", "progress"):
        nodes.add_column(col)
    for proc in farm.nodes:
        st = states.get(proc.node_id, {})
        roles = [r for r, on in (("broker host", st.get("broker_host")), ("arbiter", st.get("arbiter"))) if on]
        progress = f"{st['progress'] * 100:3.0f}%" if st.get("progress") is not None else ""
        job = f"{st['job']}#{st['copy_index']}" if st.get("job") else ""
        nodes.add_row(proc.node_id, "running" if proc.alive else "[red]killed[/red]", ", ".join(roles),
                      str(st.get("worker", "")), job, progress)
    counts: dict[str, int] = {}
    for j in jobs:
        for c in j["copies"]:
            counts[c["state"]] = counts.get(c["state"], 0) + 1
    queue = Table(title="queue (copies)", expand=True)
    states_order = ["queued", "claimed", "printing", "orphaned", "done", "failed"]
    for s in states_order:
        queue.add_column(s)
    queue.add_row(*[str(counts.get(s, 0)) for s in states_order])
    return Group(nodes, queue, note)


async def run_demo(n: int, jobs: int, *, until_done: bool, kill_host: bool, time_scale: float, timeout: float,
                   as_json: bool) -> dict[str, Any]:
    console = Console(stderr=as_json)
    farm = ProcessFarm(n, time_scale=time_scale, timing=DEMO_TIMING)
    if kill_host:
        # The first node hosts the broker and founds the farm (so it is the first arbiter): it coordinates and
        # does not print, so that killing it interrupts no print (an interrupted print's copy would be
        # orphaned until an operator checked its printer, and the demo would wait for that person).
        farm.nodes[0].extra["worker"] = {"accept_jobs": False}
    started = time.monotonic()
    # SIGTERM (e.g. from `timeout`) must still stop the node processes: cancel, so `finally` runs.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    farm.start()
    client = None
    try:
        client = await farm.client(timeout=60)
        await farm.wait_ready(client, n, timeout=60)
        client.watch(client.topics.node_state_filter)
        await farm.add_jobs(client, jobs, copies=1)
        farm_id = security.farm_id(security.parse_key(farm.key)) if farm.key else "open"
        note = (f"farm {farm_id} (its own key: credentials and signed messages); {jobs} jobs queued on {n} nodes;"
                f" printers run {time_scale:g}x faster than real time")
        killed = False
        with Live(console=console, refresh_per_second=4, transient=as_json) as live:
            while True:
                try:
                    queue = await farm.queue(client)
                except NetqError:
                    queue = []  # no arbiter at this instant (failover): keep showing the nodes
                live.update(_render(farm, client.node_states(), queue, note))
                done = queue and all(c["state"] == "done" for j in queue for c in j["copies"])
                if kill_host and not killed and any(c["state"] == "done" for j in queue for c in j["copies"]):
                    victim = _host_and_arbiter(farm, client.node_states())
                    if victim is not None:
                        farm.kill(victim)
                        killed = True
                        note = f"killed {victim.node_id} (broker host and arbiter) with SIGKILL"
                        old = client.address
                        await client.close()
                        client = await farm.client(timeout=30, exclude=old)
                        client.watch(client.topics.node_state_filter)
                if not until_done and done:
                    break
                if until_done and done:
                    break
                if time.monotonic() - started > timeout:
                    break
                await asyncio.sleep(0.25)
        summary = await farm.summary(client)
        summary["nodes"] = n
        summary["seconds"] = round(time.monotonic() - started, 1)
        if not as_json:
            if not console.is_terminal:
                console.print()  # Live leaves its last line open when the output is a pipe or a file
            console.print(f"completed {summary['completed']} of {summary['acknowledged']} copies in "
                          f"{summary['seconds']} s; double starts {summary['double_starts']}; lost {summary['lost']}")
        return summary
    finally:
        if client is not None:
            await client.close()
        farm.stop()


def _host_and_arbiter(farm: ProcessFarm, states: dict[str, dict[str, Any]]) -> Any:
    for proc in farm.nodes:
        st = states.get(proc.node_id, {})
        if proc.alive and st.get("arbiter"):
            return proc
    return None


__all__ = ["json", "run_demo"]
