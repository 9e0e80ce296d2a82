"""Unit tests for exporter.planners.sweep: the background reconcile's cursor and pacing."""

from __future__ import annotations

import pytest

from exporter.model import RunFilter, RunPage, SweepRecord
from exporter.planners.sweep import (
    SweepAdvance,
    advance,
    chunks,
    key_of,
    next_page_after,
    next_step,
    page_spacing_ms,
    pages_due,
    pages_per_cycle,
    unseen,
)

NOW = 1_700_000_000_000


@pytest.mark.parametrize(
    ("runs", "interval", "reconcile", "pages"),
    [
        (20_000, 60, 3600, 1),  # 20 pages spread over 60 cycles
        (200_000, 60, 3600, 4),  # 200 pages over 60 cycles
        (20_000, 60, 0, 20),  # 0: a whole pass every cycle
        (0, 60, 3600, 1),  # always at least one page
        (0, 60, 0, 1),
        (5_000, 3600, 60, 5),  # a reconcile shorter than a cycle: one pass per cycle
        (20_000, 1, 10, 2),  # a 1 s interval: 10 cycles per pass
    ],
)
def test_pages_per_cycle_spread_a_pass_over_the_reconcile_interval(
    runs: int, interval: float, reconcile: float, pages: int
) -> None:
    assert pages_per_cycle(runs, 1000, interval, reconcile) == pages


def test_pages_are_spaced_so_a_pass_takes_the_reconcile_interval() -> None:
    assert page_spacing_ms(100_000, 1000, 3600) == 36_000  # 100 pages an hour
    assert page_spacing_ms(30, 1000, 3600) == 3_600_000  # one page an hour
    assert page_spacing_ms(0, 1000, 3600) == 3_600_000


@pytest.mark.parametrize(
    ("next_page", "now", "pages"),
    [
        (None, NOW, 1),  # never read: one page now
        (NOW + 1, NOW, 0),  # not yet due: most cycles read nothing
        (NOW, NOW, 1),
        (NOW - 35_999, NOW, 1),
        (NOW - 36_000, NOW, 2),  # one more spacing went by
        (NOW - 10 * 3_600_000, NOW, 2),  # a long pause is made up by a cycle's share only
    ],
)
def test_pages_due_are_those_whose_time_has_come(
    next_page: int | None, now: int, pages: int
) -> None:
    assert pages_due(next_page, now, 100_000, 1000, 60, 3600) == pages


def test_pages_due_with_a_reconcile_no_longer_than_a_cycle_are_a_whole_pass() -> None:
    assert pages_due(NOW + 10**9, NOW, 20_000, 1000, 60, 0) == 20
    assert pages_due(None, NOW, 5_000, 1000, 3600, 60) == 5


def test_the_next_page_is_due_a_spacing_per_page_read_later() -> None:
    assert next_page_after(None, NOW, 1, 36_000.0, 5) == NOW + 36_000
    assert next_page_after(NOW - 1000, NOW, 2, 36_000.0, 5) == NOW - 1000 + 72_000
    # After a long pause the schedule restarts a cycle back, not hours back.
    assert next_page_after(NOW - 10**8, NOW, 1, 36_000.0, 5) == NOW - 5000 + 36_000
    assert next_page_after(NOW + 5, NOW, 0, 36_000.0, 5) == NOW + 5  # nothing read


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


def test_a_cursor_in_the_second_chunk_reads_it_and_passes_its_page_token() -> None:
    step = next_step(SweepRecord(chunk=1, page_token="offset-9"), [["1"], ["2"]])
    assert (step.chunk, step.page_token) == (["2"], "offset-9")
    assert next_step(SweepRecord(chunk=2), [["1"], ["2"]]).chunk == ["1"]


def test_a_run_without_a_start_time_keys_as_minus_one_like_the_mirror_does() -> None:
    assert key_of(None, "a") == (-1, "a")


def test_a_keyset_step_in_a_later_chunk_keeps_the_chunk_and_the_pass_start() -> None:
    record = SweepRecord(chunk=1, after_start_ms=5, after_run_id="a", started_ms=NOW - 9)
    moved = advance(record, 3, RunPage([], "tok"), [key_of(10, "b")], NOW)
    assert moved == SweepAdvance(
        SweepRecord(chunk=1, after_start_ms=10, after_run_id="b", started_ms=NOW - 9),
        (5, "a"),
        (10, "b"),
        False,
    )


def test_a_tie_page_in_a_later_chunk_keeps_the_chunk_and_the_pass_start() -> None:
    record = SweepRecord(chunk=2, after_start_ms=5, after_run_id="a", started_ms=NOW - 9)
    moved = advance(record, 3, RunPage([], "tok-2"), [key_of(5, "b"), key_of(5, "c")], NOW)
    assert moved == SweepAdvance(
        SweepRecord(
            chunk=2, after_start_ms=5, after_run_id="c", page_token="tok-2", started_ms=NOW - 9
        ),
        (5, "a"),
        (5, "c"),
        False,
    )


def test_the_first_page_of_a_pass_marks_when_the_pass_started() -> None:
    moved = advance(SweepRecord(), 1, RunPage([], "tok"), [key_of(1, "a"), key_of(2, "b")], NOW)
    assert moved.record.started_ms == NOW
    assert moved.covered_upto == (2, "b")


def test_an_empty_page_with_a_token_keeps_paging_the_same_search() -> None:
    record = SweepRecord(chunk=1, after_start_ms=5, after_run_id="a")
    moved = advance(record, 2, RunPage([], "tok-3"), [], NOW)
    assert moved == SweepAdvance(
        SweepRecord(chunk=1, after_start_ms=5, after_run_id="a", page_token="tok-3"),
        (5, "a"),
        (5, "a"),
        False,
    )


def test_a_cursor_past_the_last_chunk_restarts_at_the_first_when_advancing() -> None:
    moved = advance(SweepRecord(chunk=7), 2, RunPage([], "t"), [key_of(1, "a")], NOW)
    assert moved.record.chunk == 0
    done = advance(SweepRecord(chunk=2), 2, RunPage([], None), [], NOW)
    assert (done.record.chunk, done.pass_completed) == (1, False)


def test_a_keyset_step_after_a_tie_page_drops_the_offset_token() -> None:
    record = SweepRecord(after_start_ms=5, after_run_id="c", page_token="tok-2", started_ms=1)
    moved = advance(record, 1, RunPage([], "tok-3"), [key_of(9, "d")], NOW)
    assert moved.record.page_token is None


def test_a_first_page_full_of_one_start_time_starts_the_pass_and_wraps_its_chunk() -> None:
    record = SweepRecord(chunk=4, after_start_ms=5, after_run_id="a")
    moved = advance(record, 2, RunPage([], "tok"), [key_of(5, "b")], NOW)
    assert (moved.record.chunk, moved.record.started_ms) == (0, NOW)


def test_a_reconcile_interval_equal_to_a_cycle_reads_a_whole_pass_each_cycle() -> None:
    assert pages_due(NOW + 10**9, NOW, 5_000, 1000, 60, 60) == 5


def test_a_page_never_read_is_one_page_however_close_the_spacing() -> None:
    # 4,000 pages over 2 s: half a millisecond apart; a first read is still one page.
    assert pages_due(None, NOW, 4_000, 1, 1, 2) == 1


def test_a_long_pause_makes_up_exactly_one_cycle_of_pages() -> None:
    # 1,000 pages over 7 s (7 ms apart) at a 1 s interval: a cycle's share is 1000 ms,
    # 142 spacings, plus the page that was due.
    assert pages_due(NOW - 10**6, NOW, 1_000, 1, 1, 7) == 143
