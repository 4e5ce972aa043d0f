"""``job/add`` with sets given by URL: the arbiter downloads each file into its own store before proposing.

A set may give ``url`` (http or https only) instead of ``sha256`` + ``holders``; with ``sha256`` as well, the
download must hash to it. The downloaded file passes the G-code policy check, then the set is rewritten to
name its hash and the arbiter as its holder (other nodes fetch it from there, as from any holder), and the
request goes on as a plain ``job/add``. Downloads are size-bounded; every failure is a RequestError that
names the set, so the client gets a readable error response and nothing is queued.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from node.files.store import FileStore, MiB
from shared.errors import FileStoreError, RequestError

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
                  max_bytes: int = MAX_URL_BYTES) -> dict[str, Any]:
    """``body`` with every URL set downloaded into ``store`` and rewritten to ``sha256`` + ``holders``."""
    from node.files.analysis import analyse
    from node.files.fetch import fetch_url

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
            sha = await fetch_url(url, store, expected, max_bytes=max_bytes)
            analysis = await analyse(store, sha)
        except FileStoreError as exc:
            raise RequestError(f"sets.{i}: {exc}") from exc
        if analysis.violations:
            shown = "; ".join(f"line {v.line}: {v.command} ({v.reason})" for v in analysis.violations[:3])
            raise RequestError(f"sets.{i}: {url[:200]} breaks the G-code policy: {shown}")
        s["sha256"] = sha
        s["holders"] = [holder]
        s.setdefault("file", _file_name(url, sha))
        if "duration_s" not in s and analysis.meta.estimated_s is not None:
            s["duration_s"] = float(analysis.meta.estimated_s)
        sets.append(s)
    return {**body, "sets": sets}
