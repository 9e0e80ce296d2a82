"""The mirror's half of a capture step (`exporter.refresh.Refresh`), without capture.

Collaborators: `FakeMlflow` (`tests/fakes/mlflow_server.py`, an in-memory MLflow that
counts requests by endpoint), `FakeClock` (`tests/fakes/__init__.py`) and the real SQLite
state in `tmp_path`. A refresh reads runs into the mirror and makes their histories due; it
reads no history and queues nothing (that is `Capture`'s, `tests/test_capture.py`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.model import CaptureRecord
from exporter.refresh import Refresh, StoppedError
from tests.support.world import MlflowWorld

HISTORY = "metrics/get-history-bulk-interval"


class World(MlflowWorld):
    """MLflow, the state and the settings one refresh after another works on."""

    def finished_runs(self, n: int) -> list[str]:
        """`n` runs of one experiment that ended an hour ago, two points each."""
        exp = self.mlflow.create_experiment("churn")
        long_ago = self.now_ms() - 3_600_000
        runs = []
        for _ in range(n):
            run = self.mlflow.create_run(exp, start_ms=long_ago - 60_000)
            self.mlflow.log_many(run, "loss", [1.0, 0.5])
            self.mlflow.finish(run, end_ms=long_ago)
            runs.append(run)
        return runs


@pytest.fixture
def w(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    yield world
    world.close()


def test_a_first_refresh_mirrors_new_runs_and_makes_them_due_without_reading_history(
    w: World,
) -> None:
    runs = w.finished_runs(2)

    seen = Refresh(w.mlflow, w.state, w.settings).run(w.now_ms())

    assert sorted(seen.new_run_ids) == sorted(runs)
    assert seen.changes == {"new": 2}
    assert seen.experiments == 1
    assert w.mlflow.calls[HISTORY] == 0
    assert sorted(w.state.schedule.capture_due(w.now_ms())) == sorted(runs)
    assert w.state.load(CaptureRecord).last_capture_ms == w.now_ms()


def test_a_run_deleted_in_mlflow_is_tombstoned_by_the_next_refresh(w: World) -> None:
    keep, gone = w.finished_runs(2)
    Refresh(w.mlflow, w.state, w.settings).run(w.now_ms())

    w.clock.advance(10)
    w.mlflow.delete_run(gone)
    seen = Refresh(w.mlflow, w.state, w.settings).run(w.now_ms())

    assert seen.changes == {"removed": 1}
    assert seen.new_run_ids == []
    assert w.state.mirror.known([gone])[gone].deleted_ms is not None
    assert w.state.mirror.known([keep])[keep].deleted_ms is None


def test_a_refresh_stopped_part_way_keeps_what_it_saw_and_what_it_wrote(w: World) -> None:
    w.mlflow.page_size = 1  # one run a page: the stop lands between pages
    w.finished_runs(3)
    asked = []

    def second_time() -> bool:
        asked.append(True)
        return len(asked) >= 2

    refresh = Refresh(w.mlflow, w.state, w.settings, should_stop=second_time)
    with pytest.raises(StoppedError):
        refresh.run(w.now_ms())

    assert len(refresh.result.new_run_ids) == 2
    assert w.state.mirror.run_count() == 2
    assert w.state.load(CaptureRecord).last_capture_ms != w.now_ms()  # not recorded as done
