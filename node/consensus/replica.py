"""The node's durable replica of the farm state, in SQLite (sqlite-utils, WAL, ``synchronous=FULL``).

An entry is applied atomically with the ``(term, seq)`` it brings us to, so a crash leaves the replica at a
consistent prefix of the arbiter's log. Votes are written (and fsynced) before they are sent. The replica also
keeps what the protocol seals need across restarts: this node's boot number, and the highest boot seen of each
peer (``shared.security``).

Its metadata (table ``meta``: name, JSON value) is a set of typed slots (node/consensus/meta.py), each owned by
one part of the node: the consensus's hard state (node/consensus/hard_state.py, read whole by
:meth:`Replica.hard_state`, written through the methods named after what they write), the worker's record of its
copy, the ends it reported and its bed (node/worker/worker.py), node commands' settings
(node/app/node_commands.py). A row that cannot be read never stops the node: it is taken as its default.
"""

from __future__ import annotations

import enum
import json
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final, TypeVar, overload

import sqlite_utils
from pydantic import ValidationError

from node.consensus.hard_state import (
    APPLIED,
    BASE,
    BOOT,
    FARM,
    PEER_BOOTS,
    TERM,
    UNCONFIRMED,
    VOTE,
    HardState,
    Vote,
)
from node.consensus.meta import MetaWrite, Slot
from shared.errors import StoreError
from shared.merge import MergeRecord
from shared.models import Stamp, StoredObject

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")


class _Default(enum.Enum):
    DEFAULT = "default"


class _Unreadable(enum.Enum):
    VOTE = "vote"


_DEFAULT: Final = _Default.DEFAULT  # ``read``: no ``unreadable`` given
_UNREADABLE_VOTE: Final = _Unreadable.VOTE

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
    """Durable objects plus metadata: the consensus's hard state (:meth:`hard_state`), and the slots other parts
    of the node own (:meth:`read`, :meth:`write`; node/consensus/meta.py)."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._warned: set[str] = set()  # slots whose unreadable row was warned about
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

    # --- metadata: typed slots, each owned by one part of the node (node/consensus/meta.py) ----------------
    @overload
    def read(self, slot: Slot[T]) -> T: ...

    @overload
    def read(self, slot: Slot[T], *, unreadable: U) -> T | U: ...

    def read(self, slot: Slot[Any], *, unreadable: Any = _DEFAULT) -> Any:
        """The value of ``slot``: its default while its row is missing. A row that cannot be read as the slot's
        type (half-written, of an older format, not JSON) is ``unreadable`` if given, else the default too,
        with a warning (once per slot, then at debug level): our own disk, but it must not stop the node."""
        try:
            row = self.db.execute("SELECT value FROM meta WHERE name = ?", [slot.name]).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot read replica metadata {slot.name!r}: {exc}") from exc
        if row is None:
            return slot.default
        if row[0] is None:
            why = "NULL"
        else:
            try:
                return slot.parse(row[0])
            except ValidationError as exc:  # invalid JSON included
                why = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                                for e in exc.errors(include_url=False)[:3])[:300]
        level = logging.DEBUG if slot.name in self._warned else logging.WARNING
        self._warned.add(slot.name)
        log.log(level, "replica %s: metadata %r cannot be read (%s): taking it %s", self.path, slot.name, why,
                "as its default" if unreadable is _DEFAULT else "as unreadable")
        return slot.default if unreadable is _DEFAULT else unreadable

    def write(self, *values: MetaWrite) -> None:
        """Write values of slots (:meth:`Slot.of`) in one transaction, durably (fsynced) before it returns."""
        try:
            with self.db.conn:
                self.db.conn.executemany("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                                         [(v.name, v.value) for v in values])
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write replica metadata: {exc}") from exc

    # --- the consensus's hard state (node/consensus/hard_state.py) -------------------------------------------
    def hard_state(self) -> HardState:
        """Everything the consensus keeps here besides the objects, each unreadable row taken as its default
        (the term and vote as :attr:`term` and :attr:`voted_for` say)."""
        return HardState(farm=self.read(FARM), term=self.term, vote=self.voted_for, applied=self.applied,
                         base=self.read(BASE), boot=self.read(BOOT), peer_boots=self.peer_boots,
                         unconfirmed=self.read(UNCONFIRMED))

    @property
    def term(self) -> int:
        """The current term. An unreadable one is the highest term the vote or the applied stamp shows: a term
        we were in is never taken back."""
        term = self.read(TERM, unreadable=None)
        if term is None:
            vote = self.read(VOTE, unreadable=None)
            term = max(self.applied[0], 0 if vote is None else vote[0])
        return term

    @property
    def voted_for(self) -> Vote | None:
        """Our last vote. One that cannot be read may have been cast in the current term: it is taken, and
        stored, as a vote in that term for a node we cannot tell (no candidate is named ``""``), so that no
        second vote is cast in it, and any later term is free."""
        vote = self.read(VOTE, unreadable=_UNREADABLE_VOTE)
        if vote is _UNREADABLE_VOTE:
            vote = (self.term, "")
            self.write(VOTE.of(vote))
        return vote

    @property
    def applied(self) -> Stamp:
        return self.read(APPLIED)

    @property
    def peer_boots(self) -> dict[str, int]:
        """The highest boot number seen of each peer (meta ``peer_boots``)."""
        return self.read(PEER_BOOTS)

    def set_farm(self, farm: str) -> None:
        self.write(FARM.of(farm))

    def set_term(self, term: int) -> None:
        self.write(TERM.of(term))

    def record_vote(self, term: int, candidate: str) -> None:
        """Persist the vote (and the term) before it is sent: at most one vote per term, even across crashes."""
        self.write(TERM.of(term), VOTE.of((term, candidate)))

    def next_boot(self, at_least: int = 1) -> int:
        """This node's next boot number, stored (fsynced) before it is returned: above every earlier one, and
        at least ``at_least``."""
        boot = max(self.read(BOOT) + 1, at_least)
        self.write(BOOT.of(boot))
        return boot

    def set_peer_boots(self, boots: dict[str, int]) -> None:
        self.write(PEER_BOOTS.of(boots))

    def store_records(self, records: Iterable[MergeRecord]) -> None:
        """The records of a split (meta ``unconfirmed``), durably, before anything relies on them."""
        self.write(UNCONFIRMED.of(tuple(records)))

    # --- objects -----------------------------------------------------------------------------------------
    def load(self) -> list[StoredObject]:
        out = []
        for row in self.db.query("SELECT key, term, seq, value FROM objects"):
            value = None if row["value"] is None else json.loads(row["value"])
            out.append(StoredObject(key=row["key"], stamp=(row["term"], row["seq"]), value=value))
        return out

    def apply(
        self, stamp: Stamp, writes: list[StoredObject], *, snapshot: bool = False, base: Stamp | None = None,
        records: Iterable[MergeRecord] | None = None,
    ) -> None:
        """Write one entry (or a whole snapshot) and move ``applied`` to ``stamp``, with the hard state that
        must change with them (a snapshot's ``base``; the ``records`` of a split, when they changed), in one
        transaction: a crash leaves all of it or none."""
        rows = [
            (o.key, o.stamp[0], o.stamp[1], None if o.value is None else json.dumps(o.value)) for o in writes
        ]
        meta = [APPLIED.of(stamp)]
        if base is not None:
            meta.append(BASE.of(base))
        if records is not None:
            meta.append(UNCONFIRMED.of(tuple(records)))
        names = [(m.name, m.value) for m in meta]
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
