"""What a G-code file needs (slicer header, extents) and whether the farm's G-code policy lets it through.

One streaming pass over a file, in a worker thread: :mod:`shared.gcode_meta` parses, :mod:`shared.gcode_policy`
checks. The policy runs on every path a file takes (docs/security.md, "G-code policy"):

* :class:`Verdicts`: the scans of one store's files under the node's ``[gcode]`` rules, kept by sha256, so the
  upload check (``POST /files``), the node's answer to an arbiter (``GET /files/<sha>/policy``) and the
  arbiter's own check (node/files/holder_check.py) read a file once;
* :func:`check_path`: a file on disk (``netq add`` checks before it uploads);
* :func:`refusal_before_print`: the worker's last check, right before the printer is called, under the caps
  of its own printer's profile.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from node.files.store import FileStore, MiB
from shared.errors import FileStoreError
from shared.gcode_meta import GcodeMeta, GcodeMetaParser, iter_lines
from shared.gcode_policy import GcodePolicy, Scan, Violation, summary
from shared.settings import GcodeSettings, Settings

VERDICTS_KEPT = 1024  # scans kept per store (a few kB each)
_CHUNK = MiB


@dataclass(frozen=True, slots=True)
class FileAnalysis:
    meta: GcodeMeta
    violations: list[Violation]  # empty: the policy allows the file
    scan: Scan


async def analyse(store: FileStore, sha: str, policy: GcodePolicy | None = None) -> FileAnalysis:
    """Parse the header and moves of a stored file and check it against ``policy`` (default: the default one)."""
    return await asyncio.to_thread(_analyse, store, sha, policy or GcodePolicy())


def _analyse(store: FileStore, sha: str, policy: GcodePolicy) -> FileAnalysis:
    parser = GcodeMetaParser()
    scanner = policy.scanner()

    def chunks() -> Iterator[bytes]:
        for chunk in store.iter_chunks(sha, _CHUNK):
            scanner.feed_bytes(chunk)
            yield chunk

    for line in iter_lines(chunks()):
        parser.feed(line)
    scan = scanner.result()
    return FileAnalysis(parser.result(), scan.violations(), scan)


def _scan_file(path: Path, policy: GcodePolicy) -> Scan:
    """Scan a file on disk (blocking)."""
    scanner = policy.scanner()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                scanner.feed_bytes(chunk)
    except OSError as exc:
        raise FileStoreError(f"cannot read {path.name}: {exc.strerror or exc}") from exc
    return scanner.result()


def check_path(path: Path, policy: GcodePolicy) -> list[Violation]:
    """The violations of the file at ``path`` (blocking: call from a worker thread for big files)."""
    return _scan_file(path, policy).violations()


class Verdicts:
    """The policy scans of the files of one store under one node's ``[gcode]`` rules, made once per file.

    Scans are made under the farm's highest caps (:meth:`GcodeSettings.farm_caps`): a scan keeps the hottest
    settings, so a lower cap (a job set's, a printer's) is applied to it later without reading the file again."""

    def __init__(self, store: FileStore, gcode: GcodeSettings, *, kept: int = VERDICTS_KEPT) -> None:
        self.store = store
        self.gcode = gcode
        self.policy = gcode.policy()
        self._kept = kept
        self._scans: OrderedDict[str, Scan] = OrderedDict()
        self._lock = threading.Lock()  # scans finish in worker threads

    async def scan(self, sha: str) -> Scan:
        """The scan of stored file ``sha``; FileStoreError when the store does not hold it."""
        path = self.store.path(sha)
        with self._lock:
            scan = self._scans.get(sha)
            if scan is not None:
                self._scans.move_to_end(sha)
                return scan
        # The scan is kept by the thread that made it: one whose asker gave up (a timeout) still counts.
        return await asyncio.to_thread(self._scan_and_keep, sha, path)

    def _scan_and_keep(self, sha: str, path: Path) -> Scan:
        scan = _scan_file(path, self.policy)
        with self._lock:
            self._scans[sha] = scan
            self._scans.move_to_end(sha)
            while len(self._scans) > self._kept:
                self._scans.popitem(last=False)
        return scan

    async def violations(self, sha: str) -> list[Violation]:
        """The violations of stored file ``sha`` under the farm's caps: what an upload is refused for."""
        return (await self.scan(sha)).violations()

    def forget(self, sha: str) -> None:
        with self._lock:
            self._scans.pop(sha, None)


async def refusal_before_print(path: Path, settings: Settings) -> str | None:
    """Why the file at ``path`` must not be sent to this node's printer (the G-code policy under the caps of
    ``printer.profile``), or None. The last of the policy's checks: whatever path the file came by."""
    gcode = settings.gcode
    policy = gcode.policy(gcode.caps(settings.printer.profile))
    try:
        stat = path.stat()
        scan = await asyncio.to_thread(_cached_scan, str(path), stat.st_size, stat.st_mtime_ns, policy)
    except (OSError, FileStoreError) as exc:
        return f"cannot check {path.name} against the G-code policy: {exc}"
    violations = scan.violations()
    if not violations:
        return None
    return f"{path.name} breaks the G-code policy of this printer: {summary(violations)}"


@functools.lru_cache(maxsize=64)
def _cached_scan(path: str, size: int, mtime_ns: int, policy: GcodePolicy) -> Scan:
    # (size, mtime) in the key: a memo of one file's content, never of a path whose file was replaced.
    del size, mtime_ns
    return _scan_file(Path(path), policy)
