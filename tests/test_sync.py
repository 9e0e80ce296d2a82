"""One capture step (`exporter.sync.Sync`) used directly, without the runner.

Collaborators are the documented fakes, except the state:

- `FakeMlflow` (`tests/fakes/mlflow_server.py`): an in-memory MLflow behind the `MlflowSource`
  protocol, with MLflow's search semantics (views, time filters, offset pages), latest
  metrics and histories; it counts every request by endpoint in `calls`.
- `FakeDeliverySink` (`tests/fakes/sinks.py`): a `DeliverySink` whose batch bodies are JSON
  lists of point identities `[run, key, step, timestamp, value bits]`, so a test reads what
  was queued for it straight from its outbox; its `queue_max_points` and `overflow` are the
  bounds capture honours.
- `FakeClock` (`tests/fakes/__init__.py`): `time.time` that only moves when a test moves it.
- `exporter.state.StateStore`: the real SQLite state in `tmp_path` (mirror, ledger, outboxes).

A "Sync" below is what one cycle does: move the clock an interval, build a `Sync` over the
same state and run it. Nothing is delivered: the queues are read, or drained by hand. Its
halves have tests of their own: `tests/test_refresh.py` (the mirror) and
`tests/test_capture.py` (the queues).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from exporter import capture as capture_module
from exporter.config import Settings
from exporter.state import StateStore, captured
from exporter.sync import Sync, SyncResult
from tests.fakes import FakeClock
from tests.fakes.mlflow_server import FakeMlflow
from tests.fakes.sinks import FakeDeliverySink

SETTLE = 60.0
INTERVAL = 10.0
HISTORY = "metrics/get-history-bulk-interval"

# run, key, step, timestamp, value bits (an int; typed as `FakeMlflow.all_points` types it)
Point = tuple[str, str, int, int, float]


class Bench:
    """The state and MLflow one `Sync` after another works on; `sync()` is one cycle."""

    def __init__(self, tmp: Path, concurrency: int = 4, **export: Any) -> None:
        self.clock = FakeClock(1_700_000_000.0)
        self.mlflow = FakeMlflow(self.clock)
        self.state = StateStore(tmp / "state", clock=self.clock)
        self.settings = Settings.model_validate(
            {
                "export": {
                    "settle_seconds": SETTLE,
                    "interval_seconds": INTERVAL,
                    "reconcile_interval_seconds": 3600,
                    "state_dir": str(tmp / "state"),
                    **export,
                },
                "mlflow": {"concurrency": concurrency},
            }
        )

    def sync(
        self,
        sinks: Sequence[FakeDeliverySink],
        advance: float = INTERVAL,
        should_stop: Callable[[], bool] | None = None,
    ) -> SyncResult:
        self.clock.advance(advance)
        capture = Sync(self.mlflow, self.state, self.settings, sinks, self.clock)
        if should_stop is not None:
            capture.should_stop = should_stop
        return capture.run()

    def queued(self, sink: str) -> Counter[Point]:
        """Every point in the sink's queue (stored in the captured form), with how many
        times it is there."""
        return Counter(
            (p.run_id, p.key, p.step, p.timestamp_ms, p.identity[2])
            for batch in self.state.outbox(sink).batches()
            for p in captured.loads(batch.body).points
        )

    def drain(self, sink: str) -> Counter[Point]:
        """Take every queued batch out as if its sink acknowledged it; what it carried."""
        taken = self.queued(sink)
        with self.state.transaction():
            outbox = self.state.outbox(sink)
            for batch in list(outbox.batches()):
                outbox.done(batch.id)
        return taken

    def everything(self) -> Counter[Point]:
        """Each point MLflow holds, once."""
        return Counter(self.mlflow.all_points())


@pytest.fixture
def b(tmp_path: Path) -> Iterator[Bench]:
    bench = Bench(tmp_path)
    yield bench
    bench.state.close()


@pytest.fixture
def serial(tmp_path: Path) -> Iterator[Bench]:
    """One history read at a time: a stop or a full queue lands between known reads."""
    bench = Bench(tmp_path, concurrency=1)
    yield bench
    bench.state.close()


def finished_runs(b: Bench, exp: str, n: int, keys: Sequence[str] = ("loss", "acc")) -> list[str]:
    """`n` runs that ended an hour ago (settled at once), three points per key."""
    long_ago = int(b.clock() * 1000) - 3_600_000
    runs = []
    for _ in range(n):
        run = b.mlflow.create_run(exp, start_ms=long_ago - 60_000)
        for key in keys:
            b.mlflow.log_many(run, key, [1.0, 0.5, 0.25])
        b.mlflow.finish(run, end_ms=long_ago)
        runs.append(run)
    return runs


# ---------------------------------------------------------------------- first capture


def test_a_first_sync_queues_every_point_of_a_new_experiment_once_for_each_sink(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("churn")
    done = finished_runs(b, exp, 2)
    running = b.mlflow.create_run(exp)
    b.mlflow.log_many(running, "loss", [3.0, 2.0])
    sinks = [FakeDeliverySink("pramathus"), FakeDeliverySink("remote_write")]

    result = b.sync(sinks)

    assert b.queued("pramathus") == b.everything()
    assert b.queued("remote_write") == b.everything()
    assert result.experiments == 1
    assert result.runs == 3
    assert result.points_captured == 2 * 6 + 2  # once per point, however many sinks
    assert sorted(result.new_run_ids) == sorted([*done, running])
    assert result.changes == {"new": 3}
    assert not result.stopped
    assert not result.held_back


def test_a_sync_without_sinks_reads_runs_but_queues_nothing_until_one_is_enabled(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("churn")
    finished_runs(b, exp, 2)

    alone = b.sync([])
    later = b.sync([FakeDeliverySink()])

    assert alone.points_captured == 0
    assert alone.pending == 2  # their histories stay due
    assert later.points_captured == 12
    assert b.queued("pramathus") == b.everything()


# ---------------------------------------------------------------------- deltas


def test_a_second_sync_with_nothing_changed_captures_nothing_and_asks_mlflow_little(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("churn")
    finished_runs(b, exp, 30)
    sink = FakeDeliverySink()
    b.sync([sink])
    before = b.queued(sink.name)
    b.mlflow.calls.clear()

    second = b.sync([sink])

    assert second.points_captured == 0
    assert second.new_run_ids == []
    assert b.queued(sink.name) == before
    assert b.mlflow.calls[HISTORY] == 0  # settled runs that did not change are not re-read
    # The experiment list, the registry, three delta searches, the deleted probe and at most
    # a sweep page: a handful of requests, not one per run.
    assert b.mlflow.requests() <= 8, b.mlflow.calls


def test_points_logged_to_a_running_run_are_queued_by_the_next_sync_exactly_once(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("live")
    run = b.mlflow.create_run(exp)
    b.mlflow.log_many(run, "loss", [1.0, 0.9, 0.8])
    sink = FakeDeliverySink()
    b.sync([sink])
    first = b.queued(sink.name)

    b.clock.advance(1)
    b.mlflow.log_many(run, "loss", [0.7, 0.6], first_step=3)
    second = b.sync([sink])

    assert second.points_captured == 2
    assert second.new_run_ids == []
    assert b.queued(sink.name) == b.everything()
    assert b.queued(sink.name) - first == Counter(b.everything() - first)
    assert sum(first.values()) == 3


def test_a_late_point_below_the_latest_step_of_a_settling_run_is_queued_by_the_next_sync(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("async")
    run = b.mlflow.create_run(exp)
    t0 = int(b.clock() * 1000)
    for step in range(5, 10):  # asynchronous logging: steps 5..9 land first
        b.mlflow.log(run, "loss", 1.0 / step, step, t0 + step)
    b.mlflow.finish(run)
    sink = FakeDeliverySink()
    b.sync([sink])

    for step in range(5):  # MLflow's latest metrics do not move: only settling finds them
        b.mlflow.log(run, "loss", 1.0 / (step + 1), step, t0 + step)
    later = b.sync([sink])

    assert later.points_captured == 5
    assert later.settling == 1
    assert b.queued(sink.name) == b.everything()


def test_a_settled_run_that_changes_again_is_read_whole_so_points_below_its_window_arrive(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("scores")
    run = b.mlflow.create_run(exp)
    b.mlflow.log_many(run, "loss", [1.0, 0.9, 0.8], first_step=10)
    sink = FakeDeliverySink()
    b.sync([sink])
    # Read again once those points are older than the settle window: the window moves up.
    b.clock.advance(SETTLE + INTERVAL)
    b.mlflow.log(run, "loss", 0.7, step=13)
    b.mlflow.finish(run)
    b.sync([sink])
    b.sync([sink], advance=SETTLE * 3)  # settled
    window = b.state.ledger.series([(run, "loss")])[(run, "loss")].window_start
    assert window is not None
    assert window >= 10

    late = b.mlflow.log(run, "loss", 5.0, step=1)  # below the window, invisible in search
    b.mlflow.log(run, "test_accuracy", 0.91)  # a score later on: the run changed
    # Its end time did not move, so only the background sweep finds it: one page an hour.
    result = b.sync([sink], advance=3600)

    assert result.reconcile_found == {"changed": 1}
    assert result.changes == {"changed": 1}
    assert result.points_captured == 2  # the late point too, though below the window
    queued = b.queued(sink.name)
    assert queued[(run, "loss", 1, late.timestamp_ms, late.identity[2])] == 1
    assert queued == b.everything()


def test_a_deleted_run_is_tombstoned_and_once_restored_only_its_new_points_are_queued(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("churn")
    keep, gone = finished_runs(b, exp, 2)
    sink = FakeDeliverySink()
    b.sync([sink])
    before = b.queued(sink.name)

    b.mlflow.delete_run(gone)
    deleted = b.sync([sink])

    assert deleted.changes == {"removed": 1}
    assert deleted.runs == 1
    assert deleted.points_captured == 0
    assert gone in b.state.mirror.known([gone])
    assert b.state.mirror.known([gone])[gone].deleted_ms is not None

    b.mlflow.restore_run(gone)
    b.mlflow.log(gone, "acc", 0.125, step=3)
    restored = b.sync([sink])

    assert restored.changes == {"restored": 1}
    assert restored.runs == 2
    assert restored.points_captured == 1
    assert b.queued(sink.name) == b.everything()
    assert b.queued(sink.name) - before == Counter({p: 1 for p in b.everything() if p[2] == 3})
    assert keep not in restored.new_run_ids


def test_a_settling_run_purged_from_mlflow_is_removed_from_the_mirror(b: Bench) -> None:
    exp = b.mlflow.create_experiment("gc")
    run = b.mlflow.create_run(exp)
    b.mlflow.log_many(run, "loss", [1.0, 0.5])
    b.sync([FakeDeliverySink()])

    b.mlflow.purge_run(run)  # `mlflow gc`: no view returns it any more
    result = b.sync([FakeDeliverySink()])

    assert result.changes == {"removed": 1}
    assert result.runs == 0


# ---------------------------------------------------------------------- stopping


class StopAfter:
    """A `should_stop` that answers True from its (`calls` + 1)th question on."""

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.asked > self.calls


def big_bench(tmp: Path) -> Bench:
    """Three runs read one per page, three keys read one history request each: a stop can
    land between any two reads."""
    b = Bench(tmp, concurrency=1)
    b.mlflow.page_size = 1
    exp = b.mlflow.create_experiment("big")
    finished_runs(b, exp, 3, keys=("loss", "acc", "f1"))
    return b


# A first Sync of `big_bench` asks after each of the three pages of runs, before its
# sweep page and before each of the three history reads.
STOP_CHECKS = 7


def test_a_first_sync_asks_whether_to_stop_between_its_reads(tmp_path: Path) -> None:
    b = big_bench(tmp_path)
    never = StopAfter(10**6)
    try:
        result = b.sync([FakeDeliverySink()], should_stop=never)
    finally:
        b.state.close()

    assert not result.stopped
    assert never.asked == STOP_CHECKS


def test_points_of_several_reads_in_one_sync_fill_batches_instead_of_leaving_short_ones(
    tmp_path: Path,
) -> None:
    b = big_bench(tmp_path)  # 27 points in three reads of nine
    sink = FakeDeliverySink(batch_size=4)
    try:
        b.sync([sink])
        totals = b.state.outbox(sink.name).totals()
        queued, everything = b.queued(sink.name), b.everything()
    finally:
        b.state.close()

    assert queued == everything
    assert totals.batches == 7  # 4+4+4+4+4+4+3: each read's short tail joined the next


@pytest.mark.parametrize("checks", range(STOP_CHECKS))
def test_a_sync_stopped_part_way_keeps_what_it_queued_and_the_next_completes_the_rest(
    tmp_path: Path, checks: int
) -> None:
    b = big_bench(tmp_path)
    sink = FakeDeliverySink(batch_size=4)
    try:
        stopped = b.sync([sink], should_stop=StopAfter(checks))
        partial = b.queued(sink.name)
        rest = b.sync([sink])
        queued, everything = b.queued(sink.name), b.everything()
    finally:
        b.state.close()

    assert stopped.stopped
    assert not rest.stopped
    assert set(partial.values()) <= {1}  # nothing twice, even part-way
    assert sum(partial.values()) == stopped.points_captured
    assert queued == everything  # nothing lost, nothing twice
    assert stopped.points_captured + rest.points_captured == 27
    assert rest.pending == 0


# ---------------------------------------------------------------------- a later sink


def test_a_sink_enabled_later_is_backfilled_over_syncs_and_the_first_gets_nothing_twice(
    b: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture_module, "BACKFILL_SERIES_PER_CYCLE", 2)
    exp = b.mlflow.create_experiment("churn")
    finished_runs(b, exp, 3)  # six series
    first, later = FakeDeliverySink("pramathus"), FakeDeliverySink("otlp")
    b.sync([first])
    before = b.queued(first.name)

    live = b.mlflow.create_run(exp)  # started meanwhile: captured for both sinks
    b.mlflow.log_many(live, "f1", [0.5, 0.4])
    remaining = []
    for _ in range(4):
        result = b.sync([first, later])
        remaining.append(result.backfill_remaining.get("otlp"))

    # Two series a Sync; once none is left the sink is no longer reported at all.
    assert remaining == [4, 2, 0, None]
    assert b.queued("otlp") == b.everything()
    assert b.queued(first.name) == b.everything()
    assert b.queued(first.name) - before == Counter(b.mlflow.all_points([live]))


def test_a_disabled_sink_loses_its_queue_and_is_backfilled_in_full_when_enabled_again(
    b: Bench,
) -> None:
    exp = b.mlflow.create_experiment("churn")
    finished_runs(b, exp, 2)
    first, other = FakeDeliverySink("pramathus"), FakeDeliverySink("otlp")
    b.sync([first, other])

    b.sync([first])
    assert b.queued("otlp") == Counter()

    again = b.sync([first, other])
    assert again.backfill_remaining["otlp"] == 0
    assert b.queued("otlp") == b.everything()
    assert b.queued(first.name) == b.everything()


# ---------------------------------------------------------------------- bounded queues


def test_capture_holds_back_while_every_queue_is_full_and_loses_nothing_once_drained(
    serial: Bench,
) -> None:
    b = serial
    exp = b.mlflow.create_experiment("big")
    finished_runs(b, exp, 4, keys=("loss", "acc", "f1", "auc"))  # 48 points, 4 chunks
    sink = FakeDeliverySink(batch_size=5, queue_max_points=10, overflow="wait")

    first = b.sync([sink])

    assert first.held_back
    assert first.pending > 0
    assert 0 < first.points_captured < 48

    delivered: Counter[Point] = Counter()
    rounds = [first]
    most_queued = b.state.outbox(sink.name).totals().points
    while rounds[-1].held_back and len(rounds) < 20:
        delivered += b.drain(sink.name)
        rounds.append(b.sync([sink]))
        most_queued = max(most_queued, b.state.outbox(sink.name).totals().points)
    delivered += b.drain(sink.name)

    assert len(rounds) > 2  # capture waited for the queue more than once
    assert rounds[-1].pending == 0
    assert sum(r.points_captured for r in rounds) == 48
    assert most_queued <= 10 + 12  # the bound, overshot by at most one read (a key of 4 runs)
    assert delivered == b.everything()  # every point once, none lost while capture waited


def test_a_full_queue_owes_its_points_while_another_sink_keeps_capturing(serial: Bench) -> None:
    b = serial
    exp = b.mlflow.create_experiment("big")
    finished_runs(b, exp, 4, keys=("loss", "acc", "f1", "auc"))
    small = FakeDeliverySink("small", batch_size=5, queue_max_points=10, overflow="wait")
    roomy = FakeDeliverySink("roomy")

    first = b.sync([small, roomy])

    assert not first.held_back  # one sink still has room: capture goes on
    assert first.points_captured == 48
    assert first.waiting["small"] > 0
    assert b.queued("roomy") == b.everything()

    delivered: Counter[Point] = Counter()
    for _ in range(20):
        delivered += b.drain("small")
        result = b.sync([small, roomy])
        if result.backfill_remaining.get("small", 0) == 0 and not result.waiting:
            break
    delivered += b.drain("small")

    assert delivered == b.everything()  # the owed points came back from MLflow, once each
    assert b.queued("roomy") == b.everything()
