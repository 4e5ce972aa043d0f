"""The arbiter's check before it acknowledges a ``job/add``: a holder the job names holds each file, and the
file passes the G-code policy under the caps of its set.

Checked, not assumed: for each set the holders it names are asked in turn, the arbiter itself from its own
store, the others over HTTP (``GET /files/<sha>/policy`` on their file server, with the node token): the
answer is the holder's :class:`shared.gcode_policy.Scan` of the file (404: it does not hold it). A scan made
under other ``[gcode]`` rules than the arbiter's does not count (the message says to make ``[gcode]`` the same
on every node). The whole check is bounded in time (:data:`CHECK_S`): the request is answered with an error
rather than left waiting. Every refusal is a RequestError that names the set and the reason.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp
from pydantic import ValidationError

from node.files.analysis import Verdicts
from node.files.fetch import client_session
from node.files.http import bearer_header
from shared.errors import FileStoreError, RequestError
from shared.gcode_policy import Scan, summary
from shared.settings import GcodeSettings

log = logging.getLogger(__name__)

CHECK_S: Final = 5.0  # the most a job/add waits for its files to be checked
MAX_ANSWER_BYTES: Final = 1 << 20  # a scan is a few kB


async def check_job_files(
    sets: Sequence[Mapping[str, Any]],
    *,
    own_id: str,
    verdicts: Verdicts | None,
    nodes: Mapping[str, Mapping[str, Any]],
    gcode: GcodeSettings,
    token: str | None,
    timeout: float = CHECK_S,
) -> None:
    """Raise RequestError unless every set's file is held by a holder it names and passes the policy.

    ``sets``: the job's sets (``file``, ``sha256``, ``holders``, ``profiles``); ``nodes``: the node states by
    id (their ``files_url``); ``token``: the node's file token (None in an open farm)."""
    scans: dict[str, Scan] = {}
    try:
        # A holder that does not answer within half the time leaves the other half to the next one.
        async with client_session(connect_timeout=timeout / 2, read_timeout=timeout / 2) as session:
            async with asyncio.timeout(timeout):
                for i, s in enumerate(sets):
                    sha, name = str(s["sha256"]), str(s.get("file") or s["sha256"][:12])
                    scan = scans.get(sha)
                    if scan is None:
                        scan = scans[sha] = await _held_scan(i, name, sha, list(s.get("holders") or []), own_id,
                                                             verdicts, nodes, gcode, token, session)
                    violations = scan.violations(gcode.set_caps(list(s.get("profiles") or [])))
                    if violations:
                        raise RequestError(f"sets.{i}: {name} breaks the G-code policy: {summary(violations)}")
    except TimeoutError:
        raise RequestError(f"the job's files could not be checked within {timeout:g} s (a holder is slow or "
                           "unreachable); retry with the same transaction") from None


async def _held_scan(i: int, name: str, sha: str, holders: list[str], own_id: str, verdicts: Verdicts | None,
                     nodes: Mapping[str, Mapping[str, Any]], gcode: GcodeSettings, token: str | None,
                     session: aiohttp.ClientSession) -> Scan:
    """The scan of ``sha`` by the first holder named that holds it; RequestError saying why each could not."""
    rules = gcode.policy().fingerprint()
    why: list[str] = []
    for holder in holders:
        if holder == own_id:
            if verdicts is not None and verdicts.store.has(sha):
                try:
                    return await verdicts.scan(sha)
                except FileStoreError as exc:  # removed meanwhile, or unreadable
                    why.append(f"{holder} (this arbiter): {exc}")
                    continue
            why.append(f"{holder} (this arbiter) does not hold it")
            continue
        state = nodes.get(holder) or {}
        url = state.get("files_url")
        if state.get("state") != "online" or not isinstance(url, str) or not url:
            why.append(f"{holder} is not an online node of the farm")
            continue
        try:
            scan = await _ask(session, url, sha, token)
        except _Unheld as exc:
            why.append(f"{holder} {exc}")
            continue
        if scan.rules != rules:
            why.append(f"{holder} reads G-code under other [gcode] rules than the arbiter (make [gcode] the same "
                       "on every node)")
            continue
        return scan
    raise RequestError(f"sets.{i}: {name}: no holder holds file {sha[:12]} ({'; '.join(why) or 'no holders'}); "
                       "upload it to a node first and name that node in holders")


class _Unheld(Exception):
    """A holder could not show that it holds the file (the message completes "<holder> …")."""


async def _ask(session: aiohttp.ClientSession, base: str, sha: str, token: str | None) -> Scan:
    url = f"{base.rstrip('/')}/files/{sha}/policy"
    try:
        async with session.get(url, headers=bearer_header(token)) as resp:
            if resp.status == 404:
                raise _Unheld("does not hold it")
            if resp.status != 200:
                raise _Unheld(f"answered HTTP {resp.status}")
            body = await resp.content.read(MAX_ANSWER_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise _Unheld(f"could not be asked ({exc.__class__.__name__})") from exc
    if len(body) > MAX_ANSWER_BYTES:
        raise _Unheld("answered with more than a scan")
    try:
        return Scan.model_validate_json(body)
    except ValidationError as exc:
        log.debug("unreadable scan of %s from %s: %s", sha[:12], base, exc)
        raise _Unheld("answered with an unreadable scan") from exc
