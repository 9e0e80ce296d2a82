"""Delivery queues: one durable queue of encoded batches per sink, and what was set aside.

A batch is written in the same transaction that records its points as captured, so a point
is either still to be read from MLflow or safely queued. It leaves the queue only when its
sink acknowledged it, or when it can never succeed: then it moves to `dead_letter` with a
reason, kept on disk for a human and counted, never retried.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """A request body ready to send, with the number of points it carries."""

    idempotency_key: str
    points: int
    body: bytes


@dataclass(frozen=True, slots=True)
class QueuedBatch:
    id: int
    idempotency_key: str
    points: int
    body: bytes
    attempts: int


@dataclass(frozen=True, slots=True)
class QueueTotals:
    batches: int
    points: int


class Outbox:
    """The queue and set-aside batches of one sink."""

    def __init__(self, conn: sqlite3.Connection, sink: str) -> None:
        self.conn = conn
        self.sink = sink

    def add(self, batches: Sequence[EncodedBatch], created_ms: int) -> None:
        """Queue batches behind everything already queued (call inside a transaction)."""
        self.conn.executemany(
            "INSERT INTO spool (sink, idempotency_key, created_ms, points, body) "
            "VALUES (?, ?, ?, ?, ?)",
            [(self.sink, b.idempotency_key, created_ms, b.points, b.body) for b in batches],
        )

    def batches(self) -> Iterator[QueuedBatch]:
        """Queued batches, oldest first, fetched one at a time (the queue may be large)."""
        last = 0
        while True:
            row = self.conn.execute(
                "SELECT id, idempotency_key, points, body, attempts FROM spool "
                "WHERE sink = ? AND id > ? ORDER BY id LIMIT 1",
                (self.sink, last),
            ).fetchone()
            if row is None:
                return
            last = row[0]
            yield QueuedBatch(*row)

    def done(self, batch_id: int) -> None:
        self.conn.execute("DELETE FROM spool WHERE id = ?", (batch_id,))

    def failed(self, batch_id: int, error: str) -> None:
        self.conn.execute(
            "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE id = ?",
            (error[:500], batch_id),
        )

    def replace(self, batch: QueuedBatch, parts: Sequence[EncodedBatch]) -> list[QueuedBatch]:
        """Queue `parts` instead of `batch` (what is left of a batch that was split).

        They go to the end of the queue: ids only grow, and a split part that must wait
        is not worth reordering everything behind it.
        """
        created = self.conn.execute(
            "SELECT created_ms FROM spool WHERE id = ?", (batch.id,)
        ).fetchone()
        self.conn.execute("DELETE FROM spool WHERE id = ?", (batch.id,))
        out = []
        for part in parts:
            cur = self.conn.execute(
                "INSERT INTO spool (sink, idempotency_key, created_ms, points, body) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    self.sink,
                    part.idempotency_key,
                    created[0] if created else 0,
                    part.points,
                    part.body,
                ),
            )
            out.append(
                QueuedBatch(
                    int(cur.lastrowid or 0), part.idempotency_key, part.points, part.body, 0
                )
            )
        return out

    def set_aside(
        self, batch: QueuedBatch, failed_ms: int, reason: str, status: int | None, error: str
    ) -> None:
        """Move a batch that can never succeed out of the queue, keeping it for a human."""
        self.conn.execute(
            "INSERT INTO dead_letter (sink, idempotency_key, created_ms, failed_ms, points, "
            "body, status, error, reason) SELECT sink, idempotency_key, created_ms, ?, "
            "points, body, ?, ?, ? FROM spool WHERE id = ?",
            (failed_ms, status, error[:500], reason, batch.id),
        )
        self.conn.execute("DELETE FROM spool WHERE id = ?", (batch.id,))

    def set_aside_new(self, batch: EncodedBatch, failed_ms: int, reason: str, error: str) -> None:
        """Set aside a batch that was never queued (e.g. samples too old to send at all)."""
        self.conn.execute(
            "INSERT INTO dead_letter (sink, idempotency_key, created_ms, failed_ms, points, body, "
            "status, error, reason) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)",
            (
                self.sink,
                batch.idempotency_key,
                failed_ms,
                failed_ms,
                batch.points,
                batch.body,
                error[:500],
                reason,
            ),
        )

    def trim(self, max_points: int, oldest_first: bool) -> int:
        """Drop whole batches until at most `max_points` are queued; return points dropped."""
        dropped = 0
        order = "ASC" if oldest_first else "DESC"
        total = self.totals().points
        while total > max_points:
            row = self.conn.execute(
                f"SELECT id, points FROM spool WHERE sink = ? ORDER BY id {order} LIMIT 1",  # noqa: S608
                (self.sink,),
            ).fetchone()
            if row is None:
                break
            self.conn.execute("DELETE FROM spool WHERE id = ?", (row[0],))
            total -= row[1]
            dropped += row[1]
        return dropped

    def totals(self) -> QueueTotals:
        batches, points = self.conn.execute(
            "SELECT count(*), coalesce(sum(points), 0) FROM spool WHERE sink = ?", (self.sink,)
        ).fetchone()
        return QueueTotals(int(batches), int(points))

    def set_aside_counts(self) -> dict[str, QueueTotals]:
        """Set-aside batches and points by reason."""
        rows = self.conn.execute(
            "SELECT reason, count(*), coalesce(sum(points), 0) FROM dead_letter WHERE sink = ? "
            "GROUP BY reason",
            (self.sink,),
        )
        return {reason: QueueTotals(int(b), int(p)) for reason, b, p in rows}

    def clear(self) -> QueueTotals:
        """Forget the queue (the sink was disabled); set-aside batches stay for a human."""
        totals = self.totals()
        self.conn.execute("DELETE FROM spool WHERE sink = ?", (self.sink,))
        return totals
