"""Signed state and answers: which topics carry a signature, signing when publishing, checking on receipt.

Every retained JSON object the farm publishes under its base topic (node states and their last wills, job
topics, ``bridge/state``, ``bridge/info``, the summaries) and every answer on ``<base>/response/…`` carries
the ``sig`` field: an Ed25519 signature, by the key pair every member derives from the farm key, over the
topic and the object (:class:`shared.security.StateSigner`). A client that holds only the public key
(``nqp1-…``) checks it, so an answer or a state an intruder got in first is told from the farm's own.
Not signed: Home Assistant's discovery configs (its format), the ``events`` stream and the event entities'
topics (not retained state), and empty retained payloads (the clearing of a topic, MQTT 3.1.1 §3.3.1.3:
no object to sign). An open farm signs nothing. ``docs/security.md`` ("Signed state") says what this stops
and what it does not.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from shared import farm_api, security
from shared.errors import RequestError
from shared.security import Drop
from shared.settings import FarmSettings
from shared.topics import Topics

log = logging.getLogger(__name__)


def is_signed_topic(topics: Topics, topic: str) -> bool:
    """Whether the farm signs what it publishes on ``topic`` (see the module docstring)."""
    prefix = topics.base + "/"
    if not topic.startswith(prefix):
        return False
    parts = topic[len(prefix):].split("/")
    if parts[0] == "response":
        return len(parts) > 1
    if parts[0] == "bridge":
        return len(parts) == 2 and parts[1] in ("state", "info", "summary")
    if parts[0] == "nodes":
        return len(parts) == 3 and parts[2] in ("state", "summary")
    return parts[0] == "queues" and len(parts) == 4 and parts[2] == "jobs"


class StateSigning:
    """Encodes the JSON a node publishes as retained state or answers (signed if the farm has a key)."""

    def __init__(self, key: bytes | None) -> None:
        self._signer = security.StateSigner(key) if key is not None else None

    @classmethod
    def for_farm(cls, farm: FarmSettings) -> StateSigning:
        return cls(farm.key_bytes)

    @property
    def enabled(self) -> bool:
        return self._signer is not None

    def sign(self, topic: str, obj: dict[str, Any]) -> dict[str, Any]:
        """``obj`` with its ``sig`` for ``topic`` (unchanged in an open farm)."""
        return obj if self._signer is None else self._signer.sign(topic, obj)

    def encode(self, topic: str, obj: dict[str, Any], *, sort_keys: bool = False) -> bytes:
        """The payload of ``obj`` on ``topic``: JSON, signed. Ed25519 signatures are deterministic (RFC 8032
        §5.1.6): the same object gives the same bytes (publishers that skip unchanged payloads rely on it)."""
        return json.dumps(self.sign(topic, obj), sort_keys=sort_keys).encode()

    def sign_payload(self, topic: str, payload: bytes) -> bytes:
        """A JSON object already encoded elsewhere (an API response envelope), signed for ``topic``."""
        if self._signer is None:
            return payload
        obj = json.loads(payload)
        assert isinstance(obj, dict), "only JSON objects are signed"
        return self.encode(topic, obj)


@dataclass
class StateVerifier:
    """Checks signed state and answers on receipt with the farm's public state key; counts what it refuses.

    A refusal is the work of a peer (an intruder, or a node of another farm), so it is logged once at warning
    level and then at debug level."""

    public: str
    topics: Topics
    max_bytes: int = 64 * 1024 * 1024  # a payload decoded at most (nesting: farm_api.MAX_DEPTH)
    drops: dict[str, int] = field(default_factory=dict)
    _warned: bool = False

    def check(self, topic: str, obj: Any) -> bool:
        """Whether ``obj`` (decoded JSON) received on ``topic`` may be used. Topics the farm does not sign
        pass; on a signed topic only an object with a valid signature for that very topic does."""
        if not is_signed_topic(self.topics, topic):
            return True
        if not isinstance(obj, dict):
            return self._refuse(Drop.MALFORMED, topic, "not a JSON object")
        if security.SIG_FIELD not in obj:
            return self._refuse(Drop.UNSIGNED, topic, "no signature")
        if not security.verify_state(self.public, topic, obj):
            return self._refuse(Drop.FORGED, topic, "bad signature (forged, altered, or for another topic)")
        return True

    def decode(self, topic: str, payload: bytes) -> Any:
        """The decoded JSON of ``payload`` if it may be used (see :meth:`check`), else None (counted)."""
        try:
            obj = farm_api.loads_bounded(payload, max_bytes=self.max_bytes, what="message")
        except RequestError as exc:  # not JSON, too large, nested too deeply
            if is_signed_topic(self.topics, topic):
                self._refuse(Drop.MALFORMED, topic, str(exc)[:200])
            return None
        return obj if self.check(topic, obj) else None

    def accepts(self, topic: str, payload: bytes) -> bool:
        """Whether a non-empty payload received on ``topic`` may be used: any on a topic the farm does not
        sign, else only a signed JSON object (see :meth:`check`)."""
        return not is_signed_topic(self.topics, topic) or self.decode(topic, payload) is not None

    def _refuse(self, reason: Drop, topic: str, why: str) -> bool:
        self.drops[reason.value] = self.drops.get(reason.value, 0) + 1
        if self._warned:
            log.debug("ignoring a message on %s: %s", topic[:200], why)
        else:
            self._warned = True
            log.warning("ignoring a message on %s: %s; it is not from this farm (further ones are logged at "
                        "debug level)", topic[:200], why)
        return False
