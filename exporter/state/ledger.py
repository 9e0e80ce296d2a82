"""The capture ledger: which points have been captured (and fanned out to every sink).

One `series` row per (run, metric key) with its read window: the lowest step a read of a
settling run starts from. The identity (step, timestamp, value bits) of every captured point
is kept in `point` until the run is forgotten, so a point that arrives late, in any order,
is recognised as new and an old one is never sent twice, whatever range is read. How the
window moves is decided in `planners/capture.py`; this module only stores.

Sinks registered here receive every newly captured point. A sink registered after points
were captured gets a backfill: a frozen copy of the ledger at registration (`backfill`,
`backfill_point`) says which points it still needs, whatever the ledger does meanwhile.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from exporter.model import Identity, Series, WindowStats
from exporter.state.db import CHUNK, qmarks


@dataclass(frozen=True, slots=True)
class BackfillItem:
    """A series as it stood when a sink registered: the sink needs every point below the
    frozen `window_start` (captured long before) and every point in `identities`."""

    series: Series
    window_start: int | None
    identities: frozenset[Identity]


class Ledger:
    """Reads and writes of the capture ledger over one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    # ------------------------------------------------------------------ series

    def series(self, pairs: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Series]:
        """The series of these (run, key) pairs, created (window: everything) if new."""
        wanted = sorted(set(pairs))
        self.conn.executemany(
            "INSERT OR IGNORE INTO series (run_id, metric_key, window_start) VALUES (?, ?, NULL)",
            wanted,
        )
        out: dict[tuple[str, str], Series] = {}
        runs = sorted({r for r, _ in wanted})
        keys = set(wanted)
        for start in range(0, len(runs), CHUNK):
            chunk = runs[start : start + CHUNK]
            rows = self.conn.execute(
                "SELECT series_id, run_id, metric_key, window_start, floor FROM series "  # noqa: S608
                f"WHERE run_id IN ({qmarks(chunk)})",
                chunk,
            )
            for row in rows:
                if (row[1], row[2]) in keys:
                    out[(row[1], row[2])] = Series(*row)
        return out

    def identities(self, series_id: int, from_step: int | None) -> set[Identity]:
        """Identities kept for a series at or above `from_step` (None: all kept)."""
        rows = self.conn.execute(
            "SELECT step, timestamp_ms, value_bits FROM point WHERE series_id = ? AND step >= ?",
            (series_id, -(2**63) if from_step is None else from_step),
        )
        return {(int(s), int(t), int(v)) for s, t, v in rows}

    def record(self, series_id: int, identities: Iterable[Identity], captured_ms: int) -> None:
        """Remember newly captured points of a series."""
        self.conn.executemany(
            "INSERT OR IGNORE INTO point (series_id, step, timestamp_ms, value_bits, captured_ms) "
            "VALUES (?, ?, ?, ?, ?)",
            [(series_id, s, t, v, captured_ms) for s, t, v in identities],
        )

    def window_stats(self, series_id: int, horizon_ms: int) -> WindowStats:
        """Steps captured before and after `horizon_ms` (now minus the settle window)."""
        row = self.conn.execute(
            "SELECT max(CASE WHEN captured_ms <= ? THEN step END), "
            "min(CASE WHEN captured_ms > ? THEN step END), max(step) "
            "FROM point WHERE series_id = ?",
            (horizon_ms, horizon_ms, series_id),
        ).fetchone()
        return WindowStats(*row)

    def set_window(self, series_id: int, window_start: int | None) -> None:
        """Move a series' read window (its identities stay: a whole read still needs them)."""
        self.conn.execute(
            "UPDATE series SET window_start = ? WHERE series_id = ?", (window_start, series_id)
        )

    def forget_runs(self, run_ids: Sequence[str]) -> None:
        """Drop everything captured for these runs (after their retention ran out)."""
        for start in range(0, len(run_ids), CHUNK):
            chunk = list(run_ids[start : start + CHUNK])
            marks = qmarks(chunk)
            ids = f"SELECT series_id FROM series WHERE run_id IN ({marks})"  # noqa: S608
            for table in ("point", "backfill_point", "backfill"):
                self.conn.execute(f"DELETE FROM {table} WHERE series_id IN ({ids})", chunk)  # noqa: S608
            self.conn.execute(f"DELETE FROM series WHERE run_id IN ({marks})", chunk)  # noqa: S608

    def series_count(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM series").fetchone()[0])

    # ------------------------------------------------------------------ sinks

    def sinks(self) -> dict[str, int]:
        """Registered sink names and when each was registered (ms)."""
        return {n: int(t) for n, t in self.conn.execute("SELECT name, registered_ms FROM sink")}

    def register_sink(self, name: str, now_ms: int) -> int:
        """Register a sink; it will get every point captured from now on, plus a backfill
        of what was captured before. Returns how many series the backfill covers."""
        self.conn.execute("INSERT INTO sink (name, registered_ms) VALUES (?, ?)", (name, now_ms))
        self.conn.execute(
            "INSERT INTO backfill (sink, series_id, window_start) "
            "SELECT ?, series_id, window_start FROM series",
            (name,),
        )
        self.conn.execute(
            "INSERT INTO backfill_point (sink, series_id, step, timestamp_ms, value_bits) "
            "SELECT ?, series_id, step, timestamp_ms, value_bits FROM point",
            (name,),
        )
        return int(
            self.conn.execute("SELECT count(*) FROM backfill WHERE sink = ?", (name,)).fetchone()[0]
        )

    def unregister_sink(self, name: str) -> None:
        for table in ("backfill_point", "backfill"):
            self.conn.execute(f"DELETE FROM {table} WHERE sink = ?", (name,))  # noqa: S608
        self.conn.execute("DELETE FROM sink WHERE name = ?", (name,))

    def backfill_pending(self, sink: str, limit: int) -> list[BackfillItem]:
        """Up to `limit` series the sink still needs a backfill of."""
        rows = self.conn.execute(
            "SELECT s.series_id, s.run_id, s.metric_key, s.window_start, s.floor, b.window_start "
            "FROM backfill b JOIN series s USING (series_id) WHERE b.sink = ? "
            "ORDER BY s.metric_key, s.run_id LIMIT ?",
            (sink, limit),
        ).fetchall()
        items = []
        for series_id, run_id, key, window, floor, frozen_window in rows:
            ids = self.conn.execute(
                "SELECT step, timestamp_ms, value_bits FROM backfill_point "
                "WHERE sink = ? AND series_id = ?",
                (sink, series_id),
            )
            items.append(
                BackfillItem(
                    Series(series_id, run_id, key, window, floor),
                    frozen_window,
                    frozenset((int(s), int(t), int(v)) for s, t, v in ids),
                )
            )
        return items

    def owe(self, sink: str, items: Iterable[tuple[int, Identity]]) -> None:
        """Remember points captured while a sink's queue was full: its backfill reads them
        from MLflow once the queue has room (a frozen window a series already has stays)."""
        rows = list(items)
        self.conn.executemany(
            "INSERT OR IGNORE INTO backfill (sink, series_id, window_start) VALUES (?, ?, NULL)",
            sorted({(sink, series_id) for series_id, _ in rows}),
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO backfill_point (sink, series_id, step, timestamp_ms, "
            "value_bits) VALUES (?, ?, ?, ?, ?)",
            [(sink, series_id, *identity) for series_id, identity in rows],
        )

    def backfill_done(self, sink: str, series_ids: Iterable[int]) -> None:
        for series_id in series_ids:
            for table in ("backfill_point", "backfill"):
                self.conn.execute(
                    f"DELETE FROM {table} WHERE sink = ? AND series_id = ?",  # noqa: S608
                    (sink, series_id),
                )

    def backfill_remaining(self, sink: str) -> int:
        row = self.conn.execute("SELECT count(*) FROM backfill WHERE sink = ?", (sink,)).fetchone()
        return int(row[0])
