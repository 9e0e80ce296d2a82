"""Durable exporter state, one SQLite file in the state directory, split by concern.

- `db.py`: opening, locking, corruption versus passing trouble, transactions;
- `mirror.py`: what MLflow holds (experiments, runs, latest values, registry);
- `schedule.py`: when runs are read again (due captures, settle windows, unfinished runs);
- `push_marks.py`: Pushgateway bookkeeping (groups to push again, runs the push cut);
- `ledger.py`: what was captured (series windows, point identities, sinks, backfills);
- `outbox.py`: per-sink delivery queues and set-aside batches, each batch stored in one
  neutral form (`captured.py`) that its sink encodes at delivery;
- `records.py`: small typed facts (push state, label length, sweep cursor, ...; their
  dataclasses are in `model.py`);
- `traces.py`: per-experiment trace marks (fingerprints, live series, history marks).

Everything is handed out as dataclasses; no other module sees a connection.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from exporter.state import records
from exporter.state.db import Database, StateError, explain, is_corruption
from exporter.state.ledger import Ledger
from exporter.state.mirror import Mirror
from exporter.state.outbox import Outbox
from exporter.state.push_marks import PushMarks
from exporter.state.schedule import CaptureSchedule
from exporter.state.traces import TraceMarks

__all__ = [
    "CaptureSchedule",
    "Ledger",
    "Mirror",
    "Outbox",
    "PushMarks",
    "StateError",
    "StateStore",
    "explain",
    "is_corruption",
]

R = TypeVar("R")


class StateStore:
    """The exporter's state. One process at a time holds the directory's lock."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.db = Database(directory, clock)
        self.directory = directory
        self._open_parts()

    @property
    def path(self) -> Path:
        """The state database file."""
        return self.db.path

    @property
    def set_aside(self) -> Path | None:
        """Where a corrupt state file was moved when this store opened, if anywhere."""
        return self.db.set_aside

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All state writes inside commit together or not at all."""
        with self.db.transaction():
            yield

    def ensure_file(self) -> bool:
        """Write `state.db` back if it was deleted or replaced under this process (see
        `Database.ensure_file`); True when it was."""
        if not self.db.ensure_file():
            return False
        self._open_parts()
        return True

    def _open_parts(self) -> None:
        """The state's parts over the writer connection (again when `ensure_file` reopens)."""
        conn = self.db.conn
        self.mirror = Mirror(conn)
        self.schedule = CaptureSchedule(conn)
        self.push_marks = PushMarks(conn)
        self.ledger = Ledger(conn)

    def outbox(self, sink: str) -> Outbox:
        return Outbox(self.db.conn, sink)

    def trace_marks(self) -> TraceMarks:
        """Per-experiment trace marks (fingerprints, live series, history marks)."""
        return TraceMarks(self.db.conn)

    def load(self, kind: type[R]) -> R:
        return records.load(self.db.conn, kind)

    def save(self, record: Any) -> None:
        records.save(self.db.conn, record)

    def reader(self) -> Mirror:
        """A mirror over a separate read-only connection, for another thread (pull scrapes)."""
        return Mirror(self.db.reader())

    def suspect(self) -> None:
        """A cycle met corruption: the next start checks every page of the file."""
        self.db.suspect()

    def close(self) -> None:
        self.db.close()
