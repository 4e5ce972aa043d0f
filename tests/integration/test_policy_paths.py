"""One G-code policy on every path a file takes: every rule refused on every path, with the line and the rule.

Paths: ``POST /files`` (the real FileServer on 127.0.0.1), ``job/add`` by sha256 (real node agents over a real
amqtt broker: the arbiter checks a holder's scan, its own or over HTTP), by URL (node/arbiter/url_jobs.py against
a real HTTP server), ``.gjob`` import (node/files/archive.py, and shared/gjob.py as ``netq add`` reads one),
``netq add`` (the CLI's check before it uploads), and the worker right before the printer is called (the
in-memory farm, whose arbiter has no store and so cannot refuse at submission: the worker is the last line).
The rules themselves: tests/unit/test_gcode_policy.py.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from typer.testing import CliRunner

from node.app.agent import NodeAgent
from node.app.cli import _policy_precheck, app
from node.app.client import FarmClient
from node.arbiter.url_jobs import resolve
from node.files.analysis import Verdicts
from node.files.archive import import_gjob
from node.files.holder_check import check_job_files
from node.files.http import FileServer, bearer_header
from node.files.store import FileStore
from node.files.url_guard import UrlPolicy
from shared import security
from shared.errors import ArchiveError, RequestError
from shared.gcode_policy import PolicyError
from shared.gjob import GjobSet, Manifest, read_gjob, write_gjob
from shared.models import CopyState, job_key
from shared.settings import GcodeSettings, Settings
from tests.conftest import AmqttServer
from tests.memfarm import MemFarm
from tests.unit.test_gcode_policy import RULE_CASES
from tests.waiting import until

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "gcode"
KEY = security.new_farm_key()
KEY_BYTES = security.parse_key(KEY)
OPERATOR = security.file_token(KEY_BYTES, security.Role.OPERATOR)
NODE = security.file_token(KEY_BYTES, security.Role.NODE)
LINE = 5  # where gcode_with puts the hostile line
IDS = [c[0] for c in RULE_CASES]
TIMING = {"heartbeat_s": 0.1, "election_timeout_s": 0.5, "lease_s": 60.0, "lock_delay_s": 0.5,
          "node_timeout_s": 2.0, "work_retry_s": 0.3}


def gcode_with(line: str, tag: str = "") -> bytes:
    """A small sliced-looking file with ``line`` on line :data:`LINE` (``tag`` makes its hash its own)."""
    return (f";FLAVOR:Marlin\n;TIME:30\n; {tag}\nG28\n{line}\nM104 S210\nG1 X10 Y10 E1\nM104 S0\n").encode()


def said(text: str, line: str, fragment: str) -> bool:
    """Whether ``text`` names line :data:`LINE` and the rule's message (console wrapping ignored)."""
    flat = " ".join(text.split())
    return f"line {LINE}: " in flat and " ".join(fragment.split()) in flat


# ---- POST /files -----------------------------------------------------------------------------------------


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[FileServer]:
    store = FileStore(tmp_path / "files")
    async with FileServer(store, key=KEY_BYTES, check=Verdicts(store, GcodeSettings()).scan) as s:
        yield s


async def post(server: FileServer, data: bytes) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.post(
            f"{server.base_url}/files", data=data, headers=bearer_header(OPERATOR)) as resp:
        return resp.status, await resp.json()


@pytest.mark.security
@pytest.mark.parametrize(("line", "rule", "fragment"), RULE_CASES, ids=IDS)
async def test_upload_that_breaks_the_policy_is_refused_and_not_stored(
        server: FileServer, line: str, rule: str, fragment: str) -> None:
    data = gcode_with(line)
    status, body = await post(server, data)
    assert status == 422, body
    assert said(body["error"], line, fragment), body
    assert body["violations"][0]["rule"] == rule and body["violations"][0]["line"] == LINE
    sha = hashlib.sha256(data).hexdigest()
    assert not server.store.has(sha)
    async with aiohttp.ClientSession() as session, session.get(
            f"{server.base_url}/files/{sha}", headers=bearer_header(OPERATOR)) as resp:
        assert resp.status == 404  # never served


@pytest.mark.parametrize("name", ["prusaslicer_mk3s.gcode", "cura_ender3.gcode", "orcaslicer_two_tools.gcode"])
async def test_sliced_files_upload_and_their_scan_is_served_to_the_farm(server: FileServer, name: str) -> None:
    status, body = await post(server, (DATA / name).read_bytes())
    assert status == 201, body
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{server.base_url}/files/{body['sha256']}/policy",
                               headers=bearer_header(NODE)) as resp:
            assert resp.status == 200
            scan = await resp.json()
        assert scan["rules"] == GcodeSettings().policy().fingerprint() and scan["blocked"] == []
        async with session.get(f"{server.base_url}/files/{body['sha256']}/policy") as resp:
            assert resp.status == 401  # the farm's token, as for the file itself
        async with session.get(f"{server.base_url}/files/{'0' * 64}/policy", headers=bearer_header(NODE)) as resp:
            assert resp.status == 404


# ---- by URL ----------------------------------------------------------------------------------------------


@pytest.fixture
async def web_server() -> AsyncIterator[tuple[str, dict[str, bytes]]]:
    """An HTTP server on 127.0.0.1 serving ``files[name]`` at ``/<name>``."""
    files: dict[str, bytes] = {}

    async def serve(request: web.Request) -> web.Response:
        body = files.get(request.match_info["name"])
        return web.Response(body=body) if body is not None else web.Response(status=404)

    application = web.Application()
    application.router.add_get("/{name}", serve)
    runner = web.AppRunner(application, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", files
    finally:
        await runner.cleanup()


@pytest.mark.security
@pytest.mark.parametrize(("line", "rule", "fragment"), RULE_CASES, ids=IDS)
async def test_url_job_that_breaks_the_policy_is_refused_and_deleted(
        tmp_path: Path, web_server: tuple[str, dict[str, bytes]], line: str, rule: str, fragment: str) -> None:
    base, files = web_server
    files["part.gcode"] = data = gcode_with(line)
    store = FileStore(tmp_path / "files")
    body = {"sets": [{"url": f"{base}/part.gcode"}]}
    with pytest.raises(RequestError) as caught:
        await resolve(body, store, "n1", policy=UrlPolicy.from_allow(["127.0.0.1/32"]), gcode=GcodeSettings())
    assert said(str(caught.value), line, fragment) and "sets.0" in str(caught.value)
    assert not store.has(hashlib.sha256(data).hexdigest())


async def test_url_job_is_checked_under_the_farm_settings_and_the_sets_profiles(
        tmp_path: Path, web_server: tuple[str, dict[str, bytes]]) -> None:
    base, files = web_server
    files["hot.gcode"] = gcode_with("M104 S350")
    files["probe.gcode"] = gcode_with("M851 Z-1.2")
    store = FileStore(tmp_path / "files")
    url_policy = UrlPolicy.from_allow(["127.0.0.1/32"])
    gcode = GcodeSettings(block=["M851"], profiles={"PEEK printer": {"max_hotend_c": 420}})
    with pytest.raises(RequestError, match="M851 is blocked by \\[gcode\\] block"):
        await resolve({"sets": [{"url": f"{base}/probe.gcode"}]}, store, "n1", policy=url_policy, gcode=gcode)
    with pytest.raises(RequestError, match="above the 285 °C cap"):
        await resolve({"sets": [{"url": f"{base}/hot.gcode"}]}, store, "n1", policy=url_policy, gcode=gcode)
    ok = await resolve({"sets": [{"url": f"{base}/hot.gcode", "profiles": ["PEEK printer"]}]}, store, "n1",
                       policy=url_policy, gcode=gcode)
    assert ok["sets"][0]["holders"] == ["n1"] and store.has(ok["sets"][0]["sha256"])


# ---- .gjob import, and netq add ---------------------------------------------------------------------------


def gjob_with(data: bytes) -> bytes:
    manifest = Manifest(name="j", count=1, sets=[GjobSet(path="plate.gcode", count=1), GjobSet(path="bad.gcode", count=1)])
    return write_gjob(manifest, {"plate.gcode": (DATA / "prusaslicer_mk3s.gcode").read_bytes(), "bad.gcode": data})


@pytest.mark.security
@pytest.mark.parametrize(("line", "rule", "fragment"), RULE_CASES, ids=IDS)
async def test_gjob_import_that_breaks_the_policy_is_refused_and_not_kept(
        tmp_path: Path, line: str, rule: str, fragment: str) -> None:
    data = gcode_with(line)
    archive = gjob_with(data)
    store = FileStore(tmp_path / "files")
    with pytest.raises(ArchiveError) as caught:
        await import_gjob(archive, store, policy=GcodeSettings().policy())
    assert str(caught.value).startswith("bad.gcode: breaks the G-code policy") and said(str(caught.value), line,
                                                                                          fragment)
    assert not store.has(hashlib.sha256(data).hexdigest())
    with pytest.raises(ArchiveError) as read:  # what `netq add job.gjob` checks before it uploads
        read_gjob(archive, policy=GcodeSettings().policy())
    assert said(str(read.value), line, fragment)


async def test_gjob_import_of_sliced_files_passes(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files")
    imported = await import_gjob(gjob_with((DATA / "cura_ender3.gcode").read_bytes()), store,
                                 policy=GcodeSettings().policy())
    assert all(store.has(sha) for sha in imported.shas.values()) and len(imported.shas) == 2


@pytest.mark.security
@pytest.mark.parametrize(("line", "rule", "fragment"), RULE_CASES, ids=IDS)
def test_netq_add_refuses_before_uploading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           line: str, rule: str, fragment: str) -> None:
    monkeypatch.delenv("NETQ_CONFIG", raising=False)
    path = tmp_path / "part.gcode"
    path.write_bytes(gcode_with(line))
    archive = tmp_path / "job.gjob"
    archive.write_bytes(gjob_with(gcode_with(line)))
    for given in (path, archive):
        # No broker answers on port 9: an error about the policy shows nothing was sent anywhere.
        result = CliRunner().invoke(app, ["add", str(given), "--broker", "mqtt://127.0.0.1:9"])
        assert result.exit_code == 1
        assert said(result.output, line, fragment), result.output
        assert "breaks the G-code policy" in " ".join(result.output.split())


def test_netq_add_checks_under_the_local_config(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'node_id = "n1"\ndata_dir = "{tmp_path}"\n[farm]\nkey = "{KEY}"\n'
                      '[gcode]\nblock = ["M851"]\nallow = ["M112"]\n[gcode.profiles."hot"]\nmax_hotend_c = 400\n')
    files = {name: tmp_path / f"{name}.gcode" for name in ("probe", "stop", "hot")}
    files["probe"].write_bytes(gcode_with("M851 Z-1"))
    files["stop"].write_bytes(gcode_with("M112"))
    files["hot"].write_bytes(gcode_with("M104 S350"))
    with pytest.raises(PolicyError, match="M851 is blocked"):
        _policy_precheck([files["probe"]], False, config, None)
    _policy_precheck([files["stop"]], False, config, None)
    _policy_precheck([files["hot"]], False, config, ["hot"])
    _policy_precheck([DATA / "prusaslicer_mk3s.gcode", DATA / "cura_griffin_um3.gcode"], False, config, None)


# ---- job/add by sha256: the arbiter checks a holder ---------------------------------------------------------


class Farm:
    """Keyed node agents in this process on one amqtt broker, and an operator's client."""

    def __init__(self, root: Path, broker: tuple[str, int]) -> None:
        self.root, self.broker = root, broker
        self.agents: dict[str, NodeAgent] = {}
        self.client: FarmClient | None = None

    async def start(self, node_id: str, gcode: dict[str, Any] | None = None, **printer: Any) -> NodeAgent:
        settings = Settings(node_id=node_id, data_dir=self.root / node_id, farm={"key": KEY},
                            broker={"url": f"mqtt://{self.broker[0]}:{self.broker[1]}"}, timing=TIMING,
                            printer={"driver": "simulated", "time_scale": 6000.0, "self_clearing": True, **printer},
                            files={"bind": "127.0.0.1", "port": 0}, gcode=gcode or {})
        agent = self.agents[node_id] = NodeAgent(settings)
        await agent.start()
        return agent

    async def connect(self, members: int) -> FarmClient:
        role = security.Role.OPERATOR
        self.client = FarmClient(self.broker, username=role.value, password=security.broker_password(KEY_BYTES, role),
                                 state_key=security.state_public_key(KEY_BYTES))
        await self.client.connect()
        await until(lambda: (a := self.arbiter()) is not None and len(a.consensus.members) == members
                    and all(a.nodes.get(n, {}).get("files_url") for n in self.agents), f"{members} members", 20)
        await self.client.request("health_check")
        return self.client

    def arbiter(self) -> NodeAgent | None:
        return next((a for a in self.agents.values() if a.arbiter.active), None)

    async def add(self, holder: str, sha: str, transaction: str, **job: Any) -> dict[str, Any]:
        assert self.client is not None
        sets = [{"file": "part.gcode", "sha256": sha, "holders": [holder], **job.pop("set", {})}]
        return await self.client.request_raw("job/add", {"sets": sets, **job}, transaction=transaction,
                                             timeout=15)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        for agent in self.agents.values():
            await agent.stop()


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[Farm]:
    server = AmqttServer()
    await server.start()
    f = Farm(tmp_path, server.address)
    try:
        yield f
    finally:
        await f.stop()
        await server.stop()
        with warnings.catch_warnings():  # amqtt leaves sockets of clients gone mid-delivery (test_node_api.py)
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


async def two_nodes(farm: Farm, gcode: dict[str, Any] | None = None, **n2: Any) -> tuple[NodeAgent, NodeAgent]:
    """(arbiter, other) of a farm of two keyed nodes (``n2``: printer settings of n2)."""
    await farm.start("n1", gcode)
    await farm.start("n2", gcode, **n2)
    await farm.connect(2)
    arbiter = farm.arbiter()
    assert arbiter is not None
    return arbiter, next(a for a in farm.agents.values() if a is not arbiter)


@pytest.mark.security
async def test_job_add_by_sha_checks_every_rule_with_the_holder_local_and_remote(farm: Farm) -> None:
    arbiter, other = await two_nodes(farm)
    for i, (line, rule, fragment) in enumerate(RULE_CASES):
        for holder in (arbiter, other):
            # Put straight into the holder's store, as if it had come by a path that did not check.
            sha = await holder.store.put_stream(gcode_with(line, f"{i} {holder.node_id}"))
            answer = await farm.add(holder.node_id, sha, f"bad-{i}-{holder.node_id}")
            assert answer["status"] == "error", (line, holder.node_id, answer)
            assert said(answer["error"], line, fragment) and "sets.0: part.gcode breaks the G-code policy" in \
                answer["error"], (line, holder.node_id, answer["error"])
    assert arbiter.consensus.state.jobs() == []  # nothing was queued


@pytest.mark.security
async def test_job_add_by_sha_is_refused_when_no_holder_holds_the_file(farm: Farm) -> None:
    arbiter, other = await two_nodes(farm)
    nobody = hashlib.sha256(b"nobody holds this").hexdigest()
    answer = await farm.add("n9", nobody, "t-n9")
    assert answer["status"] == "error" and "no holder holds file" in answer["error"]
    assert "n9 is not an online node of the farm" in answer["error"]
    for holder in (arbiter, other):
        answer = await farm.add(holder.node_id, nobody, f"t-{holder.node_id}")
        assert answer["status"] == "error" and f"{holder.node_id}" in answer["error"]
        assert "does not hold it" in answer["error"]
    # Held by the other node, but the job names only the arbiter: the arbiter does not take anyone's word.
    sha = await other.store.put_stream(gcode_with("G28", "held elsewhere"))
    answer = await farm.add(arbiter.node_id, sha, "t-wrong-holder")
    assert answer["status"] == "error" and "(this arbiter) does not hold it" in answer["error"]
    assert arbiter.consensus.state.jobs() == []


async def test_job_add_of_a_passing_file_is_acknowledged_and_printed(farm: Farm) -> None:
    arbiter, other = await two_nodes(farm)
    async with aiohttp.ClientSession() as session, session.post(
            f"{other.files_url}/files", data=(DATA / "prusaslicer_mk3s.gcode").read_bytes(),
            headers=bearer_header(OPERATOR)) as resp:
        assert resp.status == 201
        sha = (await resp.json())["sha256"]
    answer = await farm.add(other.node_id, sha, "good")
    assert answer["status"] == "ok", answer
    key = job_key("default", answer["data"]["id"])
    await until(lambda: (j := arbiter.consensus.state.job(key)) is not None
                and j.copies[0].state == CopyState.DONE, "the job printed", 30)


@pytest.mark.security
async def test_job_add_follows_the_farms_gcode_settings(farm: Farm) -> None:
    gcode = {"block": ["M851"], "allow": ["M112"], "max_hotend_c": 250,
             "profiles": {"PEEK printer": {"max_hotend_c": 420}}}
    arbiter, other = await two_nodes(farm, gcode, profile="PEEK printer")
    peek = farm.agents["n2"]
    cases = [  # (line, set fields, refused with)
        ("M851 Z-1", {}, "M851 is blocked by [gcode] block"),
        ("M112", {}, None),
        ("M104 S260", {}, "above the 250 °C cap"),
        ("M104 S400", {"profiles": ["PEEK printer"]}, None),
        ("M104 S430", {"profiles": ["PEEK printer"]}, "above the 420 °C cap"),
    ]
    accepted = []
    for i, (line, fields, refused) in enumerate(cases):
        sha = await other.store.put_stream(gcode_with(line, f"knob {i}"))
        answer = await farm.add(other.node_id, sha, f"knob-{i}", set=fields, count=1)
        if refused is None:
            assert answer["status"] == "ok", (line, answer)
            accepted.append(job_key("default", answer["data"]["id"]))
        else:
            assert answer["status"] == "error" and refused in answer["error"], (line, answer)

    def copies() -> list[Any]:
        return [(j := arbiter.consensus.state.job(k)) and j.copies[0] for k in accepted]

    await until(lambda: all(c and c.state == CopyState.DONE for c in copies()), "the accepted jobs printed", 30)
    assert copies()[1].node == peek.node_id  # the 400 °C set: on the printer whose profile allows it


@pytest.mark.security
async def test_a_holder_under_other_rules_or_that_never_answers_does_not_count(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "holder")
    sha = await store.put_stream(gcode_with("G28", "ok"))
    lax = GcodeSettings(allow=["M112"])
    hung = asyncio.Event()

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await hung.wait()
        writer.close()

    silent = await asyncio.start_server(hang, "127.0.0.1", 0)
    silent_url = f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}"
    try:
        async with FileServer(store, key=KEY_BYTES, check=Verdicts(store, lax).scan) as holder:
            nodes = {"n2": {"state": "online", "files_url": holder.base_url},
                     "n3": {"state": "online", "files_url": silent_url}}
            sets = [{"file": "part.gcode", "sha256": sha, "holders": ["n2"], "profiles": []}]
            with pytest.raises(RequestError, match=r"n2 reads G-code under other \[gcode\] rules"):
                await check_job_files(sets, own_id="n1", verdicts=None, nodes=nodes, gcode=GcodeSettings(),
                                      token=NODE)
            await check_job_files(sets, own_id="n1", verdicts=None, nodes=nodes, gcode=lax, token=NODE)
            with pytest.raises(RequestError, match="refused our token|HTTP 401"):
                await check_job_files(sets, own_id="n1", verdicts=None, nodes=nodes, gcode=lax, token=None)
            # A holder that never answers: the next one is asked in time, and alone it is an error, in time.
            loop = asyncio.get_running_loop()
            began = loop.time()
            await check_job_files([dict(sets[0], holders=["n3", "n2"])], own_id="n1", verdicts=None,
                                  nodes=nodes, gcode=lax, token=NODE, timeout=1.0)
            with pytest.raises(RequestError, match="n3 could not be asked|could not be checked within"):
                await check_job_files([dict(sets[0], holders=["n3"])], own_id="n1", verdicts=None,
                                      nodes=nodes, gcode=lax, token=NODE, timeout=0.5)
            assert loop.time() - began < 3.0
    finally:
        hung.set()
        silent.close()
        await silent.wait_closed()


# ---- the worker, right before the printer ------------------------------------------------------------------


@pytest.mark.security
async def test_the_worker_never_calls_the_printer_with_a_file_that_breaks_the_policy(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 2, time_scale=6000.0)
    await farm.start()
    try:
        await farm.ready(2)
        jobs: dict[str, tuple[str, str]] = {}
        for i, (line, _rule, fragment) in enumerate(RULE_CASES):
            sha = farm.add_file(gcode_with(line, f"worker {i}"))
            answer = await farm.request("job/add", {"sets": [{"file": "part.gcode", "sha256": sha,
                                                             "holders": ["n1"]}]}, f"w-{i}")
            assert answer["status"] == "ok", answer  # this arbiter has no store: only the worker can refuse
            jobs[answer["data"]["id"]] = (line, fragment)
        good = farm.add_file((DATA / "cura_ender3.gcode").read_bytes())
        ok = await farm.request("job/add", {"sets": [{"file": "good.gcode", "sha256": good, "holders": ["n1"]}]},
                                "w-good")

        def copy(job_id: str) -> Any:
            arbiter = farm.arbiter()
            job = arbiter.consensus.state.job(job_key("default", job_id)) if arbiter else None
            return job.copies[0] if job else None

        def settled() -> bool:
            return all((c := copy(j)) is not None and c.state == CopyState.FAILED for j in jobs)

        await until(settled, "every hostile copy failed after its attempts", 60)
        for job_id, (line, fragment) in jobs.items():
            reason = copy(job_id).reason
            assert "breaks the G-code policy of this printer" in reason and said(reason, line, fragment), reason
        await until(lambda: (c := copy(ok["data"]["id"])) is not None and c.state == CopyState.DONE,
                    "the sliced file printed", 30)
        assert [name for name in farm.starts() if name.split("-")[0] in jobs] == []  # the printer never saw one
    finally:
        await farm.stop()
