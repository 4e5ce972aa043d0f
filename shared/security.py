"""A farm's identity and everything derived from its key: broker credentials, file tokens, signing keys, seals.

Pure: no I/O, no clock. ``docs/security.md`` gives the threat model and why each choice was made.

* **The farm key** is 32 random bytes, written ``nqk1-<base64url>``. Everything else is derived from it with
  HKDF-SHA256 (RFC 5869), one ``info`` string per purpose, so that no derived secret tells anything about the
  key or about another derived secret.
* **The farm id** (public: zeroconf adverts, ``netq nodes``) is derived too, so that two farms are told apart
  without either learning the other's key.
* **Broker credentials**, one per role (:data:`ROLES`): username = the role, password derived from the key.
* **File tokens**, one per role, for the nodes' HTTP file servers.
* **Protocol seals**: every ``_proto/`` message carries a trailer with its sender, the sender's boot number,
  a counter, and an HMAC-SHA256 made with the *sender's own* key (derived per node id from the farm key) over
  the topic and the body. :class:`Opener` checks the MAC, binds the message to the sender it names, and drops
  replays with a sliding window per sender and boot (RFC 4303 §3.4.3's anti-replay window).
* **Signed state**: retained state and API responses carry an Ed25519 signature by a key pair derived from the
  farm key, so a client that holds only the *public* key (``netq credentials``) can check an answer without
  being able to forge one.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shared.errors import ConfigError, ProtocolError

KEY_PREFIX: Final = "nqk1-"
KEY_BYTES: Final = 32
_SALT: Final = b"netqueues/v1"
_NODE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")

MAX_COUNTER: Final = 2**63 - 1  # boots and counters are SQLite INTEGERs wherever they are stored
REPLAY_WINDOW: Final = 4096  # counters a message may arrive late by (MQTT does not order across topics)
_SEAL_TAG: Final = b"NQS1"
_MAX_TRAILER: Final = 200


class Role(enum.StrEnum):
    """Who a broker client or file request is. ``operator`` is also the role of scripts."""

    NODE = "node"  # a member: everything, including ``_proto/`` and retained state
    HOMEASSISTANT = "homeassistant"  # reads state and discovery, sends requests and node commands but retire
    OPERATOR = "operator"  # reads (not ``_proto/``) and sends every request
    VIEWER = "viewer"  # reads (not ``_proto/``) and sends only reading requests


ROLES: Final = tuple(Role)


# --- the key -------------------------------------------------------------------------------------------------
def new_farm_key() -> str:
    """A fresh random farm key in its written form."""
    return KEY_PREFIX + _b64(secrets.token_bytes(KEY_BYTES))


def parse_key(text: str) -> bytes:
    """The 32 bytes of a written farm key. Raise ConfigError (never echoing the key) if it is not one."""
    text = text.strip()
    if not text.startswith(KEY_PREFIX):
        raise ConfigError(f"farm.key is not a farm key (it starts with {KEY_PREFIX!r}; `netq init` makes one)")
    try:
        raw = _unb64(text[len(KEY_PREFIX):])
    except (binascii.Error, ValueError) as exc:
        raise ConfigError("farm.key is damaged (not base64url); copy it again from `netq init`") from exc
    if len(raw) != KEY_BYTES:
        raise ConfigError(f"farm.key is damaged ({len(raw)} bytes instead of {KEY_BYTES})")
    return raw


def derive(key: bytes, purpose: str, length: int = 32) -> bytes:
    """HKDF-SHA256 of the farm key for one ``purpose`` (the HKDF ``info``)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=purpose.encode()).derive(key)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))


def farm_id(key: bytes) -> str:
    """The farm's public id: 16 hex digits, the same on every node, telling nothing about the key."""
    return derive(key, "farm id", 8).hex()


def broker_password(key: bytes, role: Role | str) -> str:
    return _b64(derive(key, f"broker password {Role(role).value}", 24))


def file_token(key: bytes, role: Role | str) -> str:
    """A bearer token for the file servers; its first part names the role (the server derives and compares)."""
    r = Role(role).value
    return f"{r}.{_b64(derive(key, f'file token {r}', 24))}"


def token_role(key: bytes, token: str) -> Role | None:
    """The role whose file token ``token`` is, or None (compared in constant time)."""
    name, _, _ = token.partition(".")
    try:
        role = Role(name)
    except ValueError:
        return None
    return role if hmac.compare_digest(token.encode(), file_token(key, role).encode()) else None


def credential_role(key: bytes, username: str | None, password: str | None) -> Role | None:
    """The role a broker client is, from its CONNECT username and password, or None (refused)."""
    if not username or password is None:
        return None
    try:
        role = Role(username)
    except ValueError:
        return None
    return role if hmac.compare_digest(password.encode(), broker_password(key, role).encode()) else None


def node_key(key: bytes, node_id: str) -> bytes:
    """The HMAC key of one node's protocol messages."""
    return derive(key, f"node seal {node_id}")


# --- seals of protocol messages ----------------------------------------------------------------------------
class SealError(ProtocolError):
    """A protocol message without a valid seal. ``reason`` is one of :class:`Drop`."""

    def __init__(self, reason: Drop, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class Drop(enum.StrEnum):
    """Why a message was dropped, as counted in a node's state."""

    UNSIGNED = "unsigned"
    FORGED = "forged"
    REPLAYED = "replayed"
    STALE = "stale"  # a boot of its sender older than one already seen
    MALFORMED = "malformed"
    REFUSED = "refused"  # well sealed, but the protocol refuses it from that sender (docs/protocol.md)


def _mac(nkey: bytes, topic: str, sender: str, boot: int, counter: int, body: bytes) -> bytes:
    head = b"\0".join((b"netq proto", topic.encode(), sender.encode(), b"%d" % boot, b"%d" % counter))
    return hmac.new(nkey, head + b"\0" + body, hashlib.sha256).digest()


class Sealer:
    """Seals one node's outgoing protocol messages. ``boot`` must grow with every start of the node (it is
    kept in the node's replica), so that a receiver can tell a replay from an earlier run from a new message."""

    def __init__(self, key: bytes, node_id: str, boot: int) -> None:
        if not _NODE_ID.match(node_id):
            raise ConfigError(f"not a node id: {node_id!r}")
        if not 0 < boot <= MAX_COUNTER:
            raise ConfigError(f"boot number {boot} out of range")
        self.node_id = node_id
        self.boot = boot
        self._key = node_key(key, node_id)
        self._counter = 0

    def seal(self, topic: str, body: bytes) -> bytes:
        self._counter += 1
        n = self._counter
        mac = _b64(_mac(self._key, topic, self.node_id, self.boot, n, body))
        trailer = b" ".join((_SEAL_TAG, self.node_id.encode(), b"%d" % self.boot, b"%d" % n, mac.encode()))
        return body + b"\n" + trailer


@dataclass
class _Window:
    boot: int
    top: int = 0  # highest counter accepted
    seen: int = 0  # bit i: counter top - i was accepted


@dataclass
class Opened:
    sender: str
    body: bytes


@dataclass
class Opener:
    """Checks seals of incoming protocol messages and drops replays, counting each drop by reason.

    ``boots`` (node id → highest boot seen) survives a restart of this node when ``on_boot`` stores it: a replay
    of a message from an earlier run of its sender is then refused after our own restart too. Within the boot
    of a sender that is current when we restart, a message sent before our restart can be replayed to us once;
    the protocol's own checks (terms, grants, idempotent reports) make such a replay change nothing
    (docs/security.md)."""

    key: bytes
    boots: dict[str, int] = field(default_factory=dict)
    on_boot: Callable[[dict[str, int]], None] | None = None
    drops: dict[str, int] = field(default_factory=dict)
    _windows: dict[str, _Window] = field(default_factory=dict)
    _keys: dict[str, bytes] = field(default_factory=dict)

    def count(self, reason: Drop) -> None:
        self.drops[reason.value] = self.drops.get(reason.value, 0) + 1

    def open(self, topic: str, payload: bytes) -> Opened:
        """The sender and body of a sealed message; SealError (counted) when it is not genuine or is a replay."""
        try:
            return self._open(topic, payload)
        except SealError as exc:
            self.count(exc.reason)
            raise

    def _open(self, topic: str, payload: bytes) -> Opened:
        body, nl, trailer = payload.rpartition(b"\n")
        if not nl or len(trailer) > _MAX_TRAILER or not trailer.startswith(_SEAL_TAG + b" "):
            raise SealError(Drop.UNSIGNED, "no seal")
        parts = trailer.split(b" ")
        if len(parts) != 5:
            raise SealError(Drop.MALFORMED, "seal of the wrong shape")
        try:
            sender = parts[1].decode("ascii")
            boot, counter = int(parts[2]), int(parts[3])
            mac = _unb64(parts[4])
        except (ValueError, binascii.Error) as exc:
            raise SealError(Drop.MALFORMED, "seal fields unreadable") from exc
        if not _NODE_ID.match(sender) or not (0 < boot <= MAX_COUNTER and 0 < counter <= MAX_COUNTER):
            raise SealError(Drop.MALFORMED, "seal fields out of range")
        # One written form per seal: base64 decoding ignores stray characters and the unused bits of the last
        # one, and int() takes "+1" and "01", so a trailer could otherwise be altered and still verify.
        if parts[4] != _b64(mac).encode() or parts[2] != b"%d" % boot or parts[3] != b"%d" % counter:
            raise SealError(Drop.MALFORMED, "seal not in its canonical form")
        nkey = self._keys.get(sender)
        if nkey is None:
            nkey = node_key(self.key, sender)
            if len(self._keys) < 4096:  # a cache: ids from forged seals must not grow it without bound
                self._keys[sender] = nkey
        if not hmac.compare_digest(mac, _mac(nkey, topic, sender, boot, counter, body)):
            raise SealError(Drop.FORGED, f"bad seal for {sender}")
        self._accept(sender, boot, counter)
        return Opened(sender, body)

    def _accept(self, sender: str, boot: int, counter: int) -> None:
        known = self.boots.get(sender, 0)
        if boot < known:
            raise SealError(Drop.STALE, f"{sender}'s boot {boot} is older than {known}")
        w = self._windows.get(sender)
        if w is None or w.boot < boot:
            w = self._windows[sender] = _Window(boot)
            if boot > known:
                self.boots[sender] = boot
                if self.on_boot is not None:
                    self.on_boot(dict(self.boots))
        if counter > w.top:
            shift = counter - w.top
            w.seen = ((w.seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            w.top = counter
            return
        age = w.top - counter
        if age >= REPLAY_WINDOW or w.seen >> age & 1:
            raise SealError(Drop.REPLAYED, f"{sender} #{counter} of boot {boot} seen before or too old")
        w.seen |= 1 << age


# --- signed state and answers (Ed25519) --------------------------------------------------------------------
SIG_FIELD: Final = "sig"


def state_private_key(key: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(derive(key, "state signing"))


def state_public_key(key: bytes) -> str:
    """The public key that checks the farm's signed state and answers, written ``nqp1-<base64url>``."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = state_private_key(key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "nqp1-" + _b64(raw)


def _canonical(topic: str, obj: dict[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != SIG_FIELD}
    return topic.encode() + b"\n" + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class StateSigner:
    """Signs JSON objects published as retained state or as answers (the ``sig`` field)."""

    def __init__(self, key: bytes) -> None:
        self._private = state_private_key(key)

    def sign(self, topic: str, obj: dict[str, Any]) -> dict[str, Any]:
        return {**obj, SIG_FIELD: _b64(self._private.sign(_canonical(topic, obj)))}


def verify_state(public: str, topic: str, obj: dict[str, Any]) -> bool:
    """Whether ``obj``, received on ``topic``, was signed by the farm whose state public key is ``public``."""
    sig = obj.get(SIG_FIELD)
    if not isinstance(sig, str) or not public.startswith("nqp1-"):
        return False
    try:
        pub = Ed25519PublicKey.from_public_bytes(_unb64(public[5:]))
        pub.verify(_unb64(sig), _canonical(topic, obj))
    except (ValueError, binascii.Error, InvalidSignature):
        return False
    return True
