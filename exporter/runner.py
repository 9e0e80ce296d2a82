"""One export cycle: read MLflow, push to the Pushgateway, spool and deliver to Pramathus.

Each stage fails on its own: a Pushgateway outage does not stop Pramathus delivery, and an
MLflow outage still lets the spool drain. The cycle reports every stage's error at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from exporter.config import Settings
from exporter.health import Health, SelfMetrics
from exporter.mlflow_source import MlflowClient, MlflowError, collect_snapshot, read_history
from exporter.model import MetricPoint, Snapshot
from exporter.sinks.pramathus import PramathusSink, RunContext, public_tags
from exporter.sinks.prometheus import (
    REGISTRY_GROUP,
    PushError,
    Pushgateway,
    build_groups,
    run_id_length_for,
)
from exporter.state import StateStore

log = structlog.get_logger("exporter.runner")

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
        snapshot = self._read(result)
        if snapshot is not None and self.pushgateway is not None:
            self._push(snapshot, result)
        if self.pramathus is not None:
            if snapshot is not None:
                self._spool_new_points(snapshot, result)
            self._deliver(result)
        result.duration_seconds = self.clock() - started
        self._record(result)
        return result

    def _read(self, result: CycleResult) -> Snapshot | None:
        try:
            snapshot = collect_snapshot(self.client, self.settings.export)
        except MlflowError as exc:
            result.errors["mlflow"] = str(exc)
            self.metrics.up.set(0)
            return None
        self.metrics.up.set(1)
        result.experiments = len(snapshot.experiments)
        result.runs = sum(len(r) for r in snapshot.runs.values())
        for kind, count in snapshot.excluded.items():
            self.metrics.excluded.labels(kind).set(count)
        return snapshot

    def _push(self, snapshot: Snapshot, result: CycleResult) -> None:
        assert self.pushgateway is not None
        # The label length only ever grows, so a series keeps its run_id across cycles.
        length = max(
            run_id_length_for(snapshot, self.settings.prometheus.run_id_length),
            self.state.get_meta("run_id_length", 0),
        )
        self.state.set_meta("run_id_length", length)
        groups = build_groups(snapshot, length)
        try:
            pushed = self.pushgateway.push(groups, owns=_owned_group)
        except PushError as exc:
            result.errors["pushgateway"] = str(exc)
            return
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

    def _spool_new_points(self, snapshot: Snapshot, result: CycleResult) -> None:
        assert self.pramathus is not None
        names = {e.experiment_id: e.name for e in snapshot.experiments}
        max_tag = self.settings.pramathus.max_tag_value_length
        marks = self.state.watermarks()
        chunk = self.settings.pramathus.batch_size * SPOOL_CHUNK_BATCHES
        points: list[MetricPoint] = []
        new_marks: list[tuple[str, str, int, int]] = []
        contexts: dict[str, RunContext] = {}
        try:
            for run in snapshot.all_runs():
                if self.should_stop():
                    break
                for m in run.metrics:
                    mark = marks.get((run.run_id, m.key))
                    if mark is not None and (m.step, m.timestamp_ms) <= mark:
                        continue
                    got = read_history(self.client, run.run_id, m.key, mark)
                    points.extend(got)
                    top = max(((p.step, p.timestamp_ms) for p in got), default=None)
                    if top is not None:
                        new_marks.append((run.run_id, m.key, *top))
                contexts[run.run_id] = RunContext(
                    names.get(run.experiment_id, ""), public_tags(run.tags, max_tag)
                )
                if len(points) >= chunk:
                    result.points_spooled += self._flush(points, contexts, new_marks)
        except MlflowError as exc:
            result.errors["mlflow"] = str(exc)
            self.metrics.up.set(0)
        # What was read completely is spooled even when a later read failed.
        result.points_spooled += self._flush(points, contexts, new_marks)

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


def _owned_group(labels: dict[str, str]) -> bool:
    """Groups this exporter manages on its job: one per experiment, and the registry."""
    return set(labels) == {"experiment_id"} or labels == REGISTRY_GROUP
