"""Protocol messages fuzzed through the real codec (shared.protocol) and the real seals (shared.security):
random bytes, truncated and altered seals, valid seals on garbage bodies, and hostile messages of every
kind, unsigned and sealed by a node that is not a member. Nothing but ProtocolError (SealError included)
escapes; every drop is counted; in a running farm none of it changes the state, the term or the arbiter."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import protocol as P
from shared import security
from shared.errors import ProtocolError
from shared.security import Opener, Sealer, SealError
from tests.fuzz.conftest import FUZZ, ran
from tests.fuzz.strategies import SHA, hostile_values, json_values
from tests.memfarm import MemFarm

pytestmark = pytest.mark.security

KEY = security.parse_key(security.new_farm_key())
TOPIC = "netq/_proto/log"
_STAMP = [1, 1]
_OBJECT = {"key": "job/default/x", "stamp": _STAMP, "value": {"id": "x"}}
_CAPS = {"profile": None, "materials": [], "tags": []}
TEMPLATES: dict[str, dict[str, Any]] = {
    "entry": {"farm": "f", "term": 1, "seq": 1, "commit": 0, "writes": [_OBJECT], "snapshot": False, "arbiter": "x9"},
    "heartbeat": {"farm": "f", "term": 1, "arbiter": "x9", "seq": 1, "commit": 0, "serving": True},
    "vote_request": {"farm": "f", "term": 2, "candidate": "x9", "last": _STAMP, "pre": False},
    "vote": {"farm": "f", "term": 2, "voter": "x9", "candidate": "n1", "granted": True, "last": _STAMP},
    "ack": {"node": "x9", "term": 1, "seq": 1},
    "sync": {"node": "x9", "term": 1, "last": _STAMP},
    "snapshot": {"farm": "f", "term": 1, "seq": 1, "commit": 1, "objects": [_OBJECT]},
    "join": {"node": "x9", "weight": 10, "witness": False},
    "work": {"node": "x9", "capabilities": _CAPS, "namespaces": [], "start_now": True},
    "start": {"node": "x9", "namespace": "default", "job": "x", "copy_index": 0, "grant": _STAMP},
    "finish": {"node": "x9", "namespace": "default", "job": "x", "copy_index": 0, "grant": _STAMP,
               "outcome": "requeue"},
    "release": {"node": "x9", "namespace": "default", "job": "x", "copy_index": 0, "grant": _STAMP, "reason": "r"},
    "replicate": {"sha256": SHA, "holders": ["x9"]},
    "holding": {"node": "x9", "sha256": SHA},
}
HUGE = st.sampled_from([2**63, 2**63 - 1, 2**70, -1, -(2**63), 10**30, 0])


@st.composite
def hostile_message(draw: st.DrawFn, farm: str = "f") -> dict[str, Any]:
    """A message of some kind, with its farm right and some fields hostile (terms and seqs huge above all)."""
    kind = draw(st.sampled_from(sorted(TEMPLATES)))
    msg: dict[str, Any] = {"kind": kind, **json.loads(json.dumps(TEMPLATES[kind]))}
    if "farm" in msg:
        msg["farm"] = farm
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.sampled_from(sorted(msg)))
        if field == "kind":
            continue
        msg[field] = draw(HUGE if field in ("term", "seq", "commit", "copy_index", "weight") else hostile_values)
    return msg


def _accepts(payload: bytes) -> Any:
    """Decode: a message, or ProtocolError; nothing else may come out."""
    try:
        return P.decode(payload)
    except ProtocolError:
        return None


@FUZZ
@given(payload=st.binary(max_size=500) | json_values.map(lambda v: json.dumps(v).encode())
       | hostile_message().map(lambda m: json.dumps(m).encode())
       | st.sampled_from([b'{"kind":"entry"' + b',"writes":[' * 5000, b"[" * 100_000, b'{"kind": NaN}']))
def test_decode_returns_a_message_or_raises_protocol_error(payload: bytes) -> None:
    ran("protocol decode")
    m = _accepts(payload)
    if m is not None:
        assert P.decode(P.encode(m)) == m  # what decodes is a well-formed message that round-trips


@FUZZ
@given(payload=st.binary(max_size=400), topic=st.sampled_from([TOPIC, "netq/_proto/election", "x"]))
def test_random_bytes_never_open(payload: bytes, topic: str) -> None:
    ran("seal: random bytes")
    opener = Opener(KEY)
    with pytest.raises(SealError):
        opener.open(topic, payload)
    assert sum(opener.drops.values()) == 1


@FUZZ
@given(body=st.binary(max_size=300), cut=st.integers(0, 400), flip=st.integers(0, 400),
       how=st.sampled_from(["truncate", "flip", "topic", "extend", "other key"]))
def test_altered_seals_never_open(body: bytes, cut: int, flip: int, how: str) -> None:
    ran("seal: altered")
    sealed = Sealer(KEY, "n2", boot=1).seal(TOPIC, body)
    topic = TOPIC
    if how == "truncate":
        sealed = sealed[:cut % len(sealed)]
    elif how == "flip":
        i = flip % len(sealed)
        sealed = sealed[:i] + bytes([sealed[i] ^ 0x01]) + sealed[i + 1:]
    elif how == "topic":
        topic = "netq/_proto/election"
    elif how == "extend":
        sealed += b" x"
    else:
        sealed = Sealer(security.parse_key(security.new_farm_key()), "n2", boot=1).seal(TOPIC, body)
    opener = Opener(KEY)
    with pytest.raises(SealError):
        opener.open(topic, sealed)
    assert sum(opener.drops.values()) == 1


def test_a_seal_has_one_written_form() -> None:
    """Found by the fuzzing above: the last base64 character of a MAC carries two unused bits, base64 decoding
    skips stray characters, and int() reads "+1" and "01"; each let a trailer be altered and still verify."""
    sealed = Sealer(KEY, "n2", boot=1).seal(TOPIC, b"{}")
    body, _, trailer = sealed.rpartition(b"\n")
    tag, sender, boot, counter, mac = trailer.split(b" ")
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    same_bits = [mac[:-1] + bytes([c]) for c in alphabet
                 if c != mac[-1] and security._unb64(mac[:-1] + bytes([c])) == security._unb64(mac)]
    assert same_bits  # 3 other characters decode to the same MAC
    variants = [*same_bits, mac[:5] + b"!" + mac[5:], mac + b"=", mac[:10] + b"." + mac[10:]]
    forms = [b" ".join((tag, sender, boot, counter, v)) for v in variants]
    forms += [b" ".join((tag, sender, b, counter, mac)) for b in (b"01", b"+1")]
    forms += [b" ".join((tag, sender, boot, c, mac)) for c in (b"+1", b"001")]
    for form in forms:
        with pytest.raises(SealError):
            Opener(KEY).open(TOPIC, body + b"\n" + form)
    assert Opener(KEY).open(TOPIC, sealed).body == b"{}"


@FUZZ
@given(body=st.binary(max_size=300) | hostile_message().map(lambda m: json.dumps(m).encode()),
       sender=st.sampled_from(["n1", "x9", "a" * 63]), boot=HUGE.filter(lambda b: 0 < b < 2**63))
def test_valid_seals_on_garbage_open_then_decode_or_fail_cleanly(body: bytes, sender: str, boot: int) -> None:
    ran("seal: valid seal, garbage body")
    opener = Opener(KEY)
    sealed = Sealer(KEY, sender, boot=boot).seal(TOPIC, body)
    opened = opener.open(TOPIC, sealed)
    assert (opened.sender, opened.body) == (sender, body)
    _accepts(opened.body)
    with pytest.raises(SealError, match="replayed"):
        opener.open(TOPIC, sealed)


# --- into a running farm ----------------------------------------------------------------------------------
def _view(farm: MemFarm) -> Any:
    arb = farm.arbiter()
    assert arb is not None, "the farm lost its arbiter"
    c = arb.consensus
    return arb.node_id, c.term, c.commit, {k: o.stamp for k, o in c.state.objects.items()}, sorted(c.members)


def test_hostile_protocol_messages_change_nothing_in_a_farm(tmp_path: Path) -> None:
    """Unsigned garbage, sealed garbage, and hostile messages sealed by a node that holds the key but is no
    member, on every protocol topic of a one-member farm: the state, term, commit and membership stay."""
    farm = MemFarm(tmp_path, 0, witnesses=1)
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(farm.start())
        arb = loop.run_until_complete(farm.ready(1))
        assert farm.key is not None
        key = security.parse_key(farm.key)
        outsider = Sealer(key, "x9", boot=1)
        boots = itertools.count(1)
        topics = [arb.topics.log, arb.topics.election, arb.topics.to_node("w1"), arb.topics.to_arbiter("w1")]
        before = _view(farm)

        @FUZZ
        @given(topic=st.sampled_from(topics), how=st.sampled_from(["raw", "json", "sealed garbage", "outsider"]),
               raw=st.binary(max_size=300), msg=hostile_message(arb.consensus.farm))
        def inject(topic: str, how: str, raw: bytes, msg: dict[str, Any]) -> None:
            ran("protocol into a farm")
            body = json.dumps(msg).encode()
            if how == "raw":
                payload = raw
            elif how == "json":
                payload = body
            elif how == "sealed garbage":
                payload = Sealer(key, "x9", boot=next(boots)).seal(topic, raw)
            else:
                payload = outsider.seal(topic, body)
            farm.client.publish(topic, payload, qos=1)
            loop.run_until_complete(asyncio.sleep(0))  # the memory broker delivers on the next loop turns

        inject()
        # Let every message be handled, then the farm must be as it was, and still serve requests.
        r = loop.run_until_complete(farm.request("health_check", {}, "after-fuzz"))
        assert r["status"] == "ok"
        assert _view(farm) == before
        assert sum(arb.consensus.drops.values()) > 0  # counted (shown in the node's state)
    finally:
        loop.run_until_complete(farm.stop())
        loop.close()
