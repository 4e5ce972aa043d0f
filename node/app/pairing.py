"""Pairing over HTTP: a member hands the farm key to a new node that holds a pairing code (``docs/security.md``).

Member side: :class:`PairingService` answers ``POST /pair/start`` and ``POST /pair/finish`` (the exchange of
:mod:`shared.pairing`) for the code in ``<data_dir>/pairing.json``, which ``netq init`` and ``netq pair`` write
(:func:`issue_code`). The code is deleted at the first attempt for its slot, right or wrong, before any answer;
attempts are limited per source address. :class:`PairingServer` serves those routes on a port of their own,
bound like the file server; the node advertises that port as the SRV port of its zeroconf record.

Joiner side: :func:`discover_members` finds the advertised endpoints with zeroconf, :func:`join` runs the
exchange with them in turn (a member without a code of that slot says so and costs nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo

from broker.choice import Advert
from broker.discover import browse_adverts
from node.app.config import write_private
from shared import pairing as P
from shared import security
from shared.errors import ConfigError, NetqError, ProtocolError

log = logging.getLogger(__name__)

PAIRING_FILE = "pairing.json"
START_PATH = "/pair/start"
FINISH_PATH = "/pair/finish"
_MAX_SESSIONS = 64
_WARNED_MAX = 1000
_BODY_TIMEOUT_S = 5.0


# --- the code a member serves -------------------------------------------------------------------------------
def issue_code(data_dir: Path, *, now: float | None = None,
               ttl_s: float = P.CODE_TTL_S) -> tuple[P.Code, P.PendingCode]:
    """A fresh code for this node to serve, replacing any earlier one (``<data_dir>/pairing.json``, 0600)."""
    code = P.new_code()
    pending = P.PendingCode.issue(code, time.time() if now is None else now, ttl_s)
    write_private(data_dir / PAIRING_FILE, pending.model_dump_json() + "\n")
    return code, pending


def read_pending(data_dir: Path) -> P.PendingCode | None:
    """The code waiting to be served, or None (none, or unreadable: a damaged file serves nothing)."""
    try:
        return P.PendingCode.model_validate_json((data_dir / PAIRING_FILE).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", data_dir / PAIRING_FILE, exc)
        return None


def take_pending(data_dir: Path, slot: int, now: float) -> P.PendingCode | None:
    """The live code of ``slot``, deleted from disk before it is returned: one attempt per code. None when
    there is none (an expired code is deleted too). ConfigError if it cannot be deleted: then it is not used."""
    pending = read_pending(data_dir)
    if pending is None or pending.slot != slot:
        return None
    path = data_dir / PAIRING_FILE
    try:
        path.unlink()
    except FileNotFoundError:
        return None  # taken a moment ago
    except OSError as exc:
        raise ConfigError(f"cannot delete {path}: {exc.strerror}") from exc
    return pending if pending.live(now) else None


# --- the member's side --------------------------------------------------------------------------------------
class PairingService:
    """Answers joiners for one node: ``routes()`` can be mounted on any aiohttp application."""

    def __init__(self, *, key: str, node_id: str, data_dir: Path, limiter: P.AttemptLimiter | None = None,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._delivered = P.Delivered(key=key, farm_id=security.farm_id(security.parse_key(key)), member=node_id)
        self.node_id = node_id
        self.data_dir = data_dir
        self._limiter = limiter or P.AttemptLimiter()
        self._clock = clock
        self._monotonic = monotonic
        self._sessions: dict[str, P.MemberSession] = {}
        self._warned: set[tuple[str, str]] = set()
        self.paired: list[str] = []  # source addresses that received the key, for the log and tests

    def routes(self) -> list[web.RouteDef]:
        return [web.post(START_PATH, self._start), web.post(FINISH_PATH, self._finish)]

    async def _start(self, request: web.Request) -> web.Response:
        source = request.remote or "?"
        now = self._monotonic()
        if not self._limiter.allow(source, now):
            self._peer_warning(source, "rate", "pairing attempts from %s: too many, refused for now", source)
            wait = max(1, round(self._limiter.retry_after(source, now)))
            return _error(429, f"too many pairing attempts: try again in {wait} s", **{"Retry-After": str(wait)})
        body = await _read_body(request)
        if body is None:
            return _error(413, f"a pairing message is at most {P.MAX_BODY} bytes")
        try:
            start = P.decode(P.StartRequest, body)
        except ProtocolError as exc:
            self._peer_warning(source, "malformed", "pairing request from %s: %s", source, exc)
            return _error(400, str(exc))
        try:
            pending = take_pending(self.data_dir, start.slot, self._clock())
        except ConfigError as exc:
            log.error("%s: pairing refused: %s", self.node_id, exc)
            return _error(500, "this member cannot use its pairing code (see its log)")
        if pending is None:
            log.debug("pairing request from %s for slot %d: no such code here", source, start.slot)
            return _error(404, f"no pairing code numbered {start.slot} is waiting on this node (codes last "
                               f"{P.CODE_TTL_S / 60:g} minutes and one try): run `netq pair` on a member")
        log.info("%s: pairing attempt from %s with code %d-…: that code is now used up", self.node_id, source,
                 start.slot)
        try:
            session, answer = P.member_start(pending, start, now)
        except ProtocolError as exc:
            self._peer_warning(source, "malformed", "pairing request from %s: %s", source, exc)
            return _error(400, str(exc))
        self._keep(session, now)
        return _json(200, P.encode(answer))

    async def _finish(self, request: web.Request) -> web.Response:
        source = request.remote or "?"
        body = await _read_body(request)
        if body is None:
            return _error(413, f"a pairing message is at most {P.MAX_BODY} bytes")
        try:
            finish = P.decode(P.FinishRequest, body)
        except ProtocolError as exc:
            self._peer_warning(source, "malformed", "pairing request from %s: %s", source, exc)
            return _error(400, str(exc))
        session = self._sessions.pop(finish.session, None)
        if session is None or session.expires < self._monotonic():
            return _error(404, "no such pairing session (it expired or was used): start again with a new code")
        try:
            answer = session.finish(finish, self._delivered)
        except P.PairingFailed:
            self._peer_warning(source, "wrong", "%s: wrong pairing code from %s", self.node_id, source)
            return _error(403, "wrong pairing code; it is used up now: run `netq pair` on a member for a new "
                               "one")
        self.paired.append(source)
        log.info("%s: sent the farm key to %s (paired with a code)", self.node_id, source)
        return _json(200, P.encode(answer))

    def _keep(self, session: P.MemberSession, now: float) -> None:
        for sid in [s for s, v in self._sessions.items() if v.expires < now]:
            del self._sessions[sid]
        while len(self._sessions) >= _MAX_SESSIONS:  # one per code issued: only a flood of codes gets here
            del self._sessions[next(iter(self._sessions))]
        self._sessions[session.id] = session

    def _peer_warning(self, source: str, kind: str, msg: str, *args: Any) -> None:
        """A peer's fault: warned once per peer and kind, then at debug level."""
        if (source, kind) in self._warned or len(self._warned) >= _WARNED_MAX:
            log.debug(msg, *args)
        else:
            self._warned.add((source, kind))
            log.warning(msg + " (further such messages from this peer at debug level)", *args)


class _State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"


class PairingServer:
    """Serves a :class:`PairingService` on ``host:port`` (0: a free port, see :attr:`port`)."""

    def __init__(self, service: PairingService, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.service = service
        self.host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._state = _State.NEW

    @property
    def port(self) -> int:
        if self._state is not _State.RUNNING:
            raise NetqError("pairing server is not running")
        return self._port

    async def start(self) -> int:
        if self._state is not _State.NEW:
            raise NetqError(f"pairing server cannot start: it is {self._state.value}")
        app = web.Application(client_max_size=P.MAX_BODY)
        app.add_routes(self.service.routes())
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self._port, reuse_address=False).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"cannot serve pairing on {self.host}:{self._port}: {exc}") from exc
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._state = _State.RUNNING
        return self._port

    async def stop(self) -> None:
        """Stop serving (idempotent)."""
        runner, self._runner = self._runner, None
        self._state = _State.STOPPED
        if runner is not None:
            await runner.cleanup()


async def _read_body(request: web.Request) -> bytes | None:
    """The request body, or None when it is larger than a pairing message can be."""
    if request.content_length is not None and request.content_length > P.MAX_BODY:
        return None
    data = bytearray()
    try:
        async with asyncio.timeout(_BODY_TIMEOUT_S):
            async for chunk in request.content.iter_chunked(1024):
                data += chunk
                if len(data) > P.MAX_BODY:
                    return None
    except TimeoutError:
        return None
    return bytes(data)


def _json(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


# --- the joiner's side --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Joined:
    key: str
    farm_id: str
    member: str  # the member's node id
    url: str  # where it answered


async def join(code: P.Code, urls: Sequence[str], *, timeout: float = 10.0) -> Joined:
    """Fetch the farm key from the first of ``urls`` (``http://host:port``) that holds ``code``.

    Each member gets its own exchange; one that has no code of this slot answers 404 and costs nothing. Raise
    :class:`shared.pairing.PairingFailed` when the code was wrong, NetqError when no member could be used."""
    if not urls:
        raise NetqError("no member to pair with")
    wrong: list[str] = []
    other: list[str] = []
    missing = 0
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as http:
        for url in urls:
            try:
                return await _join_one(http, code, url.rstrip("/"))
            except P.PairingFailed as exc:
                wrong.append(f"{url}: {exc}")
            except _NoCode:
                missing += 1
            except (NetqError, aiohttp.ClientError, TimeoutError) as exc:
                other.append(f"{url}: {_printable(str(exc)) or type(exc).__name__}")
    if wrong:
        raise P.PairingFailed(f"wrong pairing code, and it is used up now: run `netq pair` on a member for a "
                              f"new one ({'; '.join(wrong)})")
    if other:
        raise NetqError("could not pair: " + "; ".join(other))
    raise NoMemberHasCode(f"no member has a pairing code numbered {code.slot} waiting ({missing} asked; codes "
                          f"last {P.CODE_TTL_S / 60:g} minutes and one try): run `netq pair` on a member for a "
                          "new one")


class NoMemberHasCode(NetqError):
    """Every member asked answered that it has no code of that number (nothing was used up): members of other
    farms on the same network, or the right member not found yet."""


class _NoCode(Exception):
    pass


async def _join_one(http: aiohttp.ClientSession, code: P.Code, url: str) -> Joined:
    joiner = P.Joiner(code)
    status, body = await _post(http, url + START_PATH, P.encode(joiner.start()))
    if status == 404:
        raise _NoCode()
    if status != 200:
        raise NetqError(f"answered {status}: {_error_text(body)}")
    answer = P.decode(P.StartAnswer, body)
    finish = joiner.confirm(answer)  # PairingFailed: the member's tag does not hold, and we send nothing more
    status, body = await _post(http, url + FINISH_PATH, P.encode(finish))
    if status == 403:
        raise P.PairingFailed(_error_text(body))
    if status != 200:
        raise NetqError(f"answered {status}: {_error_text(body)}")
    delivered = joiner.open(P.decode(P.FinishAnswer, body))
    return Joined(delivered.key, delivered.farm_id, delivered.member, url)


async def _post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with http.post(url, data=body, headers={"Content-Type": "application/json"},
                         allow_redirects=False) as resp:
        data = bytearray()
        async for chunk in resp.content.iter_chunked(1024):
            data += chunk
            if len(data) > P.MAX_BODY:
                raise NetqError(f"{url} answered with more than {P.MAX_BODY} bytes")
        return resp.status, bytes(data)


def _error_text(body: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return _printable(str(json.loads(body).get("error", "")))
    return _printable(body.decode("utf-8", "replace"))


def _printable(text: str) -> str:
    """A peer's text, safe for a terminal (no escape sequences) and short."""
    return "".join(c for c in text if c.isprintable())[:300]


async def discover_members(interfaces: Sequence[str] | None, timeout: float = 3.0,
                           grace: float = 0.5) -> list[str]:
    """``http://host:port`` of every node on the network that serves pairing (its zeroconf record's SRV port;
    nodes of open farms have nothing to share). Stops ``grace`` seconds after the first is found."""
    found: list[str] = []
    first = asyncio.Event()

    def on_advert(info: AsyncServiceInfo, advert: Advert) -> None:
        if not info.port or advert.farm == "open":
            return
        for address in info.parsed_addresses(IPVersion.V4Only):
            url = f"http://{address}:{info.port}"
            if url not in found:
                found.append(url)
                first.set()

    async with browse_adverts(interfaces, on_advert):
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await first.wait()
        if found:
            await asyncio.sleep(grace)  # let the other members' answers in: a deadline, not synchronisation
    return found
