"""Unit tests for exporter.planners.capture: the pure decisions of change capture."""

from __future__ import annotations

import math

import pytest

from exporter.model import (
    HistoryRequest,
    KnownRun,
    LatestMetric,
    MetricPoint,
    Run,
    RunFilter,
    Series,
    WindowStats,
)
from exporter.planners.capture import (
    Change,
    decide,
    delta_filters,
    first_settle,
    group_by_key,
    history_requests,
    needed_by_backfill,
    new_points,
    next_window,
    points_bound,
    recheck_by_id,
)

NOW = 1_700_000_000_000
SETTLE = 60_000


def run(**kw: object) -> Run:
    values: dict[str, object] = {
        "run_id": "r1",
        "experiment_id": "1",
        "run_name": "r",
        "status": "FINISHED",
        "user_id": "u",
        "start_time_ms": NOW - 100_000,
        "end_time_ms": NOW - 50_000,
        "metrics": (LatestMetric("loss", 0.5, 3, NOW - 60_000),),
    }
    values.update(kw)
    return Run(**values)  # type: ignore[arg-type]


def known(r: Run, **kw: object) -> KnownRun:
    values: dict[str, object] = {
        "run_id": r.run_id,
        "experiment_id": r.experiment_id,
        "fingerprint": r.fingerprint(),
        "status": r.status,
        "start_time_ms": r.start_time_ms,
        "settle_until_ms": 0,
        "deleted_ms": None,
    }
    values.update(kw)
    return KnownRun(**values)  # type: ignore[arg-type]


def point(step: int, ts: int = 0, value: float = 1.0) -> MetricPoint:
    return MetricPoint("r1", "loss", value, step, ts)


# ---------------------------------------------------------------------- what to ask for


def test_deltas_look_back_from_the_last_capture_by_a_settle_window() -> None:
    started, running, ended = delta_filters(NOW, NOW - 30_000, SETTLE)
    assert started == RunFilter(started_since_ms=NOW - 90_000)
    assert running == RunFilter(status="RUNNING")
    assert ended == RunFilter(ended_since_ms=NOW - 90_000)


def test_without_a_last_capture_deltas_look_back_from_now() -> None:
    assert delta_filters(NOW, None, SETTLE)[0].started_since_ms == NOW - SETTLE


def test_a_capture_in_the_future_never_moves_the_look_back_forward() -> None:
    assert delta_filters(NOW, NOW + 999_999, SETTLE)[0].started_since_ms == NOW - SETTLE


def test_runs_rechecked_by_id_are_the_settling_and_unfinished_ones_not_seen() -> None:
    a, b, c = (known(run(run_id=i)) for i in "abc")
    assert [k.run_id for k in recheck_by_id([a, b], [b, c], seen=["b"])] == ["a", "c"]


# ---------------------------------------------------------------------- what changed


def test_a_run_never_seen_is_new_and_captured() -> None:
    decision = decide(run(), None, NOW, SETTLE)
    assert (decision.change, decision.write, decision.whole) == (Change.NEW, True, False)


def test_a_run_without_a_fingerprint_counts_as_new() -> None:
    r = run()
    assert decide(r, known(r, fingerprint=""), NOW, SETTLE).change is Change.NEW


def test_a_run_finished_long_ago_seen_first_is_settled_already() -> None:
    assert first_settle(run(end_time_ms=NOW - 10 * SETTLE), NOW, SETTLE) == NOW - 9 * SETTLE


def test_a_run_that_just_ended_settles_from_its_end_and_an_unfinished_one_from_now() -> None:
    assert first_settle(run(end_time_ms=NOW - 1000), NOW, SETTLE) == NOW - 1000 + SETTLE
    assert first_settle(run(status="RUNNING", end_time_ms=None), NOW, SETTLE) == NOW + SETTLE
    assert first_settle(run(end_time_ms=NOW + 5000), NOW, SETTLE) == NOW + SETTLE


def test_a_run_without_times_settles_from_the_epoch() -> None:
    assert first_settle(run(start_time_ms=None, end_time_ms=None), NOW, SETTLE) == SETTLE


def test_a_changed_run_settles_again_and_is_read_whole_only_if_it_had_settled() -> None:
    before = run()
    after = run(metrics=(LatestMetric("loss", 0.4, 4, NOW),))
    settling = decide(after, known(before, settle_until_ms=NOW + 1), NOW, SETTLE)
    settled = decide(after, known(before, settle_until_ms=NOW), NOW, SETTLE)
    assert (settling.change, settling.settle_until_ms, settling.whole) == (
        Change.CHANGED,
        NOW + SETTLE,
        False,
    )
    assert (settled.change, settled.whole) == (Change.CHANGED, True)


@pytest.mark.parametrize(
    "changes",
    [{"run_name": "renamed"}, {"tags": {"team": "x"}}, {"status": "FAILED"}, {"end_time_ms": 1}],
    ids=["name", "tag", "status", "end time"],
)
def test_metadata_changes_are_changes(changes: dict[str, object]) -> None:
    before = run()
    assert decide(run(**changes), known(before), NOW, SETTLE).change is Change.CHANGED


def test_a_tombstoned_run_back_in_the_active_view_is_restored() -> None:
    r = run()
    decision = decide(r, known(r, deleted_ms=NOW - 1, settle_until_ms=NOW + 1), NOW, SETTLE)
    assert (decision.change, decision.write, decision.whole) == (Change.RESTORED, True, False)


def test_a_run_in_the_deleted_view_is_removed_and_settles_so_a_restore_is_seen_soon() -> None:
    decision = decide(run(lifecycle_stage="deleted"), None, NOW, SETTLE)
    assert (decision.change, decision.write, decision.settle_until_ms) == (
        Change.REMOVED,
        False,
        NOW + SETTLE,
    )
    assert not decide(run(lifecycle_stage="deleted"), known(run()), NOW, SETTLE).write


def test_an_unchanged_run_is_not_written_and_keeps_its_settle_deadline() -> None:
    r = run()
    decision = decide(r, known(r, settle_until_ms=NOW + 5), NOW, SETTLE)
    assert (decision.change, decision.write, decision.settle_until_ms) == (
        Change.UNCHANGED,
        False,
        NOW + 5,
    )


def test_nan_values_do_not_make_a_run_look_changed() -> None:
    nan = (LatestMetric("x", math.nan, 0, 1),)
    assert run(metrics=nan).fingerprint() == run(metrics=nan).fingerprint()


# ---------------------------------------------------------------------- which histories


def test_reads_start_at_the_window_or_the_floor_for_a_whole_read() -> None:
    latest = {
        "a": (LatestMetric("loss", 1.0, 10, 0),),
        "b": (LatestMetric("loss", 1.0, 10, 0), LatestMetric("debug", 1.0, 1, 0)),
    }
    series = {
        ("a", "loss"): Series(1, "a", "loss", 7),
        ("b", "loss"): Series(2, "b", "loss", 4, floor=2),
        ("b", "debug"): Series(3, "b", "debug", None),
    }
    wanted = history_requests(latest, series, lambda k: k != "debug", whole=["b"])
    assert [(w.run_id, w.start_step, w.end_step) for w in wanted] == [("b", 2, 10), ("a", 7, 10)]


def test_a_series_whose_latest_step_is_below_its_window_costs_no_read() -> None:
    latest = {"a": (LatestMetric("loss", 1.0, 5, 0),)}
    assert history_requests(latest, {("a", "loss"): Series(1, "a", "loss", 6)}, bool) == []


def test_the_window_never_goes_below_a_migrated_floor() -> None:
    assert Series(1, "a", "k", window_start=3, floor=9).read_from(whole=False) == 9
    assert Series(1, "a", "k", window_start=12, floor=9).read_from(whole=False) == 12
    assert Series(1, "a", "k", window_start=None, floor=None).read_from(whole=False) is None


def test_reads_of_a_key_are_ordered_by_start_with_whole_reads_first() -> None:
    latest = {r: (LatestMetric("loss", 1.0, 9, 0),) for r in ("a", "b", "c")}
    series = {
        ("a", "loss"): Series(1, "a", "loss", 5),
        ("b", "loss"): Series(2, "b", "loss", None),
        ("c", "loss"): Series(3, "c", "loss", 2),
    }
    wanted = history_requests(latest, series, bool)
    assert [(w.run_id, w.start_step) for w in wanted] == [("b", None), ("c", 2), ("a", 5)]


def test_reads_are_chunked_by_key_and_size() -> None:
    latest = {f"r{i}": (LatestMetric("a", 1, 1, 0), LatestMetric("b", 1, 1, 0)) for i in range(5)}
    series = {(r, k): Series(0, r, k, None) for r in latest for k in "ab"}
    chunks = group_by_key(history_requests(latest, series, bool), per_request=2)
    assert [(c[0].key, len(c)) for c in chunks] == [
        ("a", 2),
        ("a", 2),
        ("a", 1),
        ("b", 2),
        ("b", 2),
        ("b", 1),
    ]


# ---------------------------------------------------------------------- which points are new


def test_new_points_are_those_not_captured_and_inside_the_read() -> None:
    read = [point(0), point(1), point(2), point(2), point(3, value=math.nan), point(-1)]
    captured = {point(2).identity}
    fresh = new_points(read, window_start=1, captured=captured)
    assert [p.step for p in fresh] == [1, 3]


def test_a_point_relogged_at_a_step_is_new_and_a_nan_is_one_identity() -> None:
    captured = {point(5, ts=1, value=math.nan).identity}
    again = [point(5, ts=1, value=float("nan")), point(5, ts=2, value=0.3)]
    assert [p.timestamp_ms for p in new_points(again, None, captured)] == [2]


# ---------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("stats", "current", "expected"),
    [
        (WindowStats(None, 0, 9), None, None),  # nothing settled: read every step
        (WindowStats(None, 0, 9), 4, 4),
        (WindowStats(20, None, 20), None, 20),  # one writer: from the settled top on
        (WindowStats(20, 25, 25), 10, 20),
        (WindowStats(20, 3, 25), 20, 3),  # a lagging writer pulls it back
    ],
)
def test_the_window_keeps_what_may_still_land(
    stats: WindowStats, current: int | None, expected: int | None
) -> None:
    assert next_window(current, stats) == expected


def test_a_backfill_sends_points_below_the_frozen_window_and_frozen_identities_only() -> None:
    read = [point(1), point(5), point(9), point(12)]
    needed = needed_by_backfill(read, window_start=6, identities=frozenset({point(9).identity}))
    assert [p.step for p in needed] == [1, 5, 9]
    assert needed_by_backfill(read, None, frozenset()) == []


def test_a_restore_settles_from_now_and_is_read_whole_if_the_run_had_settled() -> None:
    r = run()
    settled = decide(r, known(r, deleted_ms=NOW - 9, settle_until_ms=NOW - 1), NOW, SETTLE)
    assert (settled.change, settled.settle_until_ms, settled.whole) == (
        Change.RESTORED,
        NOW + SETTLE,
        True,
    )


def test_a_skipped_series_does_not_stop_the_reads_of_the_next_ones() -> None:
    latest = {
        "a": (
            LatestMetric("debug", 1.0, 9, 0),  # filtered out
            LatestMetric("gone", 1.0, 9, 0),  # no series (yet)
            LatestMetric("loss", 1.0, 2, 0),  # below its window
            LatestMetric("acc", 1.0, 5, 0),
        )
    }
    series = {
        ("a", "debug"): Series(1, "a", "debug", None),
        ("a", "loss"): Series(2, "a", "loss", 3),
        ("a", "acc"): Series(3, "a", "acc", 5),
    }
    wanted = history_requests(latest, series, lambda k: k != "debug")
    # A latest step equal to the window's start may hold a new point at that very step.
    assert [(w.key, w.start_step) for w in wanted] == [("acc", 5)]


def test_whole_reads_sort_before_reads_from_a_very_negative_step() -> None:
    latest = {r: (LatestMetric("loss", 1.0, 9, 0),) for r in ("a", "b")}
    series = {
        ("a", "loss"): Series(1, "a", "loss", -(2**40)),
        ("b", "loss"): Series(2, "b", "loss", None),
    }
    assert [w.run_id for w in history_requests(latest, series, bool)] == ["b", "a"]


def test_a_point_read_twice_in_one_answer_is_new_once() -> None:
    assert [p.step for p in new_points([point(4), point(4)], None, set())] == [4]


def test_a_backfill_leaves_out_an_uncaptured_point_at_the_frozen_window_step() -> None:
    assert needed_by_backfill([point(6)], window_start=6, identities=frozenset()) == []


def test_points_bound_counts_one_point_per_step_of_each_read() -> None:
    whole = HistoryRequest("r", "loss", None, 9)  # steps 0..9
    tail = HistoryRequest("r", "acc", 5, 9)  # steps 5..9
    empty = HistoryRequest("r", "lr", 5, 3)  # a range already read: at most one point
    assert points_bound([whole]) == 10
    assert points_bound([tail]) == 5
    assert points_bound([empty]) == 1
    assert points_bound([whole, tail, empty]) == 16
