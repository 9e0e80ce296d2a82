"""Unit tests for exporter.sinks.groups: groups built from a real mirror, merging, pull collector.

The mirror is a real `StateStore` in tmp_path filled by hand through its own API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.config import ExportSettings, Settings
from exporter.model import (
    CaptureRecord,
    Experiment,
    LabelRecord,
    LatestMetric,
    ModelVersion,
    PushRecord,
    Registry,
    Run,
)
from exporter.planners.series import REGISTRY_KEY, GroupKey, ServerCounts, experiment_key
from exporter.sinks.groups import GroupBuilder, MirrorCollector, merge, mirror_builder
from exporter.state import StateStore

T = 1_705_314_000_000
RUN_A = "aaaaaaaaaaaaaaaa0000000000000001"  # experiment 1, finished, newest
RUN_B = "bbbbbbbbbbbbbbbb0000000000000002"  # experiment 1, finished
RUN_C = "cccccccccccccccc0000000000000003"  # experiment 1, running, oldest
RUN_D = "dddddddddddddddd0000000000000004"  # experiment 2
RUN_GONE = "eeeeeeeeeeeeeeee0000000000000005"  # experiment 1, deleted from MLflow


def run(run_id: str, exp: str, status: str, start: int, **metrics: float) -> Run:
    latest = tuple(LatestMetric(k, v, 3, start + 10) for k, v in metrics.items())
    return Run(run_id, exp, f"name-{run_id[:2]}", status, "alice", start, None, latest)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path)
    m = store.mirror
    with store.transaction():
        m.set_experiments(
            [Experiment("1", "churn", last_update_time_ms=T), Experiment("2", "fraud")], T
        )
        m.write_run(run(RUN_A, "1", "FINISHED", T + 3000, loss=0.1, acc=0.9), 0, 0)
        m.write_run(run(RUN_B, "1", "FINISHED", T + 2000, loss=0.2), 0, 0)
        m.write_run(run(RUN_C, "1", "RUNNING", T + 1000, loss=0.3), 0, 0)
        m.write_run(run(RUN_D, "2", "FAILED", T + 500, loss=0.4), 0, 0)
        m.write_run(run(RUN_GONE, "1", "FINISHED", T, loss=0.5), 0, 0)
        m.tombstone([RUN_GONE], T + 9000, settle_until_ms=0)
        m.set_registry(
            Registry(
                ("churn-clf", "fraud-clf"),
                (
                    ModelVersion("churn-clf", "1", RUN_B, "Archived", "READY"),
                    ModelVersion("churn-clf", "2", RUN_A, "Production", "READY", ("champion",)),
                    ModelVersion("churn-clf", "3", RUN_GONE, "None", "READY"),
                    ModelVersion("fraud-clf", "1", RUN_D, "Staging", "READY"),
                ),
            )
        )
    yield store
    store.close()


def builder(state: StateStore, selected: set[str] | None = None, **export: Any) -> GroupBuilder:
    return GroupBuilder(
        state.mirror,
        ExportSettings(**export),
        12,
        {"1", "2"} if selected is None else selected,
        ServerCounts({"active": 2, "deleted": 1}),
    )


def test_the_mirror_builder_reads_its_records_over_the_mirrors_own_connection(
    state: StateStore,
) -> None:
    with state.transaction():
        state.save(LabelRecord(run_id_length=14))
        state.save(PushRecord(selected=("2",)))
        state.save(CaptureRecord(last_capture_ms=1, deleted_experiments=1, active_experiments=2))
    settings = Settings.model_validate(
        {"series": {"run_window": "1d", "min_runs_per_experiment": 3}}
    )
    reader = state.reader()
    try:
        built = mirror_builder(reader, settings, lambda: T / 1000)
    finally:
        reader.conn.close()

    assert built.mirror is reader
    assert (built.run_id_length, built.selected) == (14, {"2"})
    assert built.counts == ServerCounts({"active": 2, "deleted": 1})
    assert (built.ended_since_ms, built.min_runs) == (T - 86_400_000, 3)


def test_without_a_run_window_the_mirror_builder_keeps_every_run(state: StateStore) -> None:
    settings = Settings.model_validate({"series": {"run_window": 0}})
    assert mirror_builder(state.mirror, settings, lambda: T / 1000).ended_since_ms is None


def samples(families: list[Metric], name: str) -> list[dict[str, Any]]:
    """Every sample of one family, as its labels plus `value`."""
    return [{**s.labels, "value": s.value} for f in families if f.name == name for s in f.samples]


def names(families: list[Metric]) -> set[str]:
    return {f.name for f in families}


# ---------------------------------------------------------------- experiment groups


def test_an_experiment_group_holds_its_active_runs_with_their_model_stage(
    state: StateStore,
) -> None:
    families = builder(state).experiment("1")

    info = {s["run_id"]: s for s in samples(families, "mlflow_run_info")}
    assert set(info) == {RUN_A[:12], RUN_B[:12], RUN_C[:12]}  # not the deleted run
    assert info[RUN_A[:12]]["model_stage"] == "Production"
    assert info[RUN_B[:12]]["model_stage"] == "Archived"
    assert info[RUN_C[:12]]["model_stage"] == "none"
    runs = {s["status"]: s["value"] for s in samples(families, "mlflow_experiment_runs")}
    assert runs == {"RUNNING": 1, "SCHEDULED": 0, "FINISHED": 2, "FAILED": 0, "KILLED": 0}
    [last_start] = samples(families, "mlflow_experiment_last_run_start_time_seconds")
    assert last_start["value"] == (T + 3000) / 1000


def test_an_experiment_group_shows_the_metrics_of_versions_built_from_its_live_runs(
    state: StateStore,
) -> None:
    families = builder(state).experiment("1")

    versions = {
        (s["version"], s["metric_key"]): s["value"]
        for s in samples(families, "mlflow_model_version_metric")
    }
    assert versions == {("1", "loss"): 0.2, ("2", "acc"): 0.9, ("2", "loss"): 0.1}
    aliases = samples(families, "mlflow_model_alias_metric")
    assert {(s["alias"], s["metric_key"]) for s in aliases} == {
        ("champion", "acc"),
        ("champion", "loss"),
    }
    assert samples(builder(state).experiment("2"), "mlflow_model_version_metric") == [
        {
            "model_name": "fraud-clf",
            "version": "1",
            "run_id": RUN_D[:12],
            "metric_key": "loss",
            "value": 0.4,
        }
    ]


def test_an_experiment_without_per_run_series_still_counts_its_runs(state: StateStore) -> None:
    families = builder(state, selected={"2"}).experiment("1")

    assert samples(families, "mlflow_run_info") == []
    assert samples(families, "mlflow_loss") == []
    assert sum(s["value"] for s in samples(families, "mlflow_experiment_runs")) == 3


def test_max_runs_per_experiment_keeps_the_newest_and_every_unfinished_run_and_reports_the_cut(
    state: StateStore,
) -> None:
    cuts: dict[str, int] = {}

    families = builder(state, max_runs_per_experiment=1).experiment("1", on_cut=cuts.__setitem__)

    assert {s["run_id"] for s in samples(families, "mlflow_run_info")} == {RUN_A[:12], RUN_C[:12]}
    assert cuts == {"1": 1}


def test_a_cut_is_reported_as_zero_for_an_experiment_without_per_run_series(
    state: StateStore,
) -> None:
    cuts: dict[str, int] = {}
    builder(state, selected=set(), max_runs_per_experiment=1).experiment(
        "1", on_cut=cuts.__setitem__
    )
    assert cuts == {"1": 0}


def test_the_metric_filter_applies_to_run_and_version_metrics(state: StateStore) -> None:
    families = builder(state, exclude_metrics=["acc"]).experiment("1")

    assert "mlflow_acc" not in names(families)
    assert {s["metric_key"] for s in samples(families, "mlflow_model_version_metric")} == {"loss"}


# ---------------------------------------------------------------- registry group and iteration


def test_the_registry_group_counts_experiments_models_and_versions(state: StateStore) -> None:
    families = builder(state).registry_group()

    experiments = {
        s["lifecycle_stage"]: s["value"] for s in samples(families, "mlflow_experiments")
    }
    assert experiments == {"active": 2, "deleted": 1}
    assert samples(families, "mlflow_registered_models")[0]["value"] == 2
    stages = {s["stage"]: s["value"] for s in samples(families, "mlflow_model_versions")}
    assert stages == {"None": 1, "Staging": 1, "Production": 1, "Archived": 1}


def test_groups_are_every_experiment_in_order_then_the_registry_when_asked(
    state: StateStore,
) -> None:
    b = builder(state)
    assert [k for k, _ in b.groups(with_registry=True)] == [
        experiment_key("1"),
        experiment_key("2"),
        REGISTRY_KEY,
    ]
    assert [k for k, _ in b.groups(with_registry=False)] == [
        experiment_key("1"),
        experiment_key("2"),
    ]


# ---------------------------------------------------------------- merge


def gauge(name: str, label: str, value: float) -> GaugeMetricFamily:
    f = GaugeMetricFamily(name, f"{name} help", labels=["k"])
    f.add_metric([label], value)
    return f


def test_merge_makes_one_family_per_name_holding_every_groups_samples() -> None:
    groups: list[tuple[GroupKey, list[Metric]]] = [
        (experiment_key("1"), [gauge("mlflow_a", "1", 1.0), gauge("mlflow_b", "1", 2.0)]),
        (experiment_key("2"), [gauge("mlflow_a", "2", 3.0)]),
        (REGISTRY_KEY, [gauge("mlflow_c", "r", 4.0)]),
    ]

    merged = merge(iter(groups))

    assert [f.name for f in merged] == ["mlflow_a", "mlflow_b", "mlflow_c"]
    assert [(s.labels["k"], s.value) for s in merged[0].samples] == [("1", 1.0), ("2", 3.0)]


def test_merging_the_real_groups_names_each_family_once(state: StateStore) -> None:
    merged = merge(builder(state).groups(with_registry=True))

    assert len(names(merged)) == len(merged)
    info = samples(merged, "mlflow_experiment_info")
    assert {s["experiment_id"] for s in info} == {"1", "2"}


# ---------------------------------------------------------------- pull collector


def test_the_pull_collector_builds_every_group_fresh_and_closes_its_reader(
    state: StateStore,
) -> None:
    opened: list[str] = []

    def open_builder() -> tuple[GroupBuilder, Callable[[], None]]:
        reader = state.reader()
        opened.append("open")

        def close() -> None:
            reader.conn.close()
            opened.append("closed")

        return builder(state), close

    families = list(MirrorCollector(open_builder, with_registry=True).collect())
    assert opened == ["open", "closed"]
    assert "mlflow_registered_models" in names(families)
    assert len(samples(families, "mlflow_experiment_info")) == 2

    without = list(MirrorCollector(open_builder, with_registry=False).collect())
    assert "mlflow_registered_models" not in names(without)
    assert opened == ["open", "closed", "open", "closed"]


def test_the_pull_collector_closes_its_reader_when_building_fails() -> None:
    closed: list[bool] = []

    class Broken:
        def groups(self, with_registry: bool) -> Iterator[Any]:
            raise RuntimeError("state went away")
            yield  # pragma: no cover

    collector = MirrorCollector(lambda: (Broken(), lambda: closed.append(True)), True)  # type: ignore[arg-type,return-value]

    with pytest.raises(RuntimeError):
        list(collector.collect())
    assert closed == [True]
