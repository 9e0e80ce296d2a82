"""The exporter's own metrics, in a private `CollectorRegistry` (never the global one).

Every label value a family can take is created at start, so `rate()` and absence-based
alerts see zeros instead of nothing.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from exporter import __version__

P = "mlflow_exporter_"
# Cycle stages besides the sinks: each sink is a stage of its own, named after it.
STAGES = ("mlflow", "traces", "pushgateway", "state", "internal")
CYCLE_RESULTS = ("success", "failure", "crash")
EXCLUDED_KINDS = ("experiments", "runs", "metrics", "trace_names")
RECONCILE_KINDS = ("new", "changed", "restored", "removed")
# Why points are set aside for good: refused by the receiver (4xx), older than it (or
# max_sample_age) takes, out of order for it, or sharing a timestamp with another point.
SET_ASIDE_REASONS = ("rejected", "too_large", "too_old", "out_of_order", "duplicate_timestamp")
# Why delivery is stopped until a setting is fixed (points stay queued).
BLOCKED_CAUSES = ("credentials", "redirect", "endpoint")


class SinkMetrics:
    """The delivery metrics of one history sink, named after it (`..._pramathus_...`)."""

    def __init__(self, sink: str, registry: CollectorRegistry, unit: str = "points") -> None:
        p, r, what = f"{P}{sink}_", registry, sink.replace("_", " ")
        # The name is kept for dashboards and alerts; the help says what is counted.
        self.points_sent = Counter(
            f"{p}points_sent", f"Metric points {what} acknowledged ({unit}).", registry=r
        )
        self.batches_sent = Counter(f"{p}batches_sent", f"Batches {what} acknowledged.", registry=r)
        self.spool_points = Gauge(
            f"{p}spool_points", f"Metric points waiting in the {what} queue ({unit}).", registry=r
        )
        self.spool_batches = Gauge(
            f"{p}spool_batches", f"Batches waiting in the {what} queue.", registry=r
        )
        self.dead_letters = Gauge(
            f"{p}dead_letter_batches",
            f"Batches set aside for good ({what} refused them), kept on disk.",
            registry=r,
        )
        self.set_aside = Gauge(
            f"{p}set_aside_points",
            f"Points set aside for good, by reason ({what} refused them or they were too old).",
            ["reason"],
            registry=r,
        )
        self.dropped = Counter(
            f"{p}dropped_points",
            f"Points dropped by the {what} queue's overflow policy.",
            ["reason"],
            registry=r,
        )
        self.backfill = Gauge(
            f"{p}backfill_series",
            f"Series still to backfill into {what} (it was enabled after points were captured).",
            registry=r,
        )
        self.blocked = Gauge(
            f"{p}delivery_blocked",
            f"1 while {what} delivery is stopped by a setting to fix, by cause (credentials: "
            "401/403; redirect: 301/302/303; endpoint: 404/405/410); points stay queued.",
            ["cause"],
            registry=r,
        )
        self.dropped_by_receiver = Counter(
            f"{p}receiver_dropped_points",
            f"Points {what} acknowledged but said it dropped (an OTLP partial success); "
            "never re-sent, as the receiver asks.",
            registry=r,
        )
        self.dropped.labels("queue_overflow")
        for reason in SET_ASIDE_REASONS:
            self.set_aside.labels(reason)
        for cause in BLOCKED_CAUSES:
            self.blocked.labels(cause)


class TraceMetrics:
    """What the traces stage did (`record` takes its result; None: the stage is off)."""

    def __init__(self, registry: CollectorRegistry, excluded: Gauge) -> None:
        r = registry
        self.excluded = excluded
        self.enabled = Gauge(
            f"{P}traces_enabled",
            "1 while the traces stage reads MLflow's trace metrics API; 0 when it is off "
            "(disabled, or the server has no such API).",
            registry=r,
        )
        self.experiments = Gauge(
            f"{P}trace_experiments", "Experiments in scope holding traces.", registry=r
        )
        self.late = Counter(
            f"{P}trace_late_changes",
            "Traces or assessments that changed in history buckets already written (they "
            "move the live series only), by kind.",
            ["kind"],
            registry=r,
        )
        self.samples = Counter(
            f"{P}trace_history_samples",
            "Trace history samples (one per closed bucket and series) queued for the sinks "
            "that consume them.",
            registry=r,
        )
        for kind in ("traces", "assessments"):
            self.late.labels(kind)

    def record(self, result: Any) -> None:
        if result is None:
            self.enabled.set(0)
            return
        self.enabled.set(1)
        self.experiments.set(result.experiments)
        self.samples.inc(result.samples)
        self.excluded.labels("trace_names").set(result.names_cut)
        for kind, n in result.late.items():
            self.late.labels(kind).inc(n)


class SelfMetrics:
    """Every self-metric, registered in its own `CollectorRegistry`.

    `sinks`: the history sinks whose delivery families exist from the start; `sink(name)`
    adds one later (a sink is never looked up by a name fixed here)."""

    def __init__(self, sinks: Iterable[str] | None = None) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.up = Gauge(f"{P}up", "1 when the last cycle could read MLflow.", registry=r)
        self.cycles = Counter(
            f"{P}cycles",
            "Export cycles run, by result (success, failure, crash).",
            ["result"],
            registry=r,
        )
        self.cycle_duration = Histogram(
            f"{P}cycle_duration_seconds",
            "Wall time of export cycles.",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.last_success = Gauge(
            f"{P}last_success_timestamp_seconds",
            "When the last fully successful cycle ended.",
            registry=r,
        )
        self.last_cycle = Gauge(
            f"{P}last_cycle_timestamp_seconds",
            "When the last cycle ended, whatever its result.",
            registry=r,
        )
        self.errors = Counter(
            f"{P}errors", "Cycle errors, by pipeline stage.", ["stage"], registry=r
        )
        self.mlflow_requests = Counter(
            f"{P}mlflow_requests", "HTTP requests made to MLflow.", ["endpoint"], registry=r
        )
        self.pushed_groups = Gauge(
            f"{P}pushed_groups",
            "Pushgateway groups pushed by the last cycle (unchanged ones are not re-pushed).",
            registry=r,
        )
        self.pushed_series = Gauge(
            f"{P}pushed_series", "Series pushed by the last cycle.", registry=r
        )
        self.exported_series = Gauge(
            f"{P}series",
            "MLflow series the exporter exposes: on the Pushgateway as of the last push "
            "(push mode), or in the last scrape of /mlflow/metrics (pull mode).",
            registry=r,
        )
        self.last_push_success = Gauge(
            f"{P}last_push_success_timestamp_seconds",
            "When a cycle last brought the Pushgateway fully up to date with the mirror.",
            registry=r,
        )
        self.nonfinite = Gauge(
            f"{P}nonfinite_values",
            "Latest metric values in the last push that were NaN or inf.",
            registry=r,
        )
        self.excluded = Gauge(
            f"{P}excluded", "What the last cycle left out by config bounds.", ["kind"], registry=r
        )
        self.points_captured = Counter(
            f"{P}points_captured", "New metric points read from MLflow and queued.", registry=r
        )
        self.settling = Gauge(
            f"{P}settling_runs",
            "Runs re-read every cycle because they changed within the settle window.",
            registry=r,
        )
        self.pending = Gauge(
            f"{P}pending_runs", "Runs whose new points are not read yet.", registry=r
        )
        self.capture_runs = Gauge(
            f"{P}capture_runs",
            "Runs whose histories the running (or last) capture reads, by state (due, done).",
            ["state"],
            registry=r,
        )
        self.capture_points_estimated = Gauge(
            f"{P}capture_points_estimated",
            "Points the running (or last) capture is expected to read, extrapolated so far.",
            registry=r,
        )
        self.capture_eta = Gauge(
            f"{P}capture_eta_seconds",
            "Estimated seconds left in the running capture (0 when none runs).",
            registry=r,
        )
        self.reconcile_found = Counter(
            f"{P}reconcile_found",
            "Changes only the background sweep saw (deltas could not), by kind.",
            ["kind"],
            registry=r,
        )
        self.sweep_passes = Counter(
            f"{P}sweep_passes", "Completed passes of the background reconcile sweep.", registry=r
        )
        self.last_sweep = Gauge(
            f"{P}last_sweep_completed_timestamp_seconds",
            "When the background sweep last completed a pass over every run.",
            registry=r,
        )
        info = Gauge(
            f"{P}build_info", "Exporter build (always 1).", ["version", "python"], registry=r
        )
        info.labels(__version__, platform.python_version()).set(1)
        self.sinks: dict[str, SinkMetrics] = {}
        self.traces = TraceMetrics(r, self.excluded)
        for stage in STAGES:
            self.errors.labels(stage)
        for result in CYCLE_RESULTS:
            self.cycles.labels(result)
        for kind in EXCLUDED_KINDS:
            self.excluded.labels(kind)
        for kind in RECONCILE_KINDS:
            self.reconcile_found.labels(kind)
        for state in ("due", "done"):
            self.capture_runs.labels(state)
        if sinks is None:
            # The built-in sinks' families exist even while they are off (dashboards and
            # alerts refer to them); any other sink gets its families when it is registered.
            from exporter.sinks.registry import BUILTIN

            sinks = [spec.name for spec in BUILTIN]
        for name in sinks:
            self.sink(name)

    def sink(self, name: str) -> SinkMetrics:
        """The delivery metrics of the sink `name`, created (at zero, with its error stage)
        the first time it is asked for."""
        if name not in self.sinks:
            from exporter.sinks.registry import unit  # what its counts count

            self.sinks[name] = SinkMetrics(name, self.registry, unit(name))
            self.errors.labels(name)
        return self.sinks[name]
