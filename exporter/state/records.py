"""Small typed facts kept between cycles, one dataclass per concern.

Each record is a frozen dataclass with defaults, stored as one JSON row named after its
class: a field that is misspelt is a type error, not a silent default, and a record that
was never saved loads as its defaults.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from dataclasses import dataclass
from typing import Any, TypeVar


@dataclass(frozen=True, slots=True)
class PushRecord:
    """What the Pushgateway was last left holding, as far as this exporter knows."""

    gateway_start: str | None = None  # the Pushgateway's start time when we last pushed
    # Grouping keys (without job) left on the Pushgateway by the last push; None: unknown.
    groups: tuple[tuple[tuple[str, str], ...], ...] | None = None
    registry_dirty: bool = True
    last_success_ms: int | None = None
    # Experiments whose runs got per-run series at the last push (`MAX_EXPERIMENTS`).
    selected: tuple[str, ...] | None = None
    # The run window's start at the last push (`series.run_window`): runs ending between it
    # and the next push's start moved across it, and their groups are pushed again.
    window_since_ms: int | None = None
    # Series in each group left on the Pushgateway (experiment id, or "" for the registry).
    series: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """The run_id label length in use; it only grows, so a series keeps its identity."""

    run_id_length: int = 0


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """When MLflow was last read completely enough that deltas can start from it."""

    last_capture_ms: int | None = None
    deleted_experiments: int = 0  # in scope, as of the last read
    active_experiments: int = 0


@dataclass(frozen=True, slots=True)
class SweepRecord:
    """Where the background reconcile sweep is: a keyset cursor over (start time, run id).

    `chunk` indexes the sorted experiment ids in chunks; `page_token` is only used while a
    page is full of runs sharing one start time (MLflow tokens are offsets).
    """

    chunk: int = 0
    after_start_ms: int | None = None
    after_run_id: str = ""
    page_token: str | None = None
    started_ms: int | None = None
    last_completed_ms: int | None = None
    passes: int = 0
    next_page_ms: int | None = None  # when the next page is due (pages are spaced in time)


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
