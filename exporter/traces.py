"""The traces stage: read MLflow 3 trace aggregations into live series and history buckets.

This module executes; `planners/traces.py` decides (see there for the cost model). Each
cycle: probe every experiment in scope at once and narrow down to those that moved, read
those, refresh the window of experiments with recent traces, and queue the closed and
settled buckets on every sink that consumes trace buckets (`delivery.bucket_sinks`), each
batched as that sink plans them. Everything read in a cycle is written in one transaction
at its end (marks, live series, queued buckets), so a failure part-way leaves the state as
it was and the next cycle finds the same moves again.

A server without the trace metrics API (MLflow 2, a file store) is detected on the first
probe: one warning, and the stage stays off for the life of the process.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import structlog

from exporter.config import Settings
from exporter.mlflow_source import TRACE_MAX_RESULTS, MlflowSource, TracesUnsupportedError
from exporter.model import CapturedBatch
from exporter.planners import traces as plan
from exporter.planners.traces import Marks, MovedRead, Step
from exporter.sinks.delivery import BucketSink, DeliverySink, bucket_sinks
from exporter.state import StateStore
from exporter.state.outbox import QueueEntry
from exporter.state.traces import TraceMarks
from exporter.trace_model import BucketSample, Fingerprint, TracePoint, TraceQuery

log = structlog.get_logger("exporter.traces")


@dataclass
class TraceResult:
    experiments: int = 0  # experiments holding traces
    moved: int = 0
    windowed: int = 0
    samples: int = 0  # history samples read (queued on each sink that takes them)
    late: dict[str, int] = field(default_factory=dict)  # kind -> changes before the horizon
    names_cut: int = 0


@dataclass
class TraceStage:
    """Kept for the life of the process: it remembers whether the server supports traces."""

    source: MlflowSource
    state: StateStore
    settings: Settings
    sinks: Sequence[DeliverySink] = ()
    clock: Callable[[], float] = time.time
    supported: bool | None = None  # None until the first probe answered

    def run(self) -> TraceResult | None:
        """One cycle's trace work; None when the server has no trace metrics API."""
        if self.supported is False:
            return None
        now_ms = int(self.clock() * 1000)
        experiments = {e.experiment_id: e.name for e in self.state.mirror.experiments()}
        store = self.state.trace_marks()
        before = store.load()
        try:
            moved = self._probe(sorted(experiments), before)
        except TracesUnsupportedError as exc:
            if self.supported is None:
                self.supported = False
                log.warning("traces.unsupported", detail=str(exc))
                return None
            raise
        self.supported = True
        result = TraceResult(moved=len(moved))
        marks = {e: m for e, m in before.items() if e in experiments}
        for exp_id, fp in sorted(moved.items()):
            marks[exp_id] = self._read_moved(exp_id, fp, before.get(exp_id), now_ms, result)
        for exp_id, m in list(marks.items()):
            marks[exp_id] = self._window(m, now_ms, result)
        samples: list[BucketSample] = []
        for exp_id, m in list(marks.items()):
            marks[exp_id] = self._history(m, experiments[exp_id], now_ms, samples)
        self._write(store, before, marks, samples, now_ms)
        result.samples = len(samples)
        result.experiments = sum(m.live is not None for m in marks.values())
        result.names_cut = sum(m.live.names_cut for m in marks.values() if m.live is not None)
        return result

    def _ask(self, query: TraceQuery) -> list[TracePoint]:
        return self.source.trace_metrics(query)

    # ------------------------------------------------------------------ probing

    def _probe(self, ids: Sequence[str], marks: Mapping[str, Marks]) -> dict[str, Fingerprint]:
        """The experiments whose fingerprint moved, with their new fingerprint."""
        stored = {e: m.fingerprint for e, m in marks.items()}
        moved: dict[str, Fingerprint] = {}
        stack = list(reversed(plan.chunks(ids)))
        while stack:
            node = stack.pop()
            want = plan.expected(node, stored)
            statuses = plan.statuses_of(self._ask(plan.status_probe(node)))
            step = plan.bisect_step(node, want, statuses, None)
            assessments = None
            if step is Step.ASK_ASSESSMENTS:
                assessments = plan.count_of(self._ask(plan.assessment_probe(node)))
                step = plan.bisect_step(node, want, statuses, assessments)
            if step is Step.SPLIT:
                stack.extend(reversed(plan.halves(node)))
            elif step is Step.MOVED:
                moved[node[0]] = Fingerprint(statuses, assessments or 0)
        return moved

    # ------------------------------------------------------------------ reading

    def _read_moved(
        self,
        exp_id: str,
        fp: Fingerprint,
        old: Marks | None,
        now_ms: int,
        result: TraceResult,
    ) -> Marks:
        t = self.settings.traces
        bucket_ms = t.bucket_seconds * 1000
        marks = old or plan.first_marks(exp_id, now_ms, t.backfill_seconds * 1000, bucket_ms)
        answers = {k: self._ask(q) for k, q in plan.moved_queries(exp_id).items()}
        read = MovedRead(fp, answers)
        if not plan.names_cover(read, TRACE_MAX_RESULTS):
            totals = {k: self._ask(q) for k, q in plan.token_total_queries(exp_id).items()}
            read = replace(read, token_totals=totals)
        traces: list[TracePoint] = []
        assessments: list[TracePoint] = []
        end = plan.floor(now_ms, bucket_ms) + bucket_ms
        for trace_q, assessment_q in plan.pending_queries(
            exp_id, marks.written_until_ms, end, t.bucket_seconds
        ):
            traces += self._ask(trace_q)
            assessments += self._ask(assessment_q)
        pending = plan.account_pending(marks, fp, traces, assessments, bucket_ms, old is None)
        for kind, n in (("traces", pending.late_traces), ("assessments", pending.late_assessments)):
            if n:
                result.late[kind] = result.late.get(kind, 0) + n
                log.info("traces.late_change", experiment_id=exp_id, kind=kind, changes=n)
        live = plan.live_from_moved(
            read, marks.live, t.max_trace_names, t.max_assessment_names, pending.last_trace_ms
        )
        return replace(
            marks,
            fingerprint=fp,
            pending=pending.buckets,
            settled_traces=pending.settled_traces,
            settled_assessments=pending.settled_assessments,
            last_trace_ms=pending.last_trace_ms,
            live=live,
        )

    def _window(self, marks: Marks, now_ms: int, result: TraceResult) -> Marks:
        """Refresh latency quantiles and assessment means while the window holds traces."""
        if marks.live is None:
            return marks
        window_ms = self.settings.traces.window_seconds * 1000
        if plan.in_window(marks, now_ms, window_ms):
            result.windowed += 1
            queries = plan.window_queries(marks.experiment_id, now_ms, window_ms)
            answers = {k: self._ask(q) for k, q in queries.items()}
            return replace(marks, live=plan.with_window(marks.live, answers))
        return replace(marks, live=plan.with_window(marks.live, None))

    def _history(self, marks: Marks, name: str, now_ms: int, samples: list[BucketSample]) -> Marks:
        """Read the closed, settled buckets holding traces (when a sink consumes them) and
        move the written horizon past them."""
        t = self.settings.traces
        end = plan.due_end(now_ms, t.settle_seconds * 1000, t.bucket_seconds * 1000)
        if bucket_sinks(self.sinks) and plan.due_with_traces(marks, end):
            names = sorted(marks.live.assessments) if marks.live is not None else []
            for queries in plan.history_queries(
                marks.experiment_id, marks.written_until_ms, end, t.bucket_seconds
            ):
                answers = {k: self._ask(q) for k, q in queries.items()}
                samples += plan.bucket_samples(marks.experiment_id, name, answers, names)
        return plan.advance(marks, end)

    # ------------------------------------------------------------------ writing

    def _write(
        self,
        store: TraceMarks,
        before: Mapping[str, Marks],
        marks: Mapping[str, Marks],
        samples: Sequence[BucketSample],
        now_ms: int,
    ) -> None:
        changed = [m for e, m in marks.items() if before.get(e) != m]
        dirty = [e for e, m in marks.items() if e not in before or before[e].live != m.live]
        gone = sorted(set(before) - set(marks))
        with self.state.transaction():
            store.save(changed)
            store.forget(gone)
            self.state.push_marks.mark_dirty(dirty)
            if samples:
                for sink in bucket_sinks(self.sinks):
                    self._queue(sink, samples, now_ms)

    def _queue(self, sink: BucketSink, samples: Sequence[BucketSample], now_ms: int) -> None:
        """Queue the buckets on one sink's queue, in the batches it plans."""
        outbox = self.state.outbox(sink.name)
        batches = [
            CapturedBatch(buckets=tuple(group), created_ms=now_ms)
            for group in sink.plan_buckets(samples)
        ]
        outbox.add([QueueEntry(str(uuid.uuid4()), sink.count(b), b) for b in batches])
        # Trace buckets are few: under the default `wait` policy they are always queued;
        # only an opt-in drop policy trims (and says what was lost).
        if sink.overflow != "wait":
            oldest = sink.overflow == "drop_oldest"
            dropped = outbox.trim(sink.queue_max_points, oldest)
            if dropped:
                log.warning("queue.overflow_lost", sink=sink.name, lost_points=dropped)
