"""Collection of stored files no job references: the pure decision, and the store that carries it out."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.files.collect import StoreEntry, referenced_shas, unreferenced
from node.files.store import FileStore
from shared.models import Job, JobSet

NOW = 1_800_000_000.0
GRACE = 24 * 3600.0
A, B, C = ("a" * 64, "b" * 64, "c" * 64)


def test_only_unreferenced_entries_older_than_the_grace_are_collected() -> None:
    entries = [
        StoreEntry(A, NOW - 2 * GRACE, 10),  # referenced: kept however old
        StoreEntry(B, NOW - 2 * GRACE, 10),  # old, named by no job: collected
        StoreEntry(C, NOW - 60, 10),  # just uploaded for a job/add that is coming: kept
    ]
    assert unreferenced(entries, {A}, NOW, GRACE) == [B]
    assert unreferenced(entries, {A}, NOW + GRACE, GRACE) == [B, C]
    assert unreferenced(entries, {A, B, C}, NOW + GRACE, GRACE) == []
    assert unreferenced([StoreEntry(B, NOW - GRACE, 1)], set(), NOW, GRACE) == [B]  # exactly the grace: over


def test_a_sha_goes_only_when_its_file_and_its_partial_are_both_old() -> None:
    old_file_young_part = [StoreEntry(A, NOW - 2 * GRACE, 10), StoreEntry(A, NOW - 5, 3, partial=True)]
    young_file_old_part = [StoreEntry(B, NOW - 5, 10), StoreEntry(B, NOW - 2 * GRACE, 3, partial=True)]
    abandoned_part = [StoreEntry(C, NOW - 2 * GRACE, 3, partial=True)]
    assert unreferenced(old_file_young_part + young_file_old_part + abandoned_part, set(), NOW, GRACE) == [C]


def test_referenced_shas_are_every_set_of_every_job() -> None:
    def job(job_id: str, *shas: str) -> Job:
        return Job(id=job_id, namespace="default", name=job_id,
                   sets=[JobSet(file=f"{s[:4]}.gcode", sha256=s) for s in shas])

    assert referenced_shas([job("j1", A, B), job("j2", B)]) == {A, B}
    assert referenced_shas([]) == set()


entries_st = st.lists(st.builds(
    StoreEntry, sha=st.sampled_from([A, B, C, "d" * 64]), mtime=st.floats(NOW - 3 * GRACE, NOW + 10),
    size=st.integers(0, 10**9), partial=st.booleans()), max_size=12)


@given(entries=entries_st, referenced=st.sets(st.sampled_from([A, B, C, "d" * 64])))
def test_collection_never_takes_a_referenced_or_young_file(entries: list[StoreEntry], referenced: set[str]) -> None:
    out = unreferenced(entries, referenced, NOW, GRACE)
    assert out == sorted(set(out))
    assert not set(out) & referenced
    for sha in {e.sha for e in entries} - referenced:
        all_old = all(e.mtime <= NOW - GRACE for e in entries if e.sha == sha)
        assert (sha in out) == all_old


# --- the store ---------------------------------------------------------------------------------------------
def age(path: Path, seconds: float) -> None:
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


@pytest.mark.security  # anonymous or abandoned uploads no longer fill a node's disk for good
async def test_the_store_collects_only_unreferenced_old_files(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    keep = await store.put_stream(b"G28 ; named by a job\n")
    junk = await store.put_stream(b"G28 ; uploaded, never queued\n")
    fresh = await store.put_stream(b"G28 ; uploaded a moment ago\n")
    fetching = "f" * 64
    abandoned = "e" * 64
    for sha in (fetching, abandoned):
        async with store.open_part(sha) as part:
            await part.write(b"half a file")
    stale_tmp = store.root / "tmp" / "crashed.tmp"
    stale_tmp.write_bytes(b"an upload cut off by a crash")
    for path in (store.path(keep), store.path(junk), store.part_path(fetching), store.part_path(abandoned),
                 stale_tmp):
        age(path, 2 * GRACE)
    now = store.path(fresh).stat().st_mtime + 1

    async with store.lock(fetching):  # a fetch in progress keeps its part, however old
        removed = await asyncio.to_thread(store.gc, {keep}, now=now, grace_s=GRACE)
    assert removed == sorted([junk, abandoned])
    assert sorted(store.shas()) == sorted([keep, fresh])
    assert store.part_size(fetching) > 0 and store.part_size(abandoned) == 0
    assert not stale_tmp.exists()
    assert store.usage() == store.size(keep) + store.size(fresh) + store.part_size(fetching)

    # Added again: its grace starts over.
    age(store.path(fresh), 2 * GRACE)
    assert await store.put_stream(b"G28 ; uploaded a moment ago\n") == fresh
    assert store.gc({keep}, now=now + GRACE / 2, grace_s=GRACE) == [fetching]
    assert store.has(fresh) and store.has(keep)
    assert hashlib.sha256(store.path(keep).read_bytes()).hexdigest() == keep
