"""File fetch from a holder on loopback: one node's store serves a random file over HTTP, another fetches it.

The fetch is the real path: aiohttp client, Range-capable server (sendfile), streaming into a partial
download, sha256 verified, fsynced, atomically renamed into the store. Prints one JSON line last:
``{"bench": "file_fetch", "mb_per_s": …, "bytes": …, "seconds": …, …}`` (the median of the runs;
MB = 10^6 bytes). Target: >= 100 MB/s.

    .venv/bin/python bench/file_fetch.py [--mb 100] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from node.files.fetch import client_session, fetch
from node.files.http import FileServer
from node.files.store import FileStore

CHUNK = 4 << 20


async def random_bytes(total: int) -> AsyncIterator[bytes]:
    left = total
    while left:
        n = min(CHUNK, left)
        yield os.urandom(n)
        left -= n


async def run(size: int, runs: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="netq-bench-") as tmp:
        holder = FileStore(Path(tmp) / "holder")
        receiver = FileStore(Path(tmp) / "receiver")
        sha = await holder.put_stream(random_bytes(size))
        times: list[float] = []
        async with FileServer(holder, host="127.0.0.1", port=0) as server, client_session() as session:
            for _ in range(runs):
                receiver.remove(sha)
                start = time.perf_counter()
                path = await fetch(sha, [server.base_url], receiver, session=session)
                times.append(time.perf_counter() - start)
                if path.stat().st_size != size:
                    raise SystemExit("fetched file has the wrong size")
        seconds = statistics.median(times)
        return {
            "bench": "file_fetch",
            "mb_per_s": round(size / seconds / 1e6, 1),
            "bytes": size,
            "seconds": round(seconds, 4),
            "runs": [round(t, 4) for t in times],
            "best_mb_per_s": round(size / min(times) / 1e6, 1),
            "hash_verified": True,
            "fsync": True,
            "target_mb_per_s": 100,
        }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mb", type=int, default=100, help="file size in MB (10^6 bytes)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.mb * 1_000_000, args.runs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
