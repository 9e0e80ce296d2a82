"""The mirror's Prometheus groups, read from the state and built by `planners/series.py`.

Shared by the Pushgateway push (`push_stage.py`, one group at a time) and the pull endpoint
(all groups merged into one exposition, built fresh on each scrape over a read-only
connection); both get their builder from `mirror_builder`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from exporter.config import ExportSettings, SeriesSettings, Settings
from exporter.model import CaptureRecord, LabelRecord, PushRecord, Registry
from exporter.planners.scope import metric_filter
from exporter.planners.series import (
    REGISTRY_KEY,
    ExperimentView,
    GroupKey,
    ServerCounts,
    experiment_families,
    experiment_key,
    registry_families,
)
from exporter.planners.traces import trace_families
from exporter.state import records
from exporter.state.mirror import Mirror
from exporter.state.traces import TraceMarks


@dataclass
class GroupBuilder:
    """Families of each group, as of the mirror now."""

    mirror: Mirror
    export: ExportSettings
    run_id_length: int
    selected: set[str]  # experiments with per-run series
    counts: ServerCounts
    # Finished runs get per-run series when they ended at or after this (None: no window),
    # or are among the newest `min_runs` of their experiment (`series` settings).
    ended_since_ms: int | None = None
    min_runs: int = 0

    def __post_init__(self) -> None:
        self.registry: Registry = self.mirror.registry()
        self._stages = self.registry.stage_by_run()
        self._allowed = metric_filter(self.export)
        self._version_runs = self.mirror.known(self.registry.run_ids())
        self._experiments = {e.experiment_id: e for e in self.mirror.experiments()}
        self._traces = TraceMarks(self.mirror.conn).live()

    def experiment(
        self, experiment_id: str, on_cut: Callable[[str, int], None] | None = None
    ) -> list[Metric]:
        """The families of one experiment's group; `on_cut(id, runs)` hears how many runs
        the series bounds (`max_runs_per_experiment`, the run window) left out of its
        per-run series."""
        mirror = self.mirror
        selected = experiment_id in self.selected
        runs, cut = mirror.runs_for_push(
            experiment_id, self.export.max_runs_per_experiment, self.ended_since_ms, self.min_runs
        )
        if on_cut is not None:
            on_cut(experiment_id, cut if selected else 0)
        mine = sorted(
            r
            for r, k in self._version_runs.items()
            if k.experiment_id == experiment_id and k.deleted_ms is None
        )
        view = ExperimentView(
            experiment=self._experiments[experiment_id],
            runs=runs if selected else [],
            status_counts=mirror.status_counts(experiment_id),
            last_run_start_ms=mirror.last_run_start(experiment_id),
            versions=[v for v in self.registry.versions if v.run_id in set(mine)],
            version_metrics=mirror.latest(mine),
            window_since_ms=self.ended_since_ms,
        )
        families = experiment_families(view, self._stages, self.run_id_length, self._allowed)
        name = view.experiment.name
        return families + trace_families(self._traces.get(experiment_id), experiment_id, name)

    def registry_group(self) -> list[Metric]:
        return registry_families(self.registry, self.counts, self.run_id_length)

    def groups(self, with_registry: bool) -> Iterator[tuple[GroupKey, list[Metric]]]:
        """Every group, one at a time."""
        for experiment_id in sorted(self._experiments):
            yield experiment_key(experiment_id), self.experiment(experiment_id)
        if with_registry:
            yield REGISTRY_KEY, self.registry_group()


def run_window_since_ms(series: SeriesSettings, now: float) -> int | None:
    """Where the run window starts at `now` (seconds), in ms (None: no window)."""
    window = series.run_window
    return int((now - window) * 1000) if window else None


def mirror_builder(mirror: Mirror, settings: Settings, clock: Callable[[], float]) -> GroupBuilder:
    """Group families as of `mirror` now; its records (label length, the experiments with
    per-run series, server counts) are read over its own connection, so another thread's
    read-only mirror (a pull scrape) sees one consistent state."""
    capture = records.load(mirror.conn, CaptureRecord)
    counts = {"active": capture.active_experiments, "deleted": capture.deleted_experiments}
    return GroupBuilder(
        mirror,
        settings.export,
        records.load(mirror.conn, LabelRecord).run_id_length,
        set(records.load(mirror.conn, PushRecord).selected or ()),
        ServerCounts(counts),
        ended_since_ms=run_window_since_ms(settings.series, clock()),
        min_runs=settings.series.min_runs_per_experiment,
    )


def merge(groups: Iterator[tuple[GroupKey, list[Metric]]]) -> list[Metric]:
    """One exposition of many groups: families of one name merged (a scrape may name a
    family once)."""
    merged: dict[str, Metric] = {}
    for _key, families in groups:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = family
            else:
                into.samples.extend(family.samples)
    return list(merged.values())


@dataclass(eq=False)  # a registry keys its collectors by identity
class MirrorCollector(Collector):
    """Pull mode: every group built fresh from the state on each scrape."""

    open_builder: Callable[[], tuple[GroupBuilder, Callable[[], None]]]
    with_registry: bool
    on_series: Callable[[int], None] = lambda _series: None  # hears each scrape's series count

    def collect(self) -> Iterator[Any]:
        builder, close = self.open_builder()
        try:
            families = merge(builder.groups(self.with_registry))
        finally:
            close()
        self.on_series(sum(len(f.samples) for f in families))
        yield from families
