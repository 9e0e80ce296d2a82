"""Durable exporter state in one SQLite file in the state directory.

What it remembers: for each (run, metric key) the last point handed to Pramathus delivery
(a `(step, timestamp_ms)` watermark), the spool of batches not yet acknowledged, dead letters,
and small facts such as the run_id label length. SQLite gives atomic commits, so a `kill -9`
at any moment leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS watermark (
    run_id TEXT NOT NULL, metric_key TEXT NOT NULL,
    step INTEGER NOT NULL, timestamp_ms INTEGER NOT NULL,
    PRIMARY KEY (run_id, metric_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, idempotency_key TEXT NOT NULL,
    created_ms INTEGER NOT NULL, points INTEGER NOT NULL, body BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY, idempotency_key TEXT NOT NULL, created_ms INTEGER NOT NULL,
    failed_ms INTEGER NOT NULL, points INTEGER NOT NULL, body BLOB NOT NULL,
    status INTEGER, error TEXT);
"""


class StateError(Exception):
    """The state directory cannot be used; message safe to show."""


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    id: int
    idempotency_key: str
    points: int
    body: bytes
    attempts: int


class StateStore:
    """The exporter's SQLite state. One process at a time holds the directory's lock."""

    def __init__(self, directory: Path, clock: Any = time.time) -> None:
        self.directory = directory
        self.clock = clock
        self.set_aside: Path | None = None  # where a corrupt database was moved, if any
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self._lock = open(directory / "exporter.lock", "a+")  # noqa: SIM115 - held for life
        except OSError as exc:
            raise StateError(f"state directory {directory} is not usable: {exc}") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StateError(
                f"state directory {directory} is in use by another exporter process"
            ) from None
        self.db = self._open(directory / "state.db")

    def _open(self, path: Path) -> sqlite3.Connection:
        try:
            return self._connect(path)
        except sqlite3.DatabaseError:
            # Corrupt or foreign file: keep it for inspection and start afresh.
            aside = path.with_name(f"state.db.corrupt-{int(self.clock())}")
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{path}{suffix}")
                if src.exists():
                    os.replace(src, Path(f"{aside}{suffix}"))
            self.set_aside = aside
            return self._connect(path)

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # a committed batch survives power loss
        db.executescript(SCHEMA)
        db.execute("SELECT count(*) FROM watermark").fetchone()  # proves the file is readable
        return db

    def close(self) -> None:
        self.db.close()
        self._lock.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------ small facts
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    # ------------------------------------------------------------------ watermarks
    def watermarks(self) -> dict[tuple[str, str], tuple[int, int]]:
        rows = self.db.execute("SELECT run_id, metric_key, step, timestamp_ms FROM watermark")
        return {(r, k): (s, t) for r, k, s, t in rows}

    @staticmethod
    def advance(db: sqlite3.Connection, marks: Iterable[tuple[str, str, int, int]]) -> None:
        """Set (run_id, key) -> (step, timestamp_ms); call inside `transaction()`."""
        db.executemany(
            "INSERT INTO watermark(run_id, metric_key, step, timestamp_ms) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(run_id, metric_key) DO UPDATE SET step = excluded.step, "
            "timestamp_ms = excluded.timestamp_ms",
            marks,
        )

    # ------------------------------------------------------------------ spool
    @staticmethod
    def spool_add(
        db: sqlite3.Connection, key: str, created_ms: int, points: int, body: bytes
    ) -> None:
        db.execute(
            "INSERT INTO spool(idempotency_key, created_ms, points, body) VALUES(?, ?, ?, ?)",
            (key, created_ms, points, body),
        )

    def spool_batches(self) -> Iterator[SpooledBatch]:
        """Spooled batches, oldest first (fetched one at a time: the spool may be large)."""
        last = 0
        while True:
            row = self.db.execute(
                "SELECT id, idempotency_key, points, body, attempts FROM spool "
                "WHERE id > ? ORDER BY id LIMIT 1",
                (last,),
            ).fetchone()
            if row is None:
                return
            last = row[0]
            yield SpooledBatch(*row)

    def spool_totals(self) -> tuple[int, int]:
        """(batches, points) waiting in the spool."""
        batches, points = self.db.execute(
            "SELECT count(*), coalesce(sum(points), 0) FROM spool"
        ).fetchone()
        return int(batches), int(points)

    def spool_done(self, batch_id: int) -> None:
        self.db.execute("DELETE FROM spool WHERE id = ?", (batch_id,))

    def spool_failed(self, batch_id: int, error: str) -> None:
        self.db.execute(
            "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE id = ?",
            (error[:500], batch_id),
        )

    def spool_trim(self, db: sqlite3.Connection, max_points: int, oldest_first: bool) -> int:
        """Drop whole batches until the spool holds at most `max_points`; return points dropped."""
        dropped = 0
        order = "ASC" if oldest_first else "DESC"
        total = db.execute("SELECT coalesce(sum(points), 0) FROM spool").fetchone()[0]
        while total > max_points:
            row = db.execute(f"SELECT id, points FROM spool ORDER BY id {order} LIMIT 1").fetchone()  # noqa: S608
            if row is None:
                break
            db.execute("DELETE FROM spool WHERE id = ?", (row[0],))
            total -= row[1]
            dropped += row[1]
        return dropped

    def dead_letter(self, batch: SpooledBatch, status: int | None, error: str) -> None:
        """Move a batch that can never succeed out of the spool, keeping it for a human."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO dead_letter(id, idempotency_key, created_ms, failed_ms, points, body,"
                " status, error) SELECT id, idempotency_key, created_ms, ?, points, body, ?, ? "
                "FROM spool WHERE id = ?",
                (int(self.clock() * 1000), status, error[:500], batch.id),
            )
            db.execute("DELETE FROM spool WHERE id = ?", (batch.id,))

    def dead_letter_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM dead_letter").fetchone()[0])
