"""A cycle seen whole: capture, push and delivery against the in-memory MLflow.

Every collaborator is a documented fake (`tests/fakes/mlflow_server.py`,
`tests/fakes/sinks.py`, `tests/fakes/__init__.py`) except the state, which is the real SQLite
store in a temp directory.
Time is a `FakeClock` the tests move; a cycle is "10 s later".
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from exporter.config import Settings
from exporter.health import Health
from exporter.mlflow_source import MlflowError
from exporter.model import LabelRecord
from exporter.planners.series import experiment_key
from exporter.runner import CycleResult, Runner, run_until_drained
from exporter.selfmetrics import SelfMetrics
from exporter.sinks.delivery import Outcome, Reply
from exporter.sinks.history import RemoteWriteSink
from exporter.sinks.remote_write import RemoteWriteClient
from exporter.state import StateStore
from exporter.state.outbox import Outbox
from tests.fakes import FakeClock, FakeSleep
from tests.fakes.mlflow_server import FakeMlflow
from tests.fakes.remote_write import FakeReceiver
from tests.fakes.sinks import FakeDeliverySink, FakeGateway

SETTLE = 60.0
INTERVAL = 10.0


def sample(metrics: SelfMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


class Harness:
    """A runner over fakes; `cycle()` moves the clock one interval and runs a cycle."""

    def __init__(
        self,
        tmp: Path,
        sinks: list[FakeDeliverySink] | None = None,
        series: dict[str, Any] | None = None,
        **export: Any,
    ) -> None:
        self.tmp = tmp
        self.series = series or {}
        self.clock = FakeClock(1_700_000_000.0)
        self.mlflow = FakeMlflow(self.clock)
        self.gateway = FakeGateway()
        self.sinks = [FakeDeliverySink()] if sinks is None else sinks
        self.export = {
            "settle_seconds": SETTLE,
            "interval_seconds": INTERVAL,
            "reconcile_interval_seconds": 3600,
            "state_dir": str(tmp / "state"),
            **export,
        }
        self.metrics = SelfMetrics()
        self.health = Health()
        self.state = StateStore(tmp / "state", clock=self.clock)
        self.runner = self._runner()

    def _runner(self) -> Runner:
        return Runner(
            settings=Settings.model_validate({"export": self.export, "series": self.series}),
            source=self.mlflow,
            state=self.state,
            metrics=self.metrics,
            health=self.health,
            pushgateway=self.gateway,
            sinks=self.sinks,
            clock=self.clock,
            sleep=FakeSleep(self.clock),
        )

    @property
    def sink(self) -> FakeDeliverySink:
        return self.sinks[0]

    def cycle(self, advance: float = INTERVAL) -> CycleResult:
        self.clock.advance(advance)
        return self.runner.run_cycle()

    def ok_cycle(self, advance: float = INTERVAL) -> CycleResult:
        result = self.cycle(advance)
        assert result.ok, result.reason()
        return result

    def reopen(self, sinks: list[FakeDeliverySink] | None = None) -> None:
        """A new process on the same state directory (export-once after export-once)."""
        self.state.close()
        self.state = StateStore(self.tmp / "state", clock=self.clock)
        if sinks is not None:
            self.sinks = sinks
        self.runner = self._runner()

    def exactly_once(self, sink: FakeDeliverySink | None = None) -> bool:
        sink = sink or self.sink
        counts = sink.counts()
        return sink.delivered() == self.mlflow.all_points() and set(counts.values()) <= {1}


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    harness.state.close()


# ---------------------------------------------------------------------- delivery


def test_a_first_cycle_delivers_every_point_once_and_the_next_sends_nothing(h: Harness) -> None:
    exp = h.mlflow.create_experiment("churn")
    runs = [h.mlflow.create_run(exp) for _ in range(3)]
    for run in runs:
        h.mlflow.log_many(run, "loss", [1.0, 0.5, 0.25])
        h.mlflow.log_many(run, "val/loss", [float("nan"), 2.0])
        h.mlflow.finish(run)

    first = h.ok_cycle()
    second = h.ok_cycle()

    assert h.exactly_once()
    assert first.points_spooled == 15
    assert second.points_spooled == 0
    assert len(h.sink.accepted) == 15


def test_a_second_process_on_the_same_state_resends_nothing(h: Harness) -> None:
    exp = h.mlflow.create_experiment("churn")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [3.0, 2.0])
    h.ok_cycle()

    h.reopen()
    h.mlflow.log(run, "loss", 1.0, step=2)
    h.ok_cycle()

    assert h.exactly_once()


def test_points_landing_out_of_order_while_a_run_settles_are_all_delivered(h: Harness) -> None:
    exp = h.mlflow.create_experiment("async")
    run = h.mlflow.create_run(exp)
    t0 = int(h.clock() * 1000)
    # Asynchronous logging: the batch with steps 5..9 lands before the one with 0..4.
    for step in range(5, 10):
        h.mlflow.log(run, "loss", 1.0 / (step + 1), step, t0 + step)
    h.ok_cycle()
    for step in range(5):
        h.mlflow.log(run, "loss", 1.0 / (step + 1), step, t0 + step)
    h.ok_cycle()

    assert h.exactly_once()


def test_a_late_point_below_the_window_of_a_long_settled_run_is_the_documented_gap(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("late")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0, 0.9, 0.8], first_step=10)
    h.mlflow.finish(run)
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 3)  # long settled: its window is its top step

    late = h.mlflow.log(run, "loss", 5.0, step=1)  # below the latest step: search never shows it
    h.ok_cycle()
    h.ok_cycle(advance=3600 * 2)  # even the sweep cannot see a point below the latest

    delivered = h.sink.delivered()
    assert (late.run_id, "loss", 1, late.timestamp_ms, late.identity[2]) not in delivered
    assert delivered == h.mlflow.all_points() - {
        (late.run_id, "loss", 1, late.timestamp_ms, late.identity[2])
    }


def test_metrics_logged_to_a_run_just_finished_are_delivered_within_two_cycles(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("autolog")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "training_loss", [0.5, 0.4])
    h.mlflow.finish(run)
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE / 2)

    # `model.score(...)` after fit, under autolog: new keys on the FINISHED run.
    h.mlflow.log(run, "test_accuracy", 0.91)
    h.mlflow.log(run, "training_loss", 0.35, step=2)
    h.ok_cycle()
    h.ok_cycle()

    assert h.exactly_once()
    assert h.gateway.value("mlflow_test_accuracy", metric_key="test_accuracy") == [0.91]


def test_a_run_created_with_an_old_start_time_that_just_ended_is_seen_next_cycle(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("grid")
    parent = h.mlflow.create_run(exp)
    h.ok_cycle()
    h.mlflow.create_run(exp)  # a newer run elsewhere
    h.ok_cycle(advance=SETTLE * 5)

    # GridSearchCV children: the parent's start time, terminated at once.
    child = h.mlflow.create_run(exp, start_ms=h.mlflow.runs[parent].run.start_time_ms)
    h.mlflow.log(child, "mean_test_score", 0.8)
    h.mlflow.finish(child)
    h.ok_cycle()

    assert h.exactly_once()
    assert h.gateway.value("mlflow_run_info", run_id=child[:12])
    # Found by the cycle's own searches, not left for the background sweep.
    assert sample(h.metrics, "mlflow_exporter_reconcile_found_total", kind="new") == 0


def test_a_run_imported_with_old_times_is_found_by_the_sweep_and_counted(tmp_path: Path) -> None:
    h = Harness(tmp_path, reconcile_interval_seconds=0)  # a full sweep pass every cycle
    exp = h.mlflow.create_experiment("imports")
    h.mlflow.create_run(exp)
    h.ok_cycle()
    old = int(h.clock() * 1000) - 86_400_000
    imported = h.mlflow.create_run(exp, start_ms=old)
    h.mlflow.log(imported, "auc", 0.7, ts=old + 10)
    h.mlflow.finish(imported, end_ms=old + 1000)

    h.ok_cycle()

    assert h.exactly_once()
    assert sample(h.metrics, "mlflow_exporter_reconcile_found_total", kind="new") == 1
    h.state.close()


def test_a_restored_run_resends_nothing_even_after_its_settle_window(h: Harness) -> None:
    exp = h.mlflow.create_experiment("restore")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0, 0.5])
    h.mlflow.finish(run)
    h.ok_cycle()
    h.mlflow.delete_run(run)
    h.ok_cycle()
    assert not h.gateway.value("mlflow_loss", run_id=run[:12])

    h.mlflow.restore_run(run)
    h.ok_cycle()
    assert h.gateway.value("mlflow_loss", run_id=run[:12]) == [0.5]
    h.mlflow.delete_run(run)
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 2)
    h.mlflow.restore_run(run)
    h.ok_cycle(advance=3700)  # only the sweep sees a restore this late

    assert h.exactly_once()
    assert h.gateway.value("mlflow_loss", run_id=run[:12]) == [0.5]


def test_renaming_and_tagging_a_finished_run_show_within_a_cycle(h: Harness) -> None:
    exp = h.mlflow.create_experiment("meta")
    run = h.mlflow.create_run(exp, name="before")
    h.mlflow.log(run, "loss", 1.0)
    h.mlflow.finish(run)
    h.ok_cycle()

    h.mlflow.update(run, run_name="after")
    h.mlflow.set_tag(run, "team", "growth")
    h.ok_cycle()

    assert h.gateway.value("mlflow_run_info", run_id=run[:12], run_name="after") == [1.0]
    h.mlflow.log(run, "loss", 0.5, step=1)
    h.ok_cycle()
    assert h.sink.contexts[run].tags["team"] == "growth"


def test_two_writers_and_a_point_relogged_at_one_step_are_each_delivered_once(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("ranks")
    run = h.mlflow.create_run(exp)
    t0 = int(h.clock() * 1000)
    for step in range(20):  # rank 0 runs ahead of rank 1
        h.mlflow.log(run, "loss", 1.0, step, t0 + step)
    h.ok_cycle()
    for step in range(20):
        h.mlflow.log(run, "loss", 2.0, step, t0 + 100 + step)
    h.mlflow.log(run, "loss", 3.0, 19, t0 + 500)  # re-logged at the latest step
    h.ok_cycle()

    assert h.exactly_once()
    assert len(h.sink.accepted) == 41


def test_a_sink_enabled_later_gets_the_whole_history_and_the_first_gets_nothing_again(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("backfill")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [float(i) for i in range(30)])
    h.mlflow.finish(run)
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 2)  # settled: most identities pruned from the ledger
    first = h.sink

    history = FakeDeliverySink(name="remote_write")
    h.reopen(sinks=[first, history])
    h.mlflow.log(run, "loss", 99.0, step=30)
    h.ok_cycle()
    h.ok_cycle(advance=3700)  # only the sweep sees a point added to a long-settled run

    assert h.exactly_once(first)
    assert h.exactly_once(history)


def test_a_disabled_sink_forgets_its_queue(h: Harness) -> None:
    exp = h.mlflow.create_experiment("off")
    run = h.mlflow.create_run(exp)
    h.mlflow.log(run, "loss", 1.0)
    h.sink.script = [Reply(Outcome.RETRY, "Pramathus answered HTTP 503")] * 100
    assert not h.cycle().ok
    assert h.state.outbox("pramathus").totals().points == 1

    h.reopen(sinks=[])
    h.ok_cycle()

    assert h.state.outbox("pramathus").totals().points == 0


def remote_write_runner(
    h: Harness, settings: Settings, receiver: FakeReceiver, with_gateway: bool = True
) -> None:
    """Give `h` a runner whose one sink is remote write to `receiver`, its `run_id` length
    read from the state as the app wires it."""
    sink = RemoteWriteSink(
        settings.remote_write,
        run_id_length=lambda: max(h.state.load(LabelRecord).run_id_length, 12),
        client=RemoteWriteClient(settings.remote_write, post=receiver, clock=h.clock),
    )
    h.runner = Runner(
        settings=settings,
        source=h.mlflow,
        state=h.state,
        metrics=h.metrics,
        health=h.health,
        pushgateway=h.gateway if with_gateway else None,
        sinks=[sink],
        clock=h.clock,
        sleep=FakeSleep(h.clock),
    )


@pytest.mark.parametrize("prometheus", [False, True], ids=["prometheus_off", "prometheus_on"])
def test_two_runs_sharing_12_characters_get_two_remote_write_series_whatever_sinks_are_on(
    tmp_path: Path, prometheus: bool
) -> None:
    # The run_id length used to grow only in the Pushgateway's stage, after remote write had
    # encoded the points (and never with Prometheus off): both runs went out as one series.
    h = Harness(tmp_path, sinks=[])
    settings = Settings.model_validate(
        {
            "export": h.export,
            "prometheus": {"enabled": prometheus},
            "remote_write": {"enabled": True, "url": "http://127.0.0.1:9/api/v1/write"},
        }
    )
    receiver = FakeReceiver(in_order=False)
    remote_write_runner(h, settings, receiver, with_gateway=prometheus)
    exp = h.mlflow.create_experiment("twins")
    first = h.mlflow.create_run(exp, run_id="0123456789ab" + "0" * 20)
    h.mlflow.log(first, "loss", 1.0)
    try:
        h.ok_cycle()
        second = h.mlflow.create_run(exp, run_id="0123456789ab" + "1" * 20)
        h.mlflow.log(second, "loss", 2.0)
        h.ok_cycle()
    finally:
        h.state.close()

    labelled = [
        (dict(ts.labels)["run_id"], ts.samples[0][1])
        for call in receiver.calls
        for ts in call.series
        if dict(ts.labels)["__name__"] == "mlflow_loss"
    ]
    # The first run alone had 12 characters; the second's first point already has 13.
    assert labelled == [("0123456789ab", 1.0), ("0123456789ab1", 2.0)]


def test_a_point_queued_before_the_run_id_length_grew_goes_out_with_the_delivering_cycles(
    tmp_path: Path,
) -> None:
    # Queues hold captured points, encoded at delivery: a point that waited in the queue
    # while a second run sharing its prefix appeared carries the label the Pushgateway
    # shows for its run in the cycle that delivers it, never the one of its capture.
    h = Harness(tmp_path, sinks=[])
    settings = Settings.model_validate(
        {
            "export": h.export,
            "remote_write": {"enabled": True, "url": "http://127.0.0.1:9/api/v1/write"},
        }
    )
    receiver = FakeReceiver(in_order=False, outages=[401])  # blocks the first cycle
    remote_write_runner(h, settings, receiver)
    exp = h.mlflow.create_experiment("twins")
    first = h.mlflow.create_run(exp, run_id="0123456789ab" + "0" * 20)
    h.mlflow.log(first, "loss", 1.0)
    try:
        assert not h.cycle().ok  # captured under a 12-character label, still queued
        assert h.gateway.value("mlflow_loss", run_id="0123456789ab") == [1.0]
        second = h.mlflow.create_run(exp, run_id="0123456789ab" + "1" * 20)
        h.mlflow.log(second, "loss", 2.0)
        h.ok_cycle()
        shown = h.gateway.value("mlflow_loss", run_id="0123456789ab0")
    finally:
        h.state.close()

    delivered = [
        (dict(ts.labels)["run_id"], ts.samples[0][1])
        for call in receiver.calls
        if call.status == 204
        for ts in call.series
        if dict(ts.labels)["__name__"] == "mlflow_loss"
    ]
    assert sorted(delivered) == [("0123456789ab0", 1.0), ("0123456789ab1", 2.0)]
    assert shown == [1.0]  # the same label as the Pushgateway's for the first run


def test_runs_mirrored_by_a_capture_that_stopped_early_still_decide_the_run_id_length(
    h: Harness,
) -> None:
    first = h.mlflow.create_run(h.mlflow.create_experiment("a"), run_id="fedcba9876540" + "0" * 19)
    h.mlflow.log(first, "loss", 1.0)
    h.ok_cycle()
    h.mlflow.create_run(h.mlflow.create_experiment("b"), run_id="fedcba9876541" + "1" * 19)
    # A stop once the new experiment's first page is mirrored, before capture decides.
    h.runner.should_stop = lambda: h.state.mirror.run_count() == 2

    h.cycle()

    assert h.state.load(LabelRecord).run_id_length == 13
    # Pushed again at once with the longer label.
    assert h.gateway.value("mlflow_loss", run_id="fedcba9876540") == [1.0]


# ---------------------------------------------------------------------- costs


def test_a_third_sink_gets_its_own_metrics_and_error_stage_from_its_name(
    tmp_path: Path,
) -> None:
    # Sink names used to be a fixed tuple in selfmetrics: a third one raised KeyError.
    third = FakeDeliverySink(name="third_sink")
    h = Harness(tmp_path, sinks=[FakeDeliverySink(), FakeDeliverySink(name="remote_write"), third])
    try:
        queued = "mlflow_exporter_third_sink_spool_points"
        assert h.metrics.registry.get_sample_value(queued) == 0.0  # there before any cycle
        assert sample(h.metrics, "mlflow_exporter_errors_total", stage="third_sink") == 0.0
        run = h.mlflow.create_run(h.mlflow.create_experiment("three"))
        h.mlflow.log_many(run, "loss", [0.5, 0.25, 0.125])
        h.ok_cycle()
        third.script = [Reply(Outcome.RETRY, "third answered HTTP 503")] * 100
        h.mlflow.log(run, "loss", 0.0625, step=3)
        assert not h.cycle().ok
    finally:
        h.state.close()

    assert sample(h.metrics, "mlflow_exporter_third_sink_points_sent_total") == 3
    assert sample(h.metrics, "mlflow_exporter_third_sink_spool_points") == 1
    assert sample(h.metrics, "mlflow_exporter_errors_total", stage="third_sink") == 1
    assert sample(h.metrics, "mlflow_exporter_pramathus_points_sent_total") == 4


def test_points_a_receiver_acknowledges_but_drops_are_counted_logged_and_not_sent_again(
    tmp_path: Path,
) -> None:
    # An OTLP partial success: the request is acknowledged, some of its points dropped.
    sink = FakeDeliverySink(script=[Reply(Outcome.ACCEPTED, dropped_by_receiver=2)])
    h = Harness(tmp_path, sinks=[sink])
    try:
        run = h.mlflow.create_run(h.mlflow.create_experiment("partial"))
        h.mlflow.log_many(run, "loss", [0.5, 0.25, 0.125])
        with structlog.testing.capture_logs() as logs:
            h.ok_cycle()
        h.ok_cycle()
    finally:
        h.state.close()

    assert sample(h.metrics, "mlflow_exporter_pramathus_receiver_dropped_points_total") == 2
    assert sample(h.metrics, "mlflow_exporter_pramathus_points_sent_total") == 3
    [line] = [e for e in logs if e["event"] == "delivery.drained"]
    assert line["dropped_by_receiver"] == 2
    assert sink.posts == 1


def test_an_idle_cycle_makes_the_same_few_requests_whatever_the_number_of_runs(
    tmp_path: Path,
) -> None:
    counts = []
    for n in (20, 400):
        h = Harness(tmp_path / str(n))
        exp = h.mlflow.create_experiment("idle")
        for _ in range(n):
            run = h.mlflow.create_run(exp)
            h.mlflow.log(run, "loss", 1.0)
            h.mlflow.finish(run)
        h.ok_cycle()
        h.ok_cycle(advance=SETTLE * 2)
        before = h.mlflow.requests()
        h.ok_cycle()
        counts.append(h.mlflow.requests() - before)
        h.state.close()
    assert counts[0] == counts[1] <= 10


def test_the_sweep_spreads_a_pass_over_the_reconcile_interval_and_idles_in_between(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, reconcile_interval_seconds=600)
    h.mlflow.page_size = 10
    h.runner.settings = Settings.model_validate({"export": h.export, "mlflow": {"page_size": 10}})
    exp = h.mlflow.create_experiment("many")
    for _ in range(50):  # five pages: one due every 120 s, every 12th cycle
        h.mlflow.finish(h.mlflow.create_run(exp))
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 2)
    before = h.mlflow.calls["runs/search"]
    per_cycle = []
    for _ in range(60):  # 600 s: one whole pass
        searched = h.mlflow.calls["runs/search"]
        h.ok_cycle()
        per_cycle.append(h.mlflow.calls["runs/search"] - searched)
    deltas = 4  # the three delta searches and the deleted-runs probe, every cycle
    sweep_pages = [n - deltas for n in per_cycle]
    assert sum(sweep_pages) in (5, 6)
    assert sweep_pages.count(0) >= 54
    assert h.mlflow.calls["runs/search"] - before == sum(per_cycle)
    assert sample(h.metrics, "mlflow_exporter_sweep_passes_total") >= 1
    h.state.close()


class InFlight:
    """The fake MLflow with history reads that count how many are in flight at once. Each
    read waits (up to `gate` seconds) for another to start, as reads overlap on a real
    server with several workers; alone, it goes on when the wait runs out."""

    def __init__(self, mlflow: FakeMlflow, gate: float) -> None:
        self.mlflow, self.gate = mlflow, gate
        self.lock = threading.Lock()
        self.overlap = threading.Event()
        self.now = self.most = 0

    def histories(self, wanted: Any) -> Any:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            if self.now > 1:
                self.overlap.set()
        try:
            self.overlap.wait(self.gate)
            return self.mlflow.histories(wanted)
        finally:
            with self.lock:
                self.now -= 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mlflow, name)


@pytest.mark.parametrize(("concurrency", "gate"), [(1, 0.2), (4, 10.0)])
def test_history_reads_in_flight_follow_mlflow_concurrency(
    tmp_path: Path, concurrency: int, gate: float
) -> None:
    h = Harness(tmp_path)
    h.runner.settings = Settings.model_validate(
        {"export": h.export, "mlflow": {"concurrency": concurrency}}
    )
    reads = InFlight(h.mlflow, gate)
    h.runner.source = reads
    exp = h.mlflow.create_experiment("boot")
    for _ in range(300):  # three reads of 100 runs
        run = h.mlflow.create_run(exp)
        h.mlflow.log_many(run, "loss", [1.0, 0.5])
        h.mlflow.finish(run)

    h.ok_cycle()

    assert h.exactly_once()
    if concurrency == 1:
        assert reads.most == 1  # never two requests at a time
    else:
        assert reads.most >= 2
    h.state.close()


def test_a_capture_shows_its_progress_in_readyz_gauges_and_a_log_line(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path)
    h.runner.settings = Settings.model_validate({"export": h.export, "mlflow": {"concurrency": 1}})
    exp = h.mlflow.create_experiment("boot")
    runs = [h.mlflow.create_run(exp) for _ in range(250)]
    for run in runs:
        h.mlflow.log_many(run, "loss", [1.0, 0.5, 0.25])
        h.mlflow.finish(run)
    histories = h.mlflow.histories

    def slow(wanted: Any) -> Any:
        h.clock.advance(6.0)  # each read of 100 runs takes 6 s
        return histories(wanted)

    h.mlflow.histories = slow  # type: ignore[method-assign]
    with structlog.testing.capture_logs() as logs:
        h.ok_cycle()

    lines = [e for e in logs if e["event"] == "capture.progress"]
    assert [(e["runs_done"], e["runs_total"]) for e in lines] == [(200, 250), (250, 250)]
    assert lines[0]["points_done"] == 600
    assert lines[0]["eta_seconds"] == 3.0  # 50 runs left at 200 runs / 12 s
    assert lines[-1]["finished"] is True
    progress = h.health.progress()
    assert progress is not None
    assert (progress["runs_done"], progress["points_done"]) == (250, 750)
    assert progress["points_estimated"] == 750
    assert sample(h.metrics, "mlflow_exporter_capture_runs", state="due") == 250
    assert sample(h.metrics, "mlflow_exporter_capture_runs", state="done") == 250
    assert sample(h.metrics, "mlflow_exporter_capture_eta_seconds") == 0
    h.state.close()


def test_the_deleted_runs_probe_reads_a_short_page_and_the_sweep_finds_the_rest(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("purge")
    runs = [h.mlflow.create_run(exp) for _ in range(130)]
    for run in runs:
        h.mlflow.finish(run)
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 2)  # settled: no longer re-read by id
    for run in runs:
        h.mlflow.delete_run(run)

    h.ok_cycle()
    assert h.gateway.value("mlflow_experiment_runs", status="FINISHED") == [30.0]
    h.ok_cycle(advance=3700)  # the sweep's next page
    assert h.gateway.value("mlflow_experiment_runs", status="FINISHED") == [0.0]
    assert sample(h.metrics, "mlflow_exporter_reconcile_found_total", kind="removed") == 30


def test_a_settling_run_costs_history_reads_and_a_settled_one_does_not(h: Harness) -> None:
    exp = h.mlflow.create_experiment("cost")
    run = h.mlflow.create_run(exp)
    h.mlflow.log(run, "loss", 1.0)
    h.mlflow.log(run, "acc", 1.0)
    h.mlflow.finish(run)
    h.ok_cycle()
    settling = h.mlflow.calls["metrics/get-history-bulk-interval"]
    h.ok_cycle()
    assert h.mlflow.calls["metrics/get-history-bulk-interval"] == settling + 2  # one per key
    h.ok_cycle(advance=SETTLE * 2)
    settled = h.mlflow.calls["metrics/get-history-bulk-interval"]
    h.ok_cycle()
    assert h.mlflow.calls["metrics/get-history-bulk-interval"] == settled


def test_a_run_that_changes_after_it_settled_is_read_whole_once_then_from_its_window(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("window")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [float(i) for i in range(50)])
    h.mlflow.finish(run)
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 2)

    h.mlflow.log(run, "loss", 0.0, step=50)  # a point logged long after the run settled
    h.mlflow.history_requests.clear()
    h.ok_cycle(advance=3700)  # the sweep sees the latest step move
    h.ok_cycle(advance=SETTLE / 2)  # still settling: from the window on

    starts = [(w.start_step, w.end_step) for w in h.mlflow.history_requests]
    assert starts == [(None, 50), (49, 50)]
    assert h.exactly_once()


def test_a_run_resumed_from_a_checkpoint_gets_its_relogged_steps_delivered(h: Harness) -> None:
    exp = h.mlflow.create_experiment("resume")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0 / (s + 1) for s in range(10)])
    h.mlflow.finish(run, status="FAILED")  # the job crashed at step 9
    h.ok_cycle()
    h.ok_cycle(advance=SETTLE * 2)

    h.mlflow.update(run, status="RUNNING", end_time_ms=None)  # resumed from step 6
    h.mlflow.log_many(run, "loss", [0.5, 0.4, 0.3], first_step=6)
    h.ok_cycle()

    assert h.exactly_once()


def test_a_lagging_writer_keeps_the_window_low_enough_for_its_points(h: Harness) -> None:
    exp = h.mlflow.create_experiment("lag")
    run = h.mlflow.create_run(exp)
    t0 = int(h.clock() * 1000)
    for step in range(20):  # rank 0, far ahead
        h.mlflow.log(run, "loss", 0.0, step, t0 + step)
    h.ok_cycle()
    # Rank 1 started late and keeps 20 steps behind rank 0, both logging every cycle, so
    # the run keeps settling well past the settle horizon of rank 0's first points.
    for i in range(12):
        h.mlflow.log(run, "loss", 0.0, 20 + i, t0 + 1000 + i)
        h.mlflow.log(run, "loss", 1.0, i, t0 + 1000 + i)
        h.ok_cycle(advance=SETTLE / 3)

    assert h.exactly_once()


# ---------------------------------------------------------------------- failure paths


def test_an_mlflow_outage_fails_the_cycle_but_the_queue_drains_and_groups_stay(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("outage")
    run = h.mlflow.create_run(exp)
    h.mlflow.log(run, "loss", 1.0)
    h.sink.script = [Reply(Outcome.RETRY, "Pramathus answered HTTP 503")] * 1000
    h.cycle()
    h.sink.script = []
    h.mlflow.broken["experiments/search"] = MlflowError("cannot reach MLflow at http://x")

    result = h.cycle()

    assert result.errors == {"mlflow": "cannot reach MLflow at http://x"}
    assert h.exactly_once()
    assert h.gateway.value("mlflow_loss") == [1.0]
    assert h.health.view().status == "failing"
    assert sample(h.metrics, "mlflow_exporter_up") == 0


def test_an_mlflow_error_part_way_through_histories_loses_and_repeats_nothing(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("partial")
    runs = [h.mlflow.create_run(exp) for _ in range(3)]
    for run in runs:
        for key in ("a", "b", "c"):
            h.mlflow.log_many(run, key, [1.0, 2.0])
    h.mlflow.broken["metrics/get-history-bulk-interval"] = MlflowError("MLflow timed out")
    real = h.mlflow.histories
    calls = 0

    def flaky(wanted: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise MlflowError("MLflow metrics/get-history-bulk-interval timed out after 30s")
        return real(wanted)

    del h.mlflow.broken["metrics/get-history-bulk-interval"]
    h.mlflow.histories = flaky  # type: ignore[method-assign]
    assert not h.cycle().ok
    h.ok_cycle()

    assert h.exactly_once()


def test_an_answer_of_the_wrong_shape_fails_the_cycle_and_changes_nothing(h: Harness) -> None:
    exp = h.mlflow.create_experiment("shape")
    run = h.mlflow.create_run(exp)
    h.mlflow.log(run, "loss", 1.0)
    h.ok_cycle()
    groups = dict(h.gateway.groups)
    h.mlflow.broken["experiments/search"] = MlflowError(
        "MLflow experiments/search answered a JSON list, not an object"
    )

    result = h.cycle()

    assert "not an object" in result.errors["mlflow"]
    assert h.gateway.groups.keys() == groups.keys()
    assert h.state.mirror.run_count() == 1


def test_a_crash_is_recorded_in_health_counters_and_logs_and_the_next_cycle_recovers(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = h.mlflow.create_experiment("bug")
    h.mlflow.create_run(exp)

    def boom(*_: Any) -> None:
        raise KeyError("experiment_id")

    monkeypatch.setattr(h.mlflow, "experiments", boom)
    for _ in range(4):
        result = h.cycle()
        assert result.crashed == "mlflow stage: KeyError: 'experiment_id'"
    view = h.health.view()
    assert (view.status, view.ready) == ("crashed", False)
    assert sample(h.metrics, "mlflow_exporter_cycles_total", result="crash") == 4
    assert sample(h.metrics, "mlflow_exporter_errors_total", stage="internal") == 4

    monkeypatch.undo()
    h.ok_cycle()
    assert h.health.view().status == "ok"


def test_a_locked_state_database_fails_the_cycle_and_is_kept(h: Harness) -> None:
    exp = h.mlflow.create_experiment("locked")
    h.mlflow.create_run(exp)
    h.ok_cycle()
    h.state.db.conn.execute("PRAGMA busy_timeout = 50")
    other = sqlite3.connect(h.tmp / "state" / "state.db", timeout=0.05)
    other.execute("BEGIN EXCLUSIVE")
    try:
        result = h.cycle()
    finally:
        other.rollback()
        other.close()

    assert "database is locked" in result.errors["state"]
    assert "another program holds it" in result.errors["state"]
    assert h.state.set_aside is None
    assert sample(h.metrics, "mlflow_exporter_errors_total", stage="state") >= 1
    assert not (h.tmp / "state" / "state.db.check").exists()  # busy is not damage
    h.ok_cycle()


def test_a_read_only_state_database_names_the_file_and_how_to_fix_it(h: Harness) -> None:
    exp = h.mlflow.create_experiment("read-only")
    h.mlflow.create_run(exp)
    h.ok_cycle()
    # SQLite's own refusal (SQLITE_READONLY), as a file without write permission gives a
    # non-root user; query_only makes it happen for root too.
    h.state.db.conn.execute("PRAGMA query_only = ON")
    h.mlflow.create_run(exp)

    result = h.cycle()

    assert result.errors["state"] == (
        f"state database {h.tmp / 'state' / 'state.db'}: attempt to write a readonly database; "
        "make the file and its directory writable by the exporter's user (chown/chmod), or "
        "set EXPORTER_STATE_DIR to a writable directory (mlflow stage)"
    )
    h.state.db.conn.execute("PRAGMA query_only = OFF")
    h.ok_cycle()


def test_a_cycle_that_meets_corruption_has_the_next_start_check_the_whole_file(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    damaged = sqlite3.DatabaseError("database disk image is malformed")
    damaged.sqlite_errorname = "SQLITE_CORRUPT"

    def broken(*_: Any) -> None:
        raise damaged

    monkeypatch.setattr(h.state.mirror, "experiments", broken)
    result = h.cycle()

    assert "malformed" in result.errors["state"]
    assert (h.tmp / "state" / "state.db.check").exists()


# ---------------------------------------------------------------------- Pushgateway


def test_only_changed_groups_are_pushed_and_all_of_them_after_a_gateway_restart(
    h: Harness,
) -> None:
    quiet, busy = h.mlflow.create_experiment("quiet"), h.mlflow.create_experiment("busy")
    h.mlflow.log(h.mlflow.create_run(quiet), "loss", 1.0)
    live = h.mlflow.create_run(busy)
    h.mlflow.log(live, "loss", 2.0)
    h.ok_cycle()
    pushes = len(h.gateway.pushes)
    h.ok_cycle(advance=SETTLE * 2)
    idle = len(h.gateway.pushes) - pushes

    h.mlflow.log(live, "loss", 1.5, step=1)
    h.ok_cycle()
    changed = h.gateway.pushes[pushes + idle :]
    h.gateway.restart()
    h.ok_cycle()

    assert idle == 0
    assert changed == [experiment_key(busy)]
    assert len(h.gateway.groups) == 3  # both experiments and the registry


def test_groups_of_experiments_that_went_are_deleted(h: Harness) -> None:
    keep, drop = h.mlflow.create_experiment("keep"), h.mlflow.create_experiment("drop")
    h.mlflow.create_run(keep)
    h.mlflow.create_run(drop)
    h.ok_cycle()
    h.mlflow.delete_experiment(drop)
    h.ok_cycle()

    assert experiment_key(drop) not in h.gateway.groups
    assert h.gateway.value("mlflow_experiments", lifecycle_stage="deleted") == [1.0]


def test_every_model_stage_has_a_series_and_aliases_carry_their_runs_metrics(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("models")
    champion, challenger = h.mlflow.create_run(exp), h.mlflow.create_run(exp)
    h.mlflow.log(champion, "accuracy", 0.9)
    h.mlflow.log(challenger, "accuracy", 0.8)
    h.mlflow.register("churn", champion, stage="Production", aliases=("champion",))
    h.mlflow.register("churn", challenger, aliases=("challenger",))
    h.ok_cycle()

    versions = {
        stage: h.gateway.value("mlflow_registered_model_versions", model_name="churn", stage=stage)
        for stage in ("None", "Staging", "Production", "Archived")
    }
    assert versions == {"None": [1.0], "Staging": [0.0], "Production": [1.0], "Archived": [0.0]}
    assert h.gateway.value("mlflow_model_alias_metric", alias="champion") == [0.9]
    assert h.gateway.value("mlflow_model_alias_metric", alias="challenger") == [0.8]


def test_max_experiments_bounds_per_run_series_only_never_the_counts(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_experiments=1)
    old, new = h.mlflow.create_experiment("old"), h.mlflow.create_experiment("new")
    h.mlflow.log(h.mlflow.create_run(old, start_ms=1_000), "loss", 1.0)
    h.mlflow.log(h.mlflow.create_run(new), "loss", 2.0)
    h.ok_cycle()

    assert h.gateway.value("mlflow_loss") == [2.0]
    runs = h.gateway.value("mlflow_experiment_runs", status="RUNNING")
    assert sorted(runs) == [1.0, 1.0]
    assert h.exactly_once()
    h.state.close()


DAY_MS = 86_400_000


def test_per_run_series_cover_recent_runs_and_the_newest_few_and_old_ones_leave_the_gateway(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, series={"run_window": "7d", "min_runs_per_experiment": 1})
    now = int(h.clock() * 1000)
    busy, quiet = h.mlflow.create_experiment("busy"), h.mlflow.create_experiment("quiet")
    runs: dict[str, str] = {}
    for name, exp, start_days, end_days in (
        ("old", busy, 30, 29),  # ended long ago, not the newest: no per-run series
        ("long", busy, 12, 1),  # started long ago, ended yesterday: in the window
        ("newest", busy, 10, 9),  # ended long ago but the newest of its experiment
        ("running", busy, 40, None),  # unfinished: always
        ("quiet-older", quiet, 60, 59),
        ("quiet-newest", quiet, 50, 49),
    ):
        runs[name] = h.mlflow.create_run(exp, name=name, start_ms=now - start_days * DAY_MS)
        h.mlflow.log(runs[name], "loss", 0.5)
        if end_days is not None:
            h.mlflow.finish(runs[name], end_ms=now - end_days * DAY_MS)
    h.mlflow.register("churn", runs["old"], aliases=("champion",))
    h.ok_cycle()

    def exported() -> set[str]:
        return {
            s.labels["run_name"]
            for fams in h.gateway.groups.values()
            for f in fams
            if f.name == "mlflow_run_info"
            for s in f.samples
        }

    assert exported() == {"long", "newest", "running", "quiet-newest"}
    assert len(h.gateway.value("mlflow_loss")) == 4
    # The run behind an alias keeps its registry series; counts cover every run.
    assert h.gateway.value("mlflow_model_alias_metric", alias="champion") == [0.5]
    assert sorted(h.gateway.value("mlflow_experiment_runs", status="FINISHED")) == [2.0, 3.0]
    pushed = sum(len(f.samples) for fams in h.gateway.groups.values() for f in fams)
    assert sample(h.metrics, "mlflow_exporter_series") == pushed
    assert sample(h.metrics, "mlflow_exporter_excluded", kind="runs") == 2

    pushes = len(h.gateway.pushes)
    h.ok_cycle(advance=6.5 * 86400)  # "long" ended 7.5 days ago now
    assert exported() == {"newest", "running", "quiet-newest"}
    assert h.gateway.pushes[pushes:] == [experiment_key(busy)]  # only where runs left
    fresh = h.mlflow.create_run(quiet, name="fresh")
    h.mlflow.log(fresh, "loss", 0.1)
    h.ok_cycle()
    assert exported() == {"newest", "running", "fresh"}
    assert sample(h.metrics, "mlflow_exporter_series") == sum(
        len(f.samples) for fams in h.gateway.groups.values() for f in fams
    )
    assert h.exactly_once()  # the history sinks got every point of every run
    h.state.close()


def test_a_run_window_of_zero_gives_every_run_its_series(tmp_path: Path) -> None:
    h = Harness(tmp_path, series={"run_window": 0, "min_runs_per_experiment": 0})
    exp = h.mlflow.create_experiment("all")
    for age in (100, 200):
        run = h.mlflow.create_run(exp, start_ms=int(h.clock() * 1000) - age * DAY_MS)
        h.mlflow.log(run, "loss", 1.0)
        h.mlflow.finish(run, end_ms=int(h.clock() * 1000) - (age - 1) * DAY_MS)
    h.ok_cycle()
    assert len(h.gateway.value("mlflow_loss")) == 2
    h.state.close()


def test_the_sync_log_line_counts_new_runs_instead_of_listing_their_ids(h: Harness) -> None:
    exp = h.mlflow.create_experiment("churn")
    for _ in range(3):
        h.mlflow.create_run(exp)
    with structlog.testing.capture_logs() as logs:
        h.ok_cycle()
    [synced] = [e for e in logs if e["event"] == "mlflow.synced"]
    assert synced["new_runs"] == 3
    assert "new_run_ids" not in synced


def test_delivery_logs_name_what_they_count_and_no_error_on_a_success(tmp_path: Path) -> None:
    # Remote write counts samples (a value and a step per point): never added to points.
    h = Harness(tmp_path, sinks=[FakeDeliverySink(), FakeDeliverySink(name="remote_write")])
    h.mlflow.log(h.mlflow.create_run(h.mlflow.create_experiment("logs")), "loss", 1.0)

    try:
        with structlog.testing.capture_logs() as logs:
            h.ok_cycle()
    finally:
        h.state.close()

    drained = {e["sink"]: e for e in logs if e["event"] == "delivery.drained"}
    assert drained["pramathus"] == {
        "event": "delivery.drained",
        "log_level": "info",
        "sink": "pramathus",
        "batches": 1,
        "points": 1,
    }
    assert "samples" in drained["remote_write"]
    assert "points" not in drained["remote_write"]
    [done] = [e for e in logs if e["event"] == "cycle.succeeded"]
    assert done["points_spooled"] == 1
    assert done["pramathus_points_sent"] == 1
    assert "remote_write_samples_sent" in done
    assert "points_sent" not in done


# ---------------------------------------------------------------------- delivery rule


def test_1320_points_over_603_keys_go_out_in_3_full_batches(tmp_path: Path) -> None:
    """Run A logs 3 keys x 40 steps, run B 600 keys x 2 steps: batches hold points across
    keys and runs, so 1,320 points at batch_size 500 are 3 requests, not one per key."""
    h = Harness(tmp_path, sinks=[FakeDeliverySink(batch_size=500)])
    exp = h.mlflow.create_experiment("full-batches")
    run_a, run_b = h.mlflow.create_run(exp), h.mlflow.create_run(exp)
    for k in range(3):
        h.mlflow.log_many(run_a, f"a{k}", [float(s) for s in range(40)])
    for k in range(600):
        h.mlflow.log_many(run_b, f"b{k:03d}", [1.0, 2.0])
    h.mlflow.finish(run_a)
    h.mlflow.finish(run_b)

    h.ok_cycle()

    assert h.sink.posts == 3
    assert len(h.sink.accepted) == 1320
    assert h.exactly_once()
    h.state.close()


def test_a_blocked_sink_says_which_setting_in_health_and_metrics_then_delivers_all(
    h: Harness,
) -> None:
    exp = h.mlflow.create_experiment("blocked")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0, 2.0, 3.0])
    refused = Reply(
        Outcome.BLOCKED,
        "HTTP 401: points stay queued; set PRAMATHUS_API_KEY",
        401,
        cause="credentials",
    )
    h.sink.script = [refused]

    result = h.cycle()

    assert "PRAMATHUS_API_KEY" in result.errors["pramathus"]
    assert h.health.view().status == "failing"
    assert "PRAMATHUS_API_KEY" in h.health.view().reason
    blocked = "mlflow_exporter_pramathus_delivery_blocked"
    assert sample(h.metrics, blocked, cause="credentials") == 1
    assert h.sink.accepted == []

    h.ok_cycle()
    assert sample(h.metrics, blocked, cause="credentials") == 0
    assert h.exactly_once()


def test_set_aside_points_make_health_degraded_not_a_plain_ok(h: Harness) -> None:
    exp = h.mlflow.create_experiment("aside")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0, 2.0])
    h.sink.script = [Reply(Outcome.REFUSED, "HTTP 409", 409, reason="rejected")]

    h.cycle()
    h.ok_cycle()

    view = h.health.view()
    assert (view.status, view.ready, view.healthy) == ("degraded", True, True)
    assert "pramathus rejected: 2" in view.reason
    assert "exporter dead-letters replay" in view.reason


def _seed_1320(h: Harness) -> None:
    exp = h.mlflow.create_experiment("bounded")
    run_a, run_b = h.mlflow.create_run(exp), h.mlflow.create_run(exp)
    for k in range(3):
        h.mlflow.log_many(run_a, f"a{k}", [float(s) for s in range(40)])
    for k in range(600):
        h.mlflow.log_many(run_b, f"b{k:03d}", [1.0, 2.0])
    h.mlflow.finish(run_a)
    h.mlflow.finish(run_b)


def test_a_full_queue_is_backpressure_every_point_arrives_once_over_later_cycles(
    tmp_path: Path,
) -> None:
    sink = FakeDeliverySink(batch_size=100, queue_max_points=500)
    h = Harness(tmp_path, sinks=[sink])
    _seed_1320(h)
    down = Reply(Outcome.RETRY, "HTTP 503", 503)
    sink.script = [down] * 1000  # the endpoint is down for the whole first cycle

    h.cycle()
    queued = h.state.outbox(sink.name).totals().points
    assert 500 <= queued < 500 + 2 * 100  # waited at the bound (a read may overshoot it)
    assert sink.accepted == []

    sink.script = []
    for _ in range(6):
        h.cycle()
    assert len(sink.accepted) == 1320
    assert h.exactly_once(sink)
    assert (
        sample(h.metrics, "mlflow_exporter_pramathus_dropped_points_total", reason="queue_overflow")
        == 0
    )
    h.state.close()


def test_export_once_rounds_deliver_everything_past_the_queue_bound_in_one_run(
    tmp_path: Path,
) -> None:
    sink = FakeDeliverySink(batch_size=100, queue_max_points=500)
    h = Harness(tmp_path, sinks=[sink])
    _seed_1320(h)

    with structlog.testing.capture_logs() as logs:
        rounds = run_until_drained(h.runner)

    assert len(rounds) > 1
    assert all(r.ok for r in rounds)
    assert [r.held_back for r in rounds] == [True] * (len(rounds) - 1) + [False]
    assert len(sink.accepted) == 1320
    assert h.exactly_once(sink)
    held = [e for e in logs if e["event"] == "capture.held_back"]
    assert len(held) == len(rounds) - 1
    assert held[0]["runs_due"] >= 1
    h.state.close()


def test_export_once_rounds_end_when_a_round_delivers_nothing(tmp_path: Path) -> None:
    sink = FakeDeliverySink(batch_size=100, queue_max_points=500)
    h = Harness(tmp_path, sinks=[sink])
    _seed_1320(h)
    sink.script = [Reply(Outcome.RETRY, "HTTP 503", 503)] * 10_000  # down throughout

    rounds = run_until_drained(h.runner)

    assert len(rounds) == 1
    assert rounds[0].held_back
    assert sink.accepted == []
    h.state.close()


class FakeRunner:
    """Imitates `Runner.run_cycle` with the results given, one per call."""

    def __init__(self, *results: CycleResult) -> None:
        self.results = list(results)

    def run_cycle(self) -> CycleResult:
        return self.results.pop(0)


def test_export_once_rounds_end_on_a_successful_round_that_delivered_nothing() -> None:
    held = CycleResult(held_back=True, sent={"pramathus": 100})
    nothing = CycleResult(held_back=True, sent={"pramathus": 0})
    runner = FakeRunner(held, nothing, held)

    assert run_until_drained(runner) == [held, nothing]  # type: ignore[arg-type]


def test_export_once_rounds_stop_at_their_bound(tmp_path: Path) -> None:
    sink = FakeDeliverySink(batch_size=100, queue_max_points=500)
    h = Harness(tmp_path, sinks=[sink])
    _seed_1320(h)

    assert len(run_until_drained(h.runner, max_rounds=2)) == 2
    h.state.close()


def test_a_full_sink_waits_while_the_other_sink_gets_everything(tmp_path: Path) -> None:
    stuck = FakeDeliverySink(name="pramathus", batch_size=100, queue_max_points=200)
    other = FakeDeliverySink(name="remote_write", batch_size=100)
    h = Harness(tmp_path, sinks=[stuck, other])
    _seed_1320(h)
    stuck.script = [Reply(Outcome.RETRY, "HTTP 503", 503)] * 1000

    h.cycle()

    assert len(other.accepted) == 1320
    assert h.exactly_once(other)
    assert stuck.accepted == []
    stuck.script = []
    for _ in range(8):
        h.cycle()
    assert h.exactly_once(stuck)
    assert h.exactly_once(other)  # nothing sent twice to the sink that went on
    h.state.close()


def test_an_opt_in_drop_policy_counts_what_it_drops_as_lost(tmp_path: Path) -> None:
    sink = FakeDeliverySink(batch_size=100, queue_max_points=500, overflow="drop_oldest")
    h = Harness(tmp_path, sinks=[sink])
    _seed_1320(h)
    sink.script = [Reply(Outcome.RETRY, "HTTP 503", 503)] * 1000

    with structlog.testing.capture_logs() as logs:
        h.cycle()

    dropped = sample(
        h.metrics, "mlflow_exporter_pramathus_dropped_points_total", reason="queue_overflow"
    )
    assert dropped == 1320 - h.state.outbox(sink.name).totals().points > 0
    assert any(e["event"] == "queue.overflow_lost" for e in logs)
    h.state.close()


def test_a_state_that_cannot_record_a_delivery_sends_nothing_and_names_the_path(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = h.mlflow.create_experiment("disk-full")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0, 2.0])
    h.sink.script = [Reply(Outcome.RETRY, "HTTP 503", 503)] * 100
    h.cycle()  # queued while the endpoint is down
    h.sink.script = []

    def full(*_: Any) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Outbox, "claim", full)
    posts = h.sink.posts
    result = h.cycle()

    assert h.sink.posts == posts  # nothing sent that could not be marked delivered
    assert str(h.state.path) in result.errors["state"]
    assert "database or disk is full" in result.errors["state"]
    monkeypatch.undo()
    h.ok_cycle()
    assert h.exactly_once()


def test_a_deleted_state_file_is_written_back_and_nothing_is_sent_again(h: Harness) -> None:
    exp = h.mlflow.create_experiment("deleted-state")
    run = h.mlflow.create_run(exp)
    h.mlflow.log_many(run, "loss", [1.0, 2.0, 3.0])
    h.ok_cycle()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{h.state.path}{suffix}").unlink(missing_ok=True)

    with structlog.testing.capture_logs() as logs:
        h.ok_cycle()
    h.reopen()  # a restart reads the written-back file
    h.ok_cycle()

    warning = next(e for e in logs if e["event"] == "state.written_back")
    assert warning["path"] == str(h.state.path)
    assert h.exactly_once()


def test_a_failed_cycle_never_logs_counts_it_did_not_take(h: Harness) -> None:
    h.mlflow.broken["experiments/search"] = MlflowError("cannot reach MLflow at http://x")

    with structlog.testing.capture_logs() as logs:
        h.cycle()

    failed = next(e for e in logs if e["event"] == "cycle.failed")
    assert "experiments" not in failed
    assert "runs" not in failed


def test_two_exporters_of_different_scopes_share_a_job_without_deleting_each_others_groups(
    tmp_path: Path,
) -> None:
    """Each exporter's sweep deletes only groups it pushed itself (from its own state)."""
    first = Harness(tmp_path / "a", include_experiments=["team-a.*"])
    second = Harness(tmp_path / "b", include_experiments=["team-b.*"])
    second.gateway = first.gateway  # one Pushgateway, one job
    second.mlflow = first.mlflow  # one MLflow
    second.runner = second._runner()
    a, b = first.mlflow.create_experiment("team-a-x"), first.mlflow.create_experiment("team-b-y")
    first.mlflow.create_run(a)
    first.mlflow.create_run(b)

    first.ok_cycle()
    second.ok_cycle()
    first.gateway.restart()  # everything is pushed again and the gateway's list is swept
    first.ok_cycle()
    second.ok_cycle()
    first.ok_cycle()

    assert experiment_key(a) in first.gateway.groups
    assert experiment_key(b) in first.gateway.groups
    first.mlflow.delete_experiment(b)
    second.ok_cycle()
    assert experiment_key(b) not in first.gateway.groups  # its own group goes
    first.state.close()
    second.state.close()
