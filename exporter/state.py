"""Durable exporter state in one SQLite file in the state directory.

What it remembers: a mirror of the MLflow experiments and runs it exports (with the latest
value of each run metric), so a cycle only reads what changed and the Pushgateway can be
re-pushed without reading MLflow; for each (run, metric key) the last point handed to Pramathus
delivery (a `(step, timestamp_ms)` watermark); the spool of batches not yet acknowledged, dead
letters, and small facts such as the run_id label length. SQLite gives atomic commits, so a
`kill -9` at any moment leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.model import Experiment, LatestMetric, Run

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
CREATE TABLE IF NOT EXISTS experiment (
    experiment_id TEXT PRIMARY KEY, name TEXT NOT NULL, lifecycle_stage TEXT NOT NULL,
    creation_time_ms INTEGER, last_update_time_ms INTEGER, synced INTEGER NOT NULL DEFAULT 0,
    dirty INTEGER NOT NULL DEFAULT 1);
CREATE TABLE IF NOT EXISTS run (
    run_id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL, run_name TEXT NOT NULL,
    status TEXT NOT NULL, user_id TEXT NOT NULL, start_time_ms INTEGER, end_time_ms INTEGER,
    tags TEXT NOT NULL, fingerprint TEXT NOT NULL DEFAULT '');
CREATE INDEX IF NOT EXISTS run_by_experiment ON run (experiment_id, start_time_ms);
CREATE TABLE IF NOT EXISTS latest (
    run_id TEXT NOT NULL, metric_key TEXT NOT NULL, value REAL, step INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL, PRIMARY KEY (run_id, metric_key)) WITHOUT ROWID;
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
            self._lock.close()
            raise StateError(
                f"state directory {directory} is in use by another exporter process"
            ) from None
        self.db = self._open(directory / "state.db")
        self.mirror = Mirror(self.db)

    def _open(self, path: Path) -> sqlite3.Connection:
        try:
            return self._connect(path)
        except sqlite3.DatabaseError:
            # Corrupt or foreign file: keep it for inspection and start afresh.
            stamp = int(self.clock() * 1000)
            aside = path.with_name(f"state.db.corrupt-{stamp}")
            while aside.exists():  # never overwrite an earlier copy
                stamp += 1
                aside = path.with_name(f"state.db.corrupt-{stamp}")
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


# ---------------------------------------------------------------------- the MLflow mirror


def _value_in(value: float) -> float | None:
    return None if math.isnan(value) else value  # SQLite stores NaN as NULL anyway


def _value_out(value: float | None) -> float:
    return math.nan if value is None else float(value)


class Mirror:
    """Reads and writes of the experiments/runs mirror; writes go inside a transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def set_experiments(self, experiments: Iterable[Experiment]) -> list[str]:
        """Keep exactly these experiments (and their runs); return ids of ones dropped."""
        rows = [
            (e.experiment_id, e.name, e.lifecycle_stage, e.creation_time_ms, e.last_update_time_ms)
            for e in experiments
        ]
        keep = {r[0] for r in rows}
        gone = [
            i for (i,) in self.db.execute("SELECT experiment_id FROM experiment") if i not in keep
        ]
        for exp_id in gone:
            self.drop_runs_of(exp_id)
            self.db.execute("DELETE FROM experiment WHERE experiment_id = ?", (exp_id,))
        self.db.executemany(
            "INSERT INTO experiment(experiment_id, name, lifecycle_stage, creation_time_ms, "
            "last_update_time_ms) VALUES(?, ?, ?, ?, ?) ON CONFLICT(experiment_id) DO UPDATE "
            "SET dirty = dirty OR name IS NOT excluded.name "
            "OR lifecycle_stage IS NOT excluded.lifecycle_stage "
            "OR last_update_time_ms IS NOT excluded.last_update_time_ms, "
            "name = excluded.name, lifecycle_stage = excluded.lifecycle_stage, "
            "last_update_time_ms = excluded.last_update_time_ms",
            rows,
        )
        return gone

    def experiments(self) -> list[Experiment]:
        rows = self.db.execute(
            "SELECT experiment_id, name, lifecycle_stage, creation_time_ms, last_update_time_ms "
            "FROM experiment ORDER BY experiment_id"
        )
        return [Experiment(*row) for row in rows]

    def synced_experiments(self) -> set[str]:
        return {
            i for (i,) in self.db.execute("SELECT experiment_id FROM experiment WHERE synced = 1")
        }

    def mark_synced(self, experiment_ids: Iterable[str]) -> None:
        self.db.executemany(
            "UPDATE experiment SET synced = 1 WHERE experiment_id = ?",
            [(i,) for i in experiment_ids],
        )

    def drop_runs_of(self, experiment_id: str) -> None:
        self.db.execute(
            "DELETE FROM latest WHERE run_id IN (SELECT run_id FROM run WHERE experiment_id = ?)",
            (experiment_id,),
        )
        self.db.execute("DELETE FROM run WHERE experiment_id = ?", (experiment_id,))
        self.mark_dirty([experiment_id])

    def mark_dirty(self, experiment_ids: Iterable[str] | None = None) -> None:
        """Flag experiments (None: all) whose Pushgateway group must be pushed again."""
        if experiment_ids is None:
            self.db.execute("UPDATE experiment SET dirty = 1")
            return
        self.db.executemany(
            "UPDATE experiment SET dirty = 1 WHERE experiment_id = ?",
            [(i,) for i in experiment_ids],
        )

    def mark_clean(self, experiment_ids: Iterable[str]) -> None:
        self.db.executemany(
            "UPDATE experiment SET dirty = 0 WHERE experiment_id = ?",
            [(i,) for i in experiment_ids],
        )

    def dirty_experiments(self) -> set[str]:
        return {
            i for (i,) in self.db.execute("SELECT experiment_id FROM experiment WHERE dirty = 1")
        }

    def upsert_runs(self, runs: Iterable[Run]) -> int:
        """Write runs; an experiment is flagged dirty only when one of its runs changed."""
        count = 0
        for run in runs:
            tags = json.dumps(dict(run.tags), sort_keys=True)
            metrics = [(m.key, _value_in(m.value), m.step, m.timestamp_ms) for m in run.metrics]
            row = (
                run.run_id,
                run.experiment_id,
                run.run_name,
                run.status,
                run.user_id,
                run.start_time_ms,
                run.end_time_ms,
                tags,
            )
            fingerprint = hashlib.sha1(  # noqa: S324 - change detection, not security
                json.dumps([row, sorted(metrics, key=lambda m: m[0])]).encode()
            ).hexdigest()
            count += 1
            old = self.db.execute(
                "SELECT fingerprint FROM run WHERE run_id = ?", (run.run_id,)
            ).fetchone()
            if old is not None and old[0] == fingerprint:
                continue
            self.db.execute(
                "INSERT OR REPLACE INTO run(run_id, experiment_id, run_name, status, user_id, "
                "start_time_ms, end_time_ms, tags, fingerprint) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, fingerprint),
            )
            self.db.execute("DELETE FROM latest WHERE run_id = ?", (run.run_id,))
            self.db.executemany(
                "INSERT OR REPLACE INTO latest(run_id, metric_key, value, step, timestamp_ms) "
                "VALUES(?, ?, ?, ?, ?)",
                [(run.run_id, *m) for m in metrics],
            )
            self.mark_dirty([run.experiment_id])
        return count

    def remove_runs(self, run_ids: Iterable[str]) -> int:
        ids = [(i,) for i in run_ids]
        for (run_id,) in ids:
            self.db.execute(
                "UPDATE experiment SET dirty = 1 WHERE experiment_id = "
                "(SELECT experiment_id FROM run WHERE run_id = ?)",
                (run_id,),
            )
        self.db.executemany("DELETE FROM latest WHERE run_id = ?", ids)
        self.db.executemany("DELETE FROM run WHERE run_id = ?", ids)
        return len(ids)

    def max_start_time(self, experiment_ids: Sequence[str]) -> int | None:
        marks = ",".join("?" * len(experiment_ids))
        row = self.db.execute(
            f"SELECT max(start_time_ms) FROM run WHERE experiment_id IN ({marks})",  # noqa: S608
            list(experiment_ids),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def unfinished_run_ids(self, experiment_ids: Sequence[str]) -> set[str]:
        marks = ",".join("?" * len(experiment_ids))
        return {
            i
            for (i,) in self.db.execute(
                f"SELECT run_id FROM run WHERE experiment_id IN ({marks}) "  # noqa: S608
                "AND status IN ('RUNNING', 'SCHEDULED')",
                list(experiment_ids),
            )
        }

    def status_counts(self, experiment_id: str) -> dict[str, int]:
        rows = self.db.execute(
            "SELECT status, count(*) FROM run WHERE experiment_id = ? GROUP BY status",
            (experiment_id,),
        )
        return {status: int(n) for status, n in rows}

    def runs_for_push(self, experiment_id: str, limit: int) -> list[Run]:
        """The newest `limit` runs (0 = all) plus every unfinished run, with latest metrics."""
        rows = self.db.execute(
            "SELECT run_id, experiment_id, run_name, status, user_id, start_time_ms, "
            "end_time_ms, tags FROM run WHERE experiment_id = ? "
            "ORDER BY start_time_ms DESC, run_id",
            (experiment_id,),
        ).fetchall()
        if limit:
            rows = [r for i, r in enumerate(rows) if i < limit or r[3] in ("RUNNING", "SCHEDULED")]
        metrics: dict[str, list[LatestMetric]] = {}
        for row in rows:
            metrics[row[0]] = [
                LatestMetric(key, _value_out(value), step, ts)
                for key, value, step, ts in self.db.execute(
                    "SELECT metric_key, value, step, timestamp_ms FROM latest WHERE run_id = ? "
                    "ORDER BY metric_key",
                    (row[0],),
                )
            ]
        return [
            Run(
                run_id=r[0],
                experiment_id=r[1],
                run_name=r[2],
                status=r[3],
                user_id=r[4],
                start_time_ms=r[5],
                end_time_ms=r[6],
                metrics=tuple(metrics[r[0]]),
                tags=json.loads(r[7]),
            )
            for r in rows
        ]

    def runs_beyond(self, limit: int) -> int:
        """Finished runs that `runs_for_push(limit)` leaves out, over all experiments."""
        if not limit:
            return 0
        row = self.db.execute(
            "SELECT count(*) FROM (SELECT status, row_number() OVER (PARTITION BY "
            "experiment_id ORDER BY start_time_ms DESC, run_id) AS rank FROM run) "
            "WHERE rank > ? AND status NOT IN ('RUNNING', 'SCHEDULED')",
            (limit,),
        ).fetchone()
        return int(row[0])

    def run_count(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM run").fetchone()[0])

    def run_ids(self) -> Iterator[str]:
        for (run_id,) in self.db.execute("SELECT run_id FROM run"):
            yield run_id

    def metric_keys(self) -> list[str]:
        return [k for (k,) in self.db.execute("SELECT DISTINCT metric_key FROM latest")]

    def pending_keys(self) -> list[str]:
        """Metric keys with at least one series past its delivery watermark."""
        return [
            k
            for (k,) in self.db.execute(
                "SELECT DISTINCT l.metric_key FROM latest l LEFT JOIN watermark w "
                "ON w.run_id = l.run_id AND w.metric_key = l.metric_key "
                "WHERE w.run_id IS NULL OR (l.step, l.timestamp_ms) > (w.step, w.timestamp_ms)"
            )
        ]

    def pending_for_key(self, key: str) -> list[tuple[str, int, int | None, int | None]]:
        """(run_id, latest step, mark step, mark ts) of the series of `key` past their mark."""
        return self.db.execute(
            "SELECT l.run_id, l.step, w.step, w.timestamp_ms "
            "FROM latest l LEFT JOIN watermark w "
            "ON w.run_id = l.run_id AND w.metric_key = l.metric_key WHERE l.metric_key = ? "
            "AND (w.run_id IS NULL OR (l.step, l.timestamp_ms) > (w.step, w.timestamp_ms)) "
            "ORDER BY l.run_id",
            (key,),
        ).fetchall()

    def run_context(self, run_id: str) -> tuple[str, dict[str, str]]:
        """(experiment name, tags) of a run, for Pramathus metadata."""
        row = self.db.execute(
            "SELECT e.name, r.tags FROM run r JOIN experiment e USING (experiment_id) "
            "WHERE r.run_id = ?",
            (run_id,),
        ).fetchone()
        return ("", {}) if row is None else (row[0], json.loads(row[1]))

    def prune_watermarks(self) -> int:
        """Forget delivery marks of runs no longer mirrored (deleted, or out of scope)."""
        cur = self.db.execute("DELETE FROM watermark WHERE run_id NOT IN (SELECT run_id FROM run)")
        return cur.rowcount
