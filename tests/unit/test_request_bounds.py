"""Every request decoded with its size and nesting bounded, and any decode failure answered with an error.

Found as: a request nested 100,000 deep got no answer at all (json's RecursionError escaped the handler).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node.app import node_commands
from node.app.client import FarmClient
from node.arbiter.requests import _peek_transaction
from node.link.base import Message
from shared import farm_api
from shared import protocol as P
from shared.errors import ProtocolError, RequestError
from tests.memfarm import MemFarm

pytestmark = pytest.mark.security

DEEP = b'{"a":' * 40_000 + b"1" + b"}" * 40_000  # within the size bound: the nesting is what is refused
DEEP_LIST = b"[" * 100_000 + b"]" * 100_000
ALL_PATHS = sorted([*farm_api.MUTATING, *farm_api.READING, *node_commands.NODE_COMMANDS])


def nested(depth: int) -> bytes:
    return json.dumps({"namespace": "default", "x": json.loads("[" * (depth - 1) + "]" * (depth - 1))}).encode()


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("payload", [DEEP, DEEP_LIST, b"[" * 100_000, b'{"a":' * 5000], ids=["obj", "list",
                                                                                            "open", "unclosed"])
def test_deep_payloads_are_refused_on_every_path(path: str, payload: bytes) -> None:
    with pytest.raises(RequestError, match="nests deeper than 32"):
        farm_api.parse_envelope(path, payload)


def test_the_bound_is_32_levels_and_brackets_in_strings_do_not_count() -> None:
    assert farm_api.parse_envelope("queue/list", nested(32))[0]["namespace"] == "default"
    with pytest.raises(RequestError, match="nests deeper than 32"):
        farm_api.parse_envelope("queue/list", nested(33))
    in_string = json.dumps({"name": "[" * 1000 + '\\"{' * 100, "id": "x"}).encode()
    body, _ = farm_api.parse_envelope("job/update", in_string)
    assert body["name"].startswith("[[[")
    assert not farm_api.nesting_exceeds(b'{"a": "\\\\", "b": [[1]]}', 3)  # the string holds one backslash
    assert farm_api.nesting_exceeds(b'{"a": "\\\\", "b": [[1]]}', 2)
    assert not farm_api.nesting_exceeds(b'{"a": "\\"[[[[", "b": 1}', 1)


def test_the_scan_is_linear_even_for_hostile_shapes() -> None:
    for payload in (b"[]" * (farm_api.MAX_REQUEST_BYTES // 2), b'"' + b'\\"' * (farm_api.MAX_REQUEST_BYTES // 2),
                    b'"[' * (farm_api.MAX_REQUEST_BYTES // 2), DEEP[:farm_api.MAX_REQUEST_BYTES]):
        began = time.perf_counter()
        with pytest.raises(RequestError):
            farm_api.parse_envelope("job/add", payload)
        assert time.perf_counter() - began < 1.0, payload[:20]


def test_size_nan_and_bad_bytes_are_refused_with_a_reason() -> None:
    with pytest.raises(RequestError, match="exceeds the limit"):
        farm_api.parse_envelope("job/add", b'{"x": "' + b"a" * farm_api.MAX_REQUEST_BYTES + b'"}')
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(RequestError, match="not valid JSON"):
            farm_api.parse_envelope("job/update", b'{"id": "x", "priority": ' + constant + b"}")
    with pytest.raises(RequestError, match="not valid JSON"):
        farm_api.parse_envelope("job/add", b"\xff\xfe{")
    with pytest.raises(RequestError, match="not valid JSON"):
        farm_api.parse_envelope("job/remove", b"\xff")  # not JSON, nor a bare value (not text)


def test_node_commands_and_the_protocol_codec_are_bounded_too() -> None:
    assert node_commands.routing_error("node/pause", DEEP, lambda n: True) == "request nests deeper than 32 levels"
    with pytest.raises(RequestError):
        node_commands.addressee("node/material", DEEP_LIST)
    for payload in (DEEP, DEEP_LIST, b'{"kind": "entry", "writes": ' + b"[" * 100_000):
        with pytest.raises(ProtocolError):
            P.decode(payload)
    assert _peek_transaction(DEEP) is None
    assert _peek_transaction(b'{"transaction": "t1", "x": 1}') == "t1"


def test_the_client_ignores_deep_or_huge_answers() -> None:
    client = FarmClient(("127.0.0.1", 1))
    assert client._decode(Message("netq/response/job/add", DEEP)) is None
    assert client._decode(Message("netq/response/job/add", b'{"status": "ok"}')) == {"status": "ok"}
    client.retained["netq/nodes/n1/state"] = DEEP_LIST
    client.retained["netq/nodes/n2/state"] = b'{"node_id": "n2"}'
    assert client.node_states() == {"n2": {"node_id": "n2"}}


async def test_the_arbiter_answers_a_deep_request_with_an_error(tmp_path: Path) -> None:
    farm = MemFarm(tmp_path, 1)
    answers: list[dict[str, object]] = []
    await farm.start()
    try:
        arb = await farm.ready(1)
        farm.client.subscribe("netq/response/#", lambda m: answers.append(json.loads(m.payload)))
        before = dict(arb.consensus.state.objects)
        for path in ("job/add", "queue/list", "node/pause"):
            n = len(answers)
            farm.client.publish(f"netq/request/{path}", DEEP, qos=1)
            await farm.wait_for(lambda n=n: len(answers) > n, 5, f"an answer to a deep {path}")
            assert answers[-1]["status"] == "error" and "nests deeper" in str(answers[-1]["error"]), answers[-1]
        assert dict(arb.consensus.state.objects) == before
        r = await farm.request("health_check", {}, "h1")  # and the arbiter goes on serving
        assert r["status"] == "ok"
    finally:
        await farm.stop()
