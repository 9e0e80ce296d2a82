"""Turning free-text MLflow names into legal, stable Prometheus names and labels."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable

PREFIX = "mlflow_"

# The GenAI trace families (planners/traces.py): live series and, at bucket times, history.
TRACE_FAMILIES = frozenset(
    {
        "mlflow_traces",
        "mlflow_trace_tokens",
        "mlflow_trace_cost_usd",
        "mlflow_trace_latency_seconds",
        "mlflow_trace_last_bucket_end_seconds",
        "mlflow_trace_assessments",
        "mlflow_trace_assessment_value",
        "mlflow_trace_name_traces",
        "mlflow_trace_name_tokens",
        "mlflow_trace_name_latency_seconds",
        "mlflow_trace_bucket_traces",
        "mlflow_trace_bucket_latency_seconds",
        "mlflow_trace_bucket_tokens",
        "mlflow_trace_bucket_assessment_value",
        "mlflow_trace_bucket_cost_usd",
    }
)
# Names the exporter itself pushes; a user metric must never land on one of them.
RESERVED_NAMES = TRACE_FAMILIES | frozenset(
    {
        "mlflow_metric_step",
        "mlflow_metric_timestamp_seconds",
        "mlflow_run_info",
        "mlflow_run_start_time_seconds",
        "mlflow_run_end_time_seconds",
        "mlflow_experiment_info",
        "mlflow_experiment_runs",
        "mlflow_experiment_last_run_start_time_seconds",
        "mlflow_experiment_last_update_time_seconds",
        "mlflow_registered_model_info",
        "mlflow_registered_model_versions",
        "mlflow_model_version_info",
        "mlflow_model_alias_info",
        "mlflow_model_version_metric",
        "mlflow_model_alias_metric",
        "mlflow_model_version_created_timestamp_seconds",
        "mlflow_experiments",
        "mlflow_registered_models",
        "mlflow_model_versions",
        "mlflow_model_aliases",
    }
)
# Suffixes that mean something to Prometheus/OpenMetrics; a gauge must not carry them.
RESERVED_SUFFIXES = ("_total", "_count", "_sum", "_bucket", "_info", "_created")

_ILLEGAL = re.compile(r"[^a-zA-Z0-9_]+")
MAX_LABEL_VALUE = 256


def metric_family_name(key: str) -> str:
    """Prometheus family name for an MLflow metric key: `val/loss` -> `mlflow_val_loss`.

    Keys that sanitise to the same family (`val/loss`, `val.loss`) share it and stay distinct
    series through the `metric_key` label, which carries the original key.
    """
    ascii_key = unicodedata.normalize("NFKD", key).encode("ascii", "ignore").decode()
    body = _ILLEGAL.sub("_", ascii_key).strip("_")
    if not body:
        # Nothing ASCII survives (e.g. a key in CJK): name it by a stable digest instead.
        body = "key_" + hashlib.sha256(key.encode()).hexdigest()[:10]
    name = PREFIX + body
    if name in RESERVED_NAMES or name.startswith("mlflow_exporter_"):
        name = PREFIX + "metric_" + body
    if name.endswith(RESERVED_SUFFIXES):
        name += "_value"
    return name


def label_value(value: str | None, limit: int = MAX_LABEL_VALUE) -> str:
    """Bound a free-text label value; long values are cut and marked, never dropped."""
    if value is None:
        return ""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def short_id_length(ids: Iterable[str], minimum: int) -> int:
    """Smallest prefix length >= `minimum` at which no two of `ids` collide."""
    unique = set(ids)
    length = minimum
    longest = max((len(i) for i in unique), default=minimum)
    while length < longest and len({i[:length] for i in unique}) < len(unique):
        length += 1
    return length
