"""Unit tests for exporter.state.outbox: per-sink FIFO queues of captured batches, retries,
splits, trimming and set-aside batches. A real state database under `tmp_path`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import pytest

from exporter.model import CapturedBatch, MetricPoint
from exporter.state import StateStore, captured
from exporter.state.outbox import Outbox, QueuedBatch, QueueEntry, QueueTotals


def batch(key: str, points: int = 1, created_ms: int = 0) -> QueueEntry:
    """An entry whose one point's metric key is `key` (to tell bodies apart)."""
    point = MetricPoint("run-a", key, 0.5, 1, 1_000)
    return QueueEntry(key, points, CapturedBatch((point,), created_ms=created_ms))


def queue(outbox: Outbox, entries: Sequence[QueueEntry], created_ms: int) -> list[int]:
    """Queue entries captured at `created_ms`."""
    return outbox.add([replace(e, batch=replace(e.batch, created_ms=created_ms)) for e in entries])


def body(key: str, created_ms: int = 0) -> bytes:
    """The stored body of `batch(key)` captured at `created_ms`."""
    return captured.dumps(replace(batch(key).batch, created_ms=created_ms))


def keys(outbox: Outbox) -> list[str]:
    return [b.idempotency_key for b in outbox.batches()]


def spool_row(store: StateStore, batch_id: int) -> tuple[object, ...]:
    row: tuple[object, ...] = store.db.conn.execute(
        "SELECT sink, created_ms, attempts, last_error FROM spool WHERE id = ?", (batch_id,)
    ).fetchone()
    return row


def dead_letters(store: StateStore) -> list[tuple[object, ...]]:
    return store.db.conn.execute(
        "SELECT sink, idempotency_key, created_ms, failed_ms, points, body, status, error, "
        "reason, form FROM dead_letter ORDER BY failed_ms, idempotency_key"
    ).fetchall()


# ---------------------------------------------------------------- queueing


def test_batches_come_out_oldest_first(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    queue(outbox, [batch("a", 2), batch("b", 3)], created_ms=10)
    queue(outbox, [batch("c")], created_ms=5)  # queued later, served later, whatever its time
    queued = list(outbox.batches())
    assert [b.idempotency_key for b in queued] == ["a", "b", "c"]
    assert queued[0] == QueuedBatch(queued[0].id, "a", 2, body("a", 10), 0, "captured")
    assert queued[0].captured() == replace(batch("a").batch, created_ms=10)
    assert queued[0].id < queued[1].id < queued[2].id
    assert spool_row(store, queued[0].id) == ("pramathus", 10, 0, None)


def test_sinks_have_separate_queues(store: StateStore) -> None:
    one, two = store.outbox("one"), store.outbox("two")
    queue(one, [batch("1a"), batch("1b")], created_ms=1)
    queue(two, [batch("2a")], created_ms=1)
    queue(one, [batch("1c")], created_ms=1)
    assert keys(one) == ["1a", "1b", "1c"]
    assert keys(two) == ["2a"]
    assert one.totals() == QueueTotals(3, 3)
    assert two.totals() == QueueTotals(1, 1)


def test_batches_can_be_acknowledged_while_iterating(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    queue(outbox, [batch(k) for k in "abcd"], created_ms=1)
    seen = []
    for queued in outbox.batches():
        seen.append(queued.idempotency_key)
        outbox.done(queued.id)
        if queued.idempotency_key == "b":
            queue(outbox, [batch("e")], created_ms=2)
    assert seen == ["a", "b", "c", "d", "e"]
    assert outbox.totals() == QueueTotals(0, 0)


def test_done_removes_just_that_batch(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    queue(outbox, [batch("a"), batch("b"), batch("c")], created_ms=1)
    middle = list(outbox.batches())[1]
    outbox.done(middle.id)
    assert keys(outbox) == ["a", "c"]


def test_failed_counts_attempts_and_keeps_the_last_error_cut_to_500_characters(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    queue(outbox, [batch("a"), batch("b")], created_ms=1)
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
    queue(outbox, [batch("a", 4), batch("b")], created_ms=10)
    rejected = next(outbox.batches())
    outbox.set_aside(rejected, failed_ms=99, reason="rejected", status=422, error="e" * 600)
    assert keys(outbox) == ["b"]
    assert dead_letters(store) == [
        ("pramathus", "a", 10, 99, 4, body("a", 10), 422, "e" * 500, "rejected", "captured"),
    ]
    assert outbox.set_aside_counts() == {"rejected": QueueTotals(1, 4)}


def test_set_aside_new_keeps_a_batch_that_was_never_queued(store: StateStore) -> None:
    outbox = store.outbox("remote_write")
    outbox.set_aside_new(batch("old", 7, 40), failed_ms=50, reason="too_old", error="too old")
    assert outbox.totals() == QueueTotals(0, 0)
    assert dead_letters(store) == [
        ("remote_write", "old", 40, 50, 7, body("old", 40), None, "too old", "too_old", "captured"),
    ]


def test_set_aside_counts_are_by_reason_and_per_sink(store: StateStore) -> None:
    one, two = store.outbox("one"), store.outbox("two")
    queue(one, [batch("a", 2), batch("b", 3), batch("c", 5)], created_ms=1)
    queue(two, [batch("d", 11)], created_ms=1)
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
        queue(outbox, [batch("queued", 2)], created_ms=1)
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
    queue(outbox, [batch("big", 10)], created_ms=7)
    queue(outbox, [batch("next", 1)], created_ms=8)
    big = next(outbox.batches())
    outbox.failed(big.id, "too large")

    parts = outbox.replace(big, [batch("big-1", 6), batch("big-2", 4)])

    assert keys(outbox) == ["next", "big-1", "big-2"]
    assert [(p.idempotency_key, p.points, p.body, p.attempts) for p in parts] == [
        ("big-1", 6, body("big-1"), 0),
        ("big-2", 4, body("big-2"), 0),
    ]
    assert list(outbox.batches())[1:] == parts
    assert [spool_row(store, p.id) for p in parts] == [("pramathus", 7, 0, None)] * 2
    assert outbox.totals() == QueueTotals(3, 11)


def test_replace_with_no_parts_just_removes_the_batch(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    queue(outbox, [batch("a"), batch("b")], created_ms=1)
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
    queue(outbox, [batch("a", 2), batch("b", 3), batch("c", 4), batch("d", 3)], created_ms=1)
    queue(other, [batch("o", 100)], created_ms=1)

    assert outbox.trim(max_points=7, oldest_first=oldest_first) == dropped

    assert keys(outbox) == left
    assert outbox.totals().points <= 7
    assert other.totals() == QueueTotals(1, 100)


def test_trim_drops_nothing_at_or_under_the_bound_and_everything_for_a_bound_of_zero(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    queue(outbox, [batch("a", 2), batch("b", 3)], created_ms=1)
    assert outbox.trim(max_points=5, oldest_first=True) == 0
    assert keys(outbox) == ["a", "b"]
    assert outbox.trim(max_points=0, oldest_first=False) == 5
    assert outbox.totals() == QueueTotals(0, 0)
    assert outbox.trim(max_points=-1, oldest_first=True) == 0


def test_totals_count_batches_and_points_of_the_queue_only(store: StateStore) -> None:
    outbox = store.outbox("pramathus")
    assert outbox.totals() == QueueTotals(0, 0)
    queue(outbox, [batch("a", 2), batch("b", 3), batch("c", 4)], created_ms=1)
    outbox.set_aside(next(outbox.batches()), 1, "rejected", 400, "bad")
    assert outbox.totals() == QueueTotals(2, 7)


def test_clear_forgets_the_queue_returns_what_it_held_and_keeps_set_aside_batches(
    store: StateStore,
) -> None:
    outbox = store.outbox("pramathus")
    other = store.outbox("other")
    queue(outbox, [batch("a", 2), batch("b", 3), batch("c", 4)], created_ms=1)
    queue(other, [batch("o", 1)], created_ms=1)
    outbox.set_aside(next(outbox.batches()), 1, "rejected", 400, "bad")

    assert outbox.clear() == QueueTotals(2, 7)

    assert outbox.totals() == QueueTotals(0, 0)
    assert outbox.set_aside_counts() == {"rejected": QueueTotals(1, 2)}
    assert other.totals() == QueueTotals(1, 1)
    assert outbox.clear() == QueueTotals(0, 0)


# ---------------------------------------------------------------- the stored form


def test_a_wire_row_of_an_older_version_is_read_as_such_and_replayed_as_such(
    store: StateStore,
) -> None:
    conn = store.db.conn
    conn.execute(
        "INSERT INTO spool (sink, idempotency_key, created_ms, points, body) "
        "VALUES ('pramathus', 'old', 1, 2, x'7b7d')"
    )
    outbox = store.outbox("pramathus")
    queue(outbox, [batch("new")], created_ms=2)
    old, new = outbox.batches()
    assert (old.form, old.body, old.captured()) == ("wire", b"{}", None)
    assert new.form == "captured"

    outbox.set_aside(old, 3, "rejected", 400, "bad")
    outbox.set_aside(new, 3, "rejected", 400, "bad")
    assert {row[1]: row[-1] for row in dead_letters(store)} == {"old": "wire", "new": "captured"}
    outbox.replay()

    assert [(b.idempotency_key, b.form) for b in outbox.batches()] == [
        ("old", "wire"),
        ("new", "captured"),
    ]
