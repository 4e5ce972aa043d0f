"""Who may use the farm's broker, and what each client may do there (docs/security.md, "Broker credentials").

* :class:`TopicPolicy` — the per-role topic rules, relative to the farm's base topic ``B`` and Home Assistant's
  prefix ``H``; pure. A member (``node``) may do everything; every other role reads ``B/#`` but ``B/_proto/#``,
  and ``H/#``, and publishes only requests (``homeassistant``: not membership changes, and its ``H/status``
  birth; ``viewer``: only the reading requests). Retained publishes come only from members, never on request,
  response or protocol topics.
* :class:`FarmAccess` — the farm's broker credentials (SHA-256 digests of the role passwords, never the key) and
  the admission of a CONNECT: credentials, then the will (a will is a publish the broker makes for the client
  later, so it obeys the same rules).
* :func:`parse_connect` — the fields of an MQTT 3.1.1 CONNECT packet (§3.1) that admission needs.
* :class:`FarmAuthPlugin`, :class:`FarmTopicPlugin` — amqtt 0.12.1 plugins, thin shells over the above. The
  auth plugin remembers each session's role in ``session.attributes[ROLE_ATTR]``.
* :func:`mosquitto_acl`, :func:`mosquitto_password_line`, :func:`write_mosquitto_files` — the same rules and
  credentials for an external mosquitto 2.0 (``netq credentials mosquitto``).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from amqtt.contexts import Action, BaseContext  # type: ignore[import-untyped]
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin  # type: ignore[import-untyped]

from shared import farm_api, security
from shared.errors import BrokerError, ProtocolError
from shared.protocol import MAX_PROTO_PAYLOAD
from shared.security import Role

ROLE_ATTR: Final = "netq.role"
"""The key of a session's role in amqtt's ``Session.attributes`` (set by :class:`FarmAuthPlugin`)."""

NODE_MAX_PACKET_BYTES: Final = MAX_PROTO_PAYLOAD + (2 + 65535) + 2 + 256
"""Largest packet a member may send: the protocol's bound on one message (a snapshot of a large farm is one
message), its topic (at most 65,535 bytes, MQTT 3.1.1 §1.5.3), the packet id and the seal's trailer. Every other
client is held to the broker's ordinary bound (1 MiB)."""

_AUTH_PLUGIN: Final = f"{__name__}.FarmAuthPlugin"
_TOPIC_PLUGIN: Final = f"{__name__}.FarmTopicPlugin"


class Refusal(enum.StrEnum):
    """Why a CONNECT was refused, as counted by the broker."""

    ANONYMOUS = "anonymous"  # no username, or not a role's name
    BAD_PASSWORD = "bad_password"
    WILL = "will"  # a will the role may not publish (or retain)
    TAKEOVER = "takeover"  # the client id of a connected member, from a client that is not one
    MALFORMED = "malformed"  # not a CONNECT we can read (MQTT 3.1.1 §3.1.4: the server closes the connection)


# CONNACK return codes, MQTT 3.1.1 §3.2.2.3
CONNACK_UNACCEPTABLE_PROTOCOL: Final = 0x01
CONNACK_IDENTIFIER_REJECTED: Final = 0x02
CONNACK_BAD_CREDENTIALS: Final = 0x04
CONNACK_NOT_AUTHORIZED: Final = 0x05


# --- topic rules -----------------------------------------------------------------------------------------------
def _within(levels: list[str], prefix: list[str]) -> bool:
    """Whether a topic is ``prefix`` or below it (what the filter ``prefix/#`` matches, §4.7.1.2)."""
    return levels[: len(prefix)] == prefix


def _reaches(filter_levels: list[str], prefix: list[str]) -> bool:
    """Whether a topic filter matches at least one topic at or below ``prefix``."""
    for i, level in enumerate(prefix):
        if i >= len(filter_levels):
            return False
        if filter_levels[i] == "#":
            return True
        if filter_levels[i] not in ("+", level):
            return False
    return True


def _confined(filter_levels: list[str], prefix: list[str]) -> bool:
    """Whether every topic a filter matches is at or below ``prefix`` (its leading levels are literally it)."""
    return filter_levels[: len(prefix)] == prefix


@dataclass(frozen=True, slots=True)
class TopicPolicy:
    """What each role may read, subscribe to, publish and retain, for one farm's topics."""

    base: str = "netq"
    ha_prefix: str = "homeassistant"

    def _b(self, *rest: str) -> list[str]:
        return [*self.base.split("/"), *rest]

    @property
    def _h(self) -> list[str]:
        return self.ha_prefix.split("/")

    def may_read(self, role: Role, topic: str) -> bool:
        """Whether a message on ``topic`` may be delivered to a client of ``role``."""
        if role is Role.NODE:
            return True
        t = topic.split("/")
        if role is Role.HOMEASSISTANT and self._membership(t):
            return False  # as in mosquitto's ACL, where the ``deny`` that stops the publish stops reading too
        return (_within(t, self._b()) and not _within(t, self._b("_proto"))) or _within(t, self._h)

    def _membership(self, t: list[str]) -> bool:
        return any(_within(t, self._b("request", *path.split("/"))) for path in sorted(farm_api.MEMBERSHIP))

    def may_subscribe(self, role: Role, topic_filter: str) -> bool:
        """Whether a subscription may be made. A filter that reaches readable topics is allowed (``#`` too): its
        deliveries are filtered per message by :meth:`may_read`, as mosquitto does. One that can match nothing
        readable (``B/_proto/#``, another farm's base) is refused (SUBACK 0x80)."""
        if role is Role.NODE:
            return True
        f = topic_filter.split("/")
        if _reaches(f, self._b()) and not _confined(f, self._b("_proto")):
            return True
        return _reaches(f, self._h)

    def may_publish(self, role: Role, topic: str) -> bool:
        """Whether a client of ``role`` may publish on ``topic`` (retained or not: see :meth:`may_retain`)."""
        if role is Role.NODE:
            return True
        t = topic.split("/")
        request = self._b("request")
        if role is Role.OPERATOR:
            return _within(t, request)
        if role is Role.VIEWER:
            return any(t == self._b("request", *path.split("/")) for path in sorted(farm_api.READING))
        if role is Role.HOMEASSISTANT:
            if t == [*self._h, "status"]:  # Home Assistant's birth and will (not retained)
                return True
            return _within(t, request) and not self._membership(t)
        return False

    def may_retain(self, role: Role, topic: str) -> bool:
        """Whether a retained publish on ``topic`` may be kept: only from a member, and never on the request,
        response and protocol topics (a retained request would be replayed to every new subscriber)."""
        if role is not Role.NODE:
            return False
        t = topic.split("/")
        return not any(_within(t, self._b(part)) for part in ("request", "response", "_proto"))

    def may_will(self, role: Role, topic: str, retain: bool) -> bool:
        """Whether a CONNECT may carry this will: the broker publishes it for the client later."""
        return self.may_publish(role, topic) and (not retain or self.may_retain(role, topic))

    def reading_requests(self) -> list[str]:
        """The request topics a viewer may publish."""
        return [f"{self.base}/request/{path}" for path in sorted(farm_api.READING)]

    def membership_requests(self) -> list[str]:
        """The request topics Home Assistant may not publish."""
        return [f"{self.base}/request/{path}" for path in sorted(farm_api.MEMBERSHIP)]


# --- CONNECT -------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ConnectInfo:
    """What admission needs from a CONNECT packet."""

    client_id: str
    username: str | None = None
    password: bytes | None = None
    will_topic: str | None = None
    will_retain: bool = False
    clean_session: bool = True


class UnsupportedLevel(ProtocolError):
    """A CONNECT of another MQTT version: answered with CONNACK 0x01 (§3.1.2.2)."""


class _Cursor:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.body):
            raise ProtocolError("CONNECT packet is truncated")
        chunk = self.body[self.at: self.at + n]
        self.at += n
        return chunk

    def binary(self) -> bytes:  # §1.5.3: a two-byte length, then the bytes
        return self.take(int.from_bytes(self.take(2), "big"))

    def text(self) -> str:
        try:
            return self.binary().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("CONNECT packet has a string that is not UTF-8") from exc


def parse_connect(body: bytes) -> ConnectInfo:
    """The admission fields of a CONNECT packet's variable header and payload (MQTT 3.1.1 §3.1.2, §3.1.3).

    Raises :class:`ProtocolError` for anything that is not a well-formed MQTT 3.1.1 CONNECT."""
    c = _Cursor(body)
    if c.text() not in ("MQTT", "MQIsdp"):
        raise ProtocolError("not an MQTT CONNECT (protocol name, §3.1.2.1)")
    if c.take(1) != b"\x04":
        raise UnsupportedLevel("not MQTT 3.1.1 (protocol level, §3.1.2.2)")
    flags = c.take(1)[0]
    c.take(2)  # keep alive
    if flags & 0x01:
        raise ProtocolError("CONNECT reserved flag set (§3.1.2.3)")
    client_id = c.text()
    will_topic = None
    if flags & 0x04:
        will_topic = c.text()
        c.binary()  # the will message
    username = c.text() if flags & 0x80 else None
    password = c.binary() if flags & 0x40 else None
    if password is not None and username is None:
        raise ProtocolError("CONNECT has a password but no user name (§3.1.2.9)")
    return ConnectInfo(client_id=client_id, username=username, password=password, will_topic=will_topic,
                       will_retain=bool(flags & 0x20) and will_topic is not None, clean_session=bool(flags & 0x02))


# --- credentials -----------------------------------------------------------------------------------------------
def _digest(password: str | bytes) -> str:
    raw = password.encode() if isinstance(password, str) else password
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of admitting a CONNECT: a role, or a refusal with its CONNACK return code."""

    role: Role | None
    refusal: Refusal | None = None
    code: int = 0
    large_packets: bool = False  # may send packets up to the protocol's bound (a member's snapshot)


@dataclass(frozen=True)
class FarmAccess:
    """The broker credentials of a farm and its topic policy. ``digests`` (role → SHA-256 of its password)
    is empty for an open farm, which admits every client as a member."""

    policy: TopicPolicy = field(default_factory=TopicPolicy)
    digests: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def keyed(cls, key: bytes, policy: TopicPolicy | None = None) -> FarmAccess:
        """The access of a farm with a key: one password per role, derived from it (shared.security)."""
        return cls(policy or TopicPolicy(), {r.value: _digest(security.broker_password(key, r)) for r in Role})

    @property
    def open(self) -> bool:
        return not self.digests

    def role(self, username: str | None, password: str | bytes | None) -> Role | None:
        """The role whose credentials these are, or None (compared in constant time)."""
        if not username or password is None:
            return None
        digest = self.digests.get(username)
        if digest is None:
            return None
        return Role(username) if hmac.compare_digest(_digest(password), digest) else None

    def admit(self, connect: ConnectInfo) -> Admission:
        """Admit or refuse a CONNECT: the credentials (anonymous and wrong passwords refused), then its will."""
        if self.open:
            # Anyone is a member of an open farm; only a client that says it is one may send a member's
            # large packets, so a script or Home Assistant stays held to the ordinary bound.
            return Admission(Role.NODE, large_packets=connect.username == Role.NODE.value)
        role = self.role(connect.username, connect.password)
        if role is None:
            if connect.username in self.digests:
                return Admission(None, Refusal.BAD_PASSWORD, CONNACK_BAD_CREDENTIALS)
            return Admission(None, Refusal.ANONYMOUS, CONNACK_NOT_AUTHORIZED)
        if connect.will_topic is not None and not self.policy.may_will(role, connect.will_topic,
                                                                       connect.will_retain):
            return Admission(None, Refusal.WILL, CONNACK_NOT_AUTHORIZED)
        return Admission(role, large_packets=role is Role.NODE)

    def plugins(self) -> dict[str, dict[str, Any]]:
        """The amqtt plugin set that enforces this access (the open farm's is amqtt's anonymous plugin)."""
        if self.open:
            return {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}
        config = {"digests": dict(self.digests), "base_topic": self.policy.base,
                  "ha_prefix": self.policy.ha_prefix}
        return {_AUTH_PLUGIN: dict(config), _TOPIC_PLUGIN: dict(config)}


def role_of(session: Any) -> Role | None:
    """The role :class:`FarmAuthPlugin` gave an amqtt session, or None."""
    attributes = getattr(session, "attributes", None)
    value = attributes.get(ROLE_ATTR) if isinstance(attributes, dict) else None
    return value if isinstance(value, Role) else None


# --- amqtt plugins ---------------------------------------------------------------------------------------------
@dataclass
class _PluginConfig:
    digests: dict[str, str] = field(default_factory=dict)
    base_topic: str = "netq"
    ha_prefix: str = "homeassistant"

    def access(self) -> FarmAccess:
        if not self.digests:
            raise BrokerError("the farm's broker plugins need the role password digests")
        return FarmAccess(TopicPolicy(self.base_topic, self.ha_prefix), dict(self.digests))


class FarmAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """amqtt authentication: the CONNECT must carry a role's name and password, and a will that role may
    publish. The broker refuses the others with CONNACK "not authorized" and closes the connection."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._access: FarmAccess = self.config.access()

    async def authenticate(self, *, session: Any) -> bool:
        session.attributes.pop(ROLE_ATTR, None)
        connect = ConnectInfo(client_id=session.client_id or "", username=session.username,
                              password=_password_bytes(session.password),
                              will_topic=session.will_topic if session.will_flag else None,
                              will_retain=bool(session.will_retain))
        admission = self._access.admit(connect)
        if admission.role is None:
            return False
        session.attributes[ROLE_ATTR] = admission.role
        return True


class FarmTopicPlugin(BaseTopicPlugin):  # type: ignore[misc]
    """amqtt topic ACL: :class:`TopicPolicy` for the role the auth plugin gave the session."""

    Config = _PluginConfig

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._policy: TopicPolicy = self.config.access().policy

    async def topic_filtering(self, *, session: Any = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        role = role_of(session)
        if role is None or not topic:
            return False
        if action == Action.PUBLISH:
            return self._policy.may_publish(role, topic)
        if action == Action.SUBSCRIBE:
            return self._policy.may_subscribe(role, topic)
        if action == Action.RECEIVE:
            return self._policy.may_read(role, topic)
        return False


def _password_bytes(password: str | bytes | None) -> bytes | None:
    if password is None or isinstance(password, bytes):
        return password
    return password.encode("utf-8", "surrogateescape")


# --- mosquitto -------------------------------------------------------------------------------------------------
MOSQUITTO_ITERATIONS: Final = 101  # what mosquitto_passwd 2.0.11 writes


def mosquitto_password_line(user: str, password: str, salt: bytes | None = None,
                            iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """One line of a mosquitto 2.0 password file: ``user:$7$<iterations>$<salt>$<hash>``, the hash being
    PBKDF2-HMAC-SHA512 of the password, 64 bytes, salt 12 bytes, both in standard base64 (what
    ``mosquitto_passwd`` writes and mosquitto reads)."""
    salt = os.urandom(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"{user}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_acl(policy: TopicPolicy) -> str:
    """An ``acl_file`` for mosquitto 2.0 with the rules of :class:`TopicPolicy` (``deny`` lines are checked
    before the grants, mosquitto.conf(5)). mosquitto cannot refuse retained publishes by ACL: see
    docs/security.md."""
    b, h = policy.base, policy.ha_prefix
    lines = ["# netqueues: the broker ACL of a farm (netq credentials mosquitto). Keep it with the password file.",
             "", f"user {Role.NODE.value}", "topic readwrite #"]

    def reader(role: Role, writes: Iterable[str], denied: Iterable[str] = ()) -> None:
        lines.extend(["", f"user {role.value}", f"topic deny {b}/_proto/#"])
        lines.extend(f"topic deny {t}" for t in denied)
        lines.extend([f"topic read {b}/#", f"topic read {h}/#"])
        lines.extend(f"topic write {t}" for t in writes)

    reader(Role.HOMEASSISTANT, [f"{b}/request/#", f"{h}/status"],
           [d for t in policy.membership_requests() for d in (t, f"{t}/#")])
    reader(Role.OPERATOR, [f"{b}/request/#"])
    reader(Role.VIEWER, policy.reading_requests())
    return "\n".join(lines) + "\n"


def mosquitto_conf(directory: Path, host: str = "0.0.0.0", port: int = 1883) -> str:
    """The lines of mosquitto.conf that use the files :func:`write_mosquitto_files` wrote. mosquitto has one
    packet bound for every client, so it is the members' (the embedded broker holds the others to 1 MiB)."""
    return (f"listener {port} {host}\n"
            "allow_anonymous false\n"
            f"password_file {directory / 'netq.passwd'}\n"
            f"acl_file {directory / 'netq.acl'}\n"
            f"max_packet_size {NODE_MAX_PACKET_BYTES + 5}\n")  # the whole packet, fixed header included


def write_mosquitto_files(directory: Path, key: bytes, policy: TopicPolicy, *, host: str = "0.0.0.0",
                          port: int = 1883, use_tool: bool = True, owner: str | None = "mosquitto") -> dict[str, Path]:
    """Write ``netq.passwd`` (mode 0600), ``netq.acl`` and ``mosquitto.conf`` (a snippet to include) into
    ``directory``. The password file is made by ``mosquitto_passwd`` when it is on PATH (the passwords go to its
    standard input, never its command line), else in the same format by :func:`mosquitto_password_line`.
    Run as root, the password and ACL files are given to ``owner`` when that user exists: mosquitto started as
    root reads them after it has become that user (its ``user`` setting, ``mosquitto`` by default).
    Raises :class:`BrokerError` if the tool fails."""
    directory.mkdir(parents=True, exist_ok=True)
    passwd, acl, conf = directory / "netq.passwd", directory / "netq.acl", directory / "mosquitto.conf"
    tmp = passwd.with_name(passwd.name + ".part")
    tmp.unlink(missing_ok=True)
    tool = shutil.which("mosquitto_passwd") if use_tool else None
    if tool is not None:
        for i, role in enumerate(Role):
            secret = security.broker_password(key, role)
            args = [tool, *(["-c"] if i == 0 else []), str(tmp), role.value]
            try:
                done = subprocess.run(args, input=f"{secret}\n{secret}\n", capture_output=True, text=True,
                                      timeout=30, check=False)
            except (OSError, subprocess.TimeoutExpired) as exc:
                tmp.unlink(missing_ok=True)
                raise BrokerError(f"mosquitto_passwd failed: {exc}") from exc
            if done.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise BrokerError(f"mosquitto_passwd failed: {done.stderr.strip() or done.returncode}")
    else:
        text = "".join(mosquitto_password_line(r.value, security.broker_password(key, r)) + "\n" for r in Role)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
    os.chmod(tmp, 0o600)
    acl.write_text(mosquitto_acl(policy))
    ids = _owner_ids(owner)
    if ids is not None:
        for path in (tmp, acl):
            os.chown(path, *ids)
    tmp.replace(passwd)
    conf.write_text(mosquitto_conf(directory, host, port))
    return {"password_file": passwd, "acl_file": acl, "conf": conf}


def _owner_ids(owner: str | None) -> tuple[int, int] | None:
    """(uid, gid) of ``owner`` if we are root and that user exists, else None."""
    if owner is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(owner)
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid
