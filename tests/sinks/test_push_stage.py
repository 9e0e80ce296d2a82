"""Unit tests for exporter.sinks.push_stage: the Pushgateway stage over a real state.

The state is the SQLite store in a temp directory, seeded by hand; the Pushgateway is
`FakeGateway` (`tests/fakes/sinks.py`), time a `FakeClock`. Whole cycles (capture, then the
push) are in tests/test_runner.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.core import Metric

from exporter.config import Settings
from exporter.model import CaptureRecord, Experiment, LatestMetric, PushRecord, Run
from exporter.planners.series import REGISTRY_KEY, GroupKey, experiment_key
from exporter.selfmetrics import SelfMetrics
from exporter.sinks.push_stage import PushResult, PushStage
from exporter.sinks.pushgateway import PushedGroup, PushError
from exporter.state import StateStore
from exporter.state.schedule import PENDING_NONE
from tests.fakes import FakeClock
from tests.fakes.sinks import FakeGateway


@dataclass
class FailingGateway(FakeGateway):
    """A `FakeGateway` whose pushes fail once `fail_after` of them went through."""

    fail_after: int = 1

    def push(self, key: GroupKey, families: Sequence[Metric]) -> PushedGroup:
        if len(self.pushes) >= self.fail_after:
            raise PushError("Pushgateway answered 503")
        return super().push(key, families)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path / "state")
    yield store
    store.close()


def stage(state: StateStore, gateway: FakeGateway | None = None) -> PushStage:
    settings = Settings.model_validate({"export": {"state_dir": str(state.directory)}})
    clock = FakeClock(1_700_000_000.0)
    return PushStage(settings, state, gateway or FakeGateway(), SelfMetrics(), clock)


def mirrored(state: StateStore, *experiment_ids: str) -> None:
    """Experiments with one finished run each, as a capture leaves them."""
    with state.transaction():
        state.mirror.set_experiments([Experiment(i, f"exp-{i}") for i in experiment_ids], 1)
        for i in experiment_ids:
            loss = (LatestMetric("loss", 0.5, 1, 1),)
            run = Run(f"run-{i}", i, "r", "FINISHED", "u", 1, 2, loss)
            state.mirror.write_run(run, 0, PENDING_NONE)
        state.save(CaptureRecord(last_capture_ms=1, active_experiments=len(experiment_ids)))


def test_nothing_is_pushed_before_anything_was_mirrored(state: StateStore) -> None:
    gateway = FakeGateway()
    assert stage(state, gateway).push(verify=False) == PushResult()
    assert (gateway.pushes, gateway.listings) == ([], 0)


def test_a_first_push_sends_every_group_and_records_them_and_the_registry_clean(
    state: StateStore,
) -> None:
    mirrored(state, "1", "2")
    gateway = FakeGateway()
    push = stage(state, gateway)
    push.prepare()
    result = push.push(verify=False)

    assert gateway.pushes == [experiment_key("1"), experiment_key("2"), REGISTRY_KEY]
    series = sum(len(f.samples) for fams in gateway.groups.values() for f in fams)
    assert result == PushResult(groups=3, series=series, nonfinite=0, deleted_groups=0)
    record = state.load(PushRecord)
    assert record.groups == tuple(sorted(k.labels for k in gateway.groups))
    assert sum(n for _group, n in record.series) == series
    marks = state.push_marks
    assert (marks.dirty_experiments(), marks.registry_dirty()) == (set(), False)
    assert push.metrics.registry.get_sample_value("mlflow_exporter_pushed_groups") == 3


def test_a_second_push_sends_only_what_was_marked(state: StateStore) -> None:
    mirrored(state, "1", "2")
    gateway = FakeGateway()
    push = stage(state, gateway)
    push.prepare()
    push.push(verify=False)
    assert push.push(verify=False).groups == 0
    with state.transaction():
        state.push_marks.mark_dirty(["2"])
        state.push_marks.mark_registry_dirty()
    pushed = len(gateway.pushes)

    result = push.push(verify=False)

    assert gateway.pushes[pushed:] == [experiment_key("2"), REGISTRY_KEY]
    assert result.groups == 2


def test_a_failed_push_leaves_the_groups_unknown_and_the_next_pushes_everything(
    state: StateStore,
) -> None:
    mirrored(state, "1", "2")
    gateway = FailingGateway(fail_after=1)
    push = stage(state, gateway)
    push.prepare()

    with pytest.raises(PushError):
        push.push(verify=False)

    record = state.load(PushRecord)
    assert record.groups is None
    assert dict(record.series).keys() == {"1"}  # what was pushed before the error is ours
    assert state.push_marks.dirty_experiments() == {"1", "2"}
    assert state.push_marks.registry_dirty() is True
    gateway.fail_after = 100
    assert push.push(verify=False).groups == 3


def test_verify_lists_the_gateway_and_deletes_only_strays_it_pushed(state: StateStore) -> None:
    mirrored(state, "1", "2")
    gateway = FakeGateway()
    push = stage(state, gateway)
    push.prepare()
    push.push(verify=False)  # a first push lists the gateway: its groups are unknown
    assert push.push(verify=False).groups == 0
    listed = gateway.listings
    with state.transaction():
        state.mirror.set_experiments([Experiment("1", "exp-1")], 2)
    someone_elses = GroupKey((("experiment_id", "9"),))
    gateway.groups[someone_elses] = []

    result = push.push(verify=True)

    assert gateway.listings == listed + 1
    assert gateway.deletes == [experiment_key("2")]
    assert result.deleted_groups == 1
    assert someone_elses in gateway.groups


def test_prepare_marks_every_group_first_then_only_what_moved(state: StateStore) -> None:
    mirrored(state, "1", "2")
    with state.transaction():
        state.push_marks.mark_clean(["1", "2"])
    push = stage(state)

    push.prepare()
    assert state.push_marks.dirty_experiments() == {"1", "2"}
    assert state.load(PushRecord).selected == ("1", "2")
    with state.transaction():
        state.push_marks.mark_clean(["1", "2"])
    push.prepare()
    assert state.push_marks.dirty_experiments() == set()


def test_prepare_without_a_gateway_records_the_selection_for_the_pull_view(
    state: StateStore,
) -> None:
    mirrored(state, "1")
    settings = Settings.model_validate({"export": {"state_dir": str(state.directory)}})
    PushStage(settings, state, None, SelfMetrics(), FakeClock()).prepare()
    assert state.load(PushRecord).selected == ("1",)
