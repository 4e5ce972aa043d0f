"""Hypothesis strategies for hostile input: arbitrary JSON, hostile scalars, and valid request bodies with
hostile parts (each path's template, mutated)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

from node.app import node_commands
from shared import farm_api

SHA = "ab" * 32

HOSTILE_SCALARS: list[Any] = [
    None, True, False, 0, -1, 1.5, -0.0, 1e308, 2**31, 2**63, -(2**63) - 1, 2**70, 10**40,
    "", " ", "\x00", "\udc80", "\ud800x", "💥" * 50, "a" * 10_000, "../../etc/passwd", "default/../x", "a/b",
    "n1", "w1", "default", "job/default/x", "%s%n", "<script>", "NaN", "-1", "1e999", "\u202e", "\t\n",
]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)


@st.composite
def deep(draw: st.DrawFn) -> Any:
    """A value nested just under, at or past the API's bound (32) and pydantic's (200)."""
    depth = draw(st.sampled_from([31, 32, 33, 40, 199, 201, 400]))
    value: Any = draw(st.sampled_from([1, "x", None]))
    as_dict = draw(st.booleans())
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


@st.composite
def deep_bytes(draw: st.DrawFn) -> bytes:
    """JSON nested past Python's recursion limit (which json.dumps cannot even write), perhaps unclosed."""
    n = draw(st.sampled_from([999, 1001, 5000, 100_000]))
    opening, closing = draw(st.sampled_from([(b'{"a":', b"}"), (b"[", b"]"), (b'{"sets":[', b"]}")]))
    return opening * n + b"1" + closing * draw(st.sampled_from([n, 0, n // 2]))


hostile_values = st.sampled_from(HOSTILE_SCALARS) | json_values | deep() \
    | st.lists(st.integers(0, 3), min_size=100, max_size=3000)

_SET = {"file": "a.gcode", "sha256": SHA, "holders": ["w1"], "count": 1}
TEMPLATES: dict[str, dict[str, Any]] = {
    "job/add": {"namespace": "default", "id": "fz", "sets": [_SET], "count": 1, "priority": 0},
    "job/remove": {"namespace": "default", "id": "x"},
    "job/update": {"namespace": "default", "id": "x", "count": 2, "priority": 1, "name": "n"},
    "job/move": {"namespace": "default", "id": "x", "position": 0},
    "job/resolve": {"namespace": "default", "id": "x", "copy": 1, "outcome": "requeue"},
    "queue/pause": {"namespace": "default"},
    "queue/resume": {"namespace": "default"},
    "node/retire": {"node": "n2"},
    "queue/list": {"namespace": "default", "include_done": True},
    "node/list": {},
    "health_check": {},
    "node/bed_cleared": {"node": "n1"},
    "node/accept_jobs": {"node": "n1", "accept": True},
    "node/pause": {"node": "n1"},
    "node/resume": {"node": "n1"},
    "node/release": {"node": "n1", "pause": True},
    "node/material": {"node": "n1", "tool": 0, "material": "PLA:red"},
}
API_PATHS = sorted([*farm_api.MUTATING, *farm_api.READING])
NODE_PATHS = sorted(node_commands.NODE_COMMANDS)
ALL_PATHS = API_PATHS + NODE_PATHS  # tests/fuzz/test_fuzz_requests.py checks each has a template


@st.composite
def hostile_body(draw: st.DrawFn, path: str) -> dict[str, Any]:
    """``path``'s valid body with some fields replaced, dropped, added, or its set made hostile."""
    body = json.loads(json.dumps(TEMPLATES.get(path, {})))
    for _ in range(draw(st.integers(0, 3))):  # 0: the valid body itself
        op = draw(st.sampled_from(["replace", "drop", "extra", "set"]))
        if op == "replace" and body:
            body[draw(st.sampled_from(sorted(body)))] = draw(hostile_values)
        elif op == "drop" and body:
            body.pop(draw(st.sampled_from(sorted(body))))
        elif op == "extra":
            body[draw(st.sampled_from(["transaction", "x", "sig", "url", "holders", "__class__", "id"]))] = \
                draw(hostile_values)
        elif op == "set" and isinstance(body.get("sets"), list) and body["sets"]:
            s = dict(body["sets"][0]) if isinstance(body["sets"][0], dict) else {}
            s[draw(st.sampled_from(["file", "sha256", "holders", "count", "materials", "url", "duration_s",
                                    "profiles", "nozzle_mm", "extents_mm", "x"]))] = draw(hostile_values)
            body["sets"] = [s] * draw(st.sampled_from([1, 2, 64, 65]))
    return body


def encode(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def payloads(draw: st.DrawFn, path: str) -> bytes:
    """Any payload a client could publish on ``path``'s request topic."""
    kind = draw(st.sampled_from(["bytes", "json", "deep", "bare", "big", *["hostile"] * 5]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    if kind == "json":
        return encode(draw(json_values))
    if kind == "deep":
        return encode(draw(deep())) if draw(st.booleans()) else draw(deep_bytes())
    if kind == "bare":
        return draw(st.sampled_from([b"default", b"n1", b"42", b"null", b"[]", b'"x"', b"\xff\xfe", b"  ",
                                     b"NaN", b'{"a": NaN}', b"Infinity", b"{" * 100_000, b"[" * 100_000]))
    if kind == "big":
        return b'{"x": "' + b"a" * draw(st.sampled_from([farm_api.MAX_REQUEST_BYTES - 10, farm_api.MAX_REQUEST_BYTES + 1]))\
            + b'"}'
    return encode(draw(hostile_body(path)))
