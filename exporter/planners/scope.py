"""Which experiments this exporter mirrors, and which of them get per-run series.

Scope is what the exporter looks at at all: its shard of the experiments, narrowed by the
include/exclude name patterns. Everything in scope is mirrored, counted, and delivered to
the history sinks. `MAX_EXPERIMENTS` and `max_runs_per_experiment` only bound how many
per-run series reach Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from exporter.config import ExportSettings, name_filter
from exporter.mlflow_source import shard_of
from exporter.model import Experiment


@dataclass(frozen=True, slots=True)
class Scope:
    active: list[Experiment]  # mirrored: active, this shard's, matching the patterns
    counts: dict[str, int]  # lifecycle stage -> experiments matching the patterns (all shards)
    excluded: int  # active experiments of this shard left out by the patterns


def in_scope(experiments: Iterable[Experiment], export: ExportSettings) -> Scope:
    """Split MLflow's experiment list into what this exporter mirrors and counts."""
    allowed = name_filter(export.include_experiments, export.exclude_experiments)
    counts = {"active": 0, "deleted": 0}
    active: list[Experiment] = []
    excluded = 0
    for e in experiments:
        stage = e.lifecycle_stage if e.lifecycle_stage in counts else "active"
        if not allowed(e.name):
            excluded += stage == "active" and owns(e.experiment_id, export)
            continue
        counts[stage] += 1
        if stage == "active" and owns(e.experiment_id, export):
            active.append(e)
    return Scope(sorted(active, key=lambda e: e.experiment_id), counts, excluded)


def owns(experiment_id: str, export: ExportSettings) -> bool:
    """Whether this shard owns an experiment (a stable hash of its id)."""
    return shard_of(experiment_id, export.shard_count) == export.shard_index


def owns_group(key: tuple[tuple[str, str], ...], export: ExportSettings) -> bool:
    """Pushgateway groups this shard manages on its job: its experiments', and (shard 0)
    the registry group."""
    labels = dict(key)
    if set(labels) == {"experiment_id"}:
        return owns(labels["experiment_id"], export)
    return labels == {"group": "registry"} and export.shard_index == 0


def with_run_series(activity: Mapping[str, int], max_experiments: int) -> set[str]:
    """The experiments whose runs become per-run series: the most recently active ones
    (newest run start or experiment update), all of them when `max_experiments` is 0."""
    ordered = sorted(activity, key=lambda i: (activity[i], i), reverse=True)
    return set(ordered if not max_experiments else ordered[:max_experiments])


def metric_filter(export: ExportSettings) -> Callable[[str], bool]:
    """The include/exclude patterns over metric keys, as a predicate."""
    return name_filter(export.include_metrics, export.exclude_metrics)
