"""Signed state and answers (node/link/signing.py): which topics are signed, signing, and the client-side check."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.link.signing import StateSigning, StateVerifier, is_signed_topic
from shared import farm_api, security
from shared.settings import FarmSettings
from shared.topics import Topics

KEY = security.new_farm_key()
OTHER = security.new_farm_key()
RAW = security.parse_key(KEY)
PUBLIC = security.state_public_key(RAW)
T = Topics()
NODE = T.node_state("n1")
JOB = T.job("default", "abc")


def verifier() -> StateVerifier:
    return StateVerifier(PUBLIC, T)


def signing() -> StateSigning:
    return StateSigning.for_farm(FarmSettings(key=KEY))


@pytest.mark.parametrize(("topic", "signed"), [
    ("netq/bridge/state", True), ("netq/bridge/info", True), ("netq/bridge/summary", True),
    ("netq/nodes/n1/state", True), ("netq/nodes/n1/summary", True), ("netq/queues/default/jobs/abc", True),
    ("netq/response/job/add", True), ("netq/response/node/pause", True),
    ("netq/events", False), ("netq/nodes/n1/events", False), ("netq/request/job/add", False),
    ("netq/_proto/log", False), ("homeassistant/sensor/netq_n1/state/config", False),
    ("homeassistant/status", False), ("netq/response", False), ("netq/bridge/other", False),
    ("netq/queues/default/jobs", False), ("other/bridge/state", False), ("netqx/bridge/state", False),
])
def test_signed_topics(topic: str, signed: bool) -> None:
    assert is_signed_topic(T, topic) is signed


def test_signed_topics_follow_the_base_topic() -> None:
    t = Topics("farm/a")
    assert is_signed_topic(t, "farm/a/nodes/n1/state")
    assert not is_signed_topic(t, "netq/nodes/n1/state")


def test_an_open_farm_signs_nothing() -> None:
    s = StateSigning.for_farm(FarmSettings(open=True))
    assert not s.enabled
    assert s.encode(NODE, {"a": 1}) == json.dumps({"a": 1}).encode()
    payload = farm_api.response("ok", {"x": 1}, "t1")
    assert s.sign_payload(T.response("health_check"), payload) is payload


def test_a_signed_payload_verifies_for_its_topic_only() -> None:
    obj = {"node_id": "n1", "state": "online", "progress": 0.25, "capabilities": {"bed_mm": [250, 210, 200]}}
    payload = json.loads(signing().encode(NODE, obj))
    assert payload["sig"] and {k: v for k, v in payload.items() if k != "sig"} == obj
    assert security.verify_state(PUBLIC, NODE, payload)
    assert not security.verify_state(PUBLIC, T.node_state("n2"), payload)
    assert not security.verify_state(security.state_public_key(security.parse_key(OTHER)), NODE, payload)


def test_signatures_are_deterministic() -> None:
    """The Home Assistant publisher skips a payload equal to the one it last published: that must hold."""
    obj = {"b": 1, "a": [1, 2]}
    assert signing().encode(NODE, obj, sort_keys=True) == signing().encode(NODE, dict(reversed(obj.items())),
                                                                           sort_keys=True)


def test_an_api_response_is_signed_as_built() -> None:
    topic = T.response("job/add")
    body = json.loads(signing().sign_payload(topic, farm_api.response("error", {}, "t1", "no such queue")))
    assert body["status"] == "error" and body["transaction"] == "t1" and body["error"] == "no such queue"
    assert verifier().check(topic, body)


@given(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "sig"),
                       st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                                    | st.text(max_size=10),
                                    lambda inner: st.lists(inner, max_size=3)
                                    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                                    max_leaves=10), max_size=6))
def test_any_object_survives_the_wire_and_any_change_breaks_it(obj: dict[str, Any]) -> None:
    payload = signing().encode(JOB, obj)
    v = verifier()
    assert v.decode(JOB, payload) == {**obj, "sig": json.loads(payload)["sig"]}
    changed = {**json.loads(payload), "extra": True}
    assert not v.check(JOB, changed)
    assert v.drops == {"forged": 1}


# --- the check on receipt ---------------------------------------------------------------------------------
@pytest.mark.security
def test_unsigned_forged_and_moved_messages_are_refused_and_counted() -> None:
    v = verifier()
    genuine = signing().encode(NODE, {"node_id": "n1", "state": "online"})
    assert v.decode(NODE, genuine) is not None
    assert v.decode(NODE, json.dumps({"node_id": "n1", "state": "offline"}).encode()) is None
    intruder = StateSigning.for_farm(FarmSettings(key=OTHER))
    assert v.decode(NODE, intruder.encode(NODE, {"node_id": "n1", "state": "offline"})) is None
    assert v.decode(T.node_state("n9"), genuine) is None  # a genuine state moved to another node's topic
    altered = {**json.loads(genuine), "state": "offline"}
    assert not v.check(NODE, altered)
    assert v.drops == {"unsigned": 1, "forged": 3}


@pytest.mark.security
def test_a_genuine_answer_moved_to_another_request_is_refused() -> None:
    v = verifier()
    answer = signing().sign_payload(T.response("health_check"), farm_api.response("ok", {"healthy": True}, "t1"))
    assert v.decode(T.response("health_check"), answer) is not None
    assert v.decode(T.response("job/remove"), answer) is None
    assert v.drops == {"forged": 1}


@pytest.mark.security
@pytest.mark.parametrize("payload", [
    b"", b"not json", b"\xff\xfe", b"[1, 2]", b'"sig"', b"null", b'{"sig": 5}', b'{"sig": "!!!"}',
    b'{"sig": "' + b"A" * 86 + b'"}', b'{"sig": "\xc3\xa9"}', b'{"sig": "\\u0000"}',
    b"[" * 100_000 + b"]" * 100_000,
])
def test_hostile_payloads_on_signed_topics_are_refused_without_raising(payload: bytes) -> None:
    v = verifier()
    assert v.decode(T.response("job/add"), payload) is None
    assert not v.accepts(NODE, payload)
    assert sum(v.drops.values()) == 2


@pytest.mark.security
def test_a_malformed_state_key_refuses_everything() -> None:
    v = StateVerifier("nqp1-not-a-key", T)
    assert v.decode(NODE, signing().encode(NODE, {"state": "online"})) is None
    assert v.drops == {"forged": 1}


def test_topics_the_farm_does_not_sign_pass_unchecked() -> None:
    v = verifier()
    assert v.accepts("homeassistant/status", b"online")  # not JSON, not ours to check
    assert v.accepts(T.events, json.dumps({"event": "started"}).encode())
    assert v.check("homeassistant/sensor/netq_n1/state/config", {"name": "state"})
    assert v.drops == {}


def test_a_refusal_is_logged_once_as_a_warning_then_at_debug_level(caplog: pytest.LogCaptureFixture) -> None:
    v = verifier()
    caplog.set_level(logging.DEBUG, logger="node.link.signing")
    for _ in range(5):
        v.decode(NODE, b'{"state": "offline"}')
    levels = [r.levelno for r in caplog.records if r.name == "node.link.signing"]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 4
    assert v.drops == {"unsigned": 5}
