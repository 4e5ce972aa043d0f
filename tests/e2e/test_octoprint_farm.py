"""Two node agent processes, each driving its own real OctoPrint 1.11 (virtual printer), and a witness.

What issue 4 asks to be shown: a job of two sets with counts printed whole on one printer; a cancel in OctoPrint
handled by the failure policy; OctoPrint stopped → the node takes no work and says why; the submitting node
switched off before the job is taken → the job still prints from the other holder; a node restarted mid-print →
no second start. OctoPrint's own file statistics (``/api/files``: ``prints.success`` / ``prints.failure`` per
file, and the date of the last print) are the record of what each printer really printed: every print has its
own file name (``<job>-c<copy>-s<set>-r<run>-<file>``), so a second start of one run would show there.

The witness keeps a quorum of three members while one printer node is killed.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from node.app.client import FarmClient
from node.demo.farm import NodeProc, ProcessFarm
from shared.errors import NetqError
from tests.octoprint_fixture import OctoPrintFactory, OctoPrintServer
from tests.waiting import until as _until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

TIMING = {"heartbeat_s": 0.2, "election_timeout_s": 0.8, "lease_s": 10.0, "lock_delay_s": 1.0,
          "node_timeout_s": 2.0, "work_retry_s": 0.5}
MAX_ATTEMPTS = 2


def print_gcode(seconds: float, label: str) -> bytes:
    """A file the virtual printer takes about ``seconds`` to print: G4 dwells of 0.5 s (moves are instant)."""
    lines = [f"; netqueues e2e print {label}", "G21", "G90", "M82", "G28", "G92 E0"]
    for i in range(max(1, round(seconds / 0.5))):
        lines += [f"G1 X{10 + i % 40} Y{10 + (i * 7) % 40} E{i * 0.1:.1f} F6000", "G4 P500"]
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Rig:
    farm: ProcessFarm
    octo: dict[str, OctoPrintServer]

    def node(self, node_id: str) -> NodeProc:
        return next(n for n in self.farm.nodes if n.node_id == node_id)

    @property
    def printers(self) -> list[NodeProc]:
        return [n for n in self.farm.nodes if not n.witness]


@pytest.fixture(scope="module")
def rig(octoprint_factory: OctoPrintFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    farm = ProcessFarm(2, witnesses=1, root=tmp_path_factory.mktemp("farm"), timing=TIMING)
    octo = {}
    for node in farm.nodes:  # the farm has a key of its own (ProcessFarm makes one)
        node.extra["farm"] = {"max_attempts": MAX_ATTEMPTS}
        if node.witness:
            continue
        server = octo[node.node_id] = octoprint_factory()
        node.extra["printer"] = {
            "driver": "octoprint", "url": server.url, "api_key": server.api_key, "port": "VIRTUAL",
            "clear_script": ["M117 netq bed cleared"], "cooldown_bed_c": 45.0, "reconnect_max_s": 2.0,
        }
    farm.start()
    try:
        yield Rig(farm, octo)
    finally:
        farm.stop()


# --- helpers -----------------------------------------------------------------------------------------------
async def until(cond: Callable[[], Awaitable[Any]], timeout: float, what: str, rig: Rig) -> Any:
    def logs() -> str:
        return rig.farm.logs(60) + "\n" + "\n".join(s.log_tail(15) for s in rig.octo.values())

    # NetqError: an election or the broker moving: ask again.
    return await _until(cond, what, timeout, interval=0.1, retry_on=(NetqError,), context=logs)


def octo_get(server: OctoPrintServer, path: str) -> Any:
    reply = requests.get(f"{server.url}{path}", headers={"X-Api-Key": server.api_key}, timeout=5)
    reply.raise_for_status()
    return reply.json()


def octo_prints(server: OctoPrintServer, job_id: str) -> dict[str, dict[str, Any]]:
    """OctoPrint's files of ``job_id`` (by name) with their print statistics."""
    files = octo_get(server, "/api/files?recursive=true")["files"]
    return {f["name"]: f.get("prints") or {} for f in files if f["name"].startswith(f"{job_id}-c")}


def octo_job(server: OctoPrintServer) -> dict[str, Any]:
    return dict(octo_get(server, "/api/job"))


def octo_cancel(server: OctoPrintServer) -> None:
    requests.post(f"{server.url}/api/job", json={"command": "cancel"}, headers={"X-Api-Key": server.api_key},
                  timeout=5).raise_for_status()


async def client_for(rig: Rig) -> FarmClient:
    client = await rig.farm.client(timeout=60)
    await rig.farm.wait_ready(client, 3)
    return client


async def add_job(rig: Rig, client: FarmClient, via: NodeProc, sets: list[tuple[bytes, str, int]],
                  name: str) -> str:
    body_sets = []
    for data, file, count in sets:
        sha = await rig.farm.upload(via, data)
        body_sets.append({"file": file, "sha256": sha, "count": count, "holders": [via.node_id]})
    answer = await client.request("job/add", {"namespace": "default", "name": name, "sets": body_sets},
                                  timeout=20)
    return str(answer["id"])


async def job_view(client: FarmClient, job_id: str) -> dict[str, Any]:
    jobs = (await client.request("queue/list", {"include_done": True}, timeout=5))["jobs"]
    return next(j for j in jobs if j["id"] == job_id)


async def copy0(client: FarmClient, job_id: str) -> dict[str, Any]:
    return dict((await job_view(client, job_id))["copies"][0])


async def nodes(client: FarmClient) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in (await client.request("node/list", timeout=5))["nodes"]}


async def accept(client: FarmClient, node: str, on: bool, timeout: float = 30.0) -> None:
    """node/accept_jobs, asked again until the node answers (it may be (re)connecting to a moved broker)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.request("node/accept_jobs", {"node": node, "accept": on}, timeout=3)
            return
        except NetqError:
            if time.monotonic() > deadline:
                raise


async def settle_idle(rig: Rig, client: FarmClient) -> None:
    """Every printer node online, idle (or asking for work) and accepting jobs: the state each test leaves."""
    for n in rig.printers:
        await accept(client, n.node_id, True)

    async def idle() -> bool:
        ns = await nodes(client)
        return all(ns.get(n.node_id, {}).get("worker") in ("idle", "requesting") for n in rig.printers)

    await until(idle, 30, "both printer nodes idle", rig)


# --- the tests ---------------------------------------------------------------------------------------------
async def test_a_job_of_two_sets_with_counts_prints_whole_and_in_order_on_one_printer(rig: Rig) -> None:
    client = await client_for(rig)
    try:
        await settle_idle(rig, client)
        job_id = await add_job(rig, client, rig.printers[0], [(print_gcode(1.5, "set A"), "A.gcode", 2),
                                                              (print_gcode(1.5, "set B"), "B.gcode", 1)], "two sets")

        async def done() -> dict[str, Any] | None:
            c = await copy0(client, job_id)
            assert c["state"] not in ("failed", "orphaned"), c
            return c if c["state"] == "done" else None

        copy = await until(done, 60, "the job copy to be printed", rig)
        printer, other = copy["node"], next(n.node_id for n in rig.printers if n.node_id != copy["node"])
        prints = octo_prints(rig.octo[printer], job_id)
        expected = [f"{job_id}-c0-s0-r0-A.gcode", f"{job_id}-c0-s0-r1-A.gcode", f"{job_id}-c0-s1-r0-B.gcode"]
        assert sorted(prints) == sorted(expected), prints
        for name in expected:
            assert prints[name].get("success") == 1 and not prints[name].get("failure"), (name, prints[name])
        ends = [prints[name]["last"]["date"] for name in expected]
        assert ends == sorted(ends), f"prints not in set order: {list(zip(expected, ends, strict=True))}"
        assert octo_prints(rig.octo[other], job_id) == {}, "part of the copy went to the other printer"
        assert copy["attempts"] == 1
    finally:
        await client.close()


async def test_a_cancel_in_octoprint_requeues_the_copy_then_fails_it_at_the_retry_limit(rig: Rig) -> None:
    client = await client_for(rig)
    try:
        await settle_idle(rig, client)
        job_id = await add_job(rig, client, rig.printers[1], [(print_gcode(30, "cancel me"), "long.gcode", 1)],
                               "cancelled")
        for attempt in range(1, MAX_ATTEMPTS + 1):
            async def printing(attempt: int = attempt) -> str | None:
                c = await copy0(client, job_id)
                if c["state"] != "printing" or c["attempts"] != attempt:
                    return None
                st = octo_job(rig.octo[c["node"]])
                name = ((st.get("job") or {}).get("file") or {}).get("name") or ""
                return c["node"] if st["state"] == "Printing" and name.startswith(job_id) else None

            node = await until(printing, 30, f"attempt {attempt} to print in OctoPrint", rig)
            octo_cancel(rig.octo[node])

            async def after_cancel(attempt: int = attempt) -> dict[str, Any] | None:
                c = await copy0(client, job_id)
                if attempt == MAX_ATTEMPTS:
                    return c if c["state"] == "failed" else None
                requeued = c["state"] == "queued" and "cancelled on the printer" in (c.get("reason") or "")
                return c if requeued or c["attempts"] > attempt else None  # (or already taken again)

            c = await until(after_cancel, 30, f"the copy to be settled after cancel {attempt}", rig)
            if attempt == MAX_ATTEMPTS:
                assert c["attempts"] == MAX_ATTEMPTS
                assert "cancelled on the printer" in c["reason"], c
        # OctoPrint recorded each cancelled start as a failure, and nothing printed it to the end.
        stats = [p for s in rig.octo.values() for p in octo_prints(s, job_id).values()]
        assert sum(p.get("failure", 0) for p in stats) == MAX_ATTEMPTS, stats
        assert sum(p.get("success", 0) for p in stats) == 0, stats
    finally:
        await client.close()


async def test_octoprint_stopped_the_node_takes_no_work_and_says_why(rig: Rig) -> None:
    client = await client_for(rig)
    n1, n2 = (n.node_id for n in rig.printers)
    server = rig.octo[n2]
    try:
        await settle_idle(rig, client)
        await accept(client, n1, False)  # only n2 could take the job
        server.stop()

        async def offline() -> dict[str, Any] | None:
            st = (await nodes(client))[n2]
            return st if st.get("worker") == "offline" and "OctoPrint" in (st.get("reason") or "") else None

        st = await until(offline, 30, "n2 to report its printer offline", rig)
        assert st["state"] == "online"  # the node is up; its printer is not
        job_id = await add_job(rig, client, rig.printers[0], [(print_gcode(1.5, "offline"), "o.gcode", 1)],
                               "while offline")
        window = time.monotonic() + 4.0  # several work_retry_s and reconnect attempts
        while time.monotonic() < window:
            c = await copy0(client, job_id)
            assert c["state"] == "queued", f"granted while its printer was offline: {c}"
            await asyncio.sleep(0.2)
        server.start()

        async def printed() -> dict[str, Any] | None:
            c = await copy0(client, job_id)
            return c if c["state"] == "done" else None

        c = await until(printed, 60, "n2 to reconnect and print the job", rig)
        assert c["node"] == n2
    finally:
        if not server.running:
            server.start()
        await accept(client, n1, True)
        await client.close()


async def test_the_submitter_switched_off_before_the_job_is_taken_the_job_prints_from_another_holder(
        rig: Rig) -> None:
    client = await client_for(rig)
    n1, n2 = rig.printers[0], rig.printers[1].node_id
    try:
        await settle_idle(rig, client)
        await accept(client, n1.node_id, False)
        await accept(client, n2, False)
        job_id = await add_job(rig, client, n1, [(print_gcode(1.5, "orphan file"), "held.gcode", 1)],
                               "submitter gone")
        holders = (await job_view(client, job_id))["sets"][0]["holders"]
        assert n1.node_id in holders and len(holders) >= 2, holders  # acknowledged only once a second node held it
        rig.farm.kill(n1, signal.SIGKILL)
        await client.close()
        client = await rig.farm.client(timeout=60)

        await accept(client, n2, True)  # answered once the farm serves again without n1

        async def printed() -> dict[str, Any] | None:
            c = await copy0(client, job_id)
            return c if c["state"] == "done" else None

        c = await until(printed, 60, "n2 to print the job of the dead submitter", rig)
        assert c["node"] == n2
        assert [p.get("success") for p in octo_prints(rig.octo[n2], job_id).values()] == [1]
    finally:
        if not n1.alive:
            rig.farm.start_node(n1)
        await client.close()
        client = await client_for(rig)
        try:
            await until(lambda: _online(client, n1.node_id), 30, "n1 back online", rig)
            await settle_idle(rig, client)
        finally:
            await client.close()


async def _online(client: FarmClient, node: str) -> bool:
    return (await nodes(client)).get(node, {}).get("state") == "online"


async def test_a_node_restarted_mid_print_follows_the_print_and_never_starts_it_again(rig: Rig) -> None:
    client = await client_for(rig)
    try:
        await settle_idle(rig, client)
        job_id = await add_job(rig, client, rig.printers[1], [(print_gcode(10, "restart"), "r.gcode", 1)],
                               "restart mid-print")

        async def printing() -> str | None:
            c = await copy0(client, job_id)
            if c["state"] != "printing":
                return None
            return c["node"] if octo_job(rig.octo[c["node"]])["state"] == "Printing" else None

        victim = rig.node(await until(printing, 30, "the print to run in OctoPrint", rig))
        rig.farm.kill(victim, signal.SIGKILL)
        rig.farm.start_node(victim)
        await client.close()
        client = await rig.farm.client(timeout=60)
        assert octo_job(rig.octo[victim.node_id])["state"] == "Printing"  # the print outlived its node

        async def done() -> dict[str, Any] | None:
            c = await copy0(client, job_id)
            assert c["state"] != "failed", c
            return c if c["state"] == "done" else None

        c = await until(done, 60, "the restarted node to follow the print to its end", rig)
        assert c["node"] == victim.node_id and c["attempts"] == 1
        prints = octo_prints(rig.octo[victim.node_id], job_id)
        assert list(prints) == [f"{job_id}-c0-s0-r0-r.gcode"], prints
        stats = prints[f"{job_id}-c0-s0-r0-r.gcode"]
        assert stats.get("success") == 1 and not stats.get("failure"), stats  # one start, completed
        other = next(n.node_id for n in rig.printers if n is not victim)
        assert octo_prints(rig.octo[other], job_id) == {}
        log = Path(victim.log_path).read_text(errors="replace")
        assert "following the print" in log
    finally:
        await client.close()
