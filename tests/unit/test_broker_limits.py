"""The embedded broker's bounds and rules, without a network: the packet-size bound follows MQTT framing (§2.2.3);
CONNECT admission and the per-role topic rules of broker.auth, and the mosquitto files that repeat them."""

from __future__ import annotations

import asyncio
import base64

import pytest
from amqtt.mqtt.connect import (  # type: ignore[import-untyped]
    ConnectPacket,
    ConnectPayload,
    ConnectVariableHeader,
)
from hypothesis import example, given
from hypothesis import strategies as st

from broker.auth import (
    ConnectInfo,
    FarmAccess,
    Refusal,
    TopicPolicy,
    UnsupportedLevel,
    mosquitto_acl,
    mosquitto_password_line,
    parse_connect,
)
from broker.embedded import _BoundedReader
from node.link.base import topic_matches
from shared import security
from shared.errors import ProtocolError
from shared.security import Role


def remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def packet(body_len: int) -> bytes:
    return b"\x30" + remaining_length(body_len) + b"x" * body_len


async def read_like_amqtt(reader: _BoundedReader) -> int:
    """Read one packet the way amqtt does: type byte, length bytes one by one, then the body."""
    await reader.read(1)
    length, multiplier = 0, 1
    while True:
        byte = (await reader.read(1))[0]
        length += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    if length:
        await reader.read(length)
    return length


def stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


@pytest.mark.parametrize("sizes", [[0, 10, 127, 128, 16383, 16384], [1000] * 5])
async def test_packets_within_the_limit_pass_unchanged(sizes: list[int]) -> None:
    data = b"".join(packet(n) for n in sizes)
    reader = _BoundedReader(stream(data[1:]), data[:1], limit=16384)
    assert [await read_like_amqtt(reader) for _ in sizes] == sizes
    assert reader.oversize is None


async def test_a_packet_above_the_limit_ends_the_stream_before_its_body() -> None:
    data = packet(10) + packet(5000) + packet(10)
    reader = _BoundedReader(stream(data), b"", limit=4096)
    assert await read_like_amqtt(reader) == 10
    with pytest.raises(asyncio.IncompleteReadError):
        await read_like_amqtt(reader)
    assert reader.oversize == 5000
    with pytest.raises(asyncio.IncompleteReadError):
        await reader.read(1)


async def test_a_five_byte_length_is_refused() -> None:
    reader = _BoundedReader(stream(b"\x30\xff\xff\xff\xff\x01"), b"", limit=2**30)
    with pytest.raises(asyncio.IncompleteReadError):
        await read_like_amqtt(reader)
    assert reader.oversize is not None


# --- admission and topic rules (broker.auth), pure ---------------------------------------------------------------
KEY = security.parse_key(security.new_farm_key())
POLICY = TopicPolicy("netq", "homeassistant")
READERS = (Role.HOMEASSISTANT, Role.OPERATOR, Role.VIEWER)


def connect_body(*, client_id: str = "c1", username: str | None = None, password: str | None = None,
                 will: tuple[str, bool] | None = None, level: int = 4) -> bytes:
    """A CONNECT packet's body, encoded by amqtt's own codec."""
    vh = ConnectVariableHeader(keep_alive=5, proto_level=level)
    vh.clean_session_flag = True
    vh.username_flag = username is not None
    vh.password_flag = password is not None
    vh.will_flag = will is not None
    vh.will_retain_flag = bool(will and will[1])
    payload = ConnectPayload(client_id=client_id, will_topic=will[0] if will else None,
                             will_message=b"bye" if will else None, username=username, password=password)
    data = bytes(ConnectPacket(variable_header=vh, payload=payload).to_bytes())
    return data[2:] if data[1] < 0x80 else data[3:]  # the fixed header (these are short)


def test_parse_connect_reads_what_admission_needs() -> None:
    info = parse_connect(connect_body(username="node", password="pw", will=("netq/nodes/n1/state", True)))
    assert info == ConnectInfo(client_id="c1", username="node", password=b"pw", will_topic="netq/nodes/n1/state",
                               will_retain=True, clean_session=True)
    assert parse_connect(connect_body()) == ConnectInfo(client_id="c1")
    with pytest.raises(UnsupportedLevel):
        parse_connect(connect_body(level=5))


@pytest.mark.security
@given(st.binary(max_size=200))
def test_parse_connect_refuses_garbage_with_a_protocol_error_only(data: bytes) -> None:
    try:
        parse_connect(data)
    except ProtocolError:
        pass


@pytest.mark.security
@given(st.binary(max_size=60))
def test_parse_connect_of_a_truncated_packet_is_a_protocol_error(cut: bytes) -> None:
    body = connect_body(username="node", password="pw", will=("w", False))
    with pytest.raises(ProtocolError):
        parse_connect(body[: len(cut) % len(body)])


@pytest.mark.security
def test_admission_of_credentials_and_wills() -> None:
    access = FarmAccess.keyed(KEY)
    ok = access.admit(ConnectInfo("c", "viewer", security.broker_password(KEY, Role.VIEWER).encode()))
    assert ok.role is Role.VIEWER and not ok.large_packets
    node = access.admit(ConnectInfo("c", "node", security.broker_password(KEY, Role.NODE).encode()))
    assert node.role is Role.NODE and node.large_packets
    assert access.admit(ConnectInfo("c")).refusal is Refusal.ANONYMOUS
    assert access.admit(ConnectInfo("c", "node", b"x")).refusal is Refusal.BAD_PASSWORD
    assert access.admit(ConnectInfo("c", "node")).refusal is Refusal.BAD_PASSWORD
    assert access.admit(ConnectInfo("c", "root", b"x")).refusal is Refusal.ANONYMOUS
    ha = security.broker_password(KEY, Role.HOMEASSISTANT).encode()
    assert access.admit(ConnectInfo("c", "homeassistant", ha, will_topic="netq/_proto/log")).refusal is Refusal.WILL
    assert access.admit(ConnectInfo("c", "homeassistant", ha, will_topic="homeassistant/status",
                                    will_retain=True)).refusal is Refusal.WILL
    assert access.admit(ConnectInfo("c", "homeassistant", ha, will_topic="homeassistant/status")).role is not None
    # An open farm admits anyone as a member, but large packets only from a client that says it is one.
    assert FarmAccess().admit(ConnectInfo("c")).role is Role.NODE
    assert not FarmAccess().admit(ConnectInfo("c")).large_packets
    assert FarmAccess().admit(ConnectInfo("c", "node")).large_packets


@pytest.mark.parametrize(("role", "topic", "allowed"), [
    (Role.HOMEASSISTANT, "netq/request/node/bed_cleared", True),
    (Role.HOMEASSISTANT, "netq/request/job/add", True),
    (Role.HOMEASSISTANT, "netq/request/node/retire", False),
    (Role.HOMEASSISTANT, "netq/request/node/retire/x", False),
    (Role.HOMEASSISTANT, "homeassistant/status", True),
    (Role.HOMEASSISTANT, "homeassistant/sensor/x/config", False),
    (Role.HOMEASSISTANT, "netq/request", True),  # no path: answered by no one, as in mosquitto's `netq/request/#`
    (Role.OPERATOR, "netq/request/node/retire", True),
    (Role.OPERATOR, "netq/response/job/add", False),
    (Role.VIEWER, "netq/request/queue/list", True),
    (Role.VIEWER, "netq/request/health_check", True),
    (Role.VIEWER, "netq/request/job/add", False),
    (Role.VIEWER, "netq/request/node/pause", False),
    (Role.NODE, "anything/at/all", True),
] + [(r, t, False) for r in READERS for t in ("netq/_proto/log", "netq/nodes/n1/state", "netq/events",
                                               "netq/bridge/state", "other/request/job/add")])
def test_who_may_publish_what(role: Role, topic: str, allowed: bool) -> None:
    assert POLICY.may_publish(role, topic) is allowed


def test_a_base_topic_of_several_levels() -> None:
    policy = TopicPolicy("farms/a", "ha")
    assert policy.may_read(Role.VIEWER, "farms/a/events") and not policy.may_read(Role.VIEWER, "farms/a/_proto/x")
    assert not policy.may_read(Role.VIEWER, "farms/b/events") and policy.may_read(Role.VIEWER, "ha/x")
    assert policy.may_subscribe(Role.VIEWER, "farms/+/events") and not policy.may_subscribe(Role.VIEWER, "farms/a/_proto/#")
    assert policy.may_publish(Role.VIEWER, "farms/a/request/node/list")
    assert not policy.may_retain(Role.NODE, "farms/a/request/x") and policy.may_retain(Role.NODE, "farms/a/jobs")


_LEVEL = st.sampled_from(["netq", "_proto", "request", "response", "homeassistant", "nodes", "x", "+", "#"])


def _matches(topic_filter: str, topic: str) -> bool:
    return topic_matches(topic_filter, topic)


@pytest.mark.security
@given(st.lists(_LEVEL, min_size=1, max_size=5), st.lists(_LEVEL.filter(lambda s: s not in "+#"), min_size=1,
                                                        max_size=5), st.sampled_from(READERS))
def test_a_refused_subscription_could_match_nothing_readable(filter_levels: list[str], topic_levels: list[str],
                                                            role: Role) -> None:
    """Refusing a subscription is only a courtesy (deliveries are filtered anyway), but it must never refuse a
    filter that can reach something the role may read."""
    if "#" in filter_levels[:-1]:
        return  # not a valid filter (§4.7.1.2)
    topic_filter, topic = "/".join(filter_levels), "/".join(topic_levels)
    if _matches(topic_filter, topic) and POLICY.may_read(role, topic):
        assert POLICY.may_subscribe(role, topic_filter)


def _acl_allows(acl: str, user: str, topic: str, access: str) -> bool:
    """mosquitto 2.0's acl_file semantics (mosquitto.conf(5)): a user's ``deny`` lines first, then its grants."""
    rules: list[tuple[str, str]] = []
    current = None
    for line in acl.splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "user":
            current = words[1]
        elif len(words) == 3 and words[0] == "topic" and current == user:
            rules.append((words[1], words[2]))
    if any(kind == "deny" and _matches(pattern, topic) for kind, pattern in rules):
        return False
    return any(_matches(pattern, topic) and (kind == "readwrite" or kind == access) for kind, pattern in rules)


@given(st.lists(_LEVEL.filter(lambda s: s not in "+#"), min_size=1, max_size=5), st.sampled_from(list(Role)))
@example(["netq", "request"], Role.OPERATOR)
@example(["netq", "request", "node", "retire", "x"], Role.HOMEASSISTANT)
@example(["netq", "_proto"], Role.VIEWER)
@example(["homeassistant", "status"], Role.HOMEASSISTANT)
def test_the_mosquitto_acl_says_what_the_embedded_broker_does(levels: list[str], role: Role) -> None:
    topic = "/".join(levels)
    acl = mosquitto_acl(POLICY)
    assert _acl_allows(acl, role.value, topic, "read") is POLICY.may_read(role, topic)
    assert _acl_allows(acl, role.value, topic, "write") is POLICY.may_publish(role, topic)


@pytest.mark.parametrize("path", ["queue/list", "node/list", "health_check", "node/retire"])
def test_the_mosquitto_acl_names_the_request_paths(path: str) -> None:
    topic = f"netq/request/{path}"
    acl = mosquitto_acl(POLICY)
    for role in Role:
        assert _acl_allows(acl, role.value, topic, "write") is POLICY.may_publish(role, topic)


def test_the_mosquitto_password_line_is_what_mosquitto_passwd_writes() -> None:
    # Written by mosquitto_passwd 2.0.11 for user "node", password "secret".
    line = ("node:$7$101$zmm9pHx1Ky4F7p8r$gk8NuhkRa3a8Jyf3+wsMz9irySumIze6OJtGexR567vVHhPmlzB9FWp/K/IfY24t1ubqHhWh1mNSdb"
            "nzyXaWjw==")
    assert mosquitto_password_line("node", "secret", salt=base64.b64decode("zmm9pHx1Ky4F7p8r")) == line
    assert mosquitto_password_line("node", "secret") != line  # a fresh salt each time
