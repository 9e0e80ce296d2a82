"""Small typed facts kept between cycles, one dataclass per concern (the records section of
`model.py`: `PushRecord`, `LabelRecord`, `CaptureRecord`, `SweepRecord`, `RegistryMark`).

Each record is a frozen dataclass with defaults, stored as one JSON row named after its
class: a field that is misspelt is a type error, not a silent default, and a record that
was never saved loads as its defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from typing import Any, TypeVar

R = TypeVar("R")


def load(conn: sqlite3.Connection, kind: type[R]) -> R:
    """The saved record of this type, or its defaults."""
    row = conn.execute("SELECT value FROM record WHERE name = ?", (kind.__name__,)).fetchone()
    if row is None:
        return kind()
    fields = {f.name for f in dataclasses.fields(kind)}  # type: ignore[arg-type]
    data = {k: _tupled(v) for k, v in json.loads(row[0]).items() if k in fields}
    return kind(**data)


def save(conn: sqlite3.Connection, record: Any) -> None:
    """Store a record (call inside a transaction to commit it with related writes)."""
    conn.execute(
        "INSERT INTO record (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (type(record).__name__, json.dumps(dataclasses.asdict(record))),
    )


def _tupled(value: Any) -> Any:
    # JSON has only lists; records use tuples so they stay hashable and frozen.
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
