"""One export cycle: capture from MLflow, push to the Pushgateway, deliver each sink's queue.

The runner only orchestrates: it runs the stages in order and records what each did. The
work lives with the stages: capture in `sync.py` (composing `refresh.py`, the mirror, and
`capture.py`, the queues) and `traces.py`, the `run_id` label length in `labels.py`, the
Pushgateway in `sinks/push_stage.py` (which alone writes `PushRecord`), each history sink's
queue drain in `sinks/delivery.py`; the pull view builds its groups itself
(`sinks/groups.py`).

Each stage fails on its own: a Pushgateway outage does not stop deliveries, and an MLflow
outage still lets queues drain and the Pushgateway be refilled from the mirror. Whatever
happens, an exception included, the outcome is recorded in health, counters and one log
line (`try`/`finally`), and `/healthz` tells a crash (a bug) from a failure (a backend).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from exporter.config import Settings
from exporter.health import Health, Status
from exporter.labels import decide_run_id_length
from exporter.mlflow_source import MlflowError, MlflowSource
from exporter.progress import CaptureProgress, ProgressView
from exporter.selfmetrics import BLOCKED_CAUSES, SelfMetrics
from exporter.sinks import registry
from exporter.sinks.delivery import DeliverySink, Drainer
from exporter.sinks.push_stage import PushStage
from exporter.sinks.pushgateway import PushError, PushTarget
from exporter.state import StateError, StateStore, is_corruption
from exporter.state import explain as explain_state
from exporter.sync import Sync, SyncResult
from exporter.traces import TraceStage

log = structlog.get_logger("exporter.runner")

T = TypeVar("T")


def unit(sink: str) -> str:
    """What a sink's counts count: `points`, or `samples` for remote write (two samples per
    point: the value and its step; never added to points). From the sink registry."""
    return registry.unit(sink)


@dataclass
class CycleResult:
    """What one cycle did; `errors` maps a stage to a one-line reason."""

    errors: dict[str, str] = field(default_factory=dict)
    crashed: str | None = None  # an unexpected exception (a bug), one line
    experiments: int | None = None  # None: MLflow was not read this far
    runs: int | None = None
    pushed_series: int = 0
    points_spooled: int = 0  # new points captured and queued for the history sinks
    # What each sink had acknowledged, in its own unit (see `unit`): sink name -> count.
    sent: dict[str, int] = field(default_factory=dict)
    duration_seconds: float = 0.0
    # Capture waited for full queues: MLflow holds more for the history sinks than was read.
    held_back: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and self.crashed is None

    def sent_fields(self) -> dict[str, int]:
        """Log fields that say what was counted: `pramathus_points_sent`,
        `remote_write_samples_sent`."""
        return {f"{sink}_{unit(sink)}_sent": count for sink, count in self.sent.items()}

    def reason(self) -> str:
        parts = [f"{stage}: {msg}" for stage, msg in self.errors.items()]
        if self.crashed:
            parts.append(f"internal error: {self.crashed}")
        return "; ".join(parts)


@dataclass
class Runner:
    """Runs cycles with injected collaborators (fakes replace any of them in tests)."""

    settings: Settings
    source: MlflowSource
    state: StateStore
    metrics: SelfMetrics
    health: Health
    pushgateway: PushTarget | None
    sinks: Sequence[DeliverySink] = ()
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    should_stop: Callable[[], bool] = lambda: False
    traces: TraceStage | None = field(default=None, init=False, repr=False)
    progress: CaptureProgress = field(init=False)
    push_stage: PushStage = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.progress = CaptureProgress(self.clock, self._show_progress)
        self.push_stage = PushStage(
            self.settings, self.state, self.pushgateway, self.metrics, self.clock
        )
        for sink in self.sinks:
            self.metrics.sink(sink.name)  # its families exist (at zero) before it delivers

    def _show_progress(self, view: ProgressView) -> None:
        m = self.metrics
        m.capture_runs.labels("due").set(view.runs_total)
        m.capture_runs.labels("done").set(view.runs_done)
        m.capture_points_estimated.set(view.points_estimated)
        m.capture_eta.set(view.eta_seconds or 0.0)
        self.health.set_progress(view.as_dict())

    def run_cycle(self) -> CycleResult:
        """Run one cycle and record its outcome, whatever happens."""
        started = self.clock()
        result = CycleResult()
        try:
            if not self._stage(result, "state", self._ensure_state):
                return result
            synced = self._stage(result, "mlflow", self._sync, result)
            if synced is not None and self.settings.traces.enabled:
                self._stage(result, "traces", self._traces)
            if synced is None or not synced.labels_decided:
                # Capture stopped before deciding; what it mirrored is due, so checked here.
                self._stage(result, "state", self._decide_labels)
            if self.settings.prometheus.enabled:
                self._stage(result, "state", self._prepare_series)
            if self.pushgateway is not None:
                self._stage(result, "pushgateway", self._push, result, synced)
            for sink in self.sinks:
                self._stage(result, sink.name, self._deliver, result, sink)
        finally:
            result.duration_seconds = self.clock() - started
            self._record(result)
        return result

    def _stage(self, result: CycleResult, stage: str, fn: Callable[..., T], *args: Any) -> T | None:
        """Run one stage; a failure is recorded against it and the next stages still run."""
        try:
            return fn(*args)
        except (MlflowError, PushError) as exc:
            result.errors[stage] = str(exc)
        except StateError as exc:
            result.errors.setdefault("state", f"{exc} ({stage} stage)")
        except sqlite3.Error as exc:
            # Busy, locked, disk full: the state is kept as it is; the next cycle retries.
            # The first stage that met it is reported: later ones meet the same cause.
            reason = f"{explain_state(self.state.path, exc)} ({stage} stage)"
            result.errors.setdefault("state", reason)
            if is_corruption(exc):
                self.state.suspect()  # the next start checks the whole file
        except Exception as exc:
            result.crashed = f"{stage} stage: {type(exc).__name__}: {exc}"
            log.exception("cycle.crashed", stage=stage)
        if stage == "mlflow":
            self.metrics.up.set(0)
        return None

    def _ensure_state(self) -> bool:
        """True when the state file is this process's own (written back if it was
        deleted or replaced; StateError when another process holds it now)."""
        if self.state.ensure_file():
            log.warning(
                "state.written_back",
                path=str(self.state.path),
                detail="state.db was deleted or replaced while running; written back from "
                "the open database, nothing will be sent again",
            )
        return True

    # ------------------------------------------------------------------ capture

    def _sync(self, result: CycleResult) -> SyncResult:
        sync = Sync(
            self.source,
            self.state,
            self.settings,
            self.sinks,
            self.clock,
            self.should_stop,
            self.progress,
        )
        synced = sync.run()
        m = self.metrics
        m.up.set(1)
        m.excluded.labels("experiments").set(synced.excluded_experiments)
        m.points_captured.inc(synced.points_captured)
        m.settling.set(synced.settling)
        m.pending.set(synced.pending)
        for kind, n in synced.reconcile_found.items():
            m.reconcile_found.labels(kind).inc(n)
        if synced.sweep_completed:
            m.sweep_passes.inc()
            m.last_sweep.set(self.clock())
        for sink, n in synced.dropped.items():
            m.sink(sink).dropped.labels("queue_overflow").inc(n)
        for sink, n in synced.waiting.items():
            # Backpressure, not loss: these points are read from MLflow once it drains.
            log.warning("queue.full_capture_waits", sink=sink, points_owed=n)
        for sink, n in synced.backfill_remaining.items():
            m.sink(sink).backfill.set(n)
        result.experiments, result.runs = synced.experiments, synced.runs
        result.points_spooled = synced.points_captured
        result.held_back = synced.held_back or bool(synced.waiting)
        # The new run ids as a count: a first cycle would otherwise log every run id.
        fields = {k: v for k, v in vars(synced).items() if v and k != "new_run_ids"}
        log.debug("mlflow.synced", new_runs=len(synced.new_run_ids), **fields)
        return synced

    def _traces(self) -> None:
        if self.traces is None:
            self.traces = TraceStage(self.source, self.state, self.settings, self.sinks, self.clock)
        done = self.traces.run()
        self.metrics.traces.record(done)
        if done is not None and (done.moved or done.samples or done.late):
            log.info("traces.read", **{k: v for k, v in vars(done).items() if v})

    def _decide_labels(self) -> None:
        """The run_id label length, when capture did not get to decide it (MLflow failed
        or a stop came first): the runs it mirrored are still due, so they are checked."""
        due = self.state.schedule.capture_due(int(self.clock() * 1000))
        decide_run_id_length(self.state, self.settings.prometheus.run_id_length, due)

    # ------------------------------------------------------------------ push

    def _prepare_series(self) -> None:
        """Mark the groups whose every series changes (`PushStage.prepare`); pull mode too."""
        self.push_stage.prepare()

    def _push(self, result: CycleResult, synced: SyncResult | None) -> None:
        """The Pushgateway stage (`sinks/push_stage.py`); the sweep's end has it check the
        Pushgateway's own list of groups."""
        pushed = self.push_stage.push(verify=synced is not None and synced.sweep_completed)
        result.pushed_series = pushed.series
        if pushed.groups or pushed.deleted_groups:
            log.info(
                "pushgateway.pushed",
                groups=pushed.groups,
                series=pushed.series,
                deleted_groups=pushed.deleted_groups,
            )

    # ------------------------------------------------------------------ deliver

    def _deliver(self, result: CycleResult, sink: DeliverySink) -> None:
        drainer = Drainer(sink, self.state.outbox(sink.name), self.clock, self.sleep)
        drained = drainer.drain(self.should_stop)
        m = self.metrics.sink(sink.name)
        m.points_sent.inc(drained.points)
        m.batches_sent.inc(drained.batches)
        m.dropped_by_receiver.inc(drained.dropped_by_receiver)
        for cause in BLOCKED_CAUSES:
            m.blocked.labels(cause).set(1 if drained.blocked == cause else 0)
        result.sent[sink.name] = result.sent.get(sink.name, 0) + drained.points
        if drained.error:
            result.errors[sink.name] = drained.error
        if drained.batches or drained.error or drained.set_aside:
            # Only what happened: no `error=None` on a success, no empty `set_aside`.
            fields: dict[str, Any] = {"batches": drained.batches, unit(sink.name): drained.points}
            if drained.set_aside:
                fields["set_aside"] = drained.set_aside
            if drained.dropped_by_receiver:
                fields["dropped_by_receiver"] = drained.dropped_by_receiver
            if drained.error:
                fields["error"] = drained.error
            log.info("delivery.drained", sink=sink.name, **fields)

    # ------------------------------------------------------------------ record

    def _record(self, result: CycleResult) -> None:
        m = self.metrics
        for stage in result.errors:
            m.errors.labels(stage).inc()
        if result.crashed:
            m.errors.labels("internal").inc()
        status: Status = "ok" if result.ok else ("crashed" if result.crashed else "failing")
        m.cycles.labels({"ok": "success", "failing": "failure"}.get(status, "crash")).inc()
        m.cycle_duration.observe(result.duration_seconds)
        now = self.clock()
        m.last_cycle.set(now)
        if result.ok:
            m.last_success.set(now)
        queued, aside = self._queue_gauges()
        if result.ok and aside:
            # Healthy, but not a plain ok: points wait for an operator.
            self.health.set("degraded", f"ok, but {aside}")
        else:
            self.health.set(status, "ok" if result.ok else result.reason())
        counted = {"experiments": result.experiments, "runs": result.runs}
        fields: dict[str, Any] = {
            "duration_seconds": round(result.duration_seconds, 3),
            # What was not counted is left out, never logged as 0.
            **{k: v for k, v in counted.items() if v is not None},
            "series": result.pushed_series,
            "points_spooled": result.points_spooled,
            **result.sent_fields(),
            "spool_points": queued,
        }
        if result.ok:
            log.info("cycle.succeeded", **fields)
        elif result.crashed:
            log.error("cycle.crashed_summary", errors=result.errors, crash=result.crashed, **fields)
        else:
            log.warning("cycle.failed", errors=result.errors, **fields)

    def _queue_gauges(self) -> tuple[int | None, str]:
        """Refresh the queue gauges; (points queued, what is set aside in words). The state
        may be what failed, so never raise."""
        words = []
        try:
            total = 0
            for sink, sm in self.metrics.sinks.items():
                outbox = self.state.outbox(sink)
                queued = outbox.totals()
                sm.spool_batches.set(queued.batches)
                sm.spool_points.set(queued.points)
                aside = outbox.set_aside_counts()
                sm.dead_letters.set(sum(t.batches for t in aside.values()))
                for reason, totals in sorted(aside.items()):
                    sm.set_aside.labels(reason).set(totals.points)
                    words.append(f"{sink} {reason}: {totals.points}")
                total += queued.points
        except sqlite3.Error:
            return None, ""
        if not words:
            return total, ""
        return total, (
            f"points set aside ({', '.join(words)}): see `exporter dead-letters list`, "
            "then `exporter dead-letters replay`"
        )


def run_until_drained(runner: Runner, max_rounds: int = 100_000) -> list[CycleResult]:
    """`export-once`'s cycles: one, then another while capture was held back by full queues
    (`queue_max_points`) and the last one delivered something, so one run exports what MLflow
    holds however large, in bounded memory. It ends on a failure, or when a round delivers
    nothing (what is left stays due for the next run)."""
    results = [runner.run_cycle()]
    while len(results) < max_rounds:
        last = results[-1]
        if not (last.ok and last.held_back and any(last.sent.values())):
            break
        log.info("export.next_round", round=len(results) + 1, **last.sent_fields())
        results.append(runner.run_cycle())
    return results
