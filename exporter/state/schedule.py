"""The capture schedule: when the mirror's runs are read from MLflow again.

Two columns of the `run` table: `pending` (a run's histories are due: from their windows or
whole) and `settle_until_ms` (until then the run is re-read every cycle, by id if the
searches miss it, so late points and late status changes are caught). Both are initialised
by the mirror's insert (`Mirror.write_run` sets them in the same statement as the run's
data: one write per run on the capture path) and by `Mirror.tombstone` (a tombstone
settles too); from then on this class moves them. It also lists the unfinished runs, which
are re-read by id like settling ones. Writes happen inside the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from exporter.model import UNFINISHED_STATUSES, KnownRun
from exporter.state.db import CHUNK, qmarks
from exporter.state.mirror import KNOWN

# A run's `pending`: its histories are captured / due from their windows / due whole.
PENDING_NONE, PENDING_WINDOW, PENDING_FULL = 0, 1, 2


class CaptureSchedule:
    """Reads and writes of the runs' `pending` and `settle_until_ms` over one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def capture_due(self, now_ms: int) -> dict[str, bool]:
        """Active runs whose histories must be read (changed and not yet captured, or still
        settling), each with whether it must be read whole; newest start first, so a long
        first capture fills dashboards where users look first."""
        # Two indexed lookups (`run_pending`, `run_by_settle`) instead of one OR, and the
        # order made here: given `ORDER BY`, SQLite walks the whole table in key order.
        rows = self.conn.execute(
            "SELECT run_id, pending, start_time_ms FROM run WHERE pending != 0 "
            "AND deleted_ms IS NULL UNION SELECT run_id, pending, start_time_ms FROM run "
            "WHERE settle_until_ms > ? AND deleted_ms IS NULL",
            (now_ms,),
        )
        ordered = sorted(rows, key=lambda row: (-(row[2] if row[2] is not None else -1), row[0]))
        return {r: p == PENDING_FULL for r, p, _start in ordered}

    def captured(self, run_ids: Iterable[str]) -> None:
        """Every series of these runs was read and its new points queued."""
        self.conn.executemany(
            "UPDATE run SET pending = ? WHERE run_id = ?", [(PENDING_NONE, r) for r in run_ids]
        )

    def pending_count(self) -> int:
        """Active runs whose histories are due (changed and not yet captured)."""
        row = self.conn.execute(
            "SELECT count(*) FROM run WHERE pending != 0 AND deleted_ms IS NULL"
        ).fetchone()
        return int(row[0])

    def set_settle(self, run_ids: Iterable[str], settle_until_ms: int) -> None:
        """Extend how long these runs are re-read every cycle."""
        self.conn.executemany(
            "UPDATE run SET settle_until_ms = max(settle_until_ms, ?) WHERE run_id = ?",
            [(settle_until_ms, r) for r in run_ids],
        )

    def settle_until(self, run_ids: Sequence[str]) -> dict[str, int]:
        """Each mirrored run's settle deadline (ms); runs the mirror lacks are absent."""
        ids = list(run_ids)
        out: dict[str, int] = {}
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            rows = self.conn.execute(
                f"SELECT run_id, settle_until_ms FROM run WHERE run_id IN ({qmarks(chunk)})",  # noqa: S608
                chunk,
            )
            out.update({r: int(s) for r, s in rows})
        return out

    def settling(self, now_ms: int) -> list[KnownRun]:
        """Runs (tombstones too) still inside their settle window."""
        # Sorted here, so SQLite reads `run_by_settle` rather than the whole table in key order.
        rows = self.conn.execute(f"{KNOWN} WHERE settle_until_ms > ?", (now_ms,))
        return [KnownRun(*row) for row in sorted(rows)]

    def unfinished(self) -> list[KnownRun]:
        """Active runs whose last known status is RUNNING or SCHEDULED (re-read by id when
        the searches miss them, like settling runs)."""
        rows = self.conn.execute(
            f"{KNOWN} WHERE status IN {UNFINISHED_STATUSES} AND deleted_ms IS NULL ORDER BY run_id"
        )
        return [KnownRun(*row) for row in rows]
