"""Where URL jobs may be fetched from (node/files/url_guard.py): the pure policy, address by address."""

from __future__ import annotations

import ipaddress

import pytest
from pydantic import ValidationError

from node.files.url_guard import UrlPolicy, farm_hosts, parse_allow
from shared.errors import ConfigError
from shared.settings import FilesSettings

pytestmark = pytest.mark.security

DEFAULT = UrlPolicy()


def refused(policy: UrlPolicy, address: str, host: str = "") -> str | None:
    return policy.refusal(ipaddress.ip_address(address), host)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.5.5.5", "::1",
    "::ffff:127.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1",  # IPv6 forms carrying a loopback IPv4
    "169.254.169.254", "fe80::1",  # link-local: cloud metadata services
    "0.0.0.0", "0.1.2.3", "::", "224.0.0.1", "ff02::1", "255.255.255.255", "240.0.0.1",
    "10.0.0.5", "172.16.3.4", "172.31.255.255", "192.168.1.20", "100.64.1.1", "fd00::1", "fec0::1",
    "198.18.0.1", "::ffff:192.168.1.1",
])
def test_refused_by_default(address: str) -> None:
    assert refused(DEFAULT, address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "172.32.0.1"])
def test_public_addresses_pass(address: str) -> None:
    assert refused(DEFAULT, address) is None


def test_private_ranges_need_url_allow_by_network_or_host_name() -> None:
    policy = UrlPolicy.from_allow(["192.168.1.0/24", "10.1.2.3", "nas.lan", "fd00::/8"])
    assert refused(policy, "192.168.1.20") is None
    assert refused(policy, "10.1.2.3") is None
    assert refused(policy, "fd12::5") is None
    assert refused(policy, "10.1.2.4") is not None
    assert refused(policy, "192.168.2.1") is not None
    assert refused(policy, "172.20.0.9", "NAS.lan.") is None  # the host name allowed resolves privately
    assert refused(policy, "172.20.0.9", "other.lan") is not None


def test_loopback_and_link_local_only_by_a_network_inside_them() -> None:
    broad = UrlPolicy.from_allow(["0.0.0.0/0", "::/0"])
    for address in ("127.0.0.1", "::1", "169.254.169.254", "fe80::1"):
        assert refused(broad, address) is not None, address
    assert refused(broad, "10.0.0.1") is None
    narrow = UrlPolicy.from_allow(["127.0.0.1/32"])
    assert refused(narrow, "127.0.0.1") is None
    assert refused(narrow, "127.0.0.2") is not None
    assert refused(narrow, "::1") is not None
    # A host name in url_allow never unlocks loopback (a name is only as good as its resolver).
    assert refused(UrlPolicy.from_allow(["localhost"]), "127.0.0.1", "localhost") is not None


def test_never_unspecified_multicast_or_broadcast() -> None:
    policy = UrlPolicy.from_allow(["0.0.0.0/8", "224.0.0.0/4", "255.255.255.255", "::/128", "ff00::/8"])
    for address in ("0.0.0.0", "224.0.0.1", "255.255.255.255", "::", "ff02::1"):
        assert refused(policy, address) is not None, address


def test_the_farms_own_nodes_are_refused_whatever_url_allow_says() -> None:
    policy = UrlPolicy.from_allow(["127.0.0.0/8", "192.168.1.0/24", "printer3.lan"],
                                  own=["127.0.0.1", "192.168.1.7", "Printer3.lan"])
    assert "node of this farm" in (refused(policy, "127.0.0.1") or "")
    assert "node of this farm" in (refused(policy, "::ffff:192.168.1.7") or "")
    assert "node of this farm" in (policy.check_host("printer3.lan.") or "")
    assert refused(policy, "192.168.1.8") is None
    assert refused(policy, "127.0.0.9") is None


def test_check_host_judges_literals_before_connecting_and_names_at_connect() -> None:
    assert DEFAULT.check_host("127.0.0.1") is not None
    assert DEFAULT.check_host("[::1]") is not None
    assert DEFAULT.check_host("") == "no host"
    assert DEFAULT.check_host("localhost") is None  # a name: its addresses are checked on the socket
    assert DEFAULT.check_host("example.com") is None


def test_farm_hosts_come_from_node_states_and_the_broker() -> None:
    nodes = {"n1": {"files_url": "http://192.168.1.7:8123"}, "n2": {"files_url": "http://[fd00::2]:80"},
             "n3": {"state": "offline"}, "n4": {"files_url": "http://[bad"}, "n5": "junk"}
    assert farm_hosts(nodes, ("broker.lan", 1883)) == {"192.168.1.7", "fd00::2", "broker.lan"}  # type: ignore[arg-type]
    policy = UrlPolicy.for_farm(["192.168.1.0/24"], {"n1": {"files_url": "http://192.168.1.7:1"}}, None)
    assert refused(policy, "192.168.1.7") is not None and refused(policy, "192.168.1.8") is None


@pytest.mark.parametrize("entry", ["not a host", "1.2.3.4/33", "999.1.1.1", "", "-bad.lan", "a" * 300])
def test_bad_url_allow_entries_are_refused_at_start_up(entry: str) -> None:
    with pytest.raises(ConfigError):
        parse_allow([entry])
    with pytest.raises(ValidationError):
        FilesSettings(url_allow=[entry])


def test_url_allow_setting_takes_networks_and_names() -> None:
    files = FilesSettings(url_allow=["127.0.0.1/32", "192.168.1.20", "nas.lan", "fd00::/8"])
    nets, names = parse_allow(files.url_allow)
    assert names == {"nas.lan"} and ipaddress.ip_network("192.168.1.20/32") in nets
