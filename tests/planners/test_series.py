"""Unit tests for exporter.planners.series: the Prometheus families of each group (pure)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from exporter.model import (
    MODEL_STAGES,
    RUN_STATUSES,
    Experiment,
    LatestMetric,
    ModelVersion,
    Registry,
    Run,
)
from exporter.planners.series import (
    REGISTRY_KEY,
    ExperimentView,
    Families,
    FixedCollector,
    GroupKey,
    ServerCounts,
    experiment_families,
    experiment_key,
    registry_families,
)

T = 1_705_314_000_000
RUN_A = "a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6"
RUN_B = "ffffffffffffffff0000000000000000"
EXP = Experiment("7", "churn model", "active", creation_time_ms=T, last_update_time_ms=T + 500)
EXP_LABELS = {"experiment_id": "7", "experiment_name": "churn model"}


def everything(_: str) -> bool:
    return True


def by_name(families: list[Metric]) -> dict[str, list[dict[str, Any]]]:
    """Family name -> its samples, each as labels plus `value`."""
    out: dict[str, list[dict[str, Any]]] = {}
    for f in families:
        assert f.name not in out, f"family {f.name} appears twice"
        out[f.name] = [{**s.labels, "value": s.value} for s in f.samples]
    return out


def run(run_id: str = RUN_A, **overrides: Any) -> Run:
    fields: dict[str, Any] = {
        "run_id": run_id,
        "experiment_id": "7",
        "run_name": "brave-owl",
        "status": "FINISHED",
        "user_id": "alice",
        "start_time_ms": T + 1000,
        "end_time_ms": T + 9000,
        "metrics": (
            LatestMetric("val/loss", 0.25, 40, T + 8000),
            LatestMetric("acc", 0.9, 40, T + 8000),
        ),
    }
    fields.update(overrides)
    return Run(**fields)


def view(**overrides: Any) -> ExperimentView:
    fields: dict[str, Any] = {
        "experiment": EXP,
        "runs": [run()],
        "status_counts": {"FINISHED": 3, "FAILED": 1},
        "last_run_start_ms": T + 1000,
    }
    fields.update(overrides)
    return ExperimentView(**fields)


# ---------------------------------------------------------------- experiment groups


def test_an_experiment_group_has_its_info_update_time_and_newest_run_start() -> None:
    f = by_name(experiment_families(view(), {}, 12, everything))

    assert f["mlflow_experiment_info"] == [{**EXP_LABELS, "lifecycle_stage": "active", "value": 1}]
    assert f["mlflow_experiment_last_update_time_seconds"] == [
        {**EXP_LABELS, "value": T / 1000 + 0.5}
    ]
    assert f["mlflow_experiment_last_run_start_time_seconds"] == [
        {**EXP_LABELS, "value": T / 1000 + 1}
    ]


def test_every_run_status_is_counted_zeros_included() -> None:
    f = by_name(experiment_families(view(), {}, 12, everything))

    counts = {s["status"]: s["value"] for s in f["mlflow_experiment_runs"]}
    assert counts == {"RUNNING": 0, "SCHEDULED": 0, "FINISHED": 3, "FAILED": 1, "KILLED": 0}
    assert list(counts) == list(RUN_STATUSES)


def test_an_experiment_without_runs_or_times_still_counts_every_status() -> None:
    empty = view(
        experiment=Experiment("8", "empty"), runs=[], status_counts={}, last_run_start_ms=None
    )

    f = by_name(experiment_families(empty, {}, 12, everything))

    assert set(f) == {"mlflow_experiment_info", "mlflow_experiment_runs"}
    assert [s["value"] for s in f["mlflow_experiment_runs"]] == [0] * len(RUN_STATUSES)


def test_a_run_has_info_times_and_per_metric_value_step_and_timestamp() -> None:
    f = by_name(experiment_families(view(), {RUN_A: "Production"}, 12, everything))

    rl = {**EXP_LABELS, "run_id": RUN_A[:12]}
    assert f["mlflow_run_info"] == [
        {
            **rl,
            "run_name": "brave-owl",
            "status": "FINISHED",
            "user_id": "alice",
            "model_stage": "Production",
            "value": 1,
        }
    ]
    assert f["mlflow_run_start_time_seconds"] == [{**rl, "value": (T + 1000) / 1000}]
    assert f["mlflow_run_end_time_seconds"] == [{**rl, "value": (T + 9000) / 1000}]
    assert f["mlflow_val_loss"] == [
        {**rl, "metric_key": "val/loss", "model_stage": "Production", "value": 0.25}
    ]
    steps = {s["metric_key"]: s["value"] for s in f["mlflow_metric_step"]}
    assert steps == {"val/loss": 40, "acc": 40}
    assert {s["value"] for s in f["mlflow_metric_timestamp_seconds"]} == {(T + 8000) / 1000}
    assert all("model_stage" not in s for s in f["mlflow_metric_step"])


def test_a_run_without_a_version_has_model_stage_none_and_a_running_run_no_end_time() -> None:
    f = by_name(
        experiment_families(
            view(runs=[run(end_time_ms=None, status="RUNNING")]), {}, 12, everything
        )
    )

    assert f["mlflow_run_info"][0]["model_stage"] == "none"
    assert f["mlflow_val_loss"][0]["model_stage"] == "none"
    assert "mlflow_run_end_time_seconds" not in f


def test_a_run_that_ended_before_the_window_keeps_values_and_steps_without_logging_times() -> None:
    old = run(RUN_B, end_time_ms=T + 9000)  # ended before the window: one of the newest
    edge = run(RUN_A, end_time_ms=T + 10_000)  # ended at the window's start: inside
    running = run("c" * 32, status="RUNNING", start_time_ms=T, end_time_ms=None)
    unended = run("d" * 32, status="FAILED", start_time_ms=T + 10_000, end_time_ms=None)
    runs = [old, edge, running, unended]

    f = by_name(
        experiment_families(view(runs=runs, window_since_ms=T + 10_000), {}, 12, everything)
    )

    timed = {s["run_id"] for s in f["mlflow_metric_timestamp_seconds"]}
    assert timed == {RUN_A[:12], "c" * 12, "d" * 12}
    assert {s["run_id"] for s in f["mlflow_metric_step"]} == {r.run_id[:12] for r in runs}
    assert {s["run_id"] for s in f["mlflow_val_loss"]} == {r.run_id[:12] for r in runs}
    assert {s["run_id"] for s in f["mlflow_run_end_time_seconds"]} == {RUN_B[:12], RUN_A[:12]}


def test_without_a_window_every_run_keeps_its_logging_times() -> None:
    f = by_name(experiment_families(view(runs=[run(end_time_ms=0)]), {}, 12, everything))
    assert len(f["mlflow_metric_timestamp_seconds"]) == 2


@pytest.mark.parametrize("length", [8, 12, 32])
def test_run_ids_are_cut_to_the_label_length(length: int) -> None:
    f = by_name(experiment_families(view(), {}, length, everything))
    assert {s["run_id"] for name in f for s in f[name] if "run_id" in s} == {RUN_A[:length]}


def test_the_metric_filter_leaves_out_keys_it_refuses() -> None:
    f = by_name(experiment_families(view(), {}, 12, lambda key: key != "acc"))

    assert "mlflow_acc" not in f
    assert {s["metric_key"] for s in f["mlflow_metric_step"]} == {"val/loss"}


def test_nan_and_infinite_latest_values_are_kept_as_they_are() -> None:
    metrics = (LatestMetric("loss", math.nan, 1, T), LatestMetric("grad", math.inf, 1, T))

    f = by_name(experiment_families(view(runs=[run(metrics=metrics)]), {}, 12, everything))

    assert math.isnan(f["mlflow_loss"][0]["value"])
    assert f["mlflow_grad"][0]["value"] == math.inf


def test_long_run_names_and_users_are_cut_to_label_size() -> None:
    f = by_name(
        experiment_families(
            view(runs=[run(run_name="n" * 999, user_id="u" * 999)]), {}, 12, everything
        )
    )
    info = f["mlflow_run_info"][0]
    assert (len(info["run_name"]), len(info["user_id"])) == (256, 256)


def test_metrics_of_versions_built_from_the_experiments_runs_with_their_aliases() -> None:
    versions = [
        ModelVersion("churn-clf", "3", RUN_A, "Production", "READY", ("champion", "prod")),
        ModelVersion("churn-clf", "4", None, "None", "READY", ("orphan",)),
    ]
    latest = {RUN_A: (LatestMetric("auc", 0.8, 1, T), LatestMetric("skip", 1.0, 1, T))}

    families = experiment_families(
        view(versions=versions, version_metrics=latest), {}, 12, lambda k: k != "skip"
    )
    f = by_name(families)

    assert f["mlflow_model_version_metric"] == [
        {
            "model_name": "churn-clf",
            "version": "3",
            "run_id": RUN_A[:12],
            "metric_key": "auc",
            "value": 0.8,
        }
    ]
    assert f["mlflow_model_alias_metric"] == [
        {"model_name": "churn-clf", "alias": a, "version": "3", "metric_key": "auc", "value": 0.8}
        for a in ("champion", "prod")
    ]


def test_a_run_metric_named_like_an_exporter_family_does_not_mix_into_it() -> None:
    runs = [run(metrics=(LatestMetric("model_version_metric", 0.5, 1, T),))]
    versions = [ModelVersion("churn-clf", "3", RUN_A, "Production", "READY")]
    latest = {RUN_A: (LatestMetric("auc", 0.8, 1, T),)}

    families = experiment_families(
        view(runs=runs, versions=versions, version_metrics=latest), {}, 12, everything
    )

    version_samples = [
        s for f in families if f.name == "mlflow_model_version_metric" for s in f.samples
    ]
    assert [set(s.labels) for s in version_samples] == [
        {"model_name", "version", "run_id", "metric_key"}
    ]


# ---------------------------------------------------------------- registry group


def registry() -> Registry:
    return Registry(
        ("churn-clf", "fraud-clf", "unused"),
        (
            ModelVersion("churn-clf", "1", RUN_B, "Archived", "READY", (), T),
            ModelVersion(
                "churn-clf", "2", RUN_A, "Production", "READY", ("champion", "blue"), T + 1
            ),
            ModelVersion("churn-clf", "3", None, "None", "PENDING_REGISTRATION"),
            ModelVersion("fraud-clf", "1", RUN_A, "Production", "READY", ("champion",), T + 2),
        ),
    )


def test_experiments_are_counted_by_lifecycle_stage_zeros_included() -> None:
    f = by_name(registry_families(Registry(), ServerCounts({"active": 4}), 12))
    assert f["mlflow_experiments"] == [
        {"lifecycle_stage": "active", "value": 4},
        {"lifecycle_stage": "deleted", "value": 0},
    ]


def test_an_empty_registry_still_has_every_stage_and_zero_counts() -> None:
    f = by_name(registry_families(Registry(), ServerCounts({}), 12))

    assert f["mlflow_registered_models"] == [{"value": 0}]
    assert f["mlflow_model_aliases"] == [{"value": 0}]
    assert f["mlflow_model_versions"] == [{"stage": s, "value": 0} for s in MODEL_STAGES]
    assert "mlflow_registered_model_versions" not in f


def test_versions_are_counted_per_stage_overall_and_per_model_every_stage_present() -> None:
    f = by_name(registry_families(registry(), ServerCounts({}), 12))

    assert {s["stage"]: s["value"] for s in f["mlflow_model_versions"]} == {
        "None": 1,
        "Staging": 0,
        "Production": 2,
        "Archived": 1,
    }
    per_model = {
        (s["model_name"], s["stage"]): s["value"] for s in f["mlflow_registered_model_versions"]
    }
    assert per_model == {
        ("churn-clf", "None"): 1,
        ("churn-clf", "Staging"): 0,
        ("churn-clf", "Production"): 1,
        ("churn-clf", "Archived"): 1,
        ("fraud-clf", "None"): 0,
        ("fraud-clf", "Staging"): 0,
        ("fraud-clf", "Production"): 1,
        ("fraud-clf", "Archived"): 0,
        ("unused", "None"): 0,
        ("unused", "Staging"): 0,
        ("unused", "Production"): 0,
        ("unused", "Archived"): 0,
    }
    assert f["mlflow_registered_models"] == [{"value": 3}]
    assert [s["model_name"] for s in f["mlflow_registered_model_info"]] == [
        "churn-clf",
        "fraud-clf",
        "unused",
    ]


def test_each_version_and_alias_has_an_info_series_with_the_short_run_id() -> None:
    f = by_name(registry_families(registry(), ServerCounts({}), 8))

    info = {(s["model_name"], s["version"]): s for s in f["mlflow_model_version_info"]}
    assert info[("churn-clf", "2")] == {
        "model_name": "churn-clf",
        "version": "2",
        "run_id": RUN_A[:8],
        "stage": "Production",
        "status": "READY",
        "aliases": "champion,blue",
        "value": 1,
    }
    assert info[("churn-clf", "3")]["run_id"] == ""
    assert f["mlflow_model_aliases"] == [{"value": 3}]
    assert f["mlflow_model_alias_info"] == [
        {
            "model_name": "churn-clf",
            "alias": "champion",
            "version": "2",
            "run_id": RUN_A[:8],
            "value": 1,
        },
        {
            "model_name": "churn-clf",
            "alias": "blue",
            "version": "2",
            "run_id": RUN_A[:8],
            "value": 1,
        },
        {
            "model_name": "fraud-clf",
            "alias": "champion",
            "version": "1",
            "run_id": RUN_A[:8],
            "value": 1,
        },
    ]
    created = {
        (s["model_name"], s["version"]): s["value"]
        for s in f["mlflow_model_version_created_timestamp_seconds"]
    }
    assert created == {
        ("churn-clf", "1"): T / 1000,
        ("churn-clf", "2"): (T + 1) / 1000,
        ("fraud-clf", "1"): (T + 2) / 1000,
    }


# ---------------------------------------------------------------- helpers


def test_group_keys_name_the_experiment_or_the_registry() -> None:
    assert experiment_key("42") == GroupKey((("experiment_id", "42"),))
    assert GroupKey((("group", "registry"),)) == REGISTRY_KEY
    assert experiment_key("42").as_dict() == {"experiment_id": "42"}


def test_families_keep_the_first_help_text_and_skip_missing_values() -> None:
    f = Families()
    f.add("mlflow_x", "first", {"a": "1"}, 1.0)
    f.add("mlflow_x", "second", {"a": "2"}, 2.0)
    f.add("mlflow_y", "never", {}, None)

    [family] = f.families()
    assert (family.name, family.documentation, len(family.samples)) == ("mlflow_x", "first", 2)


def test_a_fixed_collector_yields_exactly_its_families() -> None:
    families: list[Metric] = [GaugeMetricFamily("mlflow_a", "a", value=1)]
    assert list(FixedCollector(families).collect()) == families


def test_the_readme_example_series_has_exactly_the_labels_a_run_metric_gets() -> None:
    # The README's first screen shows one pushed series; the Pushgateway adds `job`.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    [line] = [x for x in readme.splitlines() if x.startswith("mlflow_val_loss{")]
    [family] = text_string_to_metric_families(line + "\n")
    [example] = family.samples
    f = by_name(experiment_families(view(), {}, 12, everything))
    [produced] = [s for s in f["mlflow_val_loss"] if s["metric_key"] == "val/loss"]

    assert set(example.labels) == {*produced, "job"} - {"value"}
    assert example.labels["metric_key"] == "val/loss"
    assert len(example.labels["run_id"]) == len(produced["run_id"]) == 12
    assert produced["model_stage"] == example.labels["model_stage"] == "none"
    assert "run_name" in f["mlflow_run_info"][0]  # the join the README names
