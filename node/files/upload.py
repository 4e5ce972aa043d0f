"""Upload a G-code file to a node's file store over HTTP, with a progress bar.

With a farm key the upload carries the operator's file token (``shared.security.file_token``); the node
refuses it without one (401), and refuses files over its upload limit (413) or past its store's quota (507).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from shared.errors import FileStoreError

CHUNK = 1 << 20


async def upload_file(files_url: str, path: Path, *, show_progress: bool = True, token: str | None = None) -> str:
    """POST ``path`` to ``<files_url>/files``; return its sha256 (checked against what the node computed)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  disable=not show_progress, transient=True) as progress:
        task = progress.add_task(f"uploading {path.name}", total=size)

        async def body() -> AsyncIterator[bytes]:
            with path.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    digest.update(chunk)
                    progress.advance(task, len(chunk))
                    yield chunk

        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with aiohttp.ClientSession() as session, \
                    session.post(f"{files_url}/files", data=body(), headers=headers) as resp:
                if resp.status >= 300:
                    raise FileStoreError(f"upload of {path.name} refused: {resp.status} "
                                         f"{await _reason(resp)}{_hint(resp.status, token)}")
                answer = await resp.json()
        except aiohttp.ClientError as exc:
            raise FileStoreError(f"upload of {path.name} to {files_url} failed: {exc}") from exc
    sha = str(answer.get("sha256", ""))
    if sha != digest.hexdigest():
        raise FileStoreError(f"upload of {path.name}: the node stored {sha[:12]}, we sent {digest.hexdigest()[:12]}")
    return sha


async def _reason(resp: aiohttp.ClientResponse) -> str:
    """The server's ``{"error": …}``, else the start of its body."""
    text = await resp.text(errors="replace")
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


def _hint(status: int, token: str | None) -> str:
    if status == 401 and token is None:
        return " (the farm has a key: give --config of a node of the farm, or set NETQ_FARM__KEY)"
    if status == 401:
        return " (this farm key is not the farm's: check [farm] key)"
    return ""
