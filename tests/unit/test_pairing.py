"""Pairing codes and the SPAKE2 exchange (shared.pairing), the member's HTTP side in-process (node.app.pairing),
the farm key file (node.app.config), and the node refusing to run without a key."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from node.app.config import KEY_FILE, load_settings, read_key_file, write_key_file
from node.app.pairing import PAIRING_FILE, PairingService, issue_code, join, read_pending, take_pending
from shared import pairing as P
from shared import security
from shared.errors import ConfigError, NetqError, ProtocolError
from shared.settings import Settings

KEY = security.new_farm_key()


def other_code(code: P.Code) -> P.Code:
    """The same slot, one word different: a near miss."""
    words = list(code.words)
    words[0] = next(w for w in P.WORDS if w != words[0])
    return P.Code(code.slot, tuple(words))


def delivered() -> P.Delivered:
    return P.Delivered(key=KEY, farm_id=security.farm_id(security.parse_key(KEY)), member="n1")


# --- the code -----------------------------------------------------------------------------------------------
def test_word_list_is_2048_distinct_short_lowercase_words() -> None:
    assert len(P.WORDS) == 2048 == len(set(P.WORDS))
    assert all(re.fullmatch(r"[a-z]{3,7}", w) for w in P.WORDS)
    assert list(P.WORDS) == sorted(P.WORDS)


def test_secret_part_has_at_least_32_bits_and_one_try() -> None:
    # The slot is public (sent in the clear): only the words count. With one try per code, a guesser wins
    # with probability 2**-CODE_BITS.
    assert P.CODE_BITS >= 32
    assert len(P.WORDS) ** P.WORDS_PER_CODE >= 2**32


def test_new_codes_are_random_and_well_formed() -> None:
    codes = [P.new_code() for _ in range(3000)]
    texts = {str(c) for c in codes}
    assert len(texts) == len(codes)  # 2**33 words × 99 slots: a repeat here would mean a broken generator
    assert {c.slot for c in codes} == set(P.SLOTS)
    for c in codes[:50]:
        assert re.fullmatch(r"[1-9][0-9]?(-[a-z]{3,7}){3}", str(c))
        assert P.parse_code(str(c)) == c


def test_a_code_is_typed_forgivingly() -> None:
    code = P.Code(42, ("maple", "otter", "violin"))
    for typed in ("42-maple-otter-violin", " 42 Maple OTTER violin ", "42_maple.otter-violin\n"):
        assert P.parse_code(typed) == code
    assert "maple" not in repr(code)  # the words are the secret: never in a log line


@pytest.mark.parametrize(("typed", "says"), [
    ("", "starts with its number"),
    ("maple-otter-violin", "starts with its number"),
    ("0-maple-otter-violin", "1 to 99"),
    ("100-maple-otter-violin", "1 to 99"),
    ("7-maple-otter", "3 words (2 given)"),
    ("7-maple-otter-violin-wolf", "3 words (4 given)"),
    ("7-mapel-otter-violin", "did you mean 'maple'"),
    ("7-qqqq-otter-violin", "not one of the pairing code words"),
])
def test_a_mistyped_code_says_what_is_wrong(typed: str, says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        P.parse_code(typed)


# --- the exchange, pure -------------------------------------------------------------------------------------
def exchange(joiner_code: P.Code, member_code: P.Code) -> tuple[P.Joiner, P.MemberSession, P.StartAnswer]:
    joiner = P.Joiner(joiner_code)
    pending = P.PendingCode.issue(member_code, now=0.0)
    session, answer = P.member_start(pending, P.decode(P.StartRequest, P.encode(joiner.start())), now=0.0)
    return joiner, session, P.decode(P.StartAnswer, P.encode(answer))


def test_the_right_code_delivers_the_farm_key() -> None:
    code = P.new_code()
    joiner, session, answer = exchange(code, code)
    finish = joiner.confirm(answer)
    sealed = session.finish(P.decode(P.FinishRequest, P.encode(finish)), delivered())
    got = joiner.open(P.decode(P.FinishAnswer, P.encode(sealed)))
    assert got.key == KEY and got.farm_id == security.farm_id(security.parse_key(KEY)) and got.member == "n1"


@pytest.mark.security
def test_a_wrong_code_fails_on_both_sides() -> None:
    code = P.new_code()
    joiner, session, answer = exchange(other_code(code), code)
    with pytest.raises(P.PairingFailed, match="wrong pairing code"):
        joiner.confirm(answer)
    # A joiner that goes on anyway (a guesser) cannot make a tag the member accepts.
    forged = P.FinishRequest(session=answer.session, confirm=P._b64(os.urandom(32)))
    with pytest.raises(P.PairingFailed):
        session.finish(forged, delivered())
    with pytest.raises(P.PairingFailed, match="already used"):  # and the session is gone with that try
        session.finish(forged, delivered())


def _flip(text: str, at: int = 5) -> str:
    raw = bytearray(P._unb64(text))
    raw[at % len(raw)] ^= 0x01
    return P._b64(bytes(raw))


@pytest.mark.security
@pytest.mark.parametrize("field", ["msg", "confirm"])
def test_a_changed_member_answer_fails_the_joiners_confirmation(field: str) -> None:
    code = P.new_code()
    joiner, _session, answer = exchange(code, code)
    changed = answer.model_copy(update={field: _flip(getattr(answer, field))})
    with pytest.raises(ProtocolError):  # PairingFailed, or not a SPAKE2 point at all
        joiner.confirm(changed)


@pytest.mark.security
def test_a_changed_joiner_message_fails_the_members_confirmation() -> None:
    code = P.new_code()
    joiner = P.Joiner(code)
    start = joiner.start()
    pending = P.PendingCode.issue(code, now=0.0)
    try:
        session, answer = P.member_start(pending, start.model_copy(update={"msg": _flip(start.msg)}), now=0.0)
    except ProtocolError:
        return  # the changed message is not a point of the group: refused outright
    with pytest.raises(P.PairingFailed):
        joiner.confirm(answer)  # the keys differ, so the member's tag does not hold for us either
    with pytest.raises(P.PairingFailed):
        session.finish(P.FinishRequest(session=session.id, confirm=P._b64(b"\0" * 32)), delivered())


@pytest.mark.security
@pytest.mark.parametrize("field", ["nonce", "sealed"])
def test_a_changed_sealed_key_does_not_open(field: str) -> None:
    code = P.new_code()
    joiner, session, answer = exchange(code, code)
    sealed = session.finish(joiner.confirm(answer), delivered())
    with pytest.raises(P.PairingFailed, match="does not open"):
        joiner.open(sealed.model_copy(update={field: _flip(getattr(sealed, field))}))


@pytest.mark.security
def test_a_confirmation_from_another_exchange_is_refused() -> None:
    code = P.new_code()
    j1, _s1, a1 = exchange(code, code)
    _j2, s2, _a2 = exchange(code, code)
    with pytest.raises(P.PairingFailed):
        s2.finish(j1.confirm(a1), delivered())  # tags are bound to their transcript


@pytest.mark.security
def test_an_eavesdropper_sees_neither_key_nor_code() -> None:
    code = P.new_code()
    joiner, session, answer = exchange(code, code)
    finish = joiner.confirm(answer)
    sealed = session.finish(finish, delivered())
    wire = b"".join(P.encode(m) for m in (joiner.start(), answer, finish, sealed))
    raw = security.parse_key(KEY)
    assert KEY.encode() not in wire and KEY[5:].encode() not in wire
    assert raw not in wire and raw.hex().encode() not in wire
    # The words as they would be written (a single short word turns up in base64 by chance).
    assert "-".join(code.words).encode() not in wire and code.verifier not in wire
    assert all(b'"' + w.encode() + b'"' not in wire for w in code.words)
    assert P._b64(code.verifier).encode() not in wire


@pytest.mark.security
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 st.dictionaries(st.sampled_from(["v", "slot", "msg", "session", "confirm", "nonce", "sealed",
                                                  "x"]),
                                 st.one_of(st.integers(), st.text(max_size=80), st.none(), st.booleans()))
                 .map(lambda d: json.dumps(d).encode())))
def test_any_body_decodes_to_a_message_or_a_protocol_error(body: bytes) -> None:
    for model in (P.StartRequest, P.StartAnswer, P.FinishRequest, P.FinishAnswer):
        try:
            P.decode(model, body)
        except ProtocolError:
            pass


@pytest.mark.security
@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=80))
def test_any_spake2_message_is_answered_or_refused_as_a_protocol_error(msg: bytes) -> None:
    code = P.new_code()
    start = P.StartRequest(slot=code.slot, msg=P._b64(msg))
    try:
        P.member_start(P.PendingCode.issue(code, now=0.0), start, now=0.0)
    except ProtocolError:
        pass


def test_oversized_bodies_are_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError, match="larger than"):
        P.decode(P.StartRequest, b"{" + b" " * P.MAX_BODY + b"}")


# --- attempts per source ------------------------------------------------------------------------------------
def test_attempts_are_limited_per_source_and_refill() -> None:
    lim = P.AttemptLimiter(burst=3, refill_s=10.0, max_sources=2)
    assert [lim.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert lim.retry_after("a", 0.0) == pytest.approx(10.0)
    assert lim.allow("b", 0.0)  # another source is not held back by a
    assert not lim.allow("c", 0.0)  # the table is full of sources still limited: a flood of sources waits
    assert not lim.allow("a", 5.0) and lim.allow("a", 15.1)
    assert lim.allow("c", 1000.0)  # once the others are refilled, they are forgotten


# --- the member's side over HTTP, in-process ----------------------------------------------------------------
@pytest.fixture
async def member(tmp_path: Path) -> AsyncIterator[tuple[str, PairingService]]:
    service = PairingService(key=KEY, node_id="n1", data_dir=tmp_path,
                             limiter=P.AttemptLimiter(burst=4, refill_s=3600))
    app = web.Application()
    app.add_routes(service.routes())
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield f"http://127.0.0.1:{server.port}", service
    finally:
        await server.close()


async def test_join_in_process_gets_the_key_and_uses_the_code_up(member: tuple[str, PairingService],
                                                                 tmp_path: Path) -> None:
    url, service = member
    code, _ = issue_code(tmp_path)
    assert stat.S_IMODE((tmp_path / PAIRING_FILE).stat().st_mode) == 0o600
    joined = await join(code, [url])
    assert (joined.key, joined.member, joined.url) == (KEY, "n1", url)
    assert not (tmp_path / PAIRING_FILE).exists() and service.paired == ["127.0.0.1"]
    with pytest.raises(NetqError, match=f"no member has a pairing code numbered {code.slot}"):
        await join(code, [url])  # one use


@pytest.mark.security
async def test_a_wrong_code_burns_the_code_and_the_right_one_then_fails(member: tuple[str, PairingService],
                                                                        tmp_path: Path) -> None:
    url, service = member
    code, _ = issue_code(tmp_path)
    with pytest.raises(P.PairingFailed, match="wrong pairing code"):
        await join(other_code(code), [url])
    assert not (tmp_path / PAIRING_FILE).exists()
    with pytest.raises(NetqError, match="no member has a pairing code"):
        await join(code, [url])
    assert service.paired == []


@pytest.mark.security
async def test_another_slot_costs_nothing(member: tuple[str, PairingService], tmp_path: Path) -> None:
    url, _ = member
    code, _ = issue_code(tmp_path)
    elsewhere = P.Code(code.slot % 99 + 1, code.words)
    with pytest.raises(NetqError, match="no member has a pairing code"):
        await join(elsewhere, [url])
    assert (await join(code, [url])).key == KEY


@pytest.mark.security
async def test_hostile_requests_are_answered_and_change_nothing(member: tuple[str, PairingService],
                                                                tmp_path: Path) -> None:
    import aiohttp

    url, _ = member
    code, pending = issue_code(tmp_path)
    async with aiohttp.ClientSession() as http:
        for path, body, status in [
            ("/pair/start", b"not json", 400),
            ("/pair/start", b"[" * 100_000, 413),
            ("/pair/start", b'{"v":1,"slot":' + str(code.slot).encode() + b',"msg":"x","extra":1}', 400),
            ("/pair/finish", b'{"v":1,"session":"' + b"A" * 20 + b'","confirm":"AAAA"}', 404),
        ]:
            async with http.post(url + path, data=body) as resp:
                assert resp.status == status, (path, body[:40])
                assert "error" in await resp.json()
    assert read_pending(tmp_path) == pending  # none of that was an attempt at the code
    assert (await join(code, [url])).key == KEY


@pytest.mark.security
async def test_attempts_per_source_are_rate_limited(member: tuple[str, PairingService], tmp_path: Path) -> None:
    url, _ = member
    code, _ = issue_code(tmp_path)
    elsewhere = P.Code(code.slot % 99 + 1, code.words)
    for _ in range(4):
        with pytest.raises(NetqError, match="no member has"):
            await join(elsewhere, [url])
    with pytest.raises(NetqError, match="429: too many pairing attempts"):
        await join(code, [url])
    assert read_pending(tmp_path) is not None  # a refused attempt does not use the code up


def test_an_expired_code_is_not_served_and_is_deleted(tmp_path: Path) -> None:
    code, pending = issue_code(tmp_path, now=1000.0, ttl_s=60)
    assert take_pending(tmp_path, code.slot % 99 + 1, 1001.0) is None and read_pending(tmp_path) == pending
    assert take_pending(tmp_path, code.slot, 1061.0) is None
    assert not (tmp_path / PAIRING_FILE).exists()


def test_a_damaged_pairing_file_serves_nothing(tmp_path: Path) -> None:
    (tmp_path / PAIRING_FILE).write_text('{"slot": 3')
    assert read_pending(tmp_path) is None and take_pending(tmp_path, 3, 0.0) is None


# --- the key file -------------------------------------------------------------------------------------------
def test_the_key_file_is_private_and_never_overwritten_unasked(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "new", KEY)
    assert path == tmp_path / "new" / KEY_FILE and read_key_file(tmp_path / "new") == KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="already holds a farm key"):
        write_key_file(tmp_path / "new", security.new_farm_key())
    other = security.new_farm_key()
    write_key_file(tmp_path / "new", other, replace=True)
    assert read_key_file(tmp_path / "new") == other


def test_settings_take_the_key_file_unless_the_config_says_otherwise(tmp_path: Path) -> None:
    write_key_file(tmp_path, KEY)
    env: dict[str, str] = {}
    assert load_settings(flags={"data_dir": str(tmp_path)}, environ=env).farm.key == KEY
    conf = tmp_path / "netq.toml"
    other = security.new_farm_key()
    conf.write_text(f'data_dir = "{tmp_path}"\n[farm]\nkey = "{other}"\n')
    assert load_settings(conf, environ=env).farm.key == other  # [farm] key wins
    conf.write_text(f'data_dir = "{tmp_path}"\n[farm]\nopen = true\n')
    s = load_settings(conf, environ=env)
    assert s.farm.open and s.farm.key is None  # an explicitly open farm ignores the file
    assert load_settings(flags={"data_dir": str(tmp_path / "none")}, environ=env).farm.key is None


# --- no key, no node ----------------------------------------------------------------------------------------
async def test_a_node_without_a_key_refuses_to_start_and_names_the_remedies(tmp_path: Path) -> None:
    from node.app.agent import NodeAgent

    agent = NodeAgent(Settings(node_id="n1", data_dir=tmp_path / "n1", broker={"url": "mqtt://127.0.0.1:1"}))
    with pytest.raises(ConfigError) as info:
        await agent.start()
    for remedy in ("netq init", "netq join CODE", "farm.open = true"):
        assert remedy in str(info.value)
    assert not (tmp_path / "n1").exists()  # refused before anything was made
    await agent.stop()


# --- the commands -------------------------------------------------------------------------------------------
def test_init_json_on_a_fresh_machine_prints_the_farm_last(tmp_path: Path) -> None:
    from node.app.cli import app

    env = {"HOME": str(tmp_path), "NETQ_CONFIG": None}
    result = CliRunner().invoke(app, ["init", "--json"], env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(data) == {"farm_id", "key", "pairing_code"}
    assert data["farm_id"] == security.farm_id(security.parse_key(data["key"]))
    code = P.parse_code(data["pairing_code"])
    home = tmp_path / ".local/share/netqueues"
    assert read_key_file(home) == data["key"]
    pending = read_pending(home)
    assert pending is not None and pending.slot == code.slot and P._unb64(pending.verifier) == code.verifier
    again = CliRunner().invoke(app, ["init", "--json"], env=env)  # a second farm by accident: refused
    assert again.exit_code == 1 and "--force" in again.output and read_key_file(home) == data["key"]


def test_pair_needs_a_key_and_issues_a_fresh_code(tmp_path: Path) -> None:
    from node.app.cli import app

    env = {"HOME": str(tmp_path), "NETQ_CONFIG": None}
    result = CliRunner().invoke(app, ["pair", "--data-dir", str(tmp_path / "d")], env=env)
    assert result.exit_code == 1 and "netq init" in result.output
    write_key_file(tmp_path / "d", KEY)
    result = CliRunner().invoke(app, ["pair", "--data-dir", str(tmp_path / "d"), "--json", "--minutes", "5"],
                                env=env)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    pending = read_pending(tmp_path / "d")
    assert pending is not None and pending.slot == P.parse_code(data["pairing_code"]).slot
    assert data["farm_id"] == security.farm_id(security.parse_key(KEY))


def test_join_refuses_a_mistyped_code_and_a_node_that_has_a_key(tmp_path: Path) -> None:
    from node.app.cli import app

    env = {"HOME": str(tmp_path), "NETQ_CONFIG": None}
    result = CliRunner().invoke(app, ["join", "7-mapel-otter-violin", "--address", "127.0.0.1:1"], env=env)
    assert result.exit_code == 1 and "did you mean 'maple'" in result.output
    write_key_file(tmp_path / "d", KEY)
    result = CliRunner().invoke(app, ["join", "7-maple-otter-violin", "--data-dir", str(tmp_path / "d"),
                                      "--address", "127.0.0.1:1"], env=env)
    assert result.exit_code == 1 and "already holds the key" in result.output
