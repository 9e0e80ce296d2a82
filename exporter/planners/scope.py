"""Which experiments this exporter mirrors, and which of them get per-run series.

Scope is what the exporter looks at at all: its shard of the experiments, narrowed by the
include/exclude name patterns. Everything in scope is mirrored, counted, and delivered to
the history sinks. `MAX_EXPERIMENTS` and `max_runs_per_experiment` only bound how many
per-run series reach Prometheus.

Experiments are assigned to shards by jump consistent hash (Lamping and Veach, 2014): going
from n to n + 1 shards moves about 1/(n + 1) of them, all to the new shard, and none between
the shards that stay.

The settings come in as `ScopeRules`, the fields of `config.ExportSettings` read here: the
planner never imports `config.py` (its pydantic models and the file and environment loader).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from exporter.model import Experiment
from exporter.planners.series import GroupKey

_MASK64 = (1 << 64) - 1


class ScopeRules(Protocol):
    """What scope reads of the `export:` settings (`config.ExportSettings` is one)."""

    @property
    def include_experiments(self) -> Sequence[str]: ...
    @property
    def exclude_experiments(self) -> Sequence[str]: ...
    @property
    def include_metrics(self) -> Sequence[str]: ...
    @property
    def exclude_metrics(self) -> Sequence[str]: ...
    @property
    def shard_index(self) -> int: ...
    @property
    def shard_count(self) -> int: ...
    @property
    def registry_group(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class Scope:
    active: list[Experiment]  # mirrored: active, this shard's, matching the patterns
    counts: dict[str, int]  # lifecycle stage -> experiments matching the patterns (all shards)
    excluded: int  # active experiments of this shard left out by the patterns


def in_scope(experiments: Iterable[Experiment], export: ScopeRules) -> Scope:
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


def jump_hash(key: int, buckets: int) -> int:
    """Jump consistent hash: the bucket (0..buckets-1) of a 64-bit key."""
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) & _MASK64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_of(experiment_id: str, shard_count: int) -> int:
    """The shard owning an experiment: a stable key (the first 8 bytes of the SHA-256 of its
    id, the same in every process and release) through jump consistent hash."""
    digest = hashlib.sha256(experiment_id.encode()).digest()
    return jump_hash(int.from_bytes(digest[:8], "big"), shard_count)


def owns(experiment_id: str, export: ScopeRules) -> bool:
    """Whether this shard owns an experiment (a stable hash of its id)."""
    return shard_of(experiment_id, export.shard_count) == export.shard_index


def owns_registry(export: ScopeRules) -> bool:
    """Whether this exporter pushes (or serves) the registry group: shard 0 of a sharded
    exporter, unless `export.registry_group` gives it to another exporter of the job."""
    return export.shard_index == 0 and export.registry_group


def owns_group(key: GroupKey, export: ScopeRules) -> bool:
    """Pushgateway groups this exporter manages on its job: its experiments', and the
    registry group when it owns it (a sweep deletes only these, and only once pushed)."""
    labels = key.as_dict()
    if set(labels) == {"experiment_id"}:
        return owns(labels["experiment_id"], export)
    return labels == {"group": "registry"} and owns_registry(export)


def with_run_series(activity: Mapping[str, int], max_experiments: int) -> set[str]:
    """The experiments whose runs become per-run series: the most recently active ones
    (newest run start or experiment update), all of them when `max_experiments` is 0."""
    ordered = sorted(activity, key=lambda i: (activity[i], i), reverse=True)
    return set(ordered if not max_experiments else ordered[:max_experiments])


def metric_filter(export: ScopeRules) -> Callable[[str], bool]:
    """The include/exclude patterns over metric keys, as a predicate."""
    return name_filter(export.include_metrics, export.exclude_metrics)


def name_filter(include: Sequence[str], exclude: Sequence[str]) -> Callable[[str], bool]:
    """A predicate for the include/exclude pattern pairs: whole-name regex matches, an empty
    include list admitting everything."""
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]

    def allowed(name: str) -> bool:
        return (not inc or any(p.fullmatch(name) for p in inc)) and not any(
            p.fullmatch(name) for p in exc
        )

    return allowed
