"""What a stored G-code file needs (slicer header, extents) and whether the policy lets it be queued.

One streaming pass over the file, in a worker thread: :mod:`shared.gcode_meta` does the parsing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from node.files.store import FileStore
from shared.gcode_meta import GcodeMeta, GcodeMetaParser, GcodePolicy, Violation, check_policy, iter_lines


@dataclass(frozen=True, slots=True)
class FileAnalysis:
    meta: GcodeMeta
    violations: list[Violation]  # empty: the policy allows the file


async def analyse(store: FileStore, sha: str, policy: GcodePolicy | None = None) -> FileAnalysis:
    """Parse the header and moves of a stored file and check it against ``policy``."""
    return await asyncio.to_thread(_analyse, store, sha, policy or GcodePolicy())


def _analyse(store: FileStore, sha: str, policy: GcodePolicy) -> FileAnalysis:
    parser = GcodeMetaParser()

    def lines() -> Iterator[str]:
        for line in iter_lines(store.iter_chunks(sha)):
            parser.feed(line)
            yield line

    feed = lines()
    violations = check_policy(feed, policy)
    for _ in feed:  # check_policy stops at max_violations; the header parser wants the footer too
        pass
    return FileAnalysis(parser.result(), violations)
