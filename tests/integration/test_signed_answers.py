"""Signed answers and retained state, with real node agents of a farm with a key over a real amqtt broker.

An intruder (here: a client with the ``operator`` credential, on a broker whose ACL lets it write where it
should not — the case the signatures are for) answers a request before the arbiter does, replaces a node's
retained state, or moves a genuine signed message to another topic. A :class:`node.app.client.FarmClient` given the
farm's public state key ignores all of it and returns the farm's own answer; one without the key is fooled,
which shows each attack does reach the client.
"""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from node.app.agent import NodeAgent
from node.app.client import FarmClient
from node.link.base import Message
from node.link.signing import StateSigning, is_signed_topic
from shared import farm_api, security
from shared.errors import NetqError
from shared.settings import FarmSettings, Settings
from shared.topics import Topics
from tests.conftest import AmqttServer
from tests.waiting import until as _until

pytestmark = pytest.mark.integration

KEY = security.new_farm_key()
RAW = security.parse_key(KEY)
PUBLIC = security.state_public_key(RAW)
INTRUDER = StateSigning.for_farm(FarmSettings(key=security.new_farm_key()))  # signs, with another farm's key
TIMING = {"heartbeat_s": 0.1, "election_timeout_s": 0.5, "lease_s": 60.0, "lock_delay_s": 0.5,
          "node_timeout_s": 2.0, "work_retry_s": 0.3}
T = Topics()


async def until(cond: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    return await _until(cond, what, timeout)


class Farm:
    """Node agents of one keyed farm in this process, sharing one broker; clients that close with it."""

    def __init__(self, root: Path, broker: tuple[str, int]) -> None:
        self.root = root
        self.broker = broker
        self.agents: dict[str, NodeAgent] = {}
        self.clients: list[FarmClient] = []

    async def start(self, node_id: str, farm: dict[str, Any] | None = None) -> NodeAgent:
        settings = Settings(node_id=node_id, data_dir=self.root / node_id, farm=farm or {"key": KEY},
                            broker={"url": f"mqtt://{self.broker[0]}:{self.broker[1]}"}, timing=TIMING,
                            printer={"driver": "simulated", "time_scale": 600.0, "self_clearing": True},
                            files={"bind": "127.0.0.1", "port": 0})
        agent = NodeAgent(settings)
        await agent.start()
        self.agents[node_id] = agent
        return agent

    async def client(self, *, state_key: str | None = PUBLIC, role: security.Role = security.Role.OPERATOR
                     ) -> FarmClient:
        client = FarmClient(self.broker, username=role.value, password=security.broker_password(RAW, role),
                            state_key=state_key)
        await client.connect()
        self.clients.append(client)
        return client

    def arbiter(self) -> NodeAgent | None:
        return next((a for a in self.agents.values() if a.arbiter.active), None)

    async def ready(self, members: int) -> None:
        await until(lambda: (a := self.arbiter()) is not None and len(a.consensus.members) == members
                    and not a.arbiter.requests.member_change_pending, f"an arbiter with {members} members")

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        for agent in self.agents.values():
            await agent.stop()


@pytest.fixture
async def farm(tmp_path: Path) -> AsyncIterator[Farm]:
    server = AmqttServer()  # anonymous clients allowed: no ACL stands between the intruder and the topics
    await server.start()
    f = Farm(tmp_path, server.address)
    try:
        yield f
    finally:
        await f.stop()
        await server.stop()
        with warnings.catch_warnings():  # see tests/integration/test_node_api.py's broker fixture
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


def answer_first(intruder: FarmClient, path: str, forge: Callable[[str], bytes]) -> list[Message]:
    """Make ``intruder`` answer every request on ``path`` the moment it sees it (before the arbiter can: a
    mutating request is answered only after a commit, a round trip to the other members); return every
    message on the response topic, in the order the broker delivered them."""
    seen: list[Message] = []

    def on_request(msg: Message) -> None:
        txn = json.loads(msg.payload).get("transaction")
        intruder.link.publish(T.response(path), forge(txn), qos=1)

    intruder.link.subscribe(T.response(path), seen.append)
    intruder.link.subscribe(T.request(path), on_request)
    return seen


def _forged_pause(txn: str) -> bytes:
    return INTRUDER.sign_payload(T.response("queue/pause"),
                                 farm_api.response("ok", {"namespace": "default", "paused": False}, txn))


@pytest.mark.security
async def test_a_forged_early_answer_is_ignored_and_the_real_one_returned(farm: Farm) -> None:
    for node in ("n1", "n2"):
        await farm.start(node)
    await farm.ready(2)
    intruder = await farm.client(state_key=None)
    seen = answer_first(intruder, "queue/pause", _forged_pause)
    client = await farm.client()
    await client.request("health_check")  # the intruder's subscriptions are in place after this round trip

    data = await client.request("queue/pause", {"namespace": "default"}, transaction="t-real")
    assert data["paused"] is True  # the farm's answer, not the intruder's
    assert client.dropped == {"forged": 1}
    await until(lambda: len(seen) == 2, "both answers on the wire")
    assert json.loads(seen[0].payload)["data"]["paused"] is False, "the forged answer must come first"
    assert security.verify_state(PUBLIC, seen[1].topic, json.loads(seen[1].payload))

    # Without the state key the same intruder wins: the attack does reach a client.
    naive = await farm.client(state_key=None)
    fooled = await naive.request("queue/pause", {"namespace": "default"})
    assert fooled["paused"] is False


@pytest.mark.security
async def test_an_unsigned_answer_is_refused_with_the_key_and_accepted_without(farm: Farm) -> None:
    await farm.start("n1")
    await farm.ready(1)
    intruder = await farm.client(state_key=None)
    unsigned = answer_first(intruder, "queue/resume", lambda txn: farm_api.response(
        "ok", {"namespace": "default", "paused": True, "by": "intruder"}, txn))
    client = await farm.client()
    await client.request("health_check")

    data = await client.request("queue/resume", {"namespace": "default"})
    assert data == {"namespace": "default", "paused": False} and client.dropped == {"unsigned": 1}
    naive = await farm.client(state_key=None)
    assert (await naive.request("queue/resume", {"namespace": "default"}))["by"] == "intruder"
    await until(lambda: len(unsigned) == 4, "every answer on the wire")


async def test_an_open_farm_signs_nothing_and_a_client_with_a_state_key_says_why_it_hears_nothing(
        farm: Farm) -> None:
    await farm.start("n1", farm={"open": True})
    await farm.ready(1)
    naive = await farm.client(state_key=None)
    assert security.SIG_FIELD not in await naive.request_raw("health_check")
    client = await farm.client()
    with pytest.raises(NetqError, match="signed by this farm"):
        await client.request("health_check", timeout=1.0)
    assert client.dropped == {"unsigned": 1}


@pytest.mark.security
async def test_a_genuine_answer_moved_to_another_request_is_refused(farm: Farm) -> None:
    await farm.start("n1")
    await farm.ready(1)
    intruder = await farm.client(state_key=None)
    recorded = await intruder.request_raw("health_check", transaction="t-reused")
    assert security.verify_state(PUBLIC, T.response("health_check"), recorded)
    # The farm's own signed answer to another request with the same transaction, replayed as this answer.
    answer_first(intruder, "queue/pause", lambda txn: json.dumps(recorded).encode())
    client = await farm.client()
    await client.request("health_check")

    data = await client.request("queue/pause", {"namespace": "default"}, transaction="t-reused")
    assert data["paused"] is True and client.dropped == {"forged": 1}


@pytest.mark.security
async def test_a_forged_or_moved_retained_node_state_is_ignored(farm: Farm) -> None:
    for node in ("n1", "n2"):
        await farm.start(node)
    await farm.ready(2)
    client, naive = await farm.client(), await farm.client(state_key=None)
    kept: list[Message] = []
    fooled: list[Message] = []
    client.watch(T.node_state_filter, kept.append)
    naive.watch(T.node_state_filter, fooled.append)
    await until(lambda: {"n1", "n2"} <= set(client.node_states()), "both node states, signed")
    genuine = client.retained[T.node_state("n1")]
    before = len(kept)

    intruder = await farm.client(state_key=None)
    forged = {"node_id": "n1", "state": "online", "worker": "error", "reason": "forged"}
    intruder.link.publish(T.node_state("n1"), INTRUDER.encode(T.node_state("n1"), forged), retain=True)
    intruder.link.publish(T.node_state("n8"), json.dumps({"node_id": "n8", "state": "online"}).encode(),
                          retain=True)
    intruder.link.publish(T.node_state("n9"), genuine, retain=True)  # n1's own signed state, moved
    await until(lambda: sum(client.dropped.values()) == 3, "the three forgeries refused")
    assert client.dropped == {"forged": 2, "unsigned": 1}
    await until(lambda: {"n8", "n9"} <= {m.topic.split("/")[2] for m in fooled}, "the naive client fooled")
    assert any(json.loads(m.payload).get("reason") == "forged" for m in fooled)

    states = client.node_states()
    assert set(states) == {"n1", "n2"} and states["n1"].get("reason") != "forged"
    assert all(security.verify_state(PUBLIC, m.topic, json.loads(m.payload)) for m in kept[before:])
    for topic in (T.node_state("n8"), T.node_state("n9")):
        intruder.link.publish(topic, b"", retain=True)  # leave the broker clean (MQTT 3.1.1 §3.3.1.3)


async def test_every_retained_state_and_answer_of_the_farm_is_signed(farm: Farm) -> None:
    recorder = await farm.client(state_key=None, role=security.Role.NODE)
    wire: list[Message] = []
    recorder.link.subscribe("netq/#", wire.append)
    recorder.link.subscribe("homeassistant/#", wire.append)
    n1 = await farm.start("n1")
    await farm.start("n2")
    await farm.ready(2)
    client = await farm.client()
    sha = await n1.store.put_stream(b";TIME:30\n; signed\nG28\nG1 X10 Y10\n")
    job = await client.request("job/add", {"sets": [{"file": "part.gcode", "sha256": sha, "holders": ["n1"]}]},
                               timeout=15)
    await client.request("queue/list")
    assert (await client.request("node/accept_jobs", {"node": "n2", "accept": True}))["node"] == "n2"
    kinds = {"nodes/n1/state", "nodes/n2/state", f"queues/default/jobs/{job['id']}", "bridge/state",
             "bridge/info", "bridge/summary", "nodes/n1/summary", "response/job/add", "response/queue/list",
             "response/node/accept_jobs"}

    def seen() -> set[str]:
        return {m.topic.removeprefix("netq/") for m in wire if m.payload}

    await until(lambda: kinds <= seen(), "every kind of signed message", 30)
    for agent in list(farm.agents.values()):
        await agent.stop()  # each says it is offline, signed
    await until(lambda: sum(1 for m in wire if m.payload and b'"offline"' in m.payload) >= 2, "offline states")

    signed = [m for m in wire if m.payload and is_signed_topic(T, m.topic)]
    bad = [m.topic for m in signed if not security.verify_state(PUBLIC, m.topic, json.loads(m.payload))]
    assert not bad, f"not validly signed: {sorted(set(bad))}"
    configs = [json.loads(m.payload) for m in wire if m.topic.endswith("/config") and m.payload]
    assert configs and all(security.SIG_FIELD not in c for c in configs)  # Home Assistant's own format
    # The last will, given to the broker at connect time, is signed too.
    will = n1.link.options.will  # type: ignore[attr-defined]
    assert will is not None and security.verify_state(PUBLIC, will.topic, json.loads(will.payload))
