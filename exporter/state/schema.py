"""The state database's tables, by concern, and the migration from the first layout.

- mirror: `experiment`, `run`, `latest`, `registered_model`, `model_version`, `metric_key`;
- capture ledger: `series` (one per run and metric key, with its read window) and `point`
  (identities of points delivered within that window), `sink` and the `backfill*` tables;
- delivery queues: `spool` (batches per sink, oldest first) and `dead_letter` (set aside),
  each row's `form` saying what its body is: `captured` (a `CapturedBatch`, see
  `captured.py`, encoded by its sink at delivery) or `wire` (a request body queued by a
  version before 4, sent as it is);
- typed records: `record` (one JSON row per record dataclass, see `records.py`);
- traces: `trace_marks` (per experiment: last fingerprint, live series, history marks).
"""

from __future__ import annotations

import sqlite3

# 3: run_count with its triggers, trace_marks (a version 2 database gains both on open);
# 4: the queues' `form` column (a version 3 database gains it on open, its rows `wire`).
SCHEMA_VERSION = 4

TABLES = """
CREATE TABLE IF NOT EXISTS record (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiment (
    experiment_id TEXT PRIMARY KEY, name TEXT NOT NULL, lifecycle_stage TEXT NOT NULL,
    creation_time_ms INTEGER, last_update_time_ms INTEGER,
    synced INTEGER NOT NULL DEFAULT 0, dirty INTEGER NOT NULL DEFAULT 1,
    cut_runs INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS run (
    run_id TEXT PRIMARY KEY, experiment_id TEXT NOT NULL, run_name TEXT NOT NULL,
    status TEXT NOT NULL, user_id TEXT NOT NULL, start_time_ms INTEGER, end_time_ms INTEGER,
    tags TEXT NOT NULL, fingerprint TEXT NOT NULL DEFAULT '',
    settle_until_ms INTEGER NOT NULL DEFAULT 0, deleted_ms INTEGER,
    pending INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS run_by_experiment ON run (experiment_id, start_time_ms, run_id);
CREATE INDEX IF NOT EXISTS run_by_settle ON run (settle_until_ms);
CREATE INDEX IF NOT EXISTS run_unfinished ON run (status)
    WHERE status IN ('RUNNING', 'SCHEDULED');
CREATE INDEX IF NOT EXISTS run_deleted ON run (deleted_ms) WHERE deleted_ms IS NOT NULL;
CREATE INDEX IF NOT EXISTS run_pending ON run (run_id) WHERE pending != 0;
CREATE INDEX IF NOT EXISTS run_by_activity ON run (coalesce(end_time_ms, start_time_ms));
CREATE TABLE IF NOT EXISTS run_count (
    experiment_id TEXT NOT NULL, status TEXT NOT NULL, n INTEGER NOT NULL,
    PRIMARY KEY (experiment_id, status)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS latest (
    run_id TEXT NOT NULL, metric_key TEXT NOT NULL, value REAL, step INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL, PRIMARY KEY (run_id, metric_key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS metric_key (key TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS registered_model (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS model_version (
    model_name TEXT NOT NULL, version TEXT NOT NULL, run_id TEXT, stage TEXT NOT NULL,
    status TEXT NOT NULL, aliases TEXT NOT NULL, creation_time_ms INTEGER,
    PRIMARY KEY (model_name, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS series (
    series_id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, metric_key TEXT NOT NULL,
    window_start INTEGER, floor INTEGER, UNIQUE (run_id, metric_key));
CREATE TABLE IF NOT EXISTS point (
    series_id INTEGER NOT NULL, step INTEGER NOT NULL, timestamp_ms INTEGER NOT NULL,
    value_bits INTEGER NOT NULL, captured_ms INTEGER NOT NULL,
    PRIMARY KEY (series_id, step, timestamp_ms, value_bits)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sink (name TEXT PRIMARY KEY, registered_ms INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS backfill (
    sink TEXT NOT NULL, series_id INTEGER NOT NULL, window_start INTEGER,
    PRIMARY KEY (sink, series_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backfill_point (
    sink TEXT NOT NULL, series_id INTEGER NOT NULL, step INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL, value_bits INTEGER NOT NULL,
    PRIMARY KEY (sink, series_id, step, timestamp_ms, value_bits)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT, sink TEXT NOT NULL DEFAULT 'pramathus',
    idempotency_key TEXT NOT NULL, created_ms INTEGER NOT NULL, points INTEGER NOT NULL,
    body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    form TEXT NOT NULL DEFAULT 'wire');
CREATE INDEX IF NOT EXISTS spool_by_sink ON spool (sink, id);
CREATE TABLE IF NOT EXISTS dead_letter (
    id INTEGER PRIMARY KEY, sink TEXT NOT NULL DEFAULT 'pramathus',
    idempotency_key TEXT NOT NULL, created_ms INTEGER NOT NULL, failed_ms INTEGER NOT NULL,
    points INTEGER NOT NULL, body BLOB NOT NULL, status INTEGER, error TEXT,
    reason TEXT NOT NULL DEFAULT 'rejected', form TEXT NOT NULL DEFAULT 'wire');
CREATE TABLE IF NOT EXISTS trace_marks (
    experiment_id TEXT PRIMARY KEY, body TEXT NOT NULL) WITHOUT ROWID;
"""


# `run_count` holds active runs per experiment and status, kept by these triggers as runs
# change, so counting runs costs the same at 100 runs and at 100,000 (`write_run` upserts:
# a REPLACE would delete without firing the delete trigger).
_ADD = (
    "INSERT INTO run_count (experiment_id, status, n) SELECT NEW.experiment_id, NEW.status, 1 "
    "WHERE NEW.deleted_ms IS NULL ON CONFLICT (experiment_id, status) DO UPDATE SET n = n + 1"
)
_SUB = (
    "UPDATE run_count SET n = n - 1 WHERE OLD.deleted_ms IS NULL "
    "AND experiment_id = OLD.experiment_id AND status = OLD.status"
)
TRIGGERS = (
    f"CREATE TRIGGER IF NOT EXISTS run_count_insert AFTER INSERT ON run BEGIN {_ADD}; END",
    f"CREATE TRIGGER IF NOT EXISTS run_count_delete AFTER DELETE ON run BEGIN {_SUB}; END",
    (
        "CREATE TRIGGER IF NOT EXISTS run_count_update AFTER UPDATE OF experiment_id, status, "
        f"deleted_ms ON run BEGIN {_SUB}; {_ADD}; END"
    ),
)


def _counts(conn: sqlite3.Connection) -> None:
    """Create the count triggers and, on an upgrade, count the runs once."""
    fresh = conn.execute("SELECT 1 FROM run_count LIMIT 1").fetchone() is None
    for statement in TRIGGERS:
        conn.execute(statement)
    if fresh:
        conn.execute(
            "INSERT INTO run_count (experiment_id, status, n) SELECT experiment_id, status, "
            "count(*) FROM run WHERE deleted_ms IS NULL GROUP BY experiment_id, status"
        )


# Columns added after a table was first made: an older database gains them on open.
LATER_COLUMNS = (
    ("spool", "form", "TEXT NOT NULL DEFAULT 'wire'"),
    ("dead_letter", "form", "TEXT NOT NULL DEFAULT 'wire'"),
)


def _later_columns(conn: sqlite3.Connection) -> None:
    """Add the `LATER_COLUMNS` a table lacks (its rows take the default: queued bodies of a
    version before 4 are wire bodies)."""
    for table, column, kind in LATER_COLUMNS:
        have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def create(conn: sqlite3.Connection) -> None:
    """Create every table and column that is missing and stamp the schema version."""
    conn.executescript(TABLES)
    _later_columns(conn)
    _counts(conn)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


def migrate(conn: sqlite3.Connection, from_version: int) -> None:
    """Bring a state database of an older layout up to date in one transaction.

    Version 1 kept one `(step, timestamp)` watermark per run and key for Pramathus, its
    spool and dead letters without a sink, and small facts in a `meta` table. Its marks
    become floors: points at or below a mark count as delivered and are never read again,
    so upgrading resends nothing.
    """
    if from_version != 1:
        raise sqlite3.OperationalError(f"no migration from schema version {from_version}")
    conn.execute("BEGIN IMMEDIATE")
    try:
        for table, column in (
            ("spool", "sink TEXT NOT NULL DEFAULT 'pramathus'"),
            ("dead_letter", "sink TEXT NOT NULL DEFAULT 'pramathus'"),
            ("dead_letter", "reason TEXT NOT NULL DEFAULT 'rejected'"),
            ("run", "settle_until_ms INTEGER NOT NULL DEFAULT 0"),
            ("run", "deleted_ms INTEGER"),
            ("run", "pending INTEGER NOT NULL DEFAULT 1"),
            ("experiment", "cut_runs INTEGER NOT NULL DEFAULT 0"),
        ):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
        # Version 1's index lacked the run id: make it as a fresh database has it.
        conn.execute("DROP INDEX IF EXISTS run_by_experiment")
        for statement in TABLES.split(";"):  # executescript would commit the transaction
            if statement.strip():
                conn.execute(statement)
        _later_columns(conn)
        _counts(conn)
        # Fingerprints were computed differently: an empty one makes the next read of each
        # run adopt it as if first seen (its windows still keep delivered points out).
        conn.execute("UPDATE run SET fingerprint = ''")
        conn.execute(
            "INSERT OR IGNORE INTO series (run_id, metric_key, window_start, floor) "
            "SELECT run_id, metric_key, step + 1, step + 1 FROM watermark"
        )
        delivered = conn.execute(
            "SELECT (SELECT count(*) FROM watermark) + (SELECT count(*) FROM spool)"
        ).fetchone()[0]
        if delivered:
            conn.execute("INSERT OR IGNORE INTO sink (name, registered_ms) VALUES ('pramathus', 0)")
        # Everything else in `meta` is re-learnt in a cycle: push every group once more.
        conn.execute("UPDATE experiment SET dirty = 1")
        conn.execute("DROP TABLE watermark")
        conn.execute("DROP TABLE IF EXISTS meta")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (disk full)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
