"""Where a URL job may be fetched from, and the limits of one download (docs/security.md, "URL jobs").

:class:`UrlPolicy` is pure: it says whether one address may be connected to for one URL host. It is
enforced by :func:`node.files.fetch.download_url` on the socket actually connected (aiohttp's
``socket_factory``), after every resolution and for every redirect hop, so a name that resolves to a
harmless address for a check and to another for the connection (DNS rebinding) gains nothing.

Refused, in this order:

* the farm's own nodes (their file servers' hosts, the broker's): never, whatever ``[files] url_allow`` says;
* unspecified (``0.0.0.0/8``, ``::``), multicast and broadcast addresses: never;
* loopback (``127.0.0.0/8``, ``::1``), link-local (``169.254.0.0/16``, ``fe80::/10``: cloud metadata
  services live there) and reserved (``240.0.0.0/4``): unless ``url_allow`` names a network *inside* that
  range holding the address (``127.0.0.1/32`` allows a test server; ``0.0.0.0/0`` does not allow loopback);
* every other address that is not globally routable (``10/8``, ``172.16/12``, ``192.168/16``,
  ``100.64/10``, ``fc00::/7``, site-local, documentation and benchmarking ranges): unless a ``url_allow``
  network holds it or ``url_allow`` names the URL's host (a LAN NAS, a slicer's upload server).

IPv6 forms that carry an IPv4 address (``::ffff:a.b.c.d``, 6to4, NAT64's ``64:ff9b::/96``) are judged by
both addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from shared.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

KiB: Final = 1024
TOTAL_S: Final = 120.0
MIN_RATE: Final = 16 * KiB  # bytes per second, averaged over RATE_WINDOW_S
RATE_WINDOW_S: Final = 10.0
MAX_REDIRECTS: Final = 5
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


_NEVER: Final = (("unspecified", _nets("0.0.0.0/8", "::/128")),
                 ("multicast", _nets("224.0.0.0/4", "ff00::/8")),
                 ("broadcast", _nets("255.255.255.255/32")))
_SPECIAL: Final = (("loopback", _nets("127.0.0.0/8", "::1/128")),
                   ("link-local", _nets("169.254.0.0/16", "fe80::/10")),
                   ("reserved", _nets("240.0.0.0/4")))
_SITE_LOCAL: Final = ipaddress.ip_network("fec0::/10")  # deprecated (RFC 3879), still not the internet
_NAT64: Final = _nets("64:ff9b::/96", "64:ff9b:1::/48")


@dataclass(frozen=True)
class UrlLimits:
    """Bounds on one URL download: a total time, a rate floor over a window, redirects followed."""

    total_s: float = TOTAL_S
    min_rate: float = MIN_RATE
    rate_window_s: float = RATE_WINDOW_S
    max_redirects: int = MAX_REDIRECTS


DEFAULT_LIMITS: Final = UrlLimits()


def parse_allow(entries: Iterable[str]) -> tuple[tuple[IPNetwork, ...], frozenset[str]]:
    """``[files] url_allow`` as networks (a bare address is a /32 or /128) and host names (lower case).
    ConfigError names the first entry that is neither."""
    nets: list[IPNetwork] = []
    names: set[str] = set()
    for entry in entries:
        text = entry.strip()
        try:
            nets.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        name = text.rstrip(".").lower()
        if not _HOST_NAME.match(name) or name.replace(".", "").isdigit():
            raise ConfigError(f"files.url_allow: {entry[:80]!r} is neither a network (10.0.0.0/8, "
                              "192.168.1.20) nor a host name (nas.lan)")
        names.add(name)
    return tuple(nets), frozenset(names)


def ip_of(text: str) -> IPAddress | None:
    """The address written in ``text`` (a URL host or a socket address; brackets and a zone dropped)."""
    text = text.strip().strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """``ip`` and any IPv4 address it carries."""
    out: list[IPAddress] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
        if any(ip in n for n in _NAT64):
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return out


def host_name(text: str) -> str:
    return text.strip().strip("[]").rstrip(".").lower()


@dataclass(frozen=True)
class UrlPolicy:
    """Which addresses a URL job may connect to. ``own``: the farm's own nodes (addresses or host names)."""

    allow_nets: tuple[IPNetwork, ...] = ()
    allow_names: frozenset[str] = frozenset()
    own: frozenset[str] = frozenset()
    _own_ips: frozenset[IPAddress] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ips = {ip for h in self.own if (ip := ip_of(h)) is not None}
        object.__setattr__(self, "_own_ips", frozenset(a for ip in ips for a in _embedded(ip)))

    @classmethod
    def from_allow(cls, entries: Iterable[str], own: Iterable[str] = ()) -> UrlPolicy:
        nets, names = parse_allow(entries)
        return cls(nets, names, frozenset(host_name(h) for h in own if h))

    @classmethod
    def for_farm(cls, url_allow: Iterable[str], nodes: Mapping[str, Mapping[str, Any]],
                 broker: Sequence[Any] | None = None) -> UrlPolicy:
        """The arbiter's policy: ``url_allow`` (``[files] url_allow``), with every known node's file server host
        (from the retained node states) and the broker's host refused."""
        return cls.from_allow(url_allow, farm_hosts(nodes, broker))

    def with_own(self, more: Iterable[str]) -> UrlPolicy:
        """This policy with more addresses of the farm's own nodes (e.g. what their host names resolve to)."""
        return UrlPolicy(self.allow_nets, self.allow_names, self.own | {host_name(h) for h in more})

    def own_names(self) -> set[str]:
        """The farm's own hosts given by name (to be resolved, so that their addresses are refused too)."""
        return {h for h in self.own if ip_of(h) is None}

    def check_host(self, host: str) -> str | None:
        """Why a URL naming ``host`` is refused before any connection (a farm node's name, or an address that
        :meth:`refusal` refuses), else None. Names are judged again by the addresses they resolve to."""
        name = host_name(host)
        if not name:
            return "no host"
        if name in self.own:
            return f"{name} is a node of this farm"
        ip = ip_of(name)
        return None if ip is None else self.refusal(ip, name)

    def refusal(self, ip: IPAddress, host: str = "") -> str | None:
        """Why a connection to ``ip`` for a URL naming ``host`` is refused, else None."""
        for a in _embedded(ip):
            if a in self._own_ips:
                return f"{ip} is a node of this farm"
        for a in _embedded(ip):
            why = self._refusal(a, host_name(host))
            if why is not None:
                return why if a == ip else f"{ip} carries {why}"
        return None

    def _refusal(self, ip: IPAddress, host: str) -> str | None:
        for kind, nets in _NEVER:
            if any(ip in n for n in nets):
                return f"{ip} is a {kind} address"
        for kind, nets in _SPECIAL:
            special = next((n for n in nets if ip in n), None)
            if special is None:
                continue
            if any(ip in n and n.version == special.version and n.subnet_of(special)  # type: ignore[arg-type]
                   for n in self.allow_nets):
                return None
            return (f"{ip} is a {kind} address (allow it with [files] url_allow = [\"{ip}/"
                    f"{ip.max_prefixlen}\"] if you mean it)")
        if ip.is_global and ip not in _SITE_LOCAL:
            return None
        if host in self.allow_names or any(ip in n for n in self.allow_nets):
            return None
        return f"{ip} is a private address (a host of your network: add it to [files] url_allow)"


def farm_hosts(nodes: Mapping[str, Mapping[str, Any]], broker: Sequence[Any] | None = None) -> set[str]:
    """The hosts of the farm's own nodes: every file server in the node states, and the broker."""
    hosts: set[str] = set()
    for st in nodes.values():
        url = st.get("files_url") if isinstance(st, Mapping) else None
        if isinstance(url, str):
            try:
                host = urlsplit(url).hostname
            except ValueError:
                continue
            if host:
                hosts.add(host)
    if broker and isinstance(broker[0], str) and broker[0]:
        hosts.add(broker[0])
    return {h for h in hosts if h not in ("0.0.0.0", "::")}
