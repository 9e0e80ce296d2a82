"""Trace marks: saved and loaded whole, forgotten by experiment, and a version 2 database
gains their table on open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from exporter.planners.traces import Marks
from exporter.state import StateStore
from exporter.state.db import FILE
from exporter.state.schema import SCHEMA_VERSION
from exporter.state.traces import TraceMarks
from exporter.trace_model import Fingerprint, NamedValues, TraceLive

MARKS = Marks(
    "7",
    Fingerprint((("ERROR", 1), ("OK", 4)), 3),
    written_until_ms=60_000,
    last_trace_ms=120_000,
    pending=((60_000, 2, 1), (90_000, 1, 0)),
    settled_traces=2,
    settled_assessments=2,
    live=TraceLive(
        NamedValues({"OK": 4, "ERROR": 1}, {"input": 10.0}, {"P50": 12.5}),
        {"chat": NamedValues({"OK": 4}, {}, {"P99": 40.0})},
        cost_usd=0.5,
        assessments={"correct": 3},
        assessment_means={"correct": 0.75},
        names_cut=2,
        last_trace_ms=120_000,
    ),
)


def test_marks_come_back_as_they_were_saved(store: StateStore) -> None:
    marks = TraceMarks(store.db.conn)
    with store.transaction():
        marks.save([MARKS, Marks("8")])
    assert marks.load() == {"7": MARKS, "8": Marks("8")}
    assert marks.live() == {"7": MARKS.live}
    with store.transaction():
        marks.forget(["7"])
    assert list(marks.load()) == ["8"]


def test_a_version_2_database_gains_the_trace_table_and_keeps_its_data(tmp_path: Path) -> None:
    first = StateStore(tmp_path)
    with first.transaction():
        first.db.conn.execute("DROP TABLE trace_marks")
        first.db.conn.execute("INSERT INTO sink (name, registered_ms) VALUES ('pramathus', 1)")
        first.db.conn.execute("PRAGMA user_version = 2")
    first.close()

    again = StateStore(tmp_path)
    try:
        assert TraceMarks(again.db.conn).load() == {}
        assert again.ledger.sinks() == {"pramathus": 1}
    finally:
        again.close()
    conn = sqlite3.connect(tmp_path / FILE)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()
