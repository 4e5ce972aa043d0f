"""A LAN client of the farm for fault tests: runs inside the client namespace, driven over stdin/stdout.

    ip netns exec nq-R-c python -m tests.lan.client --interface 10.77.0.2 --history H

It finds the farm's broker as any LAN client would (zeroconf bound to its interface, then a TCP probe: a dead
node's record lingers), moves to another broker when its own stops answering, and speaks only the public MQTT
API. Commands arrive as JSON lines on stdin; each gets one JSON line on stdout ``{"id", "ok", ...}``. Commands
run concurrently (an add may wait through a failover while others proceed).

Every operation is appended to the history file (JSON lines), Jepsen style: ``invoke`` when it is sent, then
exactly one of ``ok`` (the farm answered ``status: ok``: the change is *acknowledged*), ``fail`` (the farm
refused it: it changed nothing) or ``info`` (no definite answer before the deadline: it may or may not have
happened). ``attempt`` lines record each try (broker, outcome); ``event`` lines what ``netq/events`` said.

Commands: ``upload`` {urls, seconds, label} → {sha256}; ``add`` {job, txn, deadline_s}; ``request``
{path, body, deadline_s}; ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from broker.advert import SERVICE_TYPE, advert_from_properties
from broker.choice import Address
from broker.host import tcp_reachable
from node.app.client import FarmClient
from node.demo.farm import gcode_for
from shared import security
from shared.errors import NetqError, ProtocolError, RequestError

ATTEMPT_TIMEOUT_S = 2.5
PROBE_TIMEOUT_S = 0.5
RETRY_PAUSE_S = 0.25
REBROWSE_S = 3.0  # no live broker for this long: browse again from scratch
# The farm's key, from the fault run that started us (tests/lan/chaos.py): the client is an operator.
FARM_KEY = security.parse_key(os.environ["NETQ_LAN_FARM_KEY"])
FILE_HEADERS = {"Authorization": f"Bearer {security.file_token(FARM_KEY, security.Role.OPERATOR)}"}


class History:
    def __init__(self, path: Path) -> None:
        self._fh: TextIO = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        record = {"t": round(time.time(), 4), **record}
        self._fh.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._fh.close()


async def _reachable(address: Address) -> bool:
    return await tcp_reachable(address, PROBE_TIMEOUT_S)


class Brokers:
    """Every broker the node adverts name, kept up to date by a zeroconf browser on our interface."""

    def __init__(self, interface: str) -> None:
        self.interface = interface
        self.known: dict[str, Address] = {}  # node id -> its advertised broker
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation: dict[str, int] = {}
        self.changed = asyncio.Event()

    async def start(self) -> None:
        self._zc = AsyncZeroconf(interfaces=[self.interface], ip_version=IPVersion.V4Only)
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, [SERVICE_TYPE], handlers=[self._on_service])

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._zc is not None:
            await self._zc.async_close()

    def _on_service(self, zeroconf: Zeroconf, service_type: str, name: str,
                    state_change: ServiceStateChange) -> None:
        if state_change is ServiceStateChange.Removed:
            return  # goodbyes are rare and records linger anyway: reachability decides
        # Lookups may finish out of order: only the one of the latest event for a name may write.
        generation = self._generation.get(name, 0) + 1
        self._generation[name] = generation
        task = asyncio.get_running_loop().create_task(self._lookup(zeroconf, name, generation))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _lookup(self, zeroconf: Zeroconf, name: str, generation: int) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(zeroconf, 1000) or self._generation.get(name) != generation:
            return
        try:
            advert = advert_from_properties(info.decoded_properties)
        except ProtocolError:
            return
        if advert.farm != security.farm_id(FARM_KEY):
            return  # another farm's node
        if advert.broker is None:
            self.known.pop(advert.node_id, None)
        else:
            self.known[advert.node_id] = advert.broker
        self.changed.set()

    async def rebrowse(self) -> None:
        """Start over with a fresh zeroconf instance (its first queries get fresh answers)."""
        old_zc, old_browser = self._zc, self._browser
        self._generation.clear()
        self.known.clear()
        await self.start()
        if old_browser is not None:
            await old_browser.async_cancel()
        if old_zc is not None:
            await old_zc.async_close()

    async def live(self) -> list[Address]:
        """Advertised brokers that accept a TCP connection now, in a stable order."""
        addrs = sorted(set(self.known.values()))
        ok = await asyncio.gather(*(_reachable(a) for a in addrs))
        return [a for a, good in zip(addrs, ok, strict=True) if good]


class Driver:
    def __init__(self, interface: str, history: History) -> None:
        self.brokers = Brokers(interface)
        self.history = history
        self.client: FarmClient | None = None
        self._suspect: set[Address] = set()
        self._rebrowsed = time.monotonic()  # brokers that did not answer our last request
        self._lock = asyncio.Lock()
        self._out_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.brokers.start()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.close()
        await self.brokers.close()

    # --- connection --------------------------------------------------------------------------------------
    async def _connected(self) -> FarmClient | None:
        """A client connected to a live broker (one that answered last time, if there is a choice)."""
        async with self._lock:
            if self.client is not None and self.client.link.connected \
                    and self.client.address not in self._suspect:
                return self.client
            live = await self.brokers.live()
            if not live and time.monotonic() - self._rebrowsed > REBROWSE_S:
                self._rebrowsed = time.monotonic()
                self.history.write({"type": "rebrowse", "known": {k: list(v) for k, v in
                                                                  self.brokers.known.items()}})
                await self.brokers.rebrowse()
            if not live:
                return self.client if self.client is not None and self.client.link.connected else None
            fresh = [a for a in live if a not in self._suspect] or live
            target = fresh[0]
            if self.client is not None and self.client.address == target and self.client.link.connected:
                self._suspect.discard(target)
                return self.client
            if self.client is not None:
                await self.client.close()
                self.client = None
            client = FarmClient(target, client_id=f"chaos-client-{int(time.time() * 1000) % 10**8}",
                                username=security.Role.OPERATOR.value,
                                password=security.broker_password(FARM_KEY, security.Role.OPERATOR),
                                state_key=security.state_public_key(FARM_KEY))
            try:
                await client.connect(timeout=2.0)
            except NetqError:
                self._suspect.add(target)
                return None
            client.link.subscribe(client.topics.events, self._on_event)
            self.client = client
            self._suspect.discard(target)
            self.history.write({"type": "connected", "broker": list(target)})
            return client

    def _on_event(self, msg: Any) -> None:
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        self.history.write({"type": "event", "event": body})

    # --- requests ----------------------------------------------------------------------------------------
    async def request(self, op: str, path: str, body: dict[str, Any], *, txn: str | None, deadline_s: float,
                      record: dict[str, Any]) -> dict[str, Any]:
        """Send ``path`` until the farm gives a definite answer or the deadline passes; write the history."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        self.history.write({"type": "invoke", "op": op, "path": path, "txn": txn, **record})
        attempts = 0
        last_error = "no broker found"
        while loop.time() < deadline:
            client = await self._connected()
            if client is None:
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            attempts += 1
            broker = list(client.address)
            try:
                timeout = max(0.2, min(ATTEMPT_TIMEOUT_S, deadline - loop.time()))
                resp = await client.request_raw(path, body, timeout=timeout, transaction=txn)
            except NetqError as exc:
                last_error = f"timeout: {exc}"
                self.history.write({"type": "attempt", "op": op, "txn": txn, "broker": broker,
                                    "outcome": "timeout"})
                self._suspect.add(client.address)
                continue
            if resp.get("status") == "ok":
                self.history.write({"type": "attempt", "op": op, "txn": txn, "broker": broker, "outcome": "ok"})
                done = {"type": "ok", "op": op, "path": path, "txn": txn, "attempts": attempts,
                        "data": resp.get("data", {}), **record}
                self.history.write(done)
                return done
            error = str(resp.get("error", ""))
            self.history.write({"type": "attempt", "op": op, "txn": txn, "broker": broker, "outcome": "error",
                                "error": error})
            if "not committed" in error:
                last_error = error
                await asyncio.sleep(RETRY_PAUSE_S)
                continue
            # A definite refusal: the farm validated the request and changed nothing.
            done = {"type": "fail", "op": op, "path": path, "txn": txn, "attempts": attempts, "error": error,
                    **record}
            self.history.write(done)
            return done
        done = {"type": "info", "op": op, "path": path, "txn": txn, "attempts": attempts, "error": last_error,
                **record}
        self.history.write(done)
        return done

    async def upload(self, urls: list[str], seconds: float, label: str) -> str:
        data = gcode_for(seconds, label)
        sha = ""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            for url in urls:
                async with session.post(f"{url}/files", data=data, headers=FILE_HEADERS) as resp:
                    if resp.status >= 300:
                        raise NetqError(f"upload to {url} failed: {resp.status} {await resp.text()}")
                    sha = str((await resp.json())["sha256"])
        return sha

    # --- the command loop --------------------------------------------------------------------------------
    async def handle(self, cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "upload":
            return {"sha256": await self.upload(list(cmd["urls"]), float(cmd["seconds"]), str(cmd["label"]))}
        if op == "add":
            job = dict(cmd["job"])
            record = {"job": job.get("id"), "namespace": job.get("namespace", "default"),
                      "count": job.get("count", 1), "sets": [{"file": s["file"], "count": s.get("count", 1)}
                                                             for s in job["sets"]]}
            return await self.request("add", "job/add", job, txn=str(cmd["txn"]),
                                      deadline_s=float(cmd.get("deadline_s", 20.0)), record=record)
        if op == "request":
            done = await self.request(str(cmd.get("label", cmd["path"])), str(cmd["path"]),
                                      dict(cmd.get("body") or {}), txn=cmd.get("txn"),
                                      deadline_s=float(cmd.get("deadline_s", 10.0)), record={})
            return done
        if op == "brokers":
            return {"known": {k: list(v) for k, v in self.brokers.known.items()},
                    "live": [list(a) for a in await self.brokers.live()]}
        raise RequestError(f"unknown command {op!r}")

    async def _run_one(self, cmd: dict[str, Any], out: TextIO) -> None:
        try:
            result = {"id": cmd.get("id"), "ok": True, "result": await self.handle(cmd)}
        except (NetqError, aiohttp.ClientError, OSError, KeyError, ValueError, TimeoutError) as exc:
            result = {"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        async with self._out_lock:
            out.write(json.dumps(result) + "\n")
            out.flush()

    async def serve(self, inp: asyncio.StreamReader, out: TextIO) -> None:
        while True:
            line = await inp.readline()
            if not line:
                break
            try:
                cmd = json.loads(line)
            except ValueError:
                continue
            if cmd.get("op") == "quit":
                break
            task = asyncio.create_task(self._run_one(cmd, out))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


async def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interface", required=True)
    parser.add_argument("--history", required=True, type=Path)
    args = parser.parse_args(argv)
    history = History(args.history)
    driver = Driver(args.interface, history)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await driver.start()
    print(json.dumps({"id": None, "ok": True, "ready": True}), flush=True)
    try:
        await driver.serve(reader, sys.stdout)
    finally:
        await driver.close()
        history.close()


if __name__ == "__main__":
    asyncio.run(main())
