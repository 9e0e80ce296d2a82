"""Unit tests for exporter.state.schedule: which runs are due for capture (whole or from
their windows), settle windows, unfinished runs, and that the per-cycle run queries read
indexes. A real state database under `tmp_path`, no servers."""

from __future__ import annotations

import re

import pytest

import exporter.state.schedule as schedule_module
from exporter.state import CaptureSchedule, Mirror, StateStore
from exporter.state.schedule import PENDING_FULL, PENDING_NONE, PENDING_WINDOW
from tests.state.test_mirror import make_run, write


def test_capture_due_lists_pending_and_settling_active_runs_with_whether_to_read_whole(
    mirror: Mirror, schedule: CaptureSchedule
) -> None:
    mirror.write_run(make_run("window"), 0, PENDING_WINDOW)
    mirror.write_run(make_run("whole"), 0, PENDING_FULL)
    mirror.write_run(make_run("settling"), 1_000, PENDING_NONE)
    mirror.write_run(make_run("settled"), 1_000, PENDING_NONE)
    mirror.write_run(make_run("idle"), 0, PENDING_NONE)
    mirror.write_run(make_run("gone"), 5_000, PENDING_FULL)
    mirror.tombstone(["gone"], now_ms=1, settle_until_ms=5_000)
    schedule.set_settle(["settling"], 2_000)

    assert schedule.capture_due(now_ms=1_000) == {"settling": False, "whole": True, "window": False}
    assert schedule.capture_due(now_ms=999) == {
        "settled": False,
        "settling": False,
        "whole": True,
        "window": False,
    }
    assert schedule.pending_count() == 2


def test_captured_clears_pending_but_a_settling_run_stays_due(
    mirror: Mirror, schedule: CaptureSchedule
) -> None:
    mirror.write_run(make_run("a"), 0, PENDING_FULL)
    mirror.write_run(make_run("b"), 500, PENDING_WINDOW)
    schedule.captured(["a", "b"])
    assert schedule.pending_count() == 0
    assert schedule.capture_due(now_ms=100) == {"b": False}
    assert schedule.capture_due(now_ms=500) == {}


def test_set_settle_only_extends_a_settle_window(mirror: Mirror, schedule: CaptureSchedule) -> None:
    mirror.write_run(make_run("a"), 1_000, PENDING_NONE)
    mirror.write_run(make_run("b"), 1_000, PENDING_NONE)
    schedule.set_settle(["a"], 3_000)
    schedule.set_settle(["b"], 500)
    assert schedule.settle_until(["a", "b", "absent"]) == {"a": 3_000, "b": 1_000}


def test_settling_lists_runs_and_tombstones_inside_their_window(
    mirror: Mirror, schedule: CaptureSchedule
) -> None:
    mirror.write_run(make_run("a"), 1_000, PENDING_NONE)
    mirror.write_run(make_run("b"), 10, PENDING_NONE)
    mirror.write_run(make_run("c"), 0, PENDING_NONE)
    mirror.tombstone(["c"], now_ms=5, settle_until_ms=2_000)
    assert [k.run_id for k in schedule.settling(now_ms=10)] == ["a", "c"]
    assert [k.run_id for k in schedule.settling(now_ms=1_000)] == ["c"]
    assert schedule.settling(now_ms=2_000) == []


def test_unfinished_lists_active_running_and_scheduled_runs(
    mirror: Mirror, schedule: CaptureSchedule
) -> None:
    for run_id, status in [
        ("r", "RUNNING"),
        ("s", "SCHEDULED"),
        ("f", "FINISHED"),
        ("x", "FAILED"),
        ("k", "KILLED"),
        ("gone", "RUNNING"),
    ]:
        write(mirror, make_run(run_id, status=status))
    mirror.tombstone(["gone"], now_ms=1, settle_until_ms=0)
    assert [k.run_id for k in schedule.unfinished()] == ["r", "s"]


def test_capture_due_lists_the_newest_runs_first(mirror: Mirror, schedule: CaptureSchedule) -> None:
    write(
        mirror,
        make_run("old", start=10),
        make_run("new-b", start=30),
        make_run("new-a", start=30),
        make_run("none", start=None),
        make_run("mid", start=20),
    )
    assert list(schedule.capture_due(now_ms=0)) == ["new-a", "new-b", "mid", "old", "none"]


def test_the_per_cycle_run_queries_read_indexes_not_the_whole_run_table(
    store: StateStore,
) -> None:
    # Each idle cycle asks which runs settle and which are due for capture: at 20,000 runs a
    # walk of the whole table in key order costs milliseconds per query, every cycle.
    conn = store.db.conn
    asked: list[str] = []
    conn.set_trace_callback(asked.append)
    try:
        store.schedule.settling(1)
        store.schedule.capture_due(1)
        store.push_marks.experiments_with_runs_ended_between(1, 2)  # the run window's edge
        store.mirror.run_count()  # the sweep's pacing
        store.mirror.status_counts("1")
    finally:
        conn.set_trace_callback(None)
    plans = {
        sql: [row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}")]
        for sql in asked
        if sql.startswith("SELECT")
    }
    assert len(plans) == 5
    for sql, steps in plans.items():
        # "SCAN run USING INDEX x" walks the whole table too, in that index's order, unless
        # x is partial (it holds only the rows asked for: pending, unfinished, deleted).
        whole_table = [
            s
            for s in steps
            if (
                re.match(r"SCAN run( |$)", s)
                and not re.search(r"INDEX run_(pending|unfinished|deleted)", s)
            )
            or "autoindex_run" in s
        ]
        assert not whole_table, (sql, steps)


def test_settle_until_works_across_more_ids_than_one_query_binds(
    mirror: Mirror, schedule: CaptureSchedule, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schedule_module, "CHUNK", 2)
    ids = [f"r{i}" for i in range(7)]
    for i, run_id in enumerate(ids):
        mirror.write_run(make_run(run_id), i, PENDING_NONE)
    assert schedule.settle_until([*ids, "absent"]) == {r: i for i, r in enumerate(ids)}
