"""Unit tests for exporter.selfmetrics: every family and label value exists from the start."""

from __future__ import annotations

import platform

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from exporter import __version__
from exporter.selfmetrics import SelfMetrics

P = "mlflow_exporter_"


@pytest.fixture(scope="module")
def exposition() -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name -> labels -> value, as a fresh exporter's /metrics shows them."""
    text = generate_latest(SelfMetrics().registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def label_values(exposition: dict, name: str, label: str) -> set[str]:  # type: ignore[type-arg]
    return {dict(labels)[label] for labels in exposition[name]}


def test_cycles_exist_at_zero_for_every_result(exposition: dict) -> None:  # type: ignore[type-arg]
    assert exposition[f"{P}cycles_total"] == {
        (("result", r),): 0.0 for r in ("success", "failure", "crash")
    }


def test_errors_exist_at_zero_for_every_stage(exposition: dict) -> None:  # type: ignore[type-arg]
    stages = {"mlflow", "traces", "pushgateway", "state", "internal"}
    stages |= {"pramathus", "remote_write", "otlp"}  # every built-in sink, on or off
    assert label_values(exposition, f"{P}errors_total", "stage") == stages
    assert set(exposition[f"{P}errors_total"].values()) == {0.0}


def test_excluded_and_reconcile_kinds_exist(exposition: dict) -> None:  # type: ignore[type-arg]
    assert label_values(exposition, f"{P}excluded", "kind") == {
        "experiments",
        "runs",
        "metrics",
        "trace_names",
    }
    assert label_values(exposition, f"{P}reconcile_found_total", "kind") == {
        "new",
        "changed",
        "restored",
        "removed",
    }


@pytest.mark.parametrize("sink", ["pramathus", "remote_write"])
def test_each_history_sink_has_its_delivery_families(exposition: dict, sink: str) -> None:  # type: ignore[type-arg]
    p = f"{P}{sink}_"
    for name in (
        "points_sent_total",
        "batches_sent_total",
        "spool_points",
        "spool_batches",
        "dead_letter_batches",
        "backfill_series",
    ):
        assert exposition[p + name] == {(): 0.0}, name
    assert label_values(exposition, p + "set_aside_points", "reason") >= {
        "rejected",
        "too_old",
        "out_of_order",
    }
    assert label_values(exposition, p + "dropped_points_total", "reason") == {"queue_overflow"}


def test_remote_write_set_aside_includes_duplicate_timestamp(exposition: dict) -> None:  # type: ignore[type-arg]
    assert "duplicate_timestamp" in label_values(
        exposition, f"{P}remote_write_set_aside_points", "reason"
    )


@pytest.mark.parametrize(
    ("sink", "unit", "what"),
    [("pramathus", "points", "pramathus"), ("remote_write", "samples", "remote write")],
)
def test_queue_help_names_the_sink_and_its_unit(sink: str, unit: str, what: str) -> None:
    families = {f.name: f for f in SelfMetrics().registry.collect()}
    spool = families[f"{P}{sink}_spool_points"]
    assert spool.documentation == f"Metric points waiting in the {what} queue ({unit})."


def test_build_info_names_the_version_and_python(exposition: dict) -> None:  # type: ignore[type-arg]
    assert exposition[f"{P}build_info"] == {
        (("python", platform.python_version()), ("version", __version__)): 1.0
    }


def test_every_gauge_and_histogram_is_there_before_the_first_cycle(exposition: dict) -> None:  # type: ignore[type-arg]
    for name in (
        "up",
        "last_success_timestamp_seconds",
        "last_cycle_timestamp_seconds",
        "pushed_groups",
        "pushed_series",
        "nonfinite_values",
        "settling_runs",
        "pending_runs",
        "points_captured_total",
        "sweep_passes_total",
        "last_sweep_completed_timestamp_seconds",
        "cycle_duration_seconds_count",
        "last_push_success_timestamp_seconds",
    ):
        assert f"{P}{name}" in exposition, name


def test_each_instance_has_its_own_registry_never_the_global_one() -> None:
    a, b = SelfMetrics(), SelfMetrics()  # a second one would clash in a shared registry
    a.up.set(1)
    assert b.registry.get_sample_value(f"{P}up") == 0.0
    assert REGISTRY.get_sample_value(f"{P}up") is None
