"""The traces planner's decisions, on plain values."""

from __future__ import annotations

import pytest

from exporter.naming import RESERVED_NAMES, TRACE_FAMILIES, metric_family_name
from exporter.planners import traces as plan
from exporter.planners.traces import Marks, MovedRead, Step
from exporter.trace_model import Fingerprint, NamedValues, TraceLive, TracePoint

FP = Fingerprint((("ERROR", 1), ("OK", 3)), 2)


def point(values: dict[str, float], bucket: int | None = None, **dims: str) -> TracePoint:
    return TracePoint(dims, values, bucket)


@pytest.mark.parametrize(
    ("node", "statuses", "assessments", "step"),
    [
        (("1", "2"), FP.statuses, None, Step.ASK_ASSESSMENTS),
        (("1", "2"), FP.statuses, 2, Step.SAME),
        (("1", "2"), FP.statuses, 3, Step.SPLIT),
        (("1", "2"), (("OK", 4),), None, Step.SPLIT),
        (("1",), (("OK", 4),), None, Step.ASK_ASSESSMENTS),
        (("1",), (("OK", 4),), 2, Step.MOVED),
        (("1",), FP.statuses, 3, Step.MOVED),
        (("1",), FP.statuses, 2, Step.SAME),
    ],
)
def test_a_probed_node_is_kept_split_or_read(
    node: tuple[str, ...],
    statuses: tuple[tuple[str, int], ...],
    assessments: int | None,
    step: Step,
) -> None:
    assert plan.bisect_step(node, FP, statuses, assessments) is step


def test_what_a_group_should_show_is_the_sum_of_its_members() -> None:
    stored = {"1": FP, "2": Fingerprint((("OK", 1), ("IN_PROGRESS", 2)), 5)}
    want = plan.expected(["1", "2", "3"], stored)
    assert want == Fingerprint((("ERROR", 1), ("IN_PROGRESS", 2), ("OK", 4)), 7)
    assert want.traces == 7
    answer = [point({"COUNT": 1}, trace_status="ERROR"), point({"COUNT": 0}, trace_status="X")]
    assert plan.statuses_of(answer) == (("ERROR", 1),)


def test_halves_and_chunks_cover_every_experiment_once() -> None:
    ids = [str(i) for i in range(5)]
    assert plan.halves(ids) == [("0", "1"), ("2", "3", "4")]
    assert plan.chunks(ids, 2) == [("0", "1"), ("2", "3"), ("4",)]


def test_buckets_are_due_once_closed_and_settled_and_reads_are_cut_in_ranges() -> None:
    assert plan.due_end(now_ms=100_500, settle_ms=30_000, bucket_ms=10_000) == 70_000
    ranges = plan.read_ranges(0, 2500 * 1000, 1000)
    assert ranges == [(0, 999_999), (1_000_000, 1_999_999), (2_000_000, 2_499_999)]


def test_pending_counts_say_what_landed_before_the_written_horizon() -> None:
    marks = Marks("1", FP, written_until_ms=60_000, settled_traces=2, settled_assessments=0)
    traces = [point({"COUNT": 2}, 60_000), point({"COUNT": 1}, 70_000)]
    assessments = [point({"COUNT": 1}, 60_000)]
    pending = plan.account_pending(marks, FP, traces, assessments, 10_000, first_sight=False)
    assert pending.buckets == ((60_000, 2, 1), (70_000, 1, 0))
    assert (pending.settled_traces, pending.settled_assessments) == (1, 1)
    assert (pending.late_traces, pending.late_assessments) == (1, 1)
    assert pending.last_trace_ms == 80_000
    first = plan.account_pending(marks, FP, traces, assessments, 10_000, first_sight=True)
    assert (first.late_traces, first.late_assessments) == (0, 0)


def test_advancing_moves_pending_counts_into_the_settled_ones() -> None:
    marks = Marks("1", written_until_ms=0, pending=((0, 2, 1), (10_000, 1, 0)))
    moved = plan.advance(marks, 10_000)
    assert moved.pending == ((10_000, 1, 0),)
    assert (moved.settled_traces, moved.settled_assessments, moved.written_until_ms) == (
        2,
        1,
        10_000,
    )
    assert plan.advance(moved, 5_000) is moved
    assert plan.due_with_traces(moved, 20_000)
    assert not plan.due_with_traces(moved, 10_000)


def moved_read(**answers: list[TracePoint]) -> MovedRead:
    base: dict[str, list[TracePoint]] = {
        "names": [
            point({"COUNT": 3}, trace_status="OK", trace_name="a"),
            point({"COUNT": 1}, trace_status="ERROR", trace_name="b"),
        ],
        "cost": [],
        "assessments": [point({"COUNT": 2}, assessment_name="correct")],
        "tokens:input": [point({"SUM": 5}, trace_name="a")],
        "tokens:output": [],
        "tokens:total": [point({"SUM": 7}, trace_name="a")],
    }
    return MovedRead(FP, {**base, **answers})


def test_live_series_come_from_the_per_name_answers_when_every_trace_has_a_name() -> None:
    read = moved_read()
    assert plan.names_cover(read, 10_000)
    live = plan.live_from_moved(read, None, 5, 5, 1_000)
    assert live is not None
    assert live.totals.statuses == {"ERROR": 1, "OK": 3}
    assert live.totals.tokens == {"input": 5, "total": 7}
    assert live.cost_usd is None
    assert live.by_name["b"].statuses == {"ERROR": 1}
    assert live.assessments == {"correct": 2}
    assert live.last_trace_ms == 1_000


def test_token_totals_are_read_whole_when_some_traces_have_no_name() -> None:
    read = moved_read(names=[point({"COUNT": 3}, trace_status="OK", trace_name="a")])
    assert not plan.names_cover(read, 10_000)
    totals = {
        "input": [point({"SUM": 9})],
        "output": [point({})],
        "total": [point({"SUM": 11})],
    }
    live = plan.live_from_moved(MovedRead(read.fingerprint, read.answers, totals), None, 5, 5, None)
    assert live is not None
    assert live.totals.tokens == {"input": 9, "total": 11}


def test_an_experiment_holding_nothing_has_no_live_series() -> None:
    read = MovedRead(Fingerprint(), moved_read().answers)
    assert plan.live_from_moved(read, None, 5, 5, None) is None
    assert plan.trace_families(None, "1", "x") == []


def test_names_beyond_the_bound_are_cut_most_frequent_first() -> None:
    assert plan.top_names({"a": 1, "b": 5, "c": 5}, 2) == (["b", "c"], 1)


def test_the_window_replaces_quantiles_and_means_and_an_empty_window_clears_them() -> None:
    live = TraceLive(
        NamedValues({"OK": 1}),
        {"a": NamedValues({"OK": 1})},
        assessments={"correct": 1},
    )
    answers = {
        "latency": [point({"P50": 100, "P95": 200, "P99": 300})],
        "latency_names": [point({"P50": 90}, trace_name="a"), point({"P50": 1}, trace_name="z")],
        "means": [
            point({"AVG": 0.5}, assessment_name="correct"),
            point({"AVG": 1}, assessment_name="x"),
        ],
    }
    windowed = plan.with_window(live, answers)
    assert windowed.totals.latency_ms == {"P50": 100, "P95": 200, "P99": 300}
    assert windowed.by_name["a"].latency_ms == {"P50": 90}
    assert windowed.assessment_means == {"correct": 0.5}
    cleared = plan.with_window(windowed, None)
    assert cleared.totals.latency_ms == {}
    assert cleared.assessment_means == {}


def test_families_carry_experiment_labels_seconds_and_every_state() -> None:
    live = TraceLive(
        NamedValues({"OK": 2}, {"input": 3.0}, {"P95": 1500.0}),
        {"a": NamedValues({"OK": 2})},
        cost_usd=0.1,
        assessments={"correct": 1},
        assessment_means={"correct": 1.0},
        last_trace_ms=60_000,
    )
    samples = {
        (f.name, tuple(sorted(s.labels.items())), s.value)
        for f in plan.trace_families(live, "7", "bot")
        for s in f.samples
    }
    exp = (("experiment_id", "7"), ("experiment_name", "bot"))
    assert ("mlflow_traces", (*exp, ("status", "ERROR")), 0) in samples
    assert ("mlflow_trace_latency_seconds", (*exp, ("quantile", "0.95")), 1.5) in samples
    assert ("mlflow_trace_cost_usd", exp, 0.1) in samples
    assert ("mlflow_trace_last_bucket_end_seconds", exp, 60.0) in samples
    assert ("mlflow_trace_name_traces", (*exp, ("status", "OK"), ("trace_name", "a")), 2) in samples
    names = {name for name, _, _ in samples}
    assert names <= TRACE_FAMILIES <= RESERVED_NAMES


def test_a_user_metric_never_lands_on_a_trace_family() -> None:
    for family in TRACE_FAMILIES:
        key = family.removeprefix("mlflow_")
        assert metric_family_name(key) != family


def test_bucket_samples_hold_every_state_seconds_tokens_and_bounded_means() -> None:
    answers = {
        "traces": [point({"COUNT": 2}, 0, trace_status="OK")],
        "latency": [point({"P50": 100, "P95": 200, "P99": 300}, 0)],
        "tokens:input": [point({"SUM": 4}, 0)],
        "tokens:output": [],
        "tokens:total": [point({}, 0)],
        "cost": [point({"SUM": 0.25}, 0)],
        "means": [
            point({"AVG": 0.5}, 0, assessment_name="correct"),
            point({"AVG": 2}, 0, assessment_name="unbounded"),
        ],
    }
    samples = plan.bucket_samples("7", "bot", answers, ["correct"])
    got = {(s.family, s.labels[-1], s.value) for s in samples if len(s.labels) == 3}
    assert got == {
        ("mlflow_trace_bucket_traces", ("status", "OK"), 2),
        ("mlflow_trace_bucket_traces", ("status", "ERROR"), 0),
        ("mlflow_trace_bucket_traces", ("status", "IN_PROGRESS"), 0),
        ("mlflow_trace_bucket_latency_seconds", ("quantile", "0.5"), 0.1),
        ("mlflow_trace_bucket_latency_seconds", ("quantile", "0.95"), 0.2),
        ("mlflow_trace_bucket_latency_seconds", ("quantile", "0.99"), 0.3),
        ("mlflow_trace_bucket_tokens", ("kind", "input"), 4),
        ("mlflow_trace_bucket_assessment_value", ("assessment_name", "correct"), 0.5),
    }
    assert {s.bucket_ms for s in samples} == {0}
    (cost,) = [s for s in samples if s.family == "mlflow_trace_bucket_cost_usd"]
    assert (cost.labels, cost.value) == ((("experiment_id", "7"), ("experiment_name", "bot")), 0.25)
