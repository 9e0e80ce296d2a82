"""Unit tests for exporter.state.schema: the version-2 tables and the migration from the
first layout (the single `exporter/state.py` before the state was split, commit 9528e3a)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.model import Run
from exporter.state import StateError, StateStore
from exporter.state.db import FILE
from exporter.state.schema import SCHEMA_VERSION, TABLES, create, migrate
from tests.support.planned import entry

# The version-1 layout exactly as `exporter/state.py` created it (git show 9528e3a:...).
V1_SCHEMA = """
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


def make_v1(
    directory: Path,
    *,
    without: str | None = None,
    watermarks: bool = True,
    spool: bool = True,
    extra_sql: str = "",
) -> Path:
    """A version-1 state database with a few rows of every kind, as the old code left it
    (WAL, user_version 0). `without` leaves one table out; `extra_sql` runs last."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    if without:
        conn.execute(f"DROP TABLE {without}")
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [("run_id_length", "8"), ("push_state", '{"groups": [["a", "b"]]}')],
    )
    if watermarks:
        conn.executemany(
            "INSERT INTO watermark VALUES (?, ?, ?, ?)",
            [("run-a", "loss", 41, 1_000), ("run-a", "acc", 0, 1_001), ("run-b", "loss", -3, 5)],
        )
    if spool:
        conn.executemany(
            "INSERT INTO spool (idempotency_key, created_ms, points, body, attempts, last_error) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [("k1", 10, 3, b"first", 2, "HTTP 503"), ("k2", 11, 4, b"second", 0, None)],
        )
    conn.executemany(
        "INSERT INTO experiment VALUES (?, ?, ?, ?, ?, ?, ?)",
        [("1", "exp one", "active", 100, 200, 1, 0), ("2", "exp two", "active", 101, 201, 0, 0)],
    )
    conn.executemany(
        "INSERT INTO run VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ("run-a", "1", "alpha", "FINISHED", "ana", 1_000, 2_000, '{"t": "1"}', "old-fp-a"),
            ("run-b", "1", "beta", "RUNNING", "bob", 3_000, None, "{}", "old-fp-b"),
        ],
    )
    conn.executemany(
        "INSERT INTO latest VALUES (?, ?, ?, ?, ?)",
        [("run-a", "loss", 0.25, 41, 1_000), ("run-a", "acc", None, 0, 1_001)],
    )
    if without != "dead_letter":
        conn.execute(
            "INSERT INTO dead_letter VALUES (7, 'k0', 5, 6, 9, x'deadbeef', 400, 'bad request')"
        )
    if extra_sql:
        conn.executescript(extra_sql)
    conn.close()
    return path


def table_names(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {
            n
            for (n,) in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'sqlite_sequence'"
            )
        }
    finally:
        conn.close()


def dump(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [*conn.iterdump(), f"user_version={conn.execute('PRAGMA user_version').fetchone()}"]
    finally:
        conn.close()


@pytest.fixture
def migrated(tmp_path: Path) -> Iterator[StateStore]:
    directory = tmp_path / "state"
    make_v1(directory)
    state = StateStore(directory)
    yield state
    state.close()


def raw(state: StateStore, sql: str) -> list[tuple[object, ...]]:
    return state.db.conn.execute(sql).fetchall()


# ---------------------------------------------------------------- the version-2 tables


def test_create_makes_every_table_and_stamps_the_version(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    create(conn)
    create(conn)  # idempotent
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    conn.close()
    expected = {
        "record", "experiment", "run", "latest", "metric_key", "registered_model",
        "model_version", "series", "point", "sink", "backfill", "backfill_point", "spool",
        "dead_letter",
    }  # fmt: skip
    assert expected <= names
    assert "watermark" not in names
    assert "meta" not in names


def test_migrate_refuses_a_version_it_does_not_know(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    try:
        with pytest.raises(sqlite3.OperationalError, match="no migration from schema version 7"):
            migrate(conn, from_version=7)
    finally:
        conn.close()


# ---------------------------------------------------------------- migration from version 1


def test_watermarks_become_series_whose_window_and_floor_start_one_step_above_the_mark(
    migrated: StateStore,
) -> None:
    series = migrated.ledger.series([("run-a", "loss"), ("run-a", "acc"), ("run-b", "loss")])
    assert {pair: (s.window_start, s.floor) for pair, s in series.items()} == {
        ("run-a", "loss"): (42, 42),
        ("run-a", "acc"): (1, 1),
        ("run-b", "loss"): (-2, -2),
    }
    # Even a whole read starts above the mark: upgrading resends nothing.
    assert series[("run-a", "loss")].read_from(whole=True) == 42
    assert migrated.ledger.series_count() == 3
    assert raw(migrated, "SELECT count(*) FROM point") == [(0,)]


def test_spooled_batches_are_kept_in_order_under_the_pramathus_sink(
    migrated: StateStore,
) -> None:
    batches = list(migrated.outbox("pramathus").batches())
    # Version 1 queued Pramathus request bodies: they are delivered as they are.
    assert [(b.idempotency_key, b.points, b.body, b.attempts, b.form) for b in batches] == [
        ("k1", 3, b"first", 2, "wire"),
        ("k2", 4, b"second", 0, "wire"),
    ]
    assert raw(migrated, "SELECT sink, created_ms, last_error FROM spool ORDER BY id") == [
        ("pramathus", 10, "HTTP 503"),
        ("pramathus", 11, None),
    ]
    # New batches queue behind them: the AUTOINCREMENT sequence survived.
    outbox = migrated.outbox("pramathus")
    outbox.add([entry("k3", 1, created_ms=12)])
    assert [b.idempotency_key for b in outbox.batches()] == ["k1", "k2", "k3"]
    assert batches[-1].id < list(outbox.batches())[-1].id


def test_dead_letters_are_kept_under_the_pramathus_sink_as_rejected(
    migrated: StateStore,
) -> None:
    assert raw(
        migrated,
        "SELECT id, sink, idempotency_key, created_ms, failed_ms, points, body, status, error, "
        "reason, form FROM dead_letter",
    ) == [
        (7, "pramathus", "k0", 5, 6, 9, b"\xde\xad\xbe\xef", 400, "bad request", "rejected", "wire")
    ]
    counts = migrated.outbox("pramathus").set_aside_counts()
    assert {r: (t.batches, t.points) for r, t in counts.items()} == {"rejected": (1, 9)}


def test_the_pramathus_sink_is_registered_without_a_backfill(migrated: StateStore) -> None:
    assert migrated.ledger.sinks() == {"pramathus": 0}
    assert migrated.ledger.backfill_remaining("pramathus") == 0


@pytest.mark.parametrize(
    ("watermarks", "spool"),
    [(True, False), (False, True)],
    ids=["watermarks-only", "spool-only"],
)
def test_either_watermarks_or_spooled_batches_are_enough_to_register_pramathus(
    tmp_path: Path, watermarks: bool, spool: bool
) -> None:
    make_v1(tmp_path / "state", watermarks=watermarks, spool=spool)
    state = StateStore(tmp_path / "state")
    try:
        assert state.ledger.sinks() == {"pramathus": 0}
    finally:
        state.close()


def test_a_version_1_database_that_delivered_nothing_registers_no_sink(tmp_path: Path) -> None:
    make_v1(tmp_path / "state", watermarks=False, spool=False)
    state = StateStore(tmp_path / "state")
    try:
        assert state.ledger.sinks() == {}
        assert state.ledger.series_count() == 0
    finally:
        state.close()


def test_meta_and_watermark_are_dropped_and_the_version_is_current(migrated: StateStore) -> None:
    names = table_names(migrated.db.path)
    assert "meta" not in names
    assert "watermark" not in names
    assert raw(migrated, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_the_migrated_database_has_every_table_and_column_a_fresh_one_has(
    migrated: StateStore, tmp_path: Path
) -> None:
    fresh = StateStore(tmp_path / "fresh")
    fresh.close()

    def columns(path: Path) -> dict[str, set[str]]:
        conn = sqlite3.connect(path)
        try:
            return {
                t: {row[1] for row in conn.execute(f"PRAGMA table_info({t})")}
                for t in table_names(path)
            }
        finally:
            conn.close()

    assert columns(migrated.db.path) == columns(fresh.db.path)


def test_the_migrated_database_has_the_same_indexes_as_a_fresh_one(
    migrated: StateStore, tmp_path: Path
) -> None:
    fresh = StateStore(tmp_path / "fresh")
    fresh.close()

    def indexes(path: Path) -> dict[str, list[str]]:
        conn = sqlite3.connect(path)
        try:
            names = [
                n
                for (n,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
                )
            ]
            return {n: [r[2] for r in conn.execute(f"PRAGMA index_info({n})")] for n in names}
        finally:
            conn.close()

    assert indexes(migrated.db.path) == indexes(fresh.db.path)


def test_run_fingerprints_are_emptied_and_every_run_is_due_for_capture_from_its_window(
    migrated: StateStore,
) -> None:
    known = migrated.mirror.known(["run-a", "run-b"])
    assert {k.run_id: k.fingerprint for k in known.values()} == {"run-a": "", "run-b": ""}
    assert {(k.settle_until_ms, k.deleted_ms) for k in known.values()} == {(0, None)}
    assert migrated.schedule.capture_due(now_ms=0) == {"run-a": False, "run-b": False}
    assert [k.run_id for k in migrated.schedule.unfinished()] == ["run-b"]


def test_experiments_keep_their_synced_flag_and_every_group_is_pushed_again(
    migrated: StateStore,
) -> None:
    assert [e.name for e in migrated.mirror.experiments()] == ["exp one", "exp two"]
    assert migrated.mirror.unsynced_experiments() == ["2"]
    assert migrated.push_marks.dirty_experiments() == {"1", "2"}
    assert migrated.push_marks.cut_runs() == 0


def test_runs_and_latest_values_read_back_through_the_mirror(migrated: StateStore) -> None:
    runs, cut = migrated.mirror.runs_for_push("1", limit=0)
    assert cut == 0
    by_id = {r.run_id: r for r in runs}
    assert by_id["run-a"].tags == {"t": "1"}
    assert by_id["run-a"].end_time_ms == 2_000
    metrics = {m.key: (m.value, m.step) for m in by_id["run-a"].metrics}
    assert metrics["loss"] == (0.25, 41)
    assert metrics["acc"][0] != metrics["acc"][0]  # NULL reads back as NaN
    assert by_id["run-b"].metrics == ()


def test_a_migrated_database_reopens_without_migrating_again(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    make_v1(directory)
    StateStore(directory).close()
    before = dump(directory / FILE)
    state = StateStore(directory)
    try:
        assert state.set_aside is None
        assert state.ledger.sinks() == {"pramathus": 0}
    finally:
        state.close()
    assert dump(directory / FILE) == before


def test_a_migration_failing_at_its_first_steps_leaves_the_version_1_file_as_it_was(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    path = make_v1(directory, without="dead_letter")  # the second table it alters
    before_bytes = path.read_bytes()
    before = dump(path)

    with pytest.raises(StateError, match="no such table: dead_letter") as failed:
        StateStore(directory)

    assert "\n" not in str(failed.value)
    assert path.read_bytes() == before_bytes
    assert dump(path) == before
    assert "watermark" in table_names(path)
    assert not any(".corrupt-" in p.name for p in directory.iterdir())


def test_a_migration_failing_at_its_last_steps_undoes_the_columns_and_tables_it_added(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    # A stray `series` table without the columns the watermark copy needs: every ALTER and
    # CREATE has run by the time the migration trips over it.
    path = make_v1(directory, extra_sql="CREATE TABLE series (unrelated INTEGER);")
    before = dump(path)

    with pytest.raises(StateError, match="series"):
        StateStore(directory)

    assert dump(path) == before
    conn = sqlite3.connect(path)
    try:
        spool_columns = {row[1] for row in conn.execute("PRAGMA table_info(spool)")}
        assert "sink" not in spool_columns
        assert conn.execute("SELECT fingerprint FROM run ORDER BY run_id").fetchall() == [
            ("old-fp-a",),
            ("old-fp-b",),
        ]
    finally:
        conn.close()
    assert {"meta", "watermark"} <= table_names(path)
    assert "sink" not in table_names(path)


def test_the_v1_layout_here_is_the_one_the_migration_expects() -> None:
    # Guards the fixture: every table the migration alters exists in version 1 without
    # the columns it adds, and every version-2 table is created by TABLES.
    assert "CREATE TABLE IF NOT EXISTS watermark" in V1_SCHEMA
    assert "sink" not in V1_SCHEMA
    assert "reason" not in V1_SCHEMA
    for table in ("spool", "dead_letter", "run", "experiment", "series", "sink"):
        assert f"CREATE TABLE IF NOT EXISTS {table} " in TABLES


def test_a_version_2_state_gets_its_run_counts_once_on_upgrade(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    store = StateStore(directory)
    with store.transaction():
        store.mirror.write_run(Run("a", "1", "a", "RUNNING", "u", 1, None), 0, 0)
        store.mirror.write_run(Run("b", "1", "b", "FINISHED", "u", 2, 3), 0, 0)
        store.mirror.write_run(Run("c", "2", "c", "FINISHED", "u", 2, 3), 0, 0)
    store.db.conn.executescript(
        "DROP TRIGGER run_count_insert; DROP TRIGGER run_count_delete; "
        "DROP TRIGGER run_count_update; DROP TABLE run_count; DROP INDEX run_by_activity; "
        "PRAGMA user_version = 2;"
    )
    store.close()

    upgraded = StateStore(directory)
    try:
        assert upgraded.mirror.status_counts("1") == {"RUNNING": 1, "FINISHED": 1}
        assert upgraded.mirror.run_count() == 3
        with upgraded.transaction():
            upgraded.mirror.write_run(Run("d", "2", "d", "FINISHED", "u", 2, 3), 0, 0)
        assert upgraded.mirror.status_counts("2") == {"FINISHED": 2}
    finally:
        upgraded.close()


def test_a_version_3_state_gains_the_form_column_its_queued_rows_being_wire_bodies(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    store = StateStore(directory)
    conn = store.db.conn
    for table in ("spool", "dead_letter"):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN form")
    conn.execute(
        "INSERT INTO spool (sink, idempotency_key, created_ms, points, body) "
        "VALUES ('remote_write', 'k1', 1, 2, x'00')"
    )
    conn.execute(
        "INSERT INTO dead_letter (sink, idempotency_key, created_ms, failed_ms, points, body) "
        "VALUES ('remote_write', 'k0', 1, 2, 2, x'01')"
    )
    conn.execute("PRAGMA user_version = 3")
    store.close()

    upgraded = StateStore(directory)
    try:
        assert raw(upgraded, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
        [old] = upgraded.outbox("remote_write").batches()
        assert (old.idempotency_key, old.form, old.body) == ("k1", "wire", b"\x00")
        assert raw(upgraded, "SELECT form FROM dead_letter") == [("wire",)]
        with upgraded.transaction():
            upgraded.outbox("remote_write").add([entry("k2", 2)])
        assert [b.form for b in upgraded.outbox("remote_write").batches()] == ["wire", "captured"]
    finally:
        upgraded.close()
    # Opening again changes nothing (the column is there once).
    again = StateStore(directory)
    try:
        assert len(list(again.outbox("remote_write").batches())) == 2
    finally:
        again.close()


def test_a_version_1_state_gains_the_form_column_too(migrated: StateStore) -> None:
    columns = {row[1] for row in migrated.db.conn.execute("PRAGMA table_info(dead_letter)")}
    assert "form" in columns
