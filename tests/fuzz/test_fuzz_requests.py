"""Every request path, fuzzed: arbitrary bytes and JSON, nesting past every bound, and each path's valid body
with hostile parts. Properties: nothing but the project's own RequestError escapes a decoder or handler; every
request published gets exactly one answer, an error for a bad one; a refused request changes nothing."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.app import node_commands
from node.app.node_commands import NodeCommands
from node.link.base import Message
from shared import farm_api
from shared.errors import RequestError
from shared.models import (
    CopyState,
    Job,
    JobCopy,
    JobSet,
    Member,
    QueueSettings,
    StoredObject,
    job_key,
    member_key,
    queue_key,
)
from shared.state import FarmState
from tests.fuzz.conftest import FUZZ, ran
from tests.fuzz.strategies import API_PATHS, NODE_PATHS, SHA, TEMPLATES, hostile_body, payloads
from tests.memfarm import MemFarm

pytestmark = pytest.mark.security

ANSWER_S = 10.0


def test_every_request_path_has_a_fuzz_template() -> None:
    assert set(TEMPLATES) == {*API_PATHS, *NODE_PATHS}


# --- the pure decoders and handlers ---------------------------------------------------------------------------
def _farm_state() -> FarmState:
    job = Job(id="x", namespace="default", name="x", count=2, created=1.0,
              sets=[JobSet(file="a.gcode", sha256=SHA, holders=["n1"])],
              copies=[JobCopy(index=0), JobCopy(index=1, state=CopyState.FAILED, attempts=3, reason="r")])
    other = job.model_copy(update={"id": "y", "rank": 1.0})
    objects = [(job_key("default", "x"), job.model_dump(mode="json")),
               (job_key("default", "y"), other.model_dump(mode="json")),
               (queue_key("default"), QueueSettings(namespace="default").model_dump(mode="json"))]
    objects += [(member_key(n), Member(node_id=n, enrolled_at=1.0).model_dump(mode="json")) for n in ("n1", "n2")]
    return FarmState(StoredObject(key=k, stamp=(1, i + 1), value=v) for i, (k, v) in enumerate(objects))


STATE = _farm_state()


def _context() -> farm_api.Context:
    return farm_api.Context(now=1e9, new_id=lambda: "fzid", nodes={"n1": {"node_id": "n1", "state": "online"}},
                       info={"arbiter": "n1", "term": 1}, reachable=frozenset({"n1", "n2"}))


def _snapshot(state: FarmState) -> dict[str, str]:
    return {k: o.model_dump_json() for k, o in state.objects.items()}


BEFORE = _snapshot(STATE)
_VALUE_MODELS: dict[str, type[Any]] = {"job": Job, "queue": QueueSettings, "member": Member}


@FUZZ
@given(path=st.sampled_from(API_PATHS), data=st.data())
def test_api_requests_are_handled_or_refused_and_never_change_the_state_they_read(
        path: str, data: st.DataObject) -> None:
    payload = data.draw(payloads(path), label="payload")
    ran("api decode+handle (pure)")
    try:
        body, txn = farm_api.parse_envelope(path, payload)
        handler = farm_api.MUTATING.get(path) or farm_api.READING[path]
        out = handler(STATE, body, _context())
    except RequestError as exc:
        assert json.loads(farm_api.response("error", {}, None, str(exc)))["status"] == "error"
        assert _snapshot(STATE) == BEFORE
        return
    assert _snapshot(STATE) == BEFORE  # pure: the arbiter commits the writes, the handler never applies them
    json.loads(farm_api.response("ok", out.data, txn))
    for key, value in out.writes:  # what an accepted request writes is a valid record
        StoredObject(key=key, stamp=(2, 1), value=value)
        if value is not None:
            _VALUE_MODELS[key.split("/", 1)[0]].model_validate(value, strict=False)  # as FarmState reads it
            json.dumps(value).encode()


@FUZZ
@given(path=st.sampled_from(NODE_PATHS), data=st.data())
def test_node_commands_are_routed_or_refused(path: str, data: st.DataObject) -> None:
    payload = data.draw(payloads(path), label="payload")
    ran("node command decode (pure)")
    error = node_commands.routing_error(path, payload, lambda n: n in ("n1", "n2"))
    if error is not None:
        assert isinstance(error, str) and error
        return
    body, _, node = node_commands.addressee(path, payload)
    assert node in ("n1", "n2")
    try:
        node_commands._MODELS[path].model_validate_json(json.dumps(body))
        farm_api._model(node_commands._MODELS[path], body)
    except (RequestError, ValueError):
        pass


# --- through a farm: every request published is answered once ----------------------------------------------
class _Answers:
    """Every answer published on ``<base>/response/#``, by topic."""

    def __init__(self) -> None:
        self.by_topic: dict[str, list[dict[str, Any]]] = {}

    def on(self, msg: Message) -> None:
        self.by_topic.setdefault(msg.topic, []).append(json.loads(msg.payload))

    def count(self, topic: str) -> int:
        return len(self.by_topic.get(topic, []))


@contextmanager
def _running(farm: MemFarm, members: int) -> Iterator[tuple[asyncio.AbstractEventLoop, _Answers]]:
    loop = asyncio.new_event_loop()
    answers = _Answers()
    try:
        loop.run_until_complete(farm.start())
        loop.run_until_complete(farm.ready(members))
        farm.client.subscribe("netq/response/#", answers.on)
        yield loop, answers
    finally:
        loop.run_until_complete(farm.stop())
        loop.close()


def _ask(farm: MemFarm, loop: asyncio.AbstractEventLoop, answers: _Answers, path: str,
         payload: bytes) -> dict[str, Any]:
    """Publish one request; return its one answer (failing if none comes, or more than one)."""
    topic = f"netq/response/{path}"
    n = answers.count(topic)
    farm.client.publish(f"netq/request/{path}", payload, qos=1)
    loop.run_until_complete(farm.wait_for(lambda: answers.count(topic) > n, ANSWER_S, f"an answer on {path}"))
    assert answers.count(topic) == n + 1, answers.by_topic[topic][n:]
    return answers.by_topic[topic][n]


def _with_txn(payload: bytes, txn: str) -> bytes:
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return payload
    return json.dumps({**body, "transaction": txn}).encode() if isinstance(body, dict) else payload


def test_api_requests_through_the_arbiter(tmp_path: Path) -> None:
    """A witness-only farm (nothing but requests changes its state): every request answered, an error for
    every one the pure decoder refuses, and an answered error leaves every object and the commit as they were."""
    farm = MemFarm(tmp_path, 0, witnesses=1)
    txns = itertools.count()
    with _running(farm, 1) as (loop, answers):
        arb = farm.arbiter()
        assert arb is not None
        # Acknowledge job adds at once: replication (a second holder) is not what this test is about.
        arb.arbiter.replication.before_add = lambda value, now, proceed: proceed({})  # type: ignore[method-assign]
        statuses: Counter[str] = Counter()

        @FUZZ
        @given(path=st.sampled_from(API_PATHS), data=st.data())
        def through(path: str, data: st.DataObject) -> None:
            payload = _with_txn(data.draw(payloads(path), label="payload"), f"fz{next(txns)}")
            ran("api through the arbiter")
            try:
                farm_api.parse_envelope(path, payload)
                decodes = True
            except RequestError:
                decodes = False
            before = (arb.consensus.commit, {k: o.stamp for k, o in arb.consensus.state.objects.items()})
            answer = _ask(farm, loop, answers, path, payload)
            statuses[answer["status"]] += 1
            assert answer["status"] in ("ok", "error"), answer
            if not decodes:
                assert answer["status"] == "error" and answer["error"], answer
            if answer["status"] == "error":
                after = (arb.consensus.commit, {k: o.stamp for k, o in arb.consensus.state.objects.items()})
                assert after == before, f"refused {path} changed the state"
            assert farm.arbiter() is arb  # the arbiter keeps serving

        through()
        assert statuses["error"] > 0
        # Still a working farm after all that.
        r = loop.run_until_complete(farm.request("health_check", {}, "after-fuzz"))
        assert r["status"] == "ok"


def test_node_commands_through_the_farm(tmp_path: Path) -> None:
    """A one-printer farm with the node's command handler: every command answered once (by the node, or by the
    arbiter when no node can be told from it), and no command changes the farm's state."""
    farm = MemFarm(tmp_path, 1)
    with _running(farm, 1) as (loop, answers):
        node = farm.nodes[0]
        arb = farm.arbiter()
        assert arb is not None and node.worker is not None
        shim: Any = type("Agent", (), {})()
        for name in ("node_id", "topics", "link", "worker", "settings", "consensus", "replica"):
            setattr(shim, name, getattr(node, name))
        shim.schedule_publish = lambda: None
        commands = NodeCommands(shim, release_timeout=1.0)
        loop.run_until_complete(commands.start())
        try:
            @FUZZ
            @given(path=st.sampled_from(NODE_PATHS), data=st.data())
            def through(path: str, data: st.DataObject) -> None:
                payload = data.draw(payloads(path) | hostile_body(path).map(
                    lambda b: json.dumps(b).encode()), label="payload")
                ran("node commands through the farm")
                before = (arb.consensus.commit, {k: o.stamp for k, o in arb.consensus.state.objects.items()})
                answer = _ask(farm, loop, answers, path, payload)
                assert answer["status"] in ("ok", "error"), answer
                assert (arb.consensus.commit, {k: o.stamp for k, o in arb.consensus.state.objects.items()}) \
                    == before

            through()
        finally:
            loop.run_until_complete(commands.stop())
