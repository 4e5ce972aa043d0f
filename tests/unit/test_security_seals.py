"""Seals of protocol messages (shared.security Sealer/Opener) and how a node keeps what they need: the replay
window's edges, reordering within it, old boots refused, boots persisted in the replica, and what a node with
neither a farm key nor ``[farm] open`` does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.consensus.consensus import Consensus
from node.consensus.replica import Replica
from node.link.base import LinkOptions
from node.link.memory import MemoryBroker, MemoryLink
from shared import protocol as P
from shared import security
from shared.errors import ConfigError, ProtocolError
from shared.security import REPLAY_WINDOW, Drop, Opener, Sealer, SealError
from shared.settings import Settings

pytestmark = pytest.mark.security

KEY = security.parse_key(security.new_farm_key())
TOPIC = "netq/_proto/log"
BODY = P.encode(P.Heartbeat(farm="f", term=3, arbiter="n1", seq=4, commit=4, serving=True))


def _refused(opener: Opener, topic: str, payload: bytes) -> Drop:
    with pytest.raises(SealError) as info:
        opener.open(topic, payload)
    return info.value.reason


def test_a_seal_names_and_proves_its_sender() -> None:
    sealed = Sealer(KEY, "n1", boot=7).seal(TOPIC, BODY)
    opened = Opener(KEY).open(TOPIC, sealed)
    assert (opened.sender, opened.body) == ("n1", BODY)
    assert P.decode(opened.body).arbiter == "n1"
    with pytest.raises(ProtocolError):
        P.decode(sealed)  # a sealed payload is not JSON: an unsealing receiver cannot mistake it for a message


def test_anything_changed_or_missing_is_dropped_and_counted() -> None:
    sealed = Sealer(KEY, "n1", boot=7).seal(TOPIC, BODY)
    opener = Opener(KEY)
    body, _, trailer = sealed.rpartition(b"\n")
    other_farm = Sealer(security.parse_key(security.new_farm_key()), "n1", boot=7).seal(TOPIC, BODY)
    assert _refused(opener, TOPIC, BODY) == Drop.UNSIGNED
    assert _refused(opener, TOPIC, body.replace(b'"term":3', b'"term":4') + b"\n" + trailer) == Drop.FORGED
    assert _refused(opener, "netq/_proto/election", sealed) == Drop.FORGED  # bound to its topic
    assert _refused(opener, TOPIC, body + b"\n" + trailer.replace(b" n1 ", b" n2 ")) == Drop.FORGED
    assert _refused(opener, TOPIC, other_farm) == Drop.FORGED  # another farm's key
    assert _refused(opener, TOPIC, body + b"\nNQS1 n1 7 x") == Drop.MALFORMED
    assert _refused(opener, TOPIC, body + b"\nNQS1 n1 0 1 AAAA") == Drop.MALFORMED  # boot 0 is never sent
    assert opener.drops == {"unsigned": 1, "forged": 4, "malformed": 2}
    assert opener.open(TOPIC, sealed).sender == "n1"  # the genuine one still opens


def test_replay_window_edges() -> None:
    sealer, opener = Sealer(KEY, "n1", boot=1), Opener(KEY)
    sent = [sealer.seal(TOPIC, BODY) for _ in range(REPLAY_WINDOW + 2)]
    opener.open(TOPIC, sent[-1])  # counter REPLAY_WINDOW + 2 arrives first
    # Counter 3 is REPLAY_WINDOW - 1 behind the top: the oldest still inside the window.
    assert opener.open(TOPIC, sent[2]).sender == "n1"
    assert _refused(opener, TOPIC, sent[2]) == Drop.REPLAYED  # once only
    assert _refused(opener, TOPIC, sent[1]) == Drop.REPLAYED  # REPLAY_WINDOW behind: too old to tell
    assert _refused(opener, TOPIC, sent[-1]) == Drop.REPLAYED
    assert opener.drops == {"replayed": 3}


def test_reordering_within_the_window_loses_nothing() -> None:
    sealer, opener = Sealer(KEY, "n1", boot=1), Opener(KEY)
    sent = [sealer.seal(TOPIC, BODY) for _ in range(50)]
    order = list(range(49, -1, -2)) + list(range(0, 50, 2))  # late, early and interleaved
    assert [opener.open(TOPIC, sent[i]).sender for i in order] == ["n1"] * 50
    assert all(_refused(opener, TOPIC, p) == Drop.REPLAYED for p in sent)
    # A jump past the window forgets the older counters without refusing the new one.
    far = Sealer(KEY, "n1", boot=1)
    far._counter = 50 + 3 * REPLAY_WINDOW
    assert opener.open(TOPIC, far.seal(TOPIC, BODY)).sender == "n1"


def test_an_old_boot_is_refused_and_boots_are_persisted() -> None:
    stored: list[dict[str, int]] = []
    opener = Opener(KEY, on_boot=stored.append)
    old = Sealer(KEY, "n1", boot=5).seal(TOPIC, BODY)
    opener.open(TOPIC, old)
    restarted = Sealer(KEY, "n1", boot=6)
    first = restarted.seal(TOPIC, BODY)
    assert opener.open(TOPIC, first).sender == "n1"  # a new boot starts a new window at counter 1
    assert _refused(opener, TOPIC, Sealer(KEY, "n1", boot=5).seal(TOPIC, BODY)) == Drop.STALE
    assert stored == [{"n1": 5}, {"n1": 6}]
    # After our own restart, an Opener made from the stored boots still refuses the older boot.
    again = Opener(KEY, boots=dict(stored[-1]))
    assert _refused(again, TOPIC, old) == Drop.STALE
    assert again.open(TOPIC, restarted.seal(TOPIC, BODY)).sender == "n1"


def _settings(tmp_path: Path, **farm: object) -> Settings:
    return Settings(node_id="n1", data_dir=tmp_path, farm=farm)


def _consensus(tmp_path: Path, replica: Replica, **farm: object) -> Consensus:
    link = MemoryLink(MemoryBroker(), LinkOptions(client_id="n1"))
    return Consensus(_settings(tmp_path, **farm), link, replica)


def test_a_node_with_neither_key_nor_open_refuses_to_run(tmp_path: Path) -> None:
    replica = Replica(tmp_path / "r.db")
    try:
        with pytest.raises(ConfigError, match=r"netq init.*netq join CODE"):
            _consensus(tmp_path, replica)
        assert replica.hard_state().boot == 0  # refused before anything was written
        _consensus(tmp_path, replica, open=True)  # an open farm is asked for
    finally:
        replica.close()


def test_the_boot_grows_durably_with_every_start_and_peer_boots_survive(tmp_path: Path) -> None:
    key = security.new_farm_key()
    replica = Replica(tmp_path / "r.db")
    try:
        first = _consensus(tmp_path, replica, key=key)
        assert first.boot >= int(time.time()) - 1  # at least the wall clock's seconds: a wiped replica is fine
        second = _consensus(tmp_path, replica, key=key)
        assert second.boot == first.boot + 1 == replica.hard_state().boot
        # The peers' boots the opener sees are stored in the replica, and loaded by the next run.
        assert second._opener is not None
        with pytest.raises(SealError):
            second._opener.open(TOPIC, Sealer(KEY, "n2", boot=41).seal(TOPIC, BODY))  # another farm's key
        assert replica.peer_boots == {}  # a forged seal stores nothing
        other = security.parse_key(key)
        second._opener.open(TOPIC, Sealer(other, "n2", boot=41).seal(TOPIC, BODY))
        assert replica.peer_boots == {"n2": 41}
        third = _consensus(tmp_path, replica, key=key)
        assert third._opener is not None and third._opener.boots == {"n2": 41}
        with pytest.raises(SealError):
            third._opener.open(TOPIC, Sealer(other, "n2", boot=40).seal(TOPIC, BODY))
    finally:
        replica.close()


def test_a_node_skips_only_its_own_sealed_echoes(tmp_path: Path) -> None:
    key = security.new_farm_key()
    replica = Replica(tmp_path / "r.db")
    try:
        c = _consensus(tmp_path, replica, key=key)
        raw = security.parse_key(key)
        assert c._is_own(Sealer(raw, "n1", boot=c.boot).seal(TOPIC, BODY))
        assert not c._is_own(Sealer(raw, "n10", boot=c.boot).seal(TOPIC, BODY))
        assert not c._is_own(BODY)
    finally:
        replica.close()


def test_one_seal_and_no_key_derivation_per_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The seal's cost (~15 µs here) is paid once per message sent and once per message received: keys are
    derived once per sender, never per message."""
    calls: list[str] = []
    real = security.derive

    def counted(key: bytes, purpose: str, length: int = 32) -> bytes:
        calls.append(purpose)
        return real(key, purpose, length)

    monkeypatch.setattr(security, "derive", counted)
    sealer, opener = Sealer(KEY, "n1", boot=1), Opener(KEY)
    start = time.perf_counter()
    for _ in range(2000):
        opener.open(TOPIC, sealer.seal(TOPIC, BODY))
    per_message = (time.perf_counter() - start) / 2000
    assert calls == ["node seal n1", "node seal n1"]  # the sealer's key, and the opener's, each once
    assert per_message < 500e-6, f"seal and open took {per_message * 1e6:.0f} µs"
