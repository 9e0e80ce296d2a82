"""Unit tests for exporter.state.outbox: per-sink FIFO queues of encoded batches, retries,
splits, trimming and set-aside batches. A real state database under `tmp_path`."""

from __future__ import annotations

import pytest

from exporter.state import StateStore
from exporter.state.outbox import EncodedBatch, Outbox, QueuedBatch, QueueTotals


def batch(key: str, points: int = 1) -> EncodedBatch:
    return EncodedBatch(key, points, f"body of {key}".encode())


def keys(outbox: Outbox) -> list[str]:
    return [b.idempotency_key for b in outbox.batches()]


def spool_row(store: StateStore, batch_id: int) -> tuple[object, ...]:
    row: tuple[object, ...] = store.db.conn.execute(
        "SELECT sink, created_ms, attempts, last_error FROM spool WHERE id = ?", (batch_id,)
    ).fetchone()
    return row


def dead_letters(store: StateStore) -> list[tuple[object, ...]]:
    return store.db.conn.execute(
        "SELECT sink, idempotency_key, created_ms, failed_ms, points, body, status, error, reason "
        "FROM dead_letter ORDER BY failed_ms, idempotency_key"
    ).fetchall()


# ---------------------------------------------------------------- queueing


def test_batches_come_out_oldest_first(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("a", 2), batch("b", 3)], created_ms=10)
    outbox.add([batch("c")], created_ms=5)  # queued later, served later, whatever its time
    queued = list(outbox.batches())
    assert [b.idempotency_key for b in queued] == ["a", "b", "c"]
    assert queued[0] == QueuedBatch(queued[0].id, "a", 2, b"body of a", 0)
    assert queued[0].id < queued[1].id < queued[2].id
    assert spool_row(store, queued[0].id) == ("pramathus", 10, 0, None)


def test_sinks_have_separate_queues(store: StateStore) -> None:
    one, two = store.outbox("one"), store.outbox("two")
    one.add([batch("1a"), batch("1b")], created_ms=1)
    two.add([batch("2a")], created_ms=1)
    one.add([batch("1c")], created_ms=1)
    assert keys(one) == ["1a", "1b", "1c"]
    assert keys(two) == ["2a"]
    assert one.totals() == QueueTotals(3, 3)
    assert two.totals() == QueueTotals(1, 1)


def test_batches_can_be_acknowledged_while_iterating(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch(k) for k in "abcd"], created_ms=1)
    seen = []
    for queued in outbox.batches():
        seen.append(queued.idempotency_key)
        outbox.done(queued.id)
        if queued.idempotency_key == "b":
            outbox.add([batch("e")], created_ms=2)
    assert seen == ["a", "b", "c", "d", "e"]
    assert outbox.totals() == QueueTotals(0, 0)


def test_done_removes_just_that_batch(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("a"), batch("b"), batch("c")], created_ms=1)
    middle = list(outbox.batches())[1]
    outbox.done(middle.id)
    assert keys(outbox) == ["a", "c"]


def test_failed_counts_attempts_and_keeps_the_last_error_cut_to_500_characters(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("a"), batch("b")], created_ms=1)
    first = next(outbox.batches())
    outbox.failed(first.id, "HTTP 503")
    outbox.failed(first.id, "x" * 499 + "yz" + "tail" * 100)
    again = next(outbox.batches())
    assert again.id == first.id  # a failed batch stays at the head of the queue
    assert again.attempts == 2
    _, _, attempts, last_error = spool_row(store, first.id)
    assert attempts == 2
    assert last_error == "x" * 499 + "y"
    assert [b.attempts for b in outbox.batches()] == [2, 0]


# ---------------------------------------------------------------- setting aside


def test_set_aside_moves_a_batch_out_of_the_queue_keeping_body_reason_and_status(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("a", 4), batch("b")], created_ms=10)
    rejected = next(outbox.batches())
    outbox.set_aside(rejected, failed_ms=99, reason="rejected", status=422, error="e" * 600)
    assert keys(outbox) == ["b"]
    assert dead_letters(store) == [
        ("pramathus", "a", 10, 99, 4, b"body of a", 422, "e" * 500, "rejected"),
    ]
    assert outbox.set_aside_counts() == {"rejected": QueueTotals(1, 4)}


def test_set_aside_new_keeps_a_batch_that_was_never_queued(store: StateStore) -> None:
    outbox = store.outbox("remote_write")
    outbox.set_aside_new(batch("old", 7), failed_ms=50, reason="too_old", error="too old")
    assert outbox.totals() == QueueTotals(0, 0)
    assert dead_letters(store) == [
        ("remote_write", "old", 50, 50, 7, b"body of old", None, "too old", "too_old"),
    ]


def test_set_aside_counts_are_by_reason_and_per_sink(store: StateStore) -> None:
    one, two = store.outbox("one"), store.outbox("two")
    one.add([batch("a", 2), batch("b", 3), batch("c", 5)], created_ms=1)
    two.add([batch("d", 11)], created_ms=1)
    a, b, _ = list(one.batches())
    one.set_aside(a, 2, "rejected", 400, "bad")
    one.set_aside(b, 2, "too_large", 413, "big")
    one.set_aside_new(batch("e", 7), 3, "rejected", "bad")
    two.set_aside(next(two.batches()), 2, "rejected", 400, "bad")
    assert one.set_aside_counts() == {
        "rejected": QueueTotals(2, 9),
        "too_large": QueueTotals(1, 3),
    }
    assert two.set_aside_counts() == {"rejected": QueueTotals(1, 11)}
    assert store.outbox("three").set_aside_counts() == {}


def test_a_queued_batch_can_be_set_aside_after_a_never_queued_one_was(store: StateStore) -> None:
    outbox = store.outbox("remote_write")
    with store.transaction():
        outbox.add([batch("queued", 2)], created_ms=1)
        outbox.set_aside_new(batch("too-old", 3), failed_ms=5, reason="too_old", error="old")
    queued = next(outbox.batches())
    with store.transaction():
        outbox.set_aside(queued, failed_ms=6, reason="rejected", status=400, error="bad")
    assert outbox.totals() == QueueTotals(0, 0)
    assert outbox.set_aside_counts() == {
        "too_old": QueueTotals(1, 3),
        "rejected": QueueTotals(1, 2),
    }


# ---------------------------------------------------------------- splitting


def test_replace_puts_the_parts_at_the_end_of_the_queue_with_the_original_creation_time(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("big", 10)], created_ms=7)
    outbox.add([batch("next", 1)], created_ms=8)
    big = next(outbox.batches())
    outbox.failed(big.id, "too large")

    parts = outbox.replace(big, [batch("big-1", 6), batch("big-2", 4)])

    assert keys(outbox) == ["next", "big-1", "big-2"]
    assert [(p.idempotency_key, p.points, p.body, p.attempts) for p in parts] == [
        ("big-1", 6, b"body of big-1", 0),
        ("big-2", 4, b"body of big-2", 0),
    ]
    assert list(outbox.batches())[1:] == parts
    assert [spool_row(store, p.id) for p in parts] == [("pramathus", 7, 0, None)] * 2
    assert outbox.totals() == QueueTotals(3, 11)


def test_replace_with_no_parts_just_removes_the_batch(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("a"), batch("b")], created_ms=1)
    assert outbox.replace(next(outbox.batches()), []) == []
    assert keys(outbox) == ["b"]


# ---------------------------------------------------------------- bounding the queue


@pytest.mark.parametrize(
    ("oldest_first", "left", "dropped"),
    [(True, ["c", "d"], 5), (False, ["a", "b"], 7)],
    ids=["drop-oldest", "drop-newest"],
)
def test_trim_drops_whole_batches_from_one_end_until_under_the_bound(
    store: StateStore, oldest_first: bool, left: list[str], dropped: int
) -> None:
    outbox = store.outbox("pramathus")
    other = store.outbox("other")
    outbox.add([batch("a", 2), batch("b", 3), batch("c", 4), batch("d", 3)], created_ms=1)
    other.add([batch("o", 100)], created_ms=1)

    assert outbox.trim(max_points=7, oldest_first=oldest_first) == dropped

    assert keys(outbox) == left
    assert outbox.totals().points <= 7
    assert other.totals() == QueueTotals(1, 100)


def test_trim_drops_nothing_at_or_under_the_bound_and_everything_for_a_bound_of_zero(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    outbox.add([batch("a", 2), batch("b", 3)], created_ms=1)
    assert outbox.trim(max_points=5, oldest_first=True) == 0
    assert keys(outbox) == ["a", "b"]
    assert outbox.trim(max_points=0, oldest_first=False) == 5
    assert outbox.totals() == QueueTotals(0, 0)
    assert outbox.trim(max_points=-1, oldest_first=True) == 0


def test_totals_count_batches_and_points_of_the_queue_only(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    assert outbox.totals() == QueueTotals(0, 0)
    outbox.add([batch("a", 2), batch("b", 3), batch("c", 4)], created_ms=1)
    outbox.set_aside(next(outbox.batches()), 1, "rejected", 400, "bad")
    assert outbox.totals() == QueueTotals(2, 7)


def test_clear_forgets_the_queue_returns_what_it_held_and_keeps_set_aside_batches(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    other = store.outbox("other")
    outbox.add([batch("a", 2), batch("b", 3), batch("c", 4)], created_ms=1)
    other.add([batch("o", 1)], created_ms=1)
    outbox.set_aside(next(outbox.batches()), 1, "rejected", 400, "bad")

    assert outbox.clear() == QueueTotals(2, 7)

    assert outbox.totals() == QueueTotals(0, 0)
    assert outbox.set_aside_counts() == {"rejected": QueueTotals(1, 2)}
    assert other.totals() == QueueTotals(1, 1)
    assert outbox.clear() == QueueTotals(0, 0)
