"""Unit tests for exporter.sinks.prometheus: grouping, rendered series, run_id length.

Groups are rendered the way the Pushgateway push renders them: each collector in a fresh
`CollectorRegistry`, through `generate_latest`, then parsed back with prometheus_client's
own text parser. Nothing here talks to a Pushgateway.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

import exporter.sinks.prometheus as prom
from exporter.config import PrometheusSettings
from exporter.model import (
    RUN_STATUSES,
    Experiment,
    LatestMetric,
    ModelVersion,
    Run,
    Snapshot,
)
from exporter.sinks.prometheus import (
    ExperimentGroup,
    Pushgateway,
    build_groups,
    run_id_length_for,
)

RUN_A = "a1b2c3d4e5f6" + "0" * 20  # 32-char MLflow run ids
RUN_B = "ffffeeeedddd" + "1" * 20
RUN_C = "0123456789ab" + "2" * 20
REGISTRY_KEY = (("group", "registry"),)


def make_run(run_id: str, experiment_id: str, *metrics: LatestMetric, **kw: Any) -> Run:
    values: dict[str, Any] = {
        "run_name": f"run-{run_id[:4]}",
        "status": "FINISHED",
        "user_id": "alice",
        "start_time_ms": 1_705_314_000_000,
        "end_time_ms": 1_705_315_000_000,
    }
    values.update(kw)
    return Run(run_id=run_id, experiment_id=experiment_id, metrics=metrics, **values)


def metric(key: str, value: float, step: int = 10) -> LatestMetric:
    return LatestMetric(key, value, step, 1_705_314_585_123)


@pytest.fixture
def snapshot() -> Snapshot:
    return Snapshot(
        experiments=[
            Experiment("1", "churn-model", last_update_time_ms=1_705_315_000_000),
            Experiment("2", "fraud-model"),
        ],
        runs={
            "1": [
                make_run(
                    RUN_A,
                    "1",
                    metric("accuracy", 0.93),
                    metric("val/loss", 0.21),
                    metric("val.loss", 0.25),
                    metric("diverged", math.nan),
                ),
                make_run(RUN_B, "1", metric("accuracy", 0.88), status="RUNNING", end_time_ms=None),
            ],
            "2": [],
        },
        registered_models=["churn"],
        model_versions=[
            ModelVersion("churn", "3", RUN_A, "Production", "READY", ("champion", "latest")),
            ModelVersion("churn", "2", RUN_C, "Archived", "READY"),
        ],
    )


def render(collector: Collector) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry).decode()


def samples(collector: Collector, name: str) -> list[Sample]:
    """The samples of family `name` in the collector's rendered text."""
    found = [
        s
        for family in text_string_to_metric_families(render(collector))
        for s in family.samples
        if s.name == name
    ]
    assert found, f"no {name} in:\n{render(collector)}"
    return found


def by_key(found: list[Sample]) -> dict[str, Sample]:
    return {s.labels["metric_key"]: s for s in found}


# ---------------------------------------------------------------- grouping


def test_build_groups_makes_one_group_per_experiment_plus_the_registry(
    snapshot: Snapshot,
) -> None:
    groups = build_groups(snapshot, 12)
    assert list(groups) == [(("experiment_id", "1"),), (("experiment_id", "2"),), REGISTRY_KEY]
    assert isinstance(groups[(("experiment_id", "1"),)], ExperimentGroup)
    assert isinstance(groups[REGISTRY_KEY], prom.RegistryGroup)


def test_build_groups_without_registry_has_only_experiment_groups(snapshot: Snapshot) -> None:
    assert REGISTRY_KEY not in build_groups(snapshot, 12, with_registry=False)


def test_every_group_renders_without_error(snapshot: Snapshot) -> None:
    for collector in build_groups(snapshot, 12).values():
        assert list(text_string_to_metric_families(render(collector)))


# ---------------------------------------------------------------- experiment group


def test_run_metric_has_experiment_run_key_and_stage_labels(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 12)[(("experiment_id", "1"),)]
    accuracy = {s.labels["run_id"]: s for s in samples(group, "mlflow_accuracy")}
    assert set(accuracy) == {RUN_A[:12], RUN_B[:12]}
    a = accuracy[RUN_A[:12]]
    assert a.labels == {
        "experiment_id": "1",
        "experiment_name": "churn-model",
        "run_id": RUN_A[:12],
        "metric_key": "accuracy",
        "model_stage": "Production",  # from the ModelVersion built from RUN_A
    }
    assert a.value == pytest.approx(0.93)
    assert accuracy[RUN_B[:12]].labels["model_stage"] == "none"  # no model version


def test_run_id_label_is_cut_to_the_given_length(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 16)[(("experiment_id", "1"),)]
    run_ids = {s.labels["run_id"] for s in samples(group, "mlflow_accuracy")}
    assert run_ids == {RUN_A[:16], RUN_B[:16]}


def test_keys_that_sanitise_alike_are_distinct_series_of_one_family(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 12)[(("experiment_id", "1"),)]
    val_loss = by_key(samples(group, "mlflow_val_loss"))
    assert set(val_loss) == {"val/loss", "val.loss"}
    assert val_loss["val/loss"].value == pytest.approx(0.21)
    assert val_loss["val.loss"].value == pytest.approx(0.25)
    steps = by_key(samples(group, "mlflow_metric_step"))
    assert {"val/loss", "val.loss"} <= set(steps)


def test_nan_metric_renders_as_nan_without_error(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 12)[(("experiment_id", "1"),)]
    text = render(group)
    assert 'metric_key="diverged"' in text
    [diverged] = samples(group, "mlflow_diverged")
    assert math.isnan(diverged.value)


@pytest.mark.parametrize(("value", "rendered"), [(math.inf, "+Inf"), (-math.inf, "-Inf")])
def test_infinite_metric_renders_as_inf(value: float, rendered: str) -> None:
    exp = Experiment("9", "e")
    group = ExperimentGroup(exp, [make_run(RUN_A, "9", metric("loss", value))], {}, 12)
    line = next(line for line in render(group).splitlines() if line.startswith("mlflow_loss{"))
    assert line.endswith(f" {rendered}")


def test_experiment_runs_has_all_five_statuses_with_zeros(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 12)[(("experiment_id", "1"),)]
    runs = {s.labels["status"]: s.value for s in samples(group, "mlflow_experiment_runs")}
    assert runs == {"RUNNING": 1, "SCHEDULED": 0, "FINISHED": 1, "FAILED": 0, "KILLED": 0}
    assert set(runs) == set(RUN_STATUSES)


def test_empty_experiment_still_reports_all_statuses_as_zero(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 12)[(("experiment_id", "2"),)]
    runs = {s.labels["status"]: s.value for s in samples(group, "mlflow_experiment_runs")}
    assert runs == dict.fromkeys(RUN_STATUSES, 0)
    [info] = samples(group, "mlflow_experiment_info")
    assert info.labels["experiment_name"] == "fraud-model"


def test_run_info_and_times_are_exported(snapshot: Snapshot) -> None:
    group = build_groups(snapshot, 12)[(("experiment_id", "1"),)]
    info = {s.labels["run_id"]: s for s in samples(group, "mlflow_run_info")}
    assert info[RUN_A[:12]].labels["model_stage"] == "Production"
    assert info[RUN_B[:12]].labels["status"] == "RUNNING"
    ends = {s.labels["run_id"] for s in samples(group, "mlflow_run_end_time_seconds")}
    assert ends == {RUN_A[:12]}  # the running run has no end time, so no series
    [last_update] = samples(group, "mlflow_experiment_last_update_time_seconds")
    assert last_update.value == 1_705_315_000.0


def test_awkward_label_values_survive_rendering() -> None:
    name = 'team "A" \\ churn\nv2 — 准确率'
    group = ExperimentGroup(Experiment("7", name), [], {}, 12)
    [info] = samples(group, "mlflow_experiment_info")
    assert info.labels["experiment_name"] == name


# ---------------------------------------------------------------- registry group


def test_registry_group_has_version_info_with_comma_joined_aliases(snapshot: Snapshot) -> None:
    registry = build_groups(snapshot, 12)[REGISTRY_KEY]
    versions = {
        s.labels["version"]: s.labels for s in samples(registry, "mlflow_model_version_info")
    }
    assert versions["3"] == {
        "model_name": "churn",
        "version": "3",
        "run_id": RUN_A[:12],
        "stage": "Production",
        "status": "READY",
        "aliases": "champion,latest",
    }
    assert versions["2"]["aliases"] == ""


def test_registry_group_has_one_alias_series_per_alias(snapshot: Snapshot) -> None:
    registry = build_groups(snapshot, 12)[REGISTRY_KEY]
    aliases = samples(registry, "mlflow_model_alias_info")
    assert sorted((s.labels["alias"], s.labels["version"]) for s in aliases) == [
        ("champion", "3"),
        ("latest", "3"),
    ]
    assert all(s.labels["run_id"] == RUN_A[:12] and s.value == 1 for s in aliases)


def test_registry_group_counts_versions_by_stage(snapshot: Snapshot) -> None:
    registry = build_groups(snapshot, 12)[REGISTRY_KEY]
    counts = {
        s.labels["stage"]: s.value for s in samples(registry, "mlflow_registered_model_versions")
    }
    assert counts == {"Production": 1, "Archived": 1}
    [model] = samples(registry, "mlflow_registered_model_info")
    assert model.labels == {"model_name": "churn"}


# ---------------------------------------------------------------- run_id length


def test_run_id_length_is_the_minimum_when_prefixes_differ(snapshot: Snapshot) -> None:
    assert run_id_length_for(snapshot, 12) == 12


def test_run_id_length_grows_when_two_run_ids_share_a_12_char_prefix(
    snapshot: Snapshot,
) -> None:
    twin = RUN_A[:12] + "9" * 20
    snapshot.runs["2"] = [make_run(twin, "2")]
    assert run_id_length_for(snapshot, 12) == 13


def test_run_id_length_counts_model_version_run_ids_too(snapshot: Snapshot) -> None:
    twin = RUN_A[:14] + "9" * 18
    snapshot.model_versions.append(ModelVersion("churn", "4", twin, "None", "READY"))
    assert run_id_length_for(snapshot, 12) == 15


# ---------------------------------------------------------------- push accounting


class _Listing:
    """The Pushgateway's `/metrics` text with no groups of ours, as `http_get` returns it."""

    def raise_for_status(self) -> None:
        pass

    def iter_lines(self, decode_unicode: bool = False) -> Iterator[str]:
        yield "# HELP push_time_seconds Last Unix time when changing this group succeeded."
        yield 'push_time_seconds{instance="",job="other"} 1.7e+09'


@pytest.fixture
def no_network_push(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace push_to_gateway with a fake that renders the registry, as the real one does."""
    bodies: list[str] = []

    def fake_push(gateway: str, job: str, registry: CollectorRegistry, **_: Any) -> None:
        bodies.append(generate_latest(registry).decode())

    monkeypatch.setattr(prom, "push_to_gateway", fake_push)
    return bodies


def test_push_puts_every_group_without_network(
    snapshot: Snapshot, no_network_push: list[str]
) -> None:
    pg = Pushgateway(PrometheusSettings(), http_get=lambda *a, **k: _Listing())
    result = pg.push(build_groups(snapshot, 12), owns=lambda labels: True)
    assert result.groups == 3
    assert len(no_network_push) == 3
    assert result.deleted == 0


def test_push_counts_each_non_finite_value_once(
    snapshot: Snapshot, no_network_push: list[str]
) -> None:
    pg = Pushgateway(PrometheusSettings(), http_get=lambda *a, **k: _Listing())
    result = pg.push(build_groups(snapshot, 12), owns=lambda labels: True)
    assert result.nonfinite == 1  # one NaN metric in the snapshot
