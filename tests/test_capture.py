"""The queues' half of a capture step (`exporter.capture.Capture`), after a refresh.

Collaborators: `FakeMlflow` (`tests/fakes/mlflow_server.py`, an in-memory MLflow that
counts requests by endpoint), `FakeDeliverySink` (`tests/fakes/sinks.py`: plans batches of
`batch_size` points, the last one left open when short), `FakeClock` and the real SQLite
state in `tmp_path`. The mirror is filled by a real `Refresh` first, as `Sync` does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.capture import Capture
from exporter.model import MetricPoint
from exporter.refresh import Refresh
from exporter.state import captured
from tests.fakes.sinks import FakeDeliverySink
from tests.support.world import MlflowWorld

HISTORY = "metrics/get-history-bulk-interval"


class World(MlflowWorld):
    """MLflow, the state and the settings captures work on; `due()` refreshes the mirror."""

    def due(self) -> dict[str, bool]:
        """Refresh the mirror from MLflow; the runs whose histories are due."""
        Refresh(self.mlflow, self.state, self.settings).run(self.now_ms())
        return self.state.schedule.capture_due(self.now_ms())

    def capture(self, *sinks: FakeDeliverySink) -> Capture:
        return Capture(self.mlflow, self.state, self.settings, sinks, self.clock)

    def queued(self, sink: str) -> Counter[tuple[str, str, int]]:
        return Counter(
            (p.run_id, p.key, p.step)
            for batch in self.state.outbox(sink).batches()
            for p in captured.loads(batch.body).points
        )


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def test_a_capture_queues_the_due_runs_points_once_for_each_sink_and_leaves_none_due(
    w: World,
) -> None:
    exp = w.mlflow.create_experiment("churn")
    run = w.mlflow.create_run(exp)
    w.mlflow.log_many(run, "loss", [1.0, 0.5, 0.25])
    sinks = [FakeDeliverySink("pramathus"), FakeDeliverySink("otlp")]
    capture = w.capture(*sinks)
    capture.register_sinks(w.now_ms())

    done = capture.capture(w.now_ms(), w.due())

    expected = Counter({(run, "loss", step): 1 for step in range(3)})
    assert done.points_captured == 3  # once per point, however many sinks
    assert w.queued("pramathus") == expected
    assert w.queued("otlp") == expected
    assert w.state.schedule.pending_count() == 0


def test_a_capture_without_sinks_reads_no_history_and_leaves_the_runs_due(w: World) -> None:
    exp = w.mlflow.create_experiment("churn")
    w.mlflow.log_many(w.mlflow.create_run(exp), "loss", [1.0, 0.5])

    done = w.capture().capture(w.now_ms(), w.due())

    assert done.points_captured == 0
    assert w.mlflow.calls[HISTORY] == 0
    assert w.state.schedule.pending_count() == 1


def test_a_sink_registered_after_points_were_captured_is_backfilled_with_them(
    w: World,
) -> None:
    exp = w.mlflow.create_experiment("churn")
    run = w.mlflow.create_run(exp)
    w.mlflow.log_many(run, "loss", [1.0, 0.5])
    first = w.capture(FakeDeliverySink("pramathus"))
    first.register_sinks(w.now_ms())
    first.capture(w.now_ms(), w.due())

    later = w.capture(FakeDeliverySink("pramathus"), FakeDeliverySink("otlp"))
    later.register_sinks(w.now_ms())
    done = later.backfill()

    assert (
        w.queued("otlp")
        == w.queued("pramathus")
        == Counter({(run, "loss", 0): 1, (run, "loss", 1): 1})
    )
    assert done.backfill_remaining == {"otlp": 0}  # a sink with nothing owed is not reported


def test_a_rolled_back_transaction_keeps_the_open_tail_as_the_queue_kept_it(w: World) -> None:
    sink = FakeDeliverySink(batch_size=4)
    capture = w.capture(sink)

    def queue(steps: range, fail: bool = False) -> None:
        pts = [MetricPoint("run-a", "loss", 0.5, s, 1_000 + s) for s in steps]
        with w.state.transaction():
            tails = capture._enqueue([sink], pts, 1)  # noqa: SLF001
            if fail:
                raise RuntimeError("the capture failed part-way")
        capture._keep_tails(tails)  # noqa: SLF001

    queue(range(2))  # an open batch of two
    with pytest.raises(RuntimeError):
        queue(range(2, 4), fail=True)  # joined the tail, then rolled back
    queue(range(4, 6))  # joins the tail the queue holds

    batches = list(w.state.outbox(sink.name).batches())
    assert [[p.step for p in captured.loads(x.body).points] for x in batches] == [[0, 1, 4, 5]]
