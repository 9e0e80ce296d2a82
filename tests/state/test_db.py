"""Unit tests for exporter.state.db: the directory lock, telling corruption from passing
trouble, transactions and the read-only reader. Real SQLite files under `tmp_path`."""

from __future__ import annotations

import sqlite3
import struct
import time
from pathlib import Path

import pytest

import exporter.state.db as db_module
from exporter.model import LabelRecord
from exporter.state import StateError, StateStore
from exporter.state.db import FILE, Database, explain, is_corruption
from exporter.state.schema import SCHEMA_VERSION
from tests.fakes import FakeClock
from tests.support.planned import entry


@pytest.fixture
def fast_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    """Wait 0.2 s (not 10 s) for a lock held by another connection."""
    monkeypatch.setattr(db_module, "BUSY_TIMEOUT_SECONDS", 0.2)
    return 0.2


def populated(directory: Path, batches: int = 300) -> Path:
    """A closed state database with rows over many pages, half of them deleted again (so
    its freelist is not empty); returns its path. `batches // 2` batches stay queued."""
    state = StateStore(directory)
    with state.transaction():
        state.outbox("pramathus").add([entry(f"key-{i}", 1, 200) for i in range(batches)])
        for i in range(0, batches, 2):
            state.outbox("pramathus").done(i + 1)  # freed pages: a non-empty freelist
    state.close()
    return directory / FILE


def damage(path: Path) -> None:
    """Write garbage over pages in the middle of a database file (the header stays)."""
    data = bytearray(path.read_bytes())
    assert len(data) > 64 * 1024
    for offset in (len(data) // 3, len(data) // 2):
        data[offset : offset + 4096] = b"\xab" * 4096
    path.write_bytes(bytes(data))


def aside_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name)


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


# ---------------------------------------------------------------- opening and locking


def test_a_fresh_directory_is_created_with_a_database_at_the_current_schema_version(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "a" / "b"
    state = StateStore(directory)
    state.close()
    assert (directory / FILE).is_file()
    assert user_version(directory / FILE) == SCHEMA_VERSION
    assert state.set_aside is None


def test_the_database_is_in_wal_mode_with_full_sync(store: StateStore) -> None:
    conn = store.db.conn
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_second_store_on_the_same_directory_is_refused_with_a_one_line_error(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    first = StateStore(directory)
    try:
        with pytest.raises(StateError) as refused:
            StateStore(directory)
        message = str(refused.value)
        assert "\n" not in message
        assert str(directory) in message
        assert "in use by another exporter process" in message
        assert "EXPORTER_STATE_DIR" in message  # what to do about it
        with pytest.raises(StateError, match="in use"):
            Database(directory)
        # The refused attempt did not disturb the holder.
        first.save(LabelRecord(run_id_length=9))
        assert first.load(LabelRecord) == LabelRecord(run_id_length=9)
    finally:
        first.close()


def test_closing_releases_the_directory_for_the_next_process(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    first = StateStore(directory)
    first.save(LabelRecord(run_id_length=12))
    first.close()
    second = StateStore(directory)
    try:
        assert second.load(LabelRecord) == LabelRecord(run_id_length=12)
    finally:
        second.close()


def test_a_directory_that_cannot_be_created_is_a_state_error_saying_what_to_set(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the state directory's parent should be")
    with pytest.raises(StateError) as refused:
        StateStore(blocker / "state")
    message = str(refused.value)
    assert "\n" not in message
    assert str(blocker / "state") in message
    assert "EXPORTER_STATE_DIR" in message


def test_a_state_file_that_cannot_be_opened_at_all_is_a_state_error_not_a_set_aside(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    (directory / FILE).mkdir(parents=True)  # a directory where the database should be
    with pytest.raises(StateError, match="kept as it is"):
        StateStore(directory)
    assert (directory / FILE).is_dir()
    assert aside_files(directory) == []


# ---------------------------------------------------------------- corruption


def test_a_file_that_is_not_a_database_is_moved_aside_and_a_fresh_one_works(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    junk = b"this is not an SQLite database at all " * 200
    (directory / FILE).write_bytes(junk)

    state = StateStore(directory, clock=FakeClock(1_700_000_000.5))
    try:
        aside = directory / f"{FILE}.corrupt-1700000000500"
        assert state.set_aside == aside
        assert aside.read_bytes() == junk
        with state.transaction():
            state.save(LabelRecord(run_id_length=8))
        assert state.load(LabelRecord).run_id_length == 8
        assert user_version(directory / FILE) == SCHEMA_VERSION
    finally:
        state.close()


def test_a_corrupt_file_is_moved_aside_together_with_its_wal_and_shm(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / FILE).write_bytes(b"this is not an SQLite database at all " * 200)
    (directory / f"{FILE}-wal").write_bytes(b"wal bytes")
    (directory / f"{FILE}-shm").write_bytes(b"shm bytes")

    state = StateStore(directory, clock=FakeClock(1_700_000_000.5))
    state.close()

    aside = directory / f"{FILE}.corrupt-1700000000500"
    assert state.set_aside == aside
    assert Path(f"{aside}-wal").exists()
    assert Path(f"{aside}-wal").read_bytes() == b"wal bytes"
    # The shared-memory index is rebuilt from the WAL by SQLite; only its presence matters.
    assert Path(f"{aside}-shm").exists()


def test_moving_aside_renames_the_wal_and_shm_files_that_exist_along_with_the_database(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    database = Database(directory, clock=FakeClock(1_700_000_000.0))
    database.close()
    (directory / f"{FILE}-wal").write_bytes(b"wal bytes")
    (directory / f"{FILE}-shm").write_bytes(b"shm bytes")
    main = (directory / FILE).read_bytes()

    aside = database._move_aside()

    assert aside == directory / f"{FILE}.corrupt-1700000000000"
    assert aside.read_bytes() == main
    assert Path(f"{aside}-wal").read_bytes() == b"wal bytes"
    # The shared-memory index is rebuilt from the WAL by SQLite; only its presence matters.
    assert Path(f"{aside}-shm").exists()
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(FILE)) == [
        aside.name,
        f"{aside.name}-shm",
        f"{aside.name}-wal",
    ]


def test_moving_aside_never_overwrites_an_earlier_copy(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    clock = FakeClock(1_700_000_000.0)
    earlier = directory / f"{FILE}.corrupt-1700000000000"
    earlier.write_bytes(b"the first corrupt copy")
    (directory / f"{FILE}.corrupt-1700000000001").write_bytes(b"the second corrupt copy")
    (directory / FILE).write_bytes(b"garbage, the third time" * 100)

    state = StateStore(directory, clock=clock)
    state.close()

    assert state.set_aside == directory / f"{FILE}.corrupt-1700000000002"
    assert earlier.read_bytes() == b"the first corrupt copy"
    assert (directory / f"{FILE}.corrupt-1700000000001").read_bytes() == (
        b"the second corrupt copy"
    )
    assert state.set_aside.read_bytes() == b"garbage, the third time" * 100


def test_a_database_with_garbage_written_into_its_pages_is_moved_aside(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    path = populated(directory)
    damage(path)
    damaged = path.read_bytes()

    state = StateStore(directory, clock=FakeClock(1_700_000_000.0))
    try:
        assert state.set_aside == directory / f"{FILE}.corrupt-1700000000000"
        assert state.set_aside.read_bytes() == damaged
        assert state.outbox("pramathus").totals().batches == 0  # a fresh, empty database
    finally:
        state.close()


def test_a_database_whose_quick_check_reports_a_problem_is_moved_aside(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    path = populated(directory)
    data = bytearray(path.read_bytes())
    (freelist,) = struct.unpack(">I", data[36:40])
    assert freelist > 0
    data[36:40] = struct.pack(">I", freelist + 1000)  # header's freelist count now wrong
    path.write_bytes(bytes(data))
    probe = sqlite3.connect(path)
    verdict = probe.execute("PRAGMA quick_check").fetchone()[0]
    probe.close()
    assert verdict != "ok"  # a verdict, not an exception: the other detection path

    state = StateStore(directory, clock=FakeClock(1_700_000_000.0))
    state.close()
    assert state.set_aside == directory / f"{FILE}.corrupt-1700000000000"
    assert state.set_aside.read_bytes() == bytes(data)


def test_a_fresh_database_that_cannot_be_made_after_a_set_aside_is_a_state_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / FILE).write_bytes(b"not a database" * 100)
    calls = []

    def connect_fails(path: Path) -> sqlite3.Connection:
        calls.append(path)  # reached only after the probe found garbage and set it aside
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(db_module, "_connect", connect_fails)
    with pytest.raises(StateError, match="cannot create a fresh state database"):
        StateStore(directory)
    assert len(aside_files(directory)) == 1
    monkeypatch.undo()
    StateStore(directory).close()  # the lock was released


# ---------------------------------------------------------------- busy is not corruption


@pytest.mark.parametrize(
    "journal_mode",
    ["wal", "delete"],
    ids=["wal-database-held-in-exclusive-locking-mode", "rollback-journal-database"],
)
def test_a_database_locked_by_another_connection_is_kept_and_opening_fails_after_the_timeout(
    tmp_path: Path, fast_busy_timeout: float, journal_mode: str
) -> None:
    directory = tmp_path / "state"
    path = populated(directory, batches=20)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        if journal_mode == "delete":
            holder.execute("PRAGMA journal_mode=DELETE")
        else:
            holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("SELECT count(*) FROM spool").fetchone()
        before = path.read_bytes()

        started = time.monotonic()
        with pytest.raises(StateError) as refused:
            StateStore(directory)
        waited = time.monotonic() - started

        message = str(refused.value)
        assert "locked" in message
        assert "kept as it is" in message
        assert str(path) in message
        assert waited >= fast_busy_timeout * 0.9
        assert waited < 5
        assert path.read_bytes() == before
        assert aside_files(directory) == []
    finally:
        holder.close()
    state = StateStore(directory)  # the lock is gone: the same file opens with its rows
    try:
        assert state.outbox("pramathus").totals().batches == 10
        assert state.set_aside is None
    finally:
        state.close()


def test_a_writer_holding_the_wal_database_lets_it_open_but_writes_fail_busy(
    tmp_path: Path, fast_busy_timeout: float
) -> None:
    directory = tmp_path / "state"
    path = populated(directory, batches=6)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        state = StateStore(directory)
        try:
            assert state.set_aside is None
            assert state.outbox("pramathus").totals().batches == 3  # readers go through
            with pytest.raises(sqlite3.OperationalError) as busy, state.transaction():
                state.save(LabelRecord(run_id_length=3))
            assert not is_corruption(busy.value)
            assert busy.value.sqlite_errorname == "SQLITE_BUSY"
        finally:
            state.close()
    finally:
        holder.close()
    assert aside_files(directory) == []


def test_a_schema_version_newer_than_known_is_a_state_error_and_the_file_is_kept(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    path = populated(directory, batches=3)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    before = path.read_bytes()

    with pytest.raises(StateError, match=rf"schema version {SCHEMA_VERSION + 1} is newer"):
        StateStore(directory)

    assert path.read_bytes() == before
    assert aside_files(directory) == []
    # The failed open released the directory lock.
    Database(directory.parent / "other").close()
    with pytest.raises(StateError, match="newer"):
        StateStore(directory)


# ---------------------------------------------------------------- transactions


def test_a_write_that_fails_inside_a_transaction_rolls_everything_back(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    with store.transaction():
        store.save(LabelRecord(run_id_length=5))

    def cycle_that_fails_after_writing() -> None:
        with store.transaction():
            store.save(LabelRecord(run_id_length=6))
            outbox.add([entry("k", 3)])
            store.ledger.series([("run", "loss")])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cycle_that_fails_after_writing()

    assert store.load(LabelRecord).run_id_length == 5
    assert outbox.totals().batches == 0
    assert store.ledger.series_count() == 0
    assert not store.db.conn.in_transaction
    with store.transaction():  # and the next transaction starts cleanly
        store.save(LabelRecord(run_id_length=7))
    assert store.load(LabelRecord).run_id_length == 7


def test_a_failing_statement_inside_a_transaction_undoes_the_statements_before_it(
    store: StateStore,
) -> None:
    store.ledger.register_sink("pramathus", 1)

    def save_then_register_again() -> None:
        with store.transaction():
            store.save(LabelRecord(run_id_length=4))
            store.ledger.register_sink("pramathus", 2)  # already registered

    with pytest.raises(sqlite3.IntegrityError):
        save_then_register_again()
    assert store.load(LabelRecord) == LabelRecord()
    assert store.ledger.sinks() == {"pramathus": 1}


def test_a_committed_transaction_survives_reopening(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    state = StateStore(directory)
    with state.transaction():
        state.save(LabelRecord(run_id_length=11))
        state.outbox("pramathus").add([entry("k", 2)])
    state.close()
    state = StateStore(directory)
    try:
        assert state.load(LabelRecord).run_id_length == 11
        assert state.outbox("pramathus").totals().points == 2
    finally:
        state.close()


def test_a_disk_full_write_inside_a_transaction_surfaces_the_disk_full_error(
    store: StateStore,
) -> None:
    conn = store.db.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages + 3}")  # the disk fills up after 3 pages
    outbox = store.outbox("pramathus")
    with pytest.raises(sqlite3.OperationalError, match="full"), store.transaction():
        outbox.add([entry(f"k{i}", 1, 5000) for i in range(20)])
    assert outbox.totals().batches == 0


# ---------------------------------------------------------------- reader


def test_the_reader_sees_committed_data_while_the_writer_holds_an_open_transaction(
    store: StateStore,
) -> None:
    from exporter.model import Experiment

    store.mirror.set_experiments([Experiment("1", "committed")], 1)
    reader = store.reader()
    try:
        with store.transaction():
            store.mirror.set_experiments([Experiment("1", "renamed, not yet committed")], 2)
            started = time.monotonic()
            assert [e.name for e in reader.experiments()] == ["committed"]
            assert time.monotonic() - started < 1  # read at once, not after a busy wait
        assert [e.name for e in reader.experiments()] == ["renamed, not yet committed"]
    finally:
        reader.conn.close()


def test_the_reader_cannot_write(store: StateStore) -> None:
    reader = store.reader()
    try:
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader.mark_synced(["1"])
    finally:
        reader.conn.close()


@pytest.mark.parametrize("name", ["state#1", "state?1", "state%41"])
def test_the_reader_opens_the_state_database_whatever_the_directory_is_called(
    tmp_path: Path, name: str
) -> None:
    from exporter.model import Experiment

    state = StateStore(tmp_path / name)
    try:
        state.mirror.set_experiments([Experiment("1", "seen")], 1)
        reader = state.reader()
        try:
            assert [e.name for e in reader.experiments()] == ["seen"]
        finally:
            reader.conn.close()
    finally:
        state.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


# ---------------------------------------------------------------- is_corruption


def _error_of(path: Path, sql: str) -> sqlite3.Error:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql).fetchall()
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError(f"{sql} did not fail")


def test_is_corruption_is_true_for_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"not a database " * 100)
    exc = _error_of(path, "PRAGMA quick_check")
    assert exc.sqlite_errorname == "SQLITE_NOTADB"
    assert is_corruption(exc)


def test_is_corruption_is_true_for_damaged_pages(tmp_path: Path) -> None:
    path = populated(tmp_path / "state")
    damage(path)
    exc = _error_of(path, "PRAGMA quick_check")
    assert exc.sqlite_errorname == "SQLITE_CORRUPT"
    assert is_corruption(exc)


def test_is_corruption_is_false_for_busy_constraint_and_schema_errors(tmp_path: Path) -> None:
    path = tmp_path / "ok.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE t (x PRIMARY KEY)")
    conn.execute("INSERT INTO t VALUES (1)")
    conn.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as busy:
            other.execute("SELECT * FROM t").fetchall()
    finally:
        other.close()
        conn.execute("ROLLBACK")
    with pytest.raises(sqlite3.IntegrityError) as constraint:
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(sqlite3.OperationalError) as missing:
        conn.execute("SELECT * FROM nowhere")
    conn.close()

    assert busy.value.sqlite_errorname == "SQLITE_BUSY"
    assert not is_corruption(busy.value)
    assert not is_corruption(constraint.value)
    assert not is_corruption(missing.value)
    assert not is_corruption(sqlite3.DatabaseError("made by hand, no error name"))


# ---------------------------------------------------------------- a state file that is gone


def queued_keys(state: StateStore) -> list[str]:
    return [b.idempotency_key for b in state.outbox("pramathus").batches()]


def queue_one(state: StateStore, key: str) -> None:
    with state.transaction():
        state.outbox("pramathus").add([entry(key)])


def test_state_files_are_private_to_the_user(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state")
    queue_one(state, "k")
    state.close()

    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / FILE).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state" / "exporter.lock").stat().st_mode & 0o777 == 0o600


def test_an_existing_state_file_is_made_private_on_open(tmp_path: Path) -> None:
    path = populated(tmp_path)
    path.chmod(0o644)

    StateStore(tmp_path).close()

    assert path.stat().st_mode & 0o777 == 0o600


def test_a_state_file_still_in_place_is_left_alone(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    try:
        assert state.ensure_file() is False
    finally:
        state.close()


def test_a_deleted_state_file_is_written_back_from_the_open_database(tmp_path: Path) -> None:
    state = StateStore(tmp_path / "state")
    queue_one(state, "before")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp_path / 'state' / FILE}{suffix}").unlink(missing_ok=True)

    assert state.ensure_file() is True
    queue_one(state, "after")  # writes go to the file on disk again
    state.close()

    reopened = StateStore(tmp_path / "state")
    try:
        assert queued_keys(reopened) == ["before", "after"]
        assert (tmp_path / "state" / FILE).stat().st_mode & 0o777 == 0o600
    finally:
        reopened.close()


def test_a_removed_state_directory_is_made_again_with_the_lock_retaken(tmp_path: Path) -> None:
    import shutil

    state = StateStore(tmp_path / "state")
    queue_one(state, "before")
    shutil.rmtree(tmp_path / "state")

    assert state.ensure_file() is True
    with pytest.raises(StateError, match="in use by another exporter process"):
        StateStore(tmp_path / "state")  # the lock is held again
    state.close()
    reopened = StateStore(tmp_path / "state")
    try:
        assert queued_keys(reopened) == ["before"]
    finally:
        reopened.close()


def test_a_replaced_state_file_is_overwritten_by_the_open_database(tmp_path: Path) -> None:
    state = StateStore(tmp_path)
    queue_one(state, "ours")
    other = tmp_path / "other.db"
    sqlite3.connect(other).close()
    other.replace(tmp_path / FILE)

    assert state.ensure_file() is True
    assert queued_keys(state) == ["ours"]
    state.close()


def test_another_process_holding_the_new_directory_stops_the_write_back(tmp_path: Path) -> None:
    import shutil

    state = StateStore(tmp_path / "state")
    shutil.rmtree(tmp_path / "state")
    second = StateStore(tmp_path / "state")  # another exporter started on the empty dir
    try:
        with pytest.raises(StateError, match="in use by another exporter process"):
            state.ensure_file()
    finally:
        second.close()
        state.close()


def test_a_state_directory_that_is_a_file_is_refused_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("not a directory", encoding="utf-8")
    with pytest.raises(StateError) as refused:
        Database(path)
    assert str(refused.value) == (
        f"state directory {path} is a file, not a directory: move it away, or set "
        "EXPORTER_STATE_DIR (or --state-dir) to a directory"
    )
    assert path.read_text(encoding="utf-8") == "not a directory"


@pytest.mark.parametrize(
    ("error", "step"),
    [
        ("attempt to write a readonly database", "writable by the exporter's user"),
        ("database or disk is full", "free space on its disk"),
        ("disk I/O error", "ulimit -f"),
        ("database is locked", "another program holds it"),
        ("something new", "fix the cause; the state is kept as it is"),
    ],
)
def test_every_passing_sqlite_error_is_explained_with_the_file_and_a_next_step(
    tmp_path: Path, error: str, step: str
) -> None:
    line = explain(tmp_path / "state.db", sqlite3.OperationalError(error))
    assert line.startswith(f"state database {tmp_path / 'state.db'}: {error}; ")
    assert step in line


def test_a_large_state_gets_a_cheap_start_check_and_a_full_one_after_a_cycle_met_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    path = populated(directory)
    damage(path)
    monkeypatch.setattr(db_module, "FULL_CHECK_MAX_BYTES", 1024)  # "large" from 1 KiB on

    cheap = StateStore(directory)  # header and schema are sound: no page-by-page check
    assert cheap.set_aside is None
    cheap.suspect()  # what the runner does when a cycle meets SQLITE_CORRUPT
    cheap.close()
    assert (directory / db_module.SUSPECT).exists()

    checked = StateStore(directory, clock=FakeClock(1_700_000_000.0))
    checked.close()
    assert checked.set_aside == directory / f"{FILE}.corrupt-1700000000000"
    assert not (directory / db_module.SUSPECT).exists()


def test_a_sound_state_checked_in_full_clears_the_suspicion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    populated(directory)
    monkeypatch.setattr(db_module, "FULL_CHECK_MAX_BYTES", 1024)
    (directory / db_module.SUSPECT).touch()
    state = StateStore(directory)
    state.close()
    assert state.set_aside is None
    assert not (directory / db_module.SUSPECT).exists()


def test_a_garbage_header_is_found_by_the_cheap_check_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    (directory / FILE).write_bytes(b"not a database" * 1000)
    monkeypatch.setattr(db_module, "FULL_CHECK_MAX_BYTES", 1024)
    state = StateStore(directory, clock=FakeClock(1_700_000_000.0))
    state.close()
    assert state.set_aside == directory / f"{FILE}.corrupt-1700000000000"
