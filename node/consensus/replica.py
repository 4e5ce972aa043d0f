"""The node's durable replica of the farm state, in SQLite (sqlite-utils, WAL, ``synchronous=FULL``).

An entry is applied atomically with the ``(term, seq)`` it brings us to, so a crash leaves the replica at a
consistent prefix of the arbiter's log. Votes are written (and fsynced) before they are sent. The replica also
keeps what the protocol seals need across restarts: this node's boot number, and the highest boot seen of each
peer (``shared.security``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

import sqlite_utils
from sqlite_utils.db import NotFoundError

from shared.errors import StoreError
from shared.models import ZERO_STAMP, Stamp, StoredObject

log = logging.getLogger(__name__)

_migrations: list[tuple[str, str]] = [
    (
        "0001_initial",
        """
        CREATE TABLE IF NOT EXISTS objects (key TEXT PRIMARY KEY, term INTEGER, seq INTEGER, value TEXT);
        CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
        """,
    ),
]


class Replica:
    """Durable objects plus protocol metadata (current term, vote, position in the log, farm id)."""

    def __init__(self, path: Path | str) -> None:
        try:
            self.db = sqlite_utils.Database(str(path))
            self.db.enable_wal()
            self.db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open replica {path}: {exc}") from exc

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY)")
        done = {r["name"] for r in self.db.query("SELECT name FROM _migrations")}
        for name, sql in _migrations:
            if name in done:
                continue
            with self.db.conn:
                self.db.conn.executescript(sql)
                self.db.execute("INSERT INTO _migrations (name) VALUES (?)", [name])

    def close(self) -> None:
        self.db.close()

    # --- metadata ----------------------------------------------------------------------------------------
    def get_meta(self, name: str, default: Any = None) -> Any:
        try:
            row = self.db.table("meta").get(name)
        except NotFoundError:
            return default
        return json.loads(row["value"])

    def set_meta(self, **values: Any) -> None:
        try:
            with self.db.conn:
                for name, value in values.items():
                    self.db.execute(
                        "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", [name, json.dumps(value)]
                    )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write replica metadata: {exc}") from exc

    @property
    def term(self) -> int:
        return int(self.get_meta("term", 0))

    @property
    def voted_for(self) -> tuple[int, str] | None:
        raw = self.get_meta("vote")
        return None if raw is None else (int(raw[0]), str(raw[1]))

    def record_vote(self, term: int, candidate: str) -> None:
        """Persist the vote (and the term) before it is sent: at most one vote per term, even across crashes."""
        self.set_meta(term=term, vote=[term, candidate])

    def next_boot(self, at_least: int = 1) -> int:
        """This node's next boot number, stored (fsynced) before it is returned: above every earlier one, and
        at least ``at_least``."""
        boot = max(int(self.get_meta("boot", 0) or 0) + 1, at_least)
        self.set_meta(boot=boot)
        return boot

    @property
    def peer_boots(self) -> dict[str, int]:
        """The highest boot number seen of each peer (meta ``peer_boots``); anything unreadable is left out."""
        raw = self.get_meta("peer_boots", {})
        if not isinstance(raw, dict):
            return {}
        return {k: v for k, v in raw.items() if isinstance(k, str) and type(v) is int and v > 0}

    def set_peer_boots(self, boots: dict[str, int]) -> None:
        self.set_meta(peer_boots=boots)

    @property
    def applied(self) -> Stamp:
        raw = self.get_meta("applied")
        return ZERO_STAMP if raw is None else (int(raw[0]), int(raw[1]))

    # --- objects -----------------------------------------------------------------------------------------
    def load(self) -> list[StoredObject]:
        out = []
        for row in self.db.query("SELECT key, term, seq, value FROM objects"):
            value = None if row["value"] is None else json.loads(row["value"])
            out.append(StoredObject(key=row["key"], stamp=(row["term"], row["seq"]), value=value))
        return out

    def apply(
        self, stamp: Stamp, writes: list[StoredObject], *, snapshot: bool = False, meta: dict[str, Any] | None = None
    ) -> None:
        """Write one entry (or a whole snapshot) and move ``applied`` to ``stamp``, with any other metadata that
        must change with them (``meta``: a snapshot's ``base``, the records of a split), in one transaction: a
        crash leaves all of it or none."""
        rows = [
            (o.key, o.stamp[0], o.stamp[1], None if o.value is None else json.dumps(o.value)) for o in writes
        ]
        names = [("applied", json.dumps(list(stamp)))]
        names += [(name, json.dumps(value)) for name, value in (meta or {}).items()]
        try:
            with self.db.conn:
                if snapshot:
                    self.db.execute("DELETE FROM objects")
                self.db.conn.executemany(
                    "INSERT OR REPLACE INTO objects (key, term, seq, value) VALUES (?, ?, ?, ?)", rows
                )
                self.db.conn.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", names)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot apply entry {stamp}: {exc}") from exc
