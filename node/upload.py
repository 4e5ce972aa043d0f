"""Upload a G-code file to a node's file store over HTTP, with a progress bar."""

from __future__ import annotations

import hashlib
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
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{files_url}/files", data=body(), headers=headers) as resp:
                    if resp.status >= 300:
                        raise FileStoreError(f"upload of {path.name} refused: {resp.status} {await resp.text()}")
                    answer = await resp.json()
        except aiohttp.ClientError as exc:
            raise FileStoreError(f"upload of {path.name} to {files_url} failed: {exc}") from exc
    sha = str(answer.get("sha256", ""))
    if sha != digest.hexdigest():
        raise FileStoreError(f"upload of {path.name}: the node stored {sha[:12]}, we sent {digest.hexdigest()[:12]}")
    return sha
