"""Delivery queues: one durable queue of captured batches per sink, and what was set aside.

A batch is written in the same transaction that records its points as captured, so a point
is either still to be read from MLflow or safely queued. It is stored in one neutral form
(`CapturedBatch`, as `captured.dumps` writes it, `form` = `captured`) and encoded by its
sink only when it is delivered. Rows of form `wire` are request bodies queued by a version
before 4, delivered as they are. A batch leaves the queue only when its sink acknowledged
it, or when it can never succeed: then it moves to `dead_letter` with a reason (and its
form), kept on disk for a human and counted, never retried unless replayed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from exporter.model import CapturedBatch
from exporter.state import captured
from exporter.state.db import reserve_wal

CAPTURED = "captured"  # the body is `captured.dumps` of a `CapturedBatch`
WIRE = "wire"  # the body is a sink's request body (queued by a version before 4)

# Pages besides a body's that one write of a queued row may touch (its leaf, the index,
# interior and freelist pages, the header page), counted generously.
CLAIM_SPARE_PAGES = 8


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """A captured batch to queue: its idempotency key (kept by every retry) and its count
    in the sink's unit (points; remote write: samples)."""

    idempotency_key: str
    points: int
    batch: CapturedBatch


@dataclass(frozen=True, slots=True)
class QueuedBatch:
    """A queued row: `body` is what is stored (see `form`)."""

    id: int
    idempotency_key: str
    points: int
    body: bytes
    attempts: int
    form: str = CAPTURED

    def captured(self) -> CapturedBatch | None:
        """The captured batch, or None for a wire body queued by an older version."""
        return captured.loads(self.body) if self.form == CAPTURED else None


@dataclass(frozen=True, slots=True)
class QueueTotals:
    batches: int
    points: int


@dataclass(frozen=True, slots=True)
class SetAside:
    """A batch set aside, as an operator sees it."""

    sink: str
    id: int
    reason: str
    points: int
    status: int | None
    failed_ms: int
    error: str | None


class Outbox:
    """The queue and set-aside batches of one sink."""

    def __init__(self, conn: sqlite3.Connection, sink: str) -> None:
        self.conn = conn
        self.sink = sink

    def add(self, entries: Sequence[QueueEntry]) -> list[int]:
        """Queue batches behind everything already queued (call inside a transaction);
        returns their queue ids."""
        return [self._insert(e, e.batch.created_ms).id for e in entries]

    def _insert(self, entry: QueueEntry, created_ms: int) -> QueuedBatch:
        body = captured.dumps(entry.batch)
        cur = self.conn.execute(
            "INSERT INTO spool (sink, idempotency_key, created_ms, points, body, form) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (self.sink, entry.idempotency_key, created_ms, entry.points, body, CAPTURED),
        )
        return QueuedBatch(int(cur.lastrowid or 0), entry.idempotency_key, entry.points, body, 0)

    def remove(self, batch_id: int) -> bool:
        """Take a batch that was never sent out of the queue (its points are queued again
        in another batch); False if it is not there."""
        cur = self.conn.execute(
            "DELETE FROM spool WHERE id = ? AND sink = ? AND attempts = 0",
            (batch_id, self.sink),
        )
        return cur.rowcount == 1

    def batches(self) -> Iterator[QueuedBatch]:
        """Queued batches, oldest first, fetched one at a time (the queue may be large)."""
        last = 0
        while True:
            row = self.conn.execute(
                "SELECT id, idempotency_key, points, body, attempts, form FROM spool "
                "WHERE sink = ? AND id > ? ORDER BY id LIMIT 1",
                (self.sink, last),
            ).fetchone()
            if row is None:
                return
            last = row[0]
            yield QueuedBatch(*row)

    def claim(self, batch: QueuedBatch) -> None:
        """Write to the state before a batch is sent, with room taken for recording its
        delivery: a state that cannot record it (disk full, read-only, a file size limit)
        fails here (StateError or sqlite3.Error), and nothing is sent that could not be
        marked. The room covers this write and `done`'s: each rewrites the row's page, its
        overflow pages (the stored body, whatever the sink encodes from it) and a few
        b-tree and freelist pages."""
        page = int(self.conn.execute("PRAGMA page_size").fetchone()[0])
        body_pages = -(-len(batch.body) // (page - 4))
        reserve_wal(self.conn, 2 * (body_pages + CLAIM_SPARE_PAGES))
        self.conn.execute("UPDATE spool SET attempts = attempts WHERE id = ?", (batch.id,))

    def done(self, batch_id: int) -> None:
        self.conn.execute("DELETE FROM spool WHERE id = ?", (batch_id,))

    def failed(self, batch_id: int, error: str) -> None:
        self.conn.execute(
            "UPDATE spool SET attempts = attempts + 1, last_error = ? WHERE id = ?",
            (error[:500], batch_id),
        )

    def replace(self, batch: QueuedBatch, parts: Sequence[QueueEntry]) -> list[QueuedBatch]:
        """Queue `parts` instead of `batch` (what is left of a batch that was split).

        They go to the end of the queue: ids only grow, and a split part that must wait
        is not worth reordering everything behind it.
        """
        created = self.conn.execute(
            "SELECT created_ms FROM spool WHERE id = ?", (batch.id,)
        ).fetchone()
        self.conn.execute("DELETE FROM spool WHERE id = ?", (batch.id,))
        return [self._insert(part, created[0] if created else 0) for part in parts]

    def set_aside(
        self, batch: QueuedBatch, failed_ms: int, reason: str, status: int | None, error: str
    ) -> None:
        """Move a batch that can never succeed out of the queue, keeping it for a human."""
        self.conn.execute(
            "INSERT INTO dead_letter (sink, idempotency_key, created_ms, failed_ms, points, "
            "body, status, error, reason, form) SELECT sink, idempotency_key, created_ms, ?, "
            "points, body, ?, ?, ?, form FROM spool WHERE id = ?",
            (failed_ms, status, error[:500], reason, batch.id),
        )
        self.conn.execute("DELETE FROM spool WHERE id = ?", (batch.id,))

    def set_aside_new(self, entry: QueueEntry, failed_ms: int, reason: str, error: str) -> None:
        """Set aside a batch that was never queued (e.g. samples too old to send at all)."""
        self.conn.execute(
            "INSERT INTO dead_letter (sink, idempotency_key, created_ms, failed_ms, points, body, "
            "status, error, reason, form) VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?)",
            (
                self.sink,
                entry.idempotency_key,
                entry.batch.created_ms,
                failed_ms,
                entry.points,
                captured.dumps(entry.batch),
                error[:500],
                reason,
                CAPTURED,
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

    def body_limit(self) -> int | None:
        """The largest body the receiver accepted after refusing a larger one (413)."""
        row = self.conn.execute(
            "SELECT value FROM record WHERE name = ?", (f"body_limit.{self.sink}",)
        ).fetchone()
        return None if row is None else int(row[0])

    def set_body_limit(self, size: int) -> None:
        self.conn.execute(
            "INSERT INTO record (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (f"body_limit.{self.sink}", str(size)),
        )

    def set_aside_batches(self, reason: str | None = None) -> list[SetAside]:
        """Set-aside batches, oldest first (of one reason, or all)."""
        rows = self.conn.execute(
            "SELECT id, reason, points, status, failed_ms, error FROM dead_letter "
            "WHERE sink = ? AND (? IS NULL OR reason = ?) ORDER BY id",
            (self.sink, reason, reason),
        )
        return [SetAside(self.sink, *row) for row in rows]

    def replay(self, reason: str | None = None) -> QueueTotals:
        """Put set-aside batches (of one reason, or all) back at the end of the queue, with
        their idempotency keys; call inside a transaction."""
        where = "sink = ? AND (? IS NULL OR reason = ?)"
        args = (self.sink, reason, reason)
        batches, points = self.conn.execute(
            f"SELECT count(*), coalesce(sum(points), 0) FROM dead_letter WHERE {where}",  # noqa: S608
            args,
        ).fetchone()
        self.conn.execute(
            "INSERT INTO spool (sink, idempotency_key, created_ms, points, body, form) "  # noqa: S608
            f"SELECT sink, idempotency_key, created_ms, points, body, form FROM dead_letter "
            f"WHERE {where} ORDER BY id",
            args,
        )
        self.conn.execute(f"DELETE FROM dead_letter WHERE {where}", args)  # noqa: S608
        return QueueTotals(int(batches), int(points))

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
