"""``job/add`` with sets given by URL: the arbiter downloads each file into its own store before proposing.

A set may give ``url`` (http or https only) instead of ``sha256`` + ``holders``; with ``sha256`` as well, the
download must hash to it. The downloaded file passes the G-code policy check, then the set is rewritten to
name its hash and the arbiter as its holder (other nodes fetch it from there, as from any holder), and the
request goes on as a plain ``job/add``. Every failure is a RequestError that names the set, so the client gets
a readable error response and nothing is queued.

Downloads follow :mod:`node.files.url_guard`: no loopback, link-local or farm node, private ranges only by
``[files] url_allow``, checked on every address connected to and every redirect hop; a total time, a rate
floor and a size bound. Bytes that break a rule (an address, the size, the time, the hash, the G-code policy)
are deleted, never served.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from node.files.store import FileStore, MiB
from node.files.url_guard import DEFAULT_LIMITS, UrlLimits, UrlPolicy
from shared.errors import FileStoreError, RequestError
from shared.settings import GcodeSettings

MAX_URL_BYTES = 1024 * MiB
MAX_URL_CHARS = 2000
_SHA = re.compile(r"^[0-9a-f]{64}$")


def has_urls(body: dict[str, Any]) -> bool:
    sets = body.get("sets")
    return isinstance(sets, list) and any(isinstance(s, dict) and "url" in s for s in sets)


def _file_name(url: str, sha: str) -> str:
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    return name[:200] if name else f"{sha[:12]}.gcode"


async def resolve(body: dict[str, Any], store: FileStore | None, holder: str, *,
                  policy: UrlPolicy | None = None, limits: UrlLimits = DEFAULT_LIMITS,
                  max_bytes: int = MAX_URL_BYTES, gcode: GcodeSettings | None = None) -> dict[str, Any]:
    """``body`` with every URL set downloaded into ``store`` and rewritten to ``sha256`` + ``holders``.

    ``policy``: where downloads may come from (the arbiter's: :meth:`UrlPolicy.for_farm`); None refuses
    everything but public addresses. ``gcode``: the farm's G-code policy (the arbiter's ``[gcode]``; None: the
    default policy), under the caps of each set's profiles."""
    from node.files.analysis import analyse
    from node.files.fetch import download_url

    if store is None:
        raise RequestError("this arbiter cannot download files: give sha256 and holders instead of url")
    sets: list[Any] = []
    for i, s in enumerate(body["sets"]):
        if not isinstance(s, dict) or "url" not in s:
            sets.append(s)
            continue
        s = dict(s)
        url = s.pop("url")
        if not isinstance(url, str) or len(url) > MAX_URL_CHARS or urlsplit(url).scheme not in ("http", "https"):
            raise RequestError(f"sets.{i}.url: give an http:// or https:// URL of at most {MAX_URL_CHARS} "
                               "characters")
        if s.get("holders"):
            raise RequestError(f"sets.{i}: give either url or holders, not both")
        expected = s.get("sha256")
        if expected is not None and (not isinstance(expected, str) or not _SHA.match(expected)):
            raise RequestError(f"sets.{i}.sha256: give 64 lowercase hex digits")
        try:
            got = await download_url(url, store, expected, policy=policy, limits=limits, max_bytes=max_bytes)
        except FileStoreError as exc:
            raise RequestError(f"sets.{i}: {exc}") from exc
        sha = got.sha
        refused = True  # until the checks below pass: a fresh file that fails one is deleted
        try:
            try:
                named = s.get("profiles")
                named = named if isinstance(named, list) else []  # the request is validated after this
                gcode_policy = None if gcode is None else gcode.policy(gcode.set_caps(
                    [p for p in named if isinstance(p, str)]))
                analysis = await analyse(store, sha, gcode_policy)
            except FileStoreError as exc:
                raise RequestError(f"sets.{i}: {exc}") from exc
            if analysis.violations:
                shown = "; ".join(v.message for v in analysis.violations[:3])
                raise RequestError(f"sets.{i}: {url[:200]} breaks the G-code policy: {shown}")
            refused = False
        finally:
            if refused and got.fresh:
                with contextlib.suppress(FileStoreError):  # the error above is the one to answer
                    store.remove(sha)
        s["sha256"] = sha
        s["holders"] = [holder]
        s.setdefault("file", _file_name(url, sha))
        if "duration_s" not in s and analysis.meta.estimated_s is not None:
            s["duration_s"] = float(analysis.meta.estimated_s)
        sets.append(s)
    return {**body, "sets": sets}
