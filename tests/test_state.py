"""Unit tests for exporter.state.StateStore: durability, atomicity, corruption, locking."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.state import StateError, StateStore

from .fakes import FakeClock


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore(tmp_path / "state")
    yield s
    s.close()


def test_watermarks_persist_across_reopen(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    with first.transaction() as db:
        first.advance(db, [("run-a", "loss", 3, 1000), ("run-a", "acc", 7, 2000)])
    with first.transaction() as db:
        first.advance(db, [("run-a", "loss", 4, 1500)])  # moves an existing mark
    first.close()

    again = StateStore(tmp_path)
    try:
        assert again.watermarks() == {("run-a", "loss"): (4, 1500), ("run-a", "acc"): (7, 2000)}
    finally:
        again.close()


def test_spool_and_meta_persist_across_reopen(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    with first.transaction() as db:
        first.spool_add(db, "key-1", 1000, 2, b'{"a": 1}')
    first.set_meta("run_id_length", 13)
    first.close()

    again = StateStore(tmp_path)
    try:
        [batch] = list(again.spool_batches())
        assert (batch.idempotency_key, batch.points, batch.body) == ("key-1", 2, b'{"a": 1}')
        assert again.get_meta("run_id_length") == 13
        assert again.get_meta("absent", "fallback") == "fallback"
    finally:
        again.close()


def test_transaction_that_raises_rolls_back_spool_and_watermark_together(
    store: StateStore,
) -> None:
    class Boom(Exception):
        pass

    def spool_and_advance_then_fail() -> None:
        with store.transaction() as db:
            store.spool_add(db, "key-1", 1000, 1, b"{}")
            store.advance(db, [("run-a", "loss", 1, 1000)])
            assert store.spool_totals() == (1, 1)  # visible inside the transaction
            raise Boom

    with pytest.raises(Boom):
        spool_and_advance_then_fail()

    assert store.spool_totals() == (0, 0)
    assert store.watermarks() == {}
    # The store is still usable after the rollback.
    with store.transaction() as db:
        store.advance(db, [("run-a", "loss", 1, 1000)])
    assert store.watermarks() == {("run-a", "loss"): (1, 1000)}


def test_spool_batches_come_oldest_first_with_totals(store: StateStore) -> None:
    with store.transaction() as db:
        for n in range(3):
            store.spool_add(db, f"key-{n}", 1000 + n, n + 1, b"{}")
    assert [b.idempotency_key for b in store.spool_batches()] == ["key-0", "key-1", "key-2"]
    assert store.spool_totals() == (3, 6)


def test_spool_failed_counts_attempts_and_spool_done_removes(store: StateStore) -> None:
    with store.transaction() as db:
        store.spool_add(db, "key-1", 1000, 1, b"{}")
    [batch] = list(store.spool_batches())
    store.spool_failed(batch.id, "HTTP 503")
    store.spool_failed(batch.id, "HTTP 503")
    [batch] = list(store.spool_batches())
    assert batch.attempts == 2
    store.spool_done(batch.id)
    assert store.spool_totals() == (0, 0)


def test_dead_letter_moves_a_batch_out_of_the_spool(store: StateStore) -> None:
    with store.transaction() as db:
        store.spool_add(db, "key-1", 1000, 4, b"{}")
    [batch] = list(store.spool_batches())
    store.dead_letter(batch, 400, "bad request")
    assert store.spool_totals() == (0, 0)
    assert store.dead_letter_count() == 1


def test_corrupt_state_db_is_set_aside_and_a_fresh_one_works(tmp_path: Path) -> None:
    garbage = b"this is not an sqlite database\x00\xff" * 100
    (tmp_path / "state.db").write_bytes(garbage)

    store = StateStore(tmp_path, clock=FakeClock(1_700_000_000.5))
    try:
        aside = tmp_path / "state.db.corrupt-1700000000500"  # milliseconds
        assert store.set_aside == aside
        assert aside.read_bytes() == garbage  # kept intact for inspection
        assert store.watermarks() == {}
        with store.transaction() as db:
            store.advance(db, [("run-a", "loss", 1, 1000)])
        assert store.watermarks() == {("run-a", "loss"): (1, 1000)}
    finally:
        store.close()


def test_healthy_state_db_is_not_set_aside(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    store = StateStore(tmp_path)
    try:
        assert store.set_aside is None
        assert not list(tmp_path.glob("state.db.corrupt-*"))
    finally:
        store.close()


def test_second_store_on_the_same_directory_raises_state_error(store: StateStore) -> None:
    with pytest.raises(StateError, match="in use by another exporter process"):
        StateStore(store.directory)


def _open_lock_files(directory: Path) -> int:
    lock = str(directory / "exporter.lock")
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if _readlink(fd) == lock)


def _readlink(fd: Path) -> str:
    try:
        return str(fd.readlink())
    except OSError:
        return ""


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_refused_second_store_closes_its_lock_file(store: StateStore) -> None:
    assert _open_lock_files(store.directory) == 1
    with pytest.raises(StateError) as info:
        StateStore(store.directory)
    # While the error is still being handled (as a caller would), no extra handle is open.
    assert _open_lock_files(store.directory) == 1, info.value


def test_lock_is_released_when_the_store_is_closed(tmp_path: Path) -> None:
    StateStore(tmp_path).close()
    StateStore(tmp_path).close()


def test_unusable_state_directory_raises_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StateError, match="not usable"):
        StateStore(blocker / "state")
