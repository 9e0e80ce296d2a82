"""Unit tests for a state disk with no room left: the room a delivery's record needs is
taken before the batch is sent (exporter.state.db.reserve_wal through Outbox.claim), and a
disk error names the OS error behind it (exporter.state.db.os_cause).

No fake: a real file size limit (RLIMIT_FSIZE, `ulimit -f`) on this test process, lowered
only around the statement under test and restored at once. CPython ignores SIGXFSZ, so a
write past the limit fails with EFBIG, which SQLite reports as "disk I/O error".
"""

from __future__ import annotations

import errno
import os
import resource
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from exporter.state import StateError, StateStore
from exporter.state.db import _frames_in_use, explain, os_cause, reserve_wal
from exporter.state.outbox import QueuedBatch
from tests.support.planned import entry

BIG_BODY = 20_000  # stored bytes: a few overflow pages, as a real batch of a few dozen points


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def largest_file(store: StateStore) -> int:
    return max(p.stat().st_size for p in store.path.parent.iterdir())


def queued(store: StateStore) -> QueuedBatch:
    outbox = store.outbox("pramathus")
    outbox.add([entry("key-1", 40, BIG_BODY)])
    return next(outbox.batches())


def test_a_claimed_batch_can_be_marked_delivered_when_no_file_may_grow(
    store: StateStore,
) -> None:
    batch = queued(store)
    outbox = store.outbox("pramathus")
    outbox.claim(batch)

    with file_size_limit(largest_file(store)):
        outbox.done(batch.id)  # the room was taken by the claim: nothing has to grow

    assert list(outbox.batches()) == []


def test_a_claim_without_room_for_its_record_fails_naming_the_file_and_the_os_error(
    store: StateStore,
) -> None:
    batch = queued(store)
    outbox = store.outbox("pramathus")

    with file_size_limit(largest_file(store)), pytest.raises(StateError) as failed:
        outbox.claim(batch)

    assert str(store.path) in str(failed.value)
    assert "[Errno 27] File too large" in str(failed.value)
    assert "nothing is sent" in str(failed.value)
    assert list(outbox.batches()) == [batch]  # still queued, as it was


def test_taking_room_again_does_not_grow_the_wal_past_what_is_in_use(
    store: StateStore,
) -> None:
    batch = queued(store)
    outbox = store.outbox("pramathus")
    outbox.claim(batch)
    wal = Path(f"{store.path}-wal")
    size = wal.stat().st_size

    for _ in range(20):  # claims that write nothing new need no more room
        reserve_wal(store.db.conn, 4)

    assert wal.stat().st_size == size


def test_an_in_memory_database_needs_no_room() -> None:
    reserve_wal(sqlite3.connect(":memory:"), 10)  # nothing to reserve, nothing raised


def test_frames_in_use_fall_back_to_the_wal_size_when_the_index_cannot_be_read(
    tmp_path: Path,
) -> None:
    db = tmp_path / "state.db"
    Path(f"{db}-wal").write_bytes(b"\0" * (3 * (4096 + 24) + 32))
    assert _frames_in_use(db, 4096) == 4  # no -shm: the file's size in frames, rounded up
    Path(f"{db}-shm").write_bytes(b"\0" * 32)  # not initialised (isInit 0)
    assert _frames_in_use(db, 4096) == 4


def test_a_disk_error_is_explained_with_the_os_error_behind_it(store: StateStore) -> None:
    conn = store.db.conn
    with file_size_limit(largest_file(store)), pytest.raises(sqlite3.OperationalError) as err:
        conn.execute("INSERT INTO record (name, value) VALUES ('big', ?)", ("y" * 200_000,))

    with file_size_limit(largest_file(store)):
        message = explain(store.path, err.value)

    assert "disk I/O error" in message
    assert "[Errno 27] File too large" in message
    assert str(store.path) in message
    assert explain(store.path, sqlite3.OperationalError("database is locked")).count("Errno") == 0
    assert os_cause(store.path) is None  # without the limit the OS grants the room
    assert not Path(f"{store.path}.room").exists()


def test_a_state_that_cannot_be_opened_for_lack_of_room_says_the_os_error(
    tmp_path: Path,
) -> None:
    StateStore(tmp_path / "state").close()

    with file_size_limit(0), pytest.raises(StateError) as failed:
        StateStore(tmp_path / "state")

    assert "[Errno 27] File too large" in str(failed.value)
    assert os.fspath(tmp_path / "state" / "state.db") in str(failed.value)


def test_a_file_system_that_cannot_allocate_ahead_still_lets_the_claim_through(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = queued(store)
    outbox = store.outbox("pramathus")

    def unsupported(fd: int, offset: int, length: int) -> None:
        # Imitates a file system without fallocate (glibc answers EOPNOTSUPP there).
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(os, "posix_fallocate", unsupported)
    outbox.claim(batch)  # no room taken ahead; the claim's own write still has to succeed
    outbox.done(batch.id)

    assert list(outbox.batches()) == []
