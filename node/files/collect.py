"""Which stored files to collect: those no job references, once their grace period is over.

Pure: :func:`unreferenced` decides from a listing of the store, the set of referenced hashes and ``now``;
:meth:`node.files.store.FileStore.collect` lists and deletes, and the node agent runs it periodically with the
hashes its replica's jobs name (:func:`referenced_shas`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from shared.models import Job


@dataclass(frozen=True)
class StoreEntry:
    """One thing on disk in a store that is named by a sha256: a complete file or a partial download."""

    sha: str
    mtime: float  # POSIX seconds; a file added again or a download that progresses is younger
    size: int
    partial: bool = False


def referenced_shas(jobs: Iterable[Job]) -> set[str]:
    """Every sha256 some set of some job names (done jobs too: they can be printed again or exported)."""
    return {s.sha256 for job in jobs for s in job.sets}


def unreferenced(entries: Iterable[StoreEntry], referenced: set[str], now: float, grace: float) -> list[str]:
    """The shas to delete: named by no job, and whose newest entry (file or partial) is at least ``grace``
    seconds old. Sorted, each once."""
    newest: dict[str, float] = {}
    for e in entries:
        if e.sha not in referenced:
            newest[e.sha] = max(e.mtime, newest.get(e.sha, e.mtime))
    cutoff = now - grace
    return sorted(sha for sha, mtime in newest.items() if mtime <= cutoff)
