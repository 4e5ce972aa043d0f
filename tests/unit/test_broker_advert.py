"""TXT records of zeroconf adverts (broker.advert) and the broker url (broker.host), without a network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.advert import (
    advert_from_properties,
    advert_to_properties,
    check_node_id,
    parse_address,
    service_name,
)
from broker.choice import Advert
from broker.host import parse_broker_url
from shared.errors import ConfigError, ProtocolError

node_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", fullmatch=True)
ipv4 = st.ip_addresses(v=4).map(str)
brokers = st.none() | st.tuples(ipv4, st.integers(min_value=1, max_value=65535))


@given(
    node_ids,
    st.integers(min_value=0, max_value=1000),
    st.text(min_size=1, max_size=40).filter(lambda s: "=" not in s),
    st.integers(min_value=0, max_value=99),
    brokers,
)
def test_txt_round_trip(
    node_id: str, prio: int, farm: str, proto: int, broker: tuple[str, int] | None
) -> None:
    advert = Advert(node_id=node_id, priority=prio, farm=farm, proto=proto, broker=broker)
    props = advert_to_properties(advert)
    assert ("broker" in props) == (broker is not None)
    assert advert_from_properties(props) == advert


def test_txt_keys() -> None:
    props = advert_to_properties(Advert("n1", 3, "open", 1, ("192.168.1.5", 41000)))
    assert props == {"proto": "1", "farm": "open", "node": "n1", "prio": "3", "broker": "192.168.1.5:41000"}
    assert service_name("n1") == "n1._netqueues._tcp.local."


GOOD = {"proto": "1", "farm": "open", "node": "n1", "prio": "1"}


@pytest.mark.parametrize(
    "change",
    [
        {"proto": None},
        {"prio": "high"},
        {"prio": "-1"},
        {"farm": ""},
        {"node": "has.dot"},
        {"node": "x" * 64},
        {"broker": "nohost"},
        {"broker": "1.2.3.4:0"},
        {"broker": "1.2.3.4:70000"},
        {"broker": "example.com:1883"},
    ],
)
def test_malformed_txt_is_a_protocol_error(change: dict[str, str | None]) -> None:
    props = {**GOOD, **change}
    with pytest.raises(ProtocolError):
        advert_from_properties(props)


@pytest.mark.parametrize("missing", sorted(GOOD))
def test_missing_txt_key_is_a_protocol_error(missing: str) -> None:
    with pytest.raises(ProtocolError):
        advert_from_properties({k: v for k, v in GOOD.items() if k != missing})


def test_node_ids_and_addresses() -> None:
    assert check_node_id("printer-01_a") == "printer-01_a"
    with pytest.raises(ProtocolError):
        check_node_id("")
    assert parse_address("127.0.0.1:1883") == ("127.0.0.1", 1883)


@pytest.mark.parametrize(
    ("url", "address"),
    [("mqtt://10.0.0.2:1884", ("10.0.0.2", 1884)), ("mqtt://broker.lan", ("broker.lan", 1883))],
)
def test_broker_url(url: str, address: tuple[str, int]) -> None:
    assert parse_broker_url(url) == address


@pytest.mark.parametrize("url", ["http://x:1", "mqtt://", "mqtt://h:99999", "mqtt://h:1/path", "h:1883"])
def test_bad_broker_url(url: str) -> None:
    with pytest.raises(ConfigError):
        parse_broker_url(url)
