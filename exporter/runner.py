"""One export cycle: read MLflow, push to the Pushgateway, spool and deliver to Pramathus.

Each stage fails on its own: a Pushgateway outage does not stop Pramathus delivery, and an
MLflow outage still lets the spool drain. The cycle reports every stage's error at once.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
from prometheus_client.registry import Collector

from exporter.config import Settings, name_filter
from exporter.health import Health, SelfMetrics
from exporter.mlflow_source import (
    BULK_MAX_RUNS,
    HistoryRequest,
    MlflowClient,
    MlflowError,
    read_histories,
    shard_of,
)
from exporter.model import Experiment, MetricPoint, Snapshot
from exporter.naming import short_id_length
from exporter.sinks.pramathus import PramathusSink, RunContext, public_tags
from exporter.sinks.prometheus import (
    REGISTRY_GROUP,
    ExperimentGroup,
    GroupKey,
    PushError,
    Pushgateway,
    PushResult,
    RegistryGroup,
)
from exporter.state import StateStore
from exporter.sync import SyncResult, registry_from_state, sync

log = structlog.get_logger("exporter.runner")

REGISTRY_KEY: GroupKey = tuple(REGISTRY_GROUP.items())

# Points are spooled in chunks of this many batches, so a first read of a large server
# never holds all history in memory at once.
SPOOL_CHUNK_BATCHES = 20


@dataclass
class CycleResult:
    """What one cycle did; `errors` maps a stage to a one-line reason."""

    errors: dict[str, str] = field(default_factory=dict)
    experiments: int = 0
    runs: int = 0
    pushed_series: int = 0
    points_spooled: int = 0
    points_sent: int = 0
    duration_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.errors

    def reason(self) -> str:
        return "; ".join(f"{stage}: {msg}" for stage, msg in self.errors.items())


@dataclass
class Runner:
    """Runs cycles with injected collaborators (fakes replace any of them in tests)."""

    settings: Settings
    client: MlflowClient
    state: StateStore
    metrics: SelfMetrics
    health: Health
    pushgateway: Pushgateway | None
    pramathus: PramathusSink | None
    clock: Callable[[], float] = time.time
    should_stop: Callable[[], bool] = lambda: False

    def run_cycle(self) -> CycleResult:
        """Run one full cycle and record its outcome in the self-metrics and health."""
        started = self.clock()
        result = CycleResult()
        synced = self._sync(result)
        # Pushed from the mirror even when MLflow is unreachable: the Pushgateway stays
        # complete (e.g. after a Pushgateway restart) with the last known data.
        if self.pushgateway is not None and self.state.get_meta("last_full_sync") is not None:
            self._push(result, full_read=synced is not None and synced.full_read > 0)
        if self.pramathus is not None:
            if synced is not None:
                self._spool_new_points(result)
            self._deliver(result)
        result.duration_seconds = self.clock() - started
        self._record(result)
        return result

    def _sync(self, result: CycleResult) -> SyncResult | None:
        try:
            synced = sync(self.client, self.state, self.settings.export, self.clock)
        except MlflowError as exc:
            result.errors["mlflow"] = str(exc)
            self.metrics.up.set(0)
            return None
        self.metrics.up.set(1)
        self.metrics.excluded.labels("experiments").set(synced.experiments_cut)
        result.experiments = synced.experiments
        result.runs = self.state.mirror.run_count()
        log.debug(
            "mlflow.synced",
            full_read=synced.full_read,
            runs_changed=synced.runs_changed,
            runs_removed=synced.runs_removed,
        )
        return synced

    def _metric_allowed(self) -> Callable[[str], bool]:
        export = self.settings.export
        return name_filter(export.include_metrics, export.exclude_metrics)

    def _push(self, result: CycleResult, full_read: bool) -> None:
        """Push the groups that changed; all of them after a full read or when the
        Pushgateway restarted (it may have lost what it held)."""
        assert self.pushgateway is not None
        state, mirror, export = self.state, self.state.mirror, self.settings.export
        try:
            started = self.pushgateway.start_time()
        except PushError as exc:
            result.errors["pushgateway"] = str(exc)
            return
        everything = (
            full_read
            or started != state.get_meta("pushgateway_start")
            or state.get_meta("pushed_groups") is None
        )
        dirty = mirror.dirty_experiments()
        experiments = mirror.experiments()
        keep: set[GroupKey] = {(("experiment_id", e.experiment_id),) for e in experiments}
        owns_registry = export.shard_index == 0
        if owns_registry:
            keep.add(REGISTRY_KEY)
        chosen = [e for e in experiments if everything or e.experiment_id in dirty]
        with_registry = owns_registry and (everything or state.get_meta("registry_dirty", True))
        # The Pushgateway is asked which groups exist after a full read; in between, the
        # groups the last push left are known from state.
        known = None if full_read else state.get_meta("pushed_groups")
        try:
            pushed = self.pushgateway.push(
                self._groups(chosen, with_registry), owns=self._owns, known=known, keep=keep
            )
        except PushError as exc:
            result.errors["pushgateway"] = str(exc)
            state.set_meta("pushed_groups", None)  # unsure what is there: push all next time
            return
        mirror.mark_clean(e.experiment_id for e in chosen)
        state.set_meta(
            "registry_dirty", state.get_meta("registry_dirty", True) and not with_registry
        )
        state.set_meta("pushgateway_start", started)
        state.set_meta("pushed_groups", pushed.pushed)
        self._record_push(result, pushed)

    def _groups(
        self, experiments: list[Experiment], with_registry: bool
    ) -> Iterator[tuple[GroupKey, Collector]]:
        """Collectors for the given experiments' groups (built one at a time) and registry."""
        mirror, export = self.state.mirror, self.settings.export
        names, versions = registry_from_state(self.state)
        ids = itertools.chain(mirror.run_ids(), (v.run_id for v in versions if v.run_id))
        # The label length only ever grows, so a series keeps its run_id across cycles.
        length = max(
            short_id_length(ids, self.settings.prometheus.run_id_length),
            self.state.get_meta("run_id_length", 0),
        )
        if length != self.state.get_meta("run_id_length", 0):
            self.state.set_meta("run_id_length", length)
            mirror.mark_dirty()  # every run_id label changes: later cycles push all groups
        registry = Snapshot([], {}, names, versions)
        stages, allowed = registry.stage_by_run(), self._metric_allowed()
        for e in experiments:
            yield (
                (("experiment_id", e.experiment_id),),
                ExperimentGroup(
                    e,
                    mirror.runs_for_push(e.experiment_id, export.max_runs_per_experiment),
                    stages,
                    length,
                    status_counts=mirror.status_counts(e.experiment_id),
                    last_run_start_ms=mirror.max_start_time([e.experiment_id]),
                    metric_allowed=allowed,
                ),
            )
        if with_registry:
            yield REGISTRY_KEY, RegistryGroup(registry, length)

    def _record_push(self, result: CycleResult, pushed: PushResult) -> None:
        mirror, allowed = self.state.mirror, self._metric_allowed()
        self.metrics.excluded.labels("runs").set(
            mirror.runs_beyond(self.settings.export.max_runs_per_experiment)
        )
        self.metrics.excluded.labels("metrics").set(
            sum(not allowed(k) for k in mirror.metric_keys())
        )
        result.pushed_series = pushed.series
        self.metrics.pushed_groups.set(pushed.groups)
        self.metrics.pushed_series.set(pushed.series)
        self.metrics.nonfinite.set(pushed.nonfinite)
        log.info(
            "pushgateway.pushed",
            groups=pushed.groups,
            series=pushed.series,
            deleted_groups=pushed.deleted,
        )

    def _owns(self, labels: dict[str, str]) -> bool:
        """Groups this shard manages on its job: its experiments', and (shard 0) the registry."""
        export = self.settings.export
        if set(labels) == {"experiment_id"}:
            return shard_of(labels["experiment_id"], export.shard_count) == export.shard_index
        return labels == REGISTRY_GROUP and export.shard_index == 0

    def _spool_new_points(self, result: CycleResult) -> None:
        assert self.pramathus is not None
        mirror, allowed = self.state.mirror, self._metric_allowed()
        max_tag = self.settings.pramathus.max_tag_value_length
        chunk = self.settings.pramathus.batch_size * SPOOL_CHUNK_BATCHES
        points: list[MetricPoint] = []
        marks: list[tuple[str, str, int, int]] = []
        contexts: dict[str, RunContext] = {}
        try:
            for key in mirror.pending_keys():
                if not allowed(key):
                    continue
                wanted = [
                    HistoryRequest(
                        run_id, key, None if m_step is None else (m_step, m_ts or 0), step
                    )
                    for run_id, step, m_step, m_ts in mirror.pending_for_key(key)
                ]
                for start in range(0, len(wanted), BULK_MAX_RUNS):
                    if self.should_stop():
                        raise _Stopped
                    got = read_histories(self.client, wanted[start : start + BULK_MAX_RUNS])
                    for p in got:
                        if p.run_id not in contexts:
                            name, tags = mirror.run_context(p.run_id)
                            contexts[p.run_id] = RunContext(name, public_tags(tags, max_tag))
                    points.extend(got)
                    marks.extend(_top_marks(got))
                    if len(points) >= chunk:
                        result.points_spooled += self._flush(points, contexts, marks)
        except MlflowError as exc:
            result.errors["mlflow"] = str(exc)
            self.metrics.up.set(0)
        except _Stopped:
            pass
        # What was read completely is spooled even when a later read failed.
        result.points_spooled += self._flush(points, contexts, marks)

    def _flush(
        self,
        points: list[MetricPoint],
        contexts: dict[str, RunContext],
        marks: list[tuple[str, str, int, int]],
    ) -> int:
        assert self.pramathus is not None
        count = len(points)
        if count or marks:
            self.pramathus.spool(points, contexts, marks)
        points.clear()
        marks.clear()
        return count

    def _deliver(self, result: CycleResult) -> None:
        assert self.pramathus is not None
        drained = self.pramathus.drain(self.should_stop)
        result.points_sent = drained.points
        self.metrics.points_sent.inc(drained.points)
        self.metrics.batches_sent.inc(drained.batches)
        if drained.error and drained.error != "stopped":
            result.errors["pramathus"] = drained.error
        if drained.batches or drained.error:
            log.info(
                "pramathus.drained",
                batches=drained.batches,
                points=drained.points,
                dead_lettered=drained.dead_lettered,
                error=drained.error,
            )

    def _record(self, result: CycleResult) -> None:
        m = self.metrics
        for stage in result.errors:
            m.errors.labels(stage).inc()
        m.cycles.labels("success" if result.ok else "failure").inc()
        m.cycle_duration.observe(result.duration_seconds)
        now = self.clock()
        m.last_cycle.set(now)
        if result.ok:
            m.last_success.set(now)
        batches, points = self.state.spool_totals()
        m.spool_batches.set(batches)
        m.spool_points.set(points)
        m.dead_letters.set(self.state.dead_letter_count())
        self.health.set(result.ok, "ok" if result.ok else result.reason())
        fields: dict[str, Any] = {
            "duration_seconds": round(result.duration_seconds, 3),
            "experiments": result.experiments,
            "runs": result.runs,
            "series": result.pushed_series,
            "points_spooled": result.points_spooled,
            "points_sent": result.points_sent,
            "spool_points": points,
        }
        if result.ok:
            log.info("cycle.succeeded", **fields)
        else:
            log.warning("cycle.failed", errors=result.errors, **fields)


class _Stopped(Exception):
    """Raised inside a cycle when a stop was requested; what was read is still spooled."""


def _top_marks(points: list[MetricPoint]) -> list[tuple[str, str, int, int]]:
    """The highest (step, timestamp) read per (run, key): the new delivery watermarks."""
    top: dict[tuple[str, str], tuple[int, int]] = {}
    for p in points:
        mark = (p.step, p.timestamp_ms)
        if mark > top.get((p.run_id, p.key), (-(2**63), 0)):
            top[(p.run_id, p.key)] = mark
    return [(run_id, key, *mark) for (run_id, key), mark in top.items()]
