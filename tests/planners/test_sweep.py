"""Unit tests for exporter.planners.sweep: the background reconcile's cursor and pacing."""

from __future__ import annotations

import pytest

from exporter.mlflow_source import RunFilter, RunPage
from exporter.planners.sweep import (
    advance,
    chunks,
    key_of,
    next_step,
    pages_per_cycle,
    unseen,
)
from exporter.state.records import SweepRecord

NOW = 1_700_000_000_000


@pytest.mark.parametrize(
    ("runs", "interval", "reconcile", "pages"),
    [
        (20_000, 60, 3600, 1),  # 20 pages spread over 60 cycles
        (200_000, 60, 3600, 4),  # 200 pages over 60 cycles
        (20_000, 60, 0, 20),  # 0: a whole pass every cycle
        (0, 60, 3600, 1),  # always at least one page
        (5_000, 3600, 60, 5),  # a reconcile shorter than a cycle: one pass per cycle
    ],
)
def test_pages_per_cycle_spread_a_pass_over_the_reconcile_interval(
    runs: int, interval: float, reconcile: float, pages: int
) -> None:
    assert pages_per_cycle(runs, 1000, interval, reconcile) == pages


def test_experiments_are_cut_into_sorted_chunks_and_none_still_makes_one() -> None:
    assert chunks(["3", "1", "2"], 2) == [["1", "2"], ["3"]]
    assert chunks([], 2) == [[]]


def test_a_fresh_sweep_starts_at_the_first_chunk_without_a_filter() -> None:
    step = next_step(SweepRecord(), [["1"], ["2"]])
    assert (step.chunk, step.where, step.page_token) == (["1"], RunFilter(), None)


def test_a_cursor_past_the_last_chunk_wraps_around() -> None:
    assert next_step(SweepRecord(chunk=5), [["1"], ["2"]]).chunk == ["1"]


def test_a_full_page_moves_a_keyset_cursor_to_its_last_run() -> None:
    keys = [key_of(10, "a"), key_of(20, "b")]
    moved = advance(SweepRecord(), 2, RunPage([], "tok"), keys, NOW)
    assert (moved.record.after_start_ms, moved.record.after_run_id) == (20, "b")
    assert moved.record.page_token is None  # the next search filters, it does not page
    assert (moved.covered_after, moved.covered_upto) == (None, (20, "b"))
    assert next_step(moved.record, [["1"], ["2"]]).where == RunFilter(started_since_ms=20)


def test_a_page_full_of_one_start_time_pages_with_mlflows_token() -> None:
    record = SweepRecord(after_start_ms=20, after_run_id="b")
    keys = [key_of(20, "c"), key_of(20, "d")]
    moved = advance(record, 1, RunPage([], "offset-2"), keys, NOW)
    assert (moved.record.after_start_ms, moved.record.after_run_id) == (20, "d")
    assert moved.record.page_token == "offset-2"


def test_the_last_page_of_a_chunk_covers_the_rest_and_moves_to_the_next_chunk() -> None:
    record = SweepRecord(after_start_ms=20, after_run_id="b", started_ms=NOW - 5)
    moved = advance(record, 2, RunPage([], None), [key_of(30, "x")], NOW)
    assert moved.record == SweepRecord(chunk=1, started_ms=NOW - 5)
    assert (moved.covered_after, moved.covered_upto, moved.pass_completed) == (
        (20, "b"),
        None,
        False,
    )


def test_the_last_page_of_the_last_chunk_completes_a_pass() -> None:
    moved = advance(SweepRecord(chunk=1, passes=3), 2, RunPage([], None), [], NOW)
    assert moved.pass_completed
    assert moved.record == SweepRecord(chunk=0, last_completed_ms=NOW, passes=4)


def test_runs_at_or_before_the_cursor_were_read_already() -> None:
    record = SweepRecord(after_start_ms=20, after_run_id="b")
    keys = [key_of(20, "a"), key_of(20, "b"), key_of(20, "c"), key_of(21, "a")]
    assert unseen(keys, record) == [2, 3]
    assert unseen(keys, SweepRecord()) == [0, 1, 2, 3]


def test_a_run_without_a_start_time_sorts_first_as_mlflow_sorts_nulls() -> None:
    assert key_of(None, "z") < key_of(0, "a")
