"""The Pushgateway stage of a cycle: which groups change, pushing them, deleting strays.

It runs from the mirror, never from MLflow, so it also refills a restarted Pushgateway while
MLflow is down. It is the one writer of `PushRecord` (what the Pushgateway was last left
holding, and the per-run selection and run window the groups were built with); other stages
only set the push marks dirty (`state/push_marks.py`: `mark_dirty`, `mark_registry_dirty`),
and only this stage sets them clean after a push (and records the runs each group cut). The
planner
(`planners/push.py`) decides; this module does the I/O and keeps the record and the push
self-metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from exporter.config import Settings
from exporter.model import CaptureRecord, PushRecord
from exporter.planners import push as push_plan
from exporter.planners.scope import metric_filter, owns_group, owns_registry, with_run_series
from exporter.planners.series import REGISTRY_KEY, GroupKey, experiment_key
from exporter.selfmetrics import SelfMetrics
from exporter.sinks.groups import mirror_builder, run_window_since_ms
from exporter.sinks.pushgateway import PushError, PushTarget
from exporter.state import StateStore


@dataclass(frozen=True, slots=True)
class PushResult:
    """What one push did."""

    groups: int = 0  # groups pushed
    series: int = 0  # series in them
    nonfinite: int = 0  # non-finite values among them
    deleted_groups: int = 0  # strays this exporter owned, deleted from the Pushgateway


@dataclass
class PushStage:
    """The push with injected collaborators. `gateway` None: pull mode, where only
    `prepare` runs (the pull view reads the selection it records)."""

    settings: Settings
    state: StateStore
    gateway: PushTarget | None
    metrics: SelfMetrics
    clock: Callable[[], float] = time.time

    def prepare(self) -> None:
        """Mark dirty what changes every series of a group: an experiment entering or
        leaving the per-run selection (`MAX_EXPERIMENTS`), or runs moving across the edge
        of the run window since the last cycle (a longer run_id label is marked by
        `labels.decide_run_id_length`)."""
        marks = self.state.push_marks
        experiment_ids = [e.experiment_id for e in self.state.mirror.experiments()]
        selected = with_run_series(marks.activity(), self.settings.export.max_experiments)
        record = self.state.load(PushRecord)
        since = run_window_since_ms(self.settings.series, self.clock())
        with self.state.transaction():
            moved = selected.symmetric_difference(record.selected or ())
            if record.selected is None:
                moved = set(experiment_ids)
            marks.mark_dirty(moved & set(experiment_ids))
            crossed = self._window_moves(record.window_since_ms, since)
            marks.mark_dirty(set(experiment_ids) if crossed is None else crossed)
            if moved or since != record.window_since_ms:
                self.state.save(
                    replace(record, selected=tuple(sorted(selected)), window_since_ms=since)
                )

    def push(self, verify: bool) -> PushResult:
        """Push the groups that changed; every group when the Pushgateway may have lost
        them. `verify`: ask the Pushgateway which groups it holds (once per sweep pass)
        instead of trusting the record. PushError when the Pushgateway fails: the record
        then says its groups are unknown, so the next push sends everything."""
        assert self.gateway is not None
        if self.state.load(CaptureRecord).last_capture_ms is None:
            return PushResult()  # nothing mirrored yet: pushing would only delete others'
        marks, export = self.state.push_marks, self.settings.export
        start = self.gateway.start_time()
        record = self.state.load(PushRecord)
        ids = [e.experiment_id for e in self.state.mirror.experiments()]
        plan = push_plan.plan_push(
            ids,
            marks.dirty_experiments(),
            record,
            marks.registry_dirty(),
            start,
            owns_registry=owns_registry(export),
            verify=verify,
        )
        counts = dict(record.series)
        # Groups this exporter pushed (from its state): the only ones its sweep may delete,
        # so exporters of other scopes can share a job.
        ours = {experiment_key(e) if e else REGISTRY_KEY for e in counts}
        ours |= {GroupKey(labels) for labels in record.groups or ()}
        try:
            pushed = self._push_groups(plan, counts, ours)
        except PushError:
            with self.state.transaction():
                # Unsure what is there now; what was pushed before the error is ours.
                self.state.save(replace(record, groups=None, series=tuple(sorted(counts.items()))))
            raise
        with self.state.transaction():
            marks.mark_clean(plan.experiments)
            marks.mark_registry_clean()
            self.state.save(
                PushRecord(
                    gateway_start=start,
                    groups=tuple(sorted(k.labels for k in plan.keep)),
                    last_success_ms=int(self.clock() * 1000),
                    selected=record.selected,
                    window_since_ms=record.window_since_ms,
                    series=tuple(sorted(counts.items())),
                )
            )
        self._record(pushed, counts)
        return pushed

    def _record(self, pushed: PushResult, counts: dict[str, int]) -> None:
        """The push self-metrics after a successful push."""
        m, mirror = self.metrics, self.state.mirror
        m.pushed_groups.set(pushed.groups)
        m.pushed_series.set(pushed.series)
        m.exported_series.set(sum(counts.values()))
        m.nonfinite.set(pushed.nonfinite)
        m.last_push_success.set(self.clock())
        m.excluded.labels("runs").set(self.state.push_marks.cut_runs())
        allowed = metric_filter(self.settings.export)
        m.excluded.labels("metrics").set(sum(not allowed(k) for k in mirror.metric_keys()))

    def _window_moves(self, before: int | None, now: int | None) -> set[str] | None:
        """Experiments with runs that crossed the window's edge as it moved from `before`
        to `now` (None: every experiment, the window was turned on or off)."""
        if before == now:
            return set()
        if before is None or now is None:
            return None
        return self.state.push_marks.experiments_with_runs_ended_between(
            min(before, now), max(before, now)
        )

    def _push_groups(
        self, plan: push_plan.PushPlan, counts: dict[str, int], ours: set[GroupKey]
    ) -> PushResult:
        """Push the planned groups and delete the strays; `counts` (series per group left
        on the Pushgateway, "" for the registry) is updated as groups are pushed."""
        assert self.gateway is not None
        gateway, mirror, export = self.gateway, self.state.mirror, self.settings.export
        builder = mirror_builder(mirror, self.settings, self.clock)
        cuts: dict[str, int] = {}
        groups = series = nonfinite = 0
        for exp_id in plan.experiments:
            families = builder.experiment(exp_id, on_cut=cuts.__setitem__)
            pushed = gateway.push(experiment_key(exp_id), families)
            counts[exp_id] = pushed.series
            groups, series = groups + 1, series + pushed.series
            nonfinite += pushed.nonfinite
        if plan.registry:
            pushed = gateway.push(REGISTRY_KEY, builder.registry_group())
            counts[""] = pushed.series
            groups, series = groups + 1, series + pushed.series
        with self.state.transaction():
            for exp_id, cut in cuts.items():
                self.state.push_marks.set_cut_runs(exp_id, cut)
        present = gateway.existing_groups() if plan.known is None else plan.known
        stale = push_plan.stale_groups(
            present, plan.keep, lambda k: k in ours and owns_group(k, export)
        )
        for key in stale:
            gateway.delete(key)
        kept = {k.as_dict().get("experiment_id", "") for k in plan.keep}
        for group in set(counts) - kept:
            del counts[group]
        return PushResult(groups, series, nonfinite, len(stale))
