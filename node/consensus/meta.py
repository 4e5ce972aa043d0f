"""Typed slots of the replica's metadata: each row of ``meta`` (name, JSON value) belongs to one part of the node.

A :class:`Slot` names its row, the type its value is read as, and the value it has while the row is missing.
Each owner declares its slots beside its model: the consensus in :mod:`node.consensus.hard_state`, the worker in
:mod:`node.worker.worker` (``local_copy``, ``ended``, ``bed_dirty``), node commands in
:mod:`node.app.node_commands` (``node_api``). :class:`node.consensus.replica.Replica` reads a slot
(:meth:`~node.consensus.replica.Replica.read`) and writes values of slots in one transaction
(:meth:`~node.consensus.replica.Replica.write`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter

T = TypeVar("T")


class MetaRecord(BaseModel):
    """A record kept in the replica's metadata. Fields a newer version added are ignored, so that its rows still
    read; a field an older version did not write has a default."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore", validate_by_name=True,
                              serialize_by_alias=True)


@dataclass(frozen=True, slots=True)
class MetaWrite:
    """One row to write: a slot's name and its value as JSON (:meth:`Slot.of`)."""

    name: str
    value: str  # JSON


class Slot(Generic[T]):
    """One row of the replica's metadata, read as a ``T``; ``default`` while it is missing or unreadable."""

    __slots__ = ("_adapter", "_default", "name")

    def __init__(self, name: str, type_: Any, default: T) -> None:
        # ``type_`` is a type expression (``LocalCopy | None``), which mypy cannot take as a ``type[T]``: a slot
        # whose T is a union is declared with its type, ``X: Slot[A | None] = Slot("x", A | None, None)``.
        self.name = name
        self._adapter: TypeAdapter[T] = TypeAdapter(type_)
        self._default = self._adapter.validate_python(default, strict=False)  # checked once, here

    @property
    def default(self) -> T:
        """A fresh copy of the default value: a caller may change what it was given (a dict of peer boots)."""
        return copy.deepcopy(self._default)

    def of(self, value: T) -> MetaWrite:
        """``value`` as the row to write."""
        return MetaWrite(self.name, self._adapter.dump_json(value, by_alias=True).decode())

    def parse(self, raw: str) -> T:
        """The stored JSON ``raw`` as a ``T``, strictly (``true`` is no term); pydantic's ValidationError when
        it is not one (or not JSON)."""
        return self._adapter.validate_json(raw, strict=True)

    def __repr__(self) -> str:
        return f"Slot({self.name!r})"
