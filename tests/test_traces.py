"""The traces stage seen through whole cycles, against the in-memory MLflow's traces.

Collaborators are the documented fakes of `tests/test_runner.py` (FakeMlflow, FakeGateway,
a FakeReceiver behind a real remote write sink, FakeDeliverySinks that consume trace buckets
or not); the state is the real SQLite store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from exporter.config import Settings
from exporter.mlflow_source import MlflowError
from exporter.planners.series import experiment_key
from exporter.runner import Runner
from exporter.sinks import remote_write as rw
from exporter.sinks.delivery import POINTS, TRACE_BUCKETS
from exporter.sinks.groups import mirror_builder
from exporter.sinks.history import RemoteWriteSink
from exporter.state.traces import TraceMarks
from tests.fakes import FakeSleep
from tests.fakes.mlflow_server import percentile
from tests.fakes.remote_write import FakeReceiver
from tests.fakes.sinks import FakeDeliverySink
from tests.test_runner import Harness, sample

BUCKET = 10
SETTLE = 20
WINDOW = 60


class TraceHarness(Harness):
    """The runner harness with trace settings and, optionally, a remote write receiver."""

    def __init__(self, tmp: Path, history: bool = False, **traces: Any) -> None:
        self.traces = {
            "bucket_seconds": BUCKET,
            "settle_seconds": SETTLE,
            "window_seconds": WINDOW,
            "backfill_seconds": 600,
            **traces,
        }
        self.receiver = FakeReceiver()
        self.history = history
        super().__init__(tmp, sinks=[])

    def _runner(self) -> Runner:
        settings = Settings.model_validate(
            {
                "export": self.export,
                "traces": self.traces,
                "remote_write": {"enabled": self.history, "url": "http://rw:8428/api/v1/write"},
            }
        )
        if self.history:
            client = rw.RemoteWriteClient(settings.remote_write, post=self.receiver)
            self.sinks = [RemoteWriteSink(settings.remote_write, client=client)]  # type: ignore[list-item]
        return Runner(
            settings=settings,
            source=self.mlflow,
            state=self.state,
            metrics=self.metrics,
            health=self.health,
            pushgateway=self.gateway,
            sinks=self.sinks,
            clock=self.clock,
            sleep=FakeSleep(self.clock),
        )

    def value(self, family: str, **labels: str) -> float | None:
        values = self.gateway.value(family, **labels)
        assert len(values) <= 1, (family, labels, values)
        return values[0] if values else None

    def trace_calls(self) -> int:
        return self.mlflow.calls["traces/metrics"]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., TraceHarness]]:
    """Harnesses with given trace settings, each closed after the test whatever happens."""
    made: list[TraceHarness] = []

    def factory(**kwargs: Any) -> TraceHarness:
        made.append(TraceHarness(tmp_path / str(len(made)), **kwargs))
        return made[-1]

    yield factory
    for harness in made:
        harness.state.close()


@pytest.fixture
def h(make: Callable[..., TraceHarness]) -> TraceHarness:
    return make()


def genai(h: TraceHarness, name: str = "chatbot") -> str:
    """An experiment with six traces of two names, an error, one in progress, tokens, a
    cost and judge feedback."""
    exp = h.mlflow.create_experiment(name)
    for i, ms in enumerate((120, 250, 900, 400)):
        t = h.mlflow.add_trace(exp, "answer", duration_ms=ms, tokens=(10 * (i + 1), 5))
        h.mlflow.log_feedback(t, "correct", i % 2 == 0)
    h.mlflow.add_trace(exp, "retrieve", state="ERROR", duration_ms=50, cost_usd=0.25)
    h.mlflow.add_trace(exp, "retrieve", state="IN_PROGRESS")
    return exp


# ---------------------------------------------------------------------- live series


def test_an_experiment_with_traces_gets_live_series_and_one_without_gets_none(
    h: TraceHarness,
) -> None:
    exp = genai(h)
    plain = h.mlflow.create_experiment("training")
    h.ok_cycle()

    assert h.value("mlflow_traces", experiment_id=exp, status="OK") == 4
    assert h.value("mlflow_traces", experiment_id=exp, status="ERROR") == 1
    assert h.value("mlflow_traces", experiment_id=exp, status="IN_PROGRESS") == 1
    assert h.value("mlflow_trace_tokens", experiment_id=exp, kind="input") == 100
    assert h.value("mlflow_trace_tokens", experiment_id=exp, kind="output") == 20
    assert h.value("mlflow_trace_tokens", experiment_id=exp, kind="total") == 120
    assert h.value("mlflow_trace_cost_usd", experiment_id=exp) == 0.25
    assert h.value("mlflow_trace_assessments", experiment_id=exp, assessment_name="correct") == 4
    assert h.value("mlflow_trace_assessment_value", assessment_name="correct") == 0.5
    assert h.value("mlflow_trace_name_traces", trace_name="retrieve", status="ERROR") == 1
    assert h.value("mlflow_trace_name_traces", trace_name="answer", status="ERROR") == 0
    assert h.value("mlflow_trace_name_tokens", trace_name="answer", kind="input") == 100
    # Experiment-level series carry no trace_name label.
    assert all(
        "trace_name" not in s.labels
        for fams in h.gateway.groups.values()
        for f in fams
        if f.name in ("mlflow_traces", "mlflow_trace_tokens", "mlflow_trace_latency_seconds")
        for s in f.samples
    )
    assert not [
        f.name
        for f in h.gateway.groups[experiment_key(plain)]
        if f.name.startswith(("mlflow_trace", "mlflow_traces"))
    ]
    assert sample(h.metrics, "mlflow_exporter_traces_enabled") == 1
    assert sample(h.metrics, "mlflow_exporter_trace_experiments") == 1


def test_latency_quantiles_are_mlflows_over_the_window_in_seconds(h: TraceHarness) -> None:
    exp = genai(h)
    h.ok_cycle()

    latencies = [120, 250, 900, 400, 50]  # the trace in progress has none
    for q, p in (("0.5", 50), ("0.95", 95), ("0.99", 99)):
        got = h.value("mlflow_trace_latency_seconds", experiment_id=exp, quantile=q)
        assert got == pytest.approx(percentile(latencies, p) / 1000)
    answer = h.value("mlflow_trace_name_latency_seconds", trace_name="answer", quantile="0.5")
    assert answer == pytest.approx(percentile([120, 250, 900, 400], 50) / 1000)

    h.ok_cycle(advance=WINDOW + BUCKET)  # the window no longer holds any trace
    assert h.value("mlflow_trace_latency_seconds", experiment_id=exp, quantile="0.5") is None
    assert h.value("mlflow_trace_assessment_value", assessment_name="correct") is None
    assert h.value("mlflow_traces", experiment_id=exp, status="OK") == 4


def test_trace_names_beyond_the_bound_are_left_out_and_counted(
    make: Callable[..., TraceHarness],
) -> None:
    h = make(max_trace_names=2)
    exp = h.mlflow.create_experiment("agents")
    for name, n in (("plan", 3), ("act", 2), ("reflect", 1)):
        for _ in range(n):
            h.mlflow.add_trace(exp, name)
    h.mlflow.add_trace(exp, None)  # a trace without a name still counts in the totals
    h.ok_cycle()

    names = {s.labels["trace_name"] for s in _samples(h, "mlflow_trace_name_traces")}
    assert names == {"plan", "act"}
    assert h.value("mlflow_traces", experiment_id=exp, status="OK") == 7
    assert sample(h.metrics, "mlflow_exporter_excluded", kind="trace_names") == 1


def _samples(h: TraceHarness, family: str) -> list[Any]:
    return [
        s for fams in h.gateway.groups.values() for f in fams if f.name == family for s in f.samples
    ]


def test_pull_mode_serves_the_same_trace_series(h: TraceHarness) -> None:
    exp = genai(h)
    h.ok_cycle()
    reader = h.state.reader()
    try:
        families = mirror_builder(reader, h.runner.settings, h.clock).experiment(exp)
    finally:
        reader.conn.close()
    pulled = {
        (f.name, tuple(sorted(s.labels.items())), s.value) for f in families for s in f.samples
    }
    pushed = {
        (f.name, tuple(sorted(s.labels.items())), s.value)
        for f in h.gateway.groups[experiment_key(exp)]
        for s in f.samples
    }
    assert pulled == pushed
    assert any(name == "mlflow_traces" for name, _, _ in pulled)


# ---------------------------------------------------------------------- cost


@pytest.mark.parametrize("experiments", [3, 40])
def test_an_idle_cycle_costs_two_trace_requests_whatever_the_number_of_genai_experiments(
    make: Callable[..., TraceHarness], experiments: int
) -> None:
    h = make()
    for i in range(experiments):
        genai(h, f"app-{i}")
    h.mlflow.create_experiment("training")
    h.ok_cycle()
    h.ok_cycle(advance=WINDOW + SETTLE + BUCKET)  # windows emptied, buckets written
    h.ok_cycle()
    before, traces_before = h.mlflow.requests(), h.trace_calls()
    h.ok_cycle()
    assert h.trace_calls() - traces_before == 2
    assert h.mlflow.requests() - before <= 12


def test_one_busy_experiment_among_many_is_found_by_halving(
    make: Callable[..., TraceHarness],
) -> None:
    h = make()
    exps = [genai(h, f"app-{i}") for i in range(32)]
    h.ok_cycle()
    h.ok_cycle(advance=WINDOW + SETTLE + BUCKET)
    h.mlflow.add_trace(exps[17], "answer", state="ERROR")
    before = h.trace_calls()
    h.ok_cycle()
    probes = [q for q in h.mlflow.trace_queries[before:] if len(q.experiment_ids) > 1]
    assert len(probes) <= 3 * 5  # about three per level of halving
    assert h.value("mlflow_traces", experiment_id=exps[17], status="ERROR") == 2


# ---------------------------------------------------------------------- changes


def test_new_traces_and_a_late_assessment_show_within_two_cycles(h: TraceHarness) -> None:
    exp = genai(h)
    old = h.mlflow.traces[0]
    h.ok_cycle()
    h.ok_cycle(advance=WINDOW + SETTLE + BUCKET)

    h.mlflow.add_trace(exp, "answer", state="ERROR", duration_ms=3000)
    h.mlflow.log_feedback(old, "helpfulness", 4.0)  # a human scores a trace long closed
    h.ok_cycle()
    assert h.value("mlflow_traces", experiment_id=exp, status="ERROR") == 2
    assert h.value("mlflow_trace_assessments", assessment_name="helpfulness") == 1
    assert h.value("mlflow_trace_latency_seconds", experiment_id=exp, quantile="0.5") == 3.0
    assert sample(h.metrics, "mlflow_exporter_trace_late_changes_total", kind="assessments") == 1


def test_an_unsupported_server_is_detected_once_with_one_warning_and_cycles_succeed(
    h: TraceHarness,
) -> None:
    genai(h)
    h.mlflow.traces_supported = False
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            h.ok_cycle()
    warnings = [e for e in logs if e["event"] == "traces.unsupported"]
    assert len(warnings) == 1
    assert h.trace_calls() == 1
    assert sample(h.metrics, "mlflow_exporter_traces_enabled") == 0
    assert not _samples(h, "mlflow_traces")


def test_traces_disabled_makes_no_trace_request(make: Callable[..., TraceHarness]) -> None:
    h = make(enabled=False)
    genai(h)
    h.ok_cycle()
    assert h.trace_calls() == 0


def test_a_failed_read_keeps_the_marks_and_the_next_cycle_finds_the_move_again(
    h: TraceHarness,
) -> None:
    exp = genai(h)
    h.mlflow.broken["traces/metrics"] = MlflowError("MLflow traces/metrics answered HTTP 503")
    result = h.cycle()
    assert "traces" in result.errors
    assert TraceMarks(h.state.db.conn).load() == {}
    del h.mlflow.broken["traces/metrics"]
    h.ok_cycle()
    assert h.value("mlflow_traces", experiment_id=exp, status="OK") == 4


def test_an_experiment_leaving_scope_forgets_its_trace_marks(h: TraceHarness) -> None:
    exp = genai(h)
    h.ok_cycle()
    assert exp in TraceMarks(h.state.db.conn).load()
    h.mlflow.delete_experiment(exp)
    h.ok_cycle()
    assert TraceMarks(h.state.db.conn).load() == {}


# ---------------------------------------------------------------------- history


def test_closed_settled_buckets_are_written_once_at_their_start(
    make: Callable[..., TraceHarness],
) -> None:
    h = make(history=True)
    exp = genai(h)
    first_bucket = h.mlflow.traces[0].timestamp_ms // (BUCKET * 1000) * BUCKET * 1000
    h.ok_cycle()
    assert not h.receiver.stored  # not settled yet
    h.ok_cycle(advance=SETTLE + BUCKET)
    labels = (
        ("__name__", "mlflow_trace_bucket_traces"),
        ("experiment_id", exp),
        ("experiment_name", "chatbot"),
        ("status", "OK"),
    )
    assert h.receiver.samples(labels) == [(first_bucket, 4.0)]
    tokens = dict(labels[:3]) | {"__name__": "mlflow_trace_bucket_tokens", "kind": "total"}
    assert h.receiver.samples(tuple(sorted(tokens.items()))) == [(first_bucket, 120.0)]
    quantile = dict(labels[:3]) | {
        "__name__": "mlflow_trace_bucket_latency_seconds",
        "quantile": "0.95",
    }
    expected = percentile([120, 250, 900, 400, 50], 95) / 1000
    ((stamp, got),) = h.receiver.samples(tuple(sorted(quantile.items())))
    assert stamp == first_bucket
    assert got == pytest.approx(expected)
    calls = len(h.receiver.calls)

    h.mlflow.add_trace(exp, "answer", ts=h.mlflow.traces[0].timestamp_ms)  # lands late
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE + BUCKET)
    assert h.receiver.samples(labels) == [(first_bucket, 4.0)]  # written once
    assert len(h.receiver.calls) == calls
    assert sample(h.metrics, "mlflow_exporter_trace_late_changes_total", kind="traces") == 1
    assert h.value("mlflow_traces", experiment_id=exp, status="OK") == 5
    assert sample(h.metrics, "mlflow_exporter_trace_history_samples_total") > 0


def test_trace_buckets_go_to_every_sink_that_consumes_them_and_to_no_other(
    make: Callable[..., TraceHarness],
) -> None:
    h = make()
    points_only = FakeDeliverySink(name="pramathus")
    takers = [
        FakeDeliverySink(name=name, batch_size=3, consumes=frozenset({POINTS, TRACE_BUCKETS}))
        for name in ("archive", "lake")
    ]
    h.reopen(sinks=[points_only, *takers])
    exp = genai(h)
    first_bucket = h.mlflow.traces[0].timestamp_ms // (BUCKET * 1000) * BUCKET * 1000
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE + BUCKET)

    traces = [
        (t, v)
        for family, labels, t, v in takers[0].accepted_buckets
        if family == "mlflow_trace_bucket_traces" and dict(labels)["status"] == "OK"
    ]
    assert traces == [(first_bucket, 4.0)]
    assert {dict(labels)["experiment_id"] for _, labels, _, _ in takers[0].accepted_buckets} == {
        exp
    }
    assert sorted(takers[1].accepted_buckets) == sorted(takers[0].accepted_buckets)
    assert takers[0].posts > 1  # batched as the sink plans them (3 buckets a batch)
    assert points_only.accepted_buckets == []
    assert points_only.posts == 0


def test_without_a_sink_consuming_trace_buckets_no_bucket_is_read(
    make: Callable[..., TraceHarness],
) -> None:
    h = make()
    h.reopen(sinks=[FakeDeliverySink(name="pramathus")])
    genai(h)
    h.ok_cycle()
    calls = h.trace_calls()
    h.ok_cycle(advance=SETTLE + BUCKET)

    idle = h.trace_calls() - calls
    taker = FakeDeliverySink(name="archive", consumes=frozenset({POINTS, TRACE_BUCKETS}))
    again = make()
    again.reopen(sinks=[taker])
    genai(again)
    again.ok_cycle()
    calls = again.trace_calls()
    again.ok_cycle(advance=SETTLE + BUCKET)

    assert again.trace_calls() - calls > idle  # the settled buckets were read for the taker
    assert taker.accepted_buckets


def test_each_sink_taking_trace_buckets_applies_its_own_overflow_policy(
    make: Callable[..., TraceHarness],
) -> None:
    both = frozenset({POINTS, TRACE_BUCKETS})
    trimming = FakeDeliverySink(
        name="archive", batch_size=2, consumes=both, queue_max_points=2, overflow="drop_newest"
    )
    waiting = FakeDeliverySink(name="lake", batch_size=2, consumes=both, queue_max_points=2)
    h = make()
    h.reopen(sinks=[trimming, waiting])
    genai(h)
    h.ok_cycle()
    with structlog.testing.capture_logs() as logs:
        h.ok_cycle(advance=SETTLE + BUCKET)

    assert len(trimming.accepted_buckets) == 2  # the first batch; the newer ones dropped
    assert len(waiting.accepted_buckets) > 2  # `wait`: trace buckets are always queued
    lost = [e for e in logs if e["event"] == "queue.overflow_lost"]
    assert [e["sink"] for e in lost] == ["archive"]
    assert lost[0]["lost_points"] == len(waiting.accepted_buckets) - 2
