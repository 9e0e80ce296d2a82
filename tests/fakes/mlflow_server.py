"""An in-memory MLflow that behaves like the real server behind `MlflowSource`.

What it imitates (MLflow 3.17's REST API as `exporter.mlflow_source.RestSource` uses it):

- experiments with lifecycle stages, listed all at once (`view_type=ALL`);
- runs with status, start/end times, tags and a lifecycle stage (delete/restore), searched
  with MLflow's semantics: AND of `start_time >=`, `end_time >=` (a run without an end time
  never matches), `status =`, `run_id IN`; views ACTIVE_ONLY/DELETED_ONLY/ALL; ordered by
  (start time, run id), nulls first, or newest first; pages whose token is an offset, so a
  run inserted before the offset shifts later pages, as in MLflow;
- each run's `metrics` are the latest point per key by (step, timestamp, value), as MLflow's
  latest_metrics table keeps them: a late point below the latest step never shows there;
- histories: every point of (run, key), one point per identity (MLflow's primary key),
  within a request's step range;
- the registry: models, versions with stage, status, run id, aliases, creation time;
- MLflow 3 traces and their assessments, aggregated like `traces/metrics` on a SQL store:
  a call sums over the experiments it names; a time range (inclusive) and buckets apply to
  the trace's timestamp (an assessment's too: it is bucketed by its trace's time); rows
  whose aggregated column is null (latency of a trace in progress, tokens never set, a
  text assessment) are left out, as are rows whose dimension is null; without dimensions
  COUNT answers 0 and other aggregations answer nothing for no rows; percentiles
  interpolate linearly (MLflow's SQLite aggregate); only valid assessments count. With
  `traces_supported = False` it answers like MLflow 2 or a file store (HTTP 404).

Every call is counted by endpoint name in `calls`; `fail_next` makes the next call raise
(an outage) and `broken` makes every call to an endpoint raise.
Writing happens through plain methods (`create_run`, `log`, `finish`, `delete_run`, ...),
with a clock the test controls.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from exporter.mlflow_source import MlflowError, TracesUnsupportedError
from exporter.model import (
    Experiment,
    HistoryRequest,
    LatestMetric,
    MetricPoint,
    ModelVersion,
    Registry,
    Run,
    RunFilter,
    RunPage,
)
from exporter.trace_model import TracePoint, TraceQuery


@dataclass
class FakeRun:
    """A run as the MLflow server stores it: its metadata and every point logged per key."""

    run: Run  # metadata; metrics are derived from `points`
    points: dict[str, list[MetricPoint]] = field(default_factory=dict)


@dataclass
class FakeAssessment:
    """An MLflow 3 assessment on a trace as the server stores it (feedback name and value)."""

    name: str
    value: float | None  # booleans as 1/0; None for text feedback
    valid: bool = True


@dataclass
class FakeTrace:
    """An MLflow 3 trace as the server stores it: state, time, duration, tokens, assessments."""

    trace_id: str
    experiment_id: str
    name: str | None
    state: str
    timestamp_ms: int
    duration_ms: int | None
    tokens: dict[str, int] | None = None  # input/output/total
    cost_usd: float | None = None
    assessments: list[FakeAssessment] = field(default_factory=list)


def percentile(values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (MLflow's SQLite `percentile`)."""
    ordered = sorted(values)
    index = p / 100.0 * (len(ordered) - 1)
    low = int(index)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (index - low) * (ordered[high] - ordered[low])


def _aggregate(key: str, values: Sequence[float]) -> float | None:
    if key == "COUNT":
        return float(len(values))
    if not values:
        return None
    plain: dict[str, Callable[[Sequence[float]], float]] = {
        "SUM": lambda v: float(sum(v)),
        "AVG": lambda v: sum(v) / len(v),
        "MIN": min,
        "MAX": max,
    }
    if key in plain:
        return plain[key](values)
    return percentile(values, float(key[1:]))


def _order_key(p: MetricPoint) -> tuple[int, int, float]:
    value = -math.inf if math.isnan(p.value) else p.value
    return (p.step, p.timestamp_ms, value)


class FakeMlflow:
    """Stands in for `RestSource` and the MLflow server behind it, all in memory."""

    def __init__(self, clock: Callable[[], float], page_size: int = 1000) -> None:
        self.clock = clock
        self.page_size = page_size
        self.experiments_by_id: dict[str, Experiment] = {}
        self.runs: dict[str, FakeRun] = {}
        self.models: list[str] = []
        self.versions: list[ModelVersion] = []
        self.calls: Counter[str] = Counter()
        self.history_requests: list[HistoryRequest] = []
        self.fail_next: list[Exception] = []
        self.broken: dict[str, Exception] = {}  # endpoint -> raise on every call
        self.traces: list[FakeTrace] = []
        self.traces_supported = True
        self.trace_queries: list[TraceQuery] = []
        self._ids = 0

    # ------------------------------------------------------------------ writing

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def create_experiment(self, name: str) -> str:
        self._ids += 1
        exp_id = str(self._ids)
        self.experiments_by_id[exp_id] = Experiment(
            exp_id, name, "active", self._now_ms(), self._now_ms()
        )
        return exp_id

    def delete_experiment(self, exp_id: str) -> None:
        self.experiments_by_id[exp_id] = replace(
            self.experiments_by_id[exp_id], lifecycle_stage="deleted"
        )

    def rename_experiment(self, exp_id: str, name: str) -> None:
        self.experiments_by_id[exp_id] = replace(
            self.experiments_by_id[exp_id], name=name, last_update_time_ms=self._now_ms()
        )

    def create_run(
        self,
        exp_id: str,
        name: str = "",
        start_ms: int | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
    ) -> str:
        self._ids += 1
        # Like MLflow's uuid4 hex ids: distinct from their first characters on.
        run_id = run_id or hashlib.sha256(str(self._ids).encode()).hexdigest()[:32]
        start = self._now_ms() if start_ms is None else start_ms
        run = Run(
            run_id,
            exp_id,
            name or f"run-{self._ids}",
            "RUNNING",
            "alice",
            start,
            None,
            (),
            dict(tags or {}),
        )
        self.runs[run_id] = FakeRun(run)
        return run_id

    def log(
        self, run_id: str, key: str, value: float, step: int = 0, ts: int | None = None
    ) -> MetricPoint:
        """Log one point (MLflow keeps one point per identity: a repeat is a no-op)."""
        point = MetricPoint(run_id, key, value, step, self._now_ms() if ts is None else ts)
        series = self.runs[run_id].points.setdefault(key, [])
        if all(p.identity != point.identity for p in series):
            series.append(point)
        return point

    def log_many(
        self, run_id: str, key: str, values: Sequence[float], first_step: int = 0
    ) -> list[MetricPoint]:
        now = self._now_ms()
        return [self.log(run_id, key, v, first_step + i, now + i) for i, v in enumerate(values)]

    def finish(self, run_id: str, status: str = "FINISHED", end_ms: int | None = None) -> None:
        fake = self.runs[run_id]
        end = self._now_ms() if end_ms is None else end_ms
        fake.run = replace(fake.run, status=status, end_time_ms=end)

    def update(self, run_id: str, **changes: object) -> None:
        """Change run metadata the way `update_run`/`set_tag` do (no end time is set)."""
        fake = self.runs[run_id]
        fake.run = replace(fake.run, **changes)  # type: ignore[arg-type]

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        fake = self.runs[run_id]
        fake.run = replace(fake.run, tags={**fake.run.tags, key: value})

    def delete_run(self, run_id: str) -> None:
        self.update(run_id, lifecycle_stage="deleted")

    def restore_run(self, run_id: str) -> None:
        self.update(run_id, lifecycle_stage="active")

    def purge_run(self, run_id: str) -> None:
        """`mlflow gc`: the run is gone for good."""
        del self.runs[run_id]

    def register(
        self, model: str, run_id: str, stage: str = "None", aliases: tuple[str, ...] = ()
    ) -> str:
        if model not in self.models:
            self.models.append(model)
        version = str(1 + sum(v.model_name == model for v in self.versions))
        self.versions.append(
            ModelVersion(model, version, run_id, stage, "READY", aliases, self._now_ms())
        )
        return version

    def add_trace(
        self,
        exp_id: str,
        name: str | None = "chat",
        state: str = "OK",
        duration_ms: int | None = 100,
        ts: int | None = None,
        tokens: tuple[int, int] | None = None,
        cost_usd: float | None = None,
    ) -> FakeTrace:
        """A trace as `@mlflow.trace` logs it (tokens: input and output; total is their sum)."""
        self._ids += 1
        trace = FakeTrace(
            f"tr-{self._ids}",
            exp_id,
            name,
            state,
            self._now_ms() if ts is None else ts,
            None if state == "IN_PROGRESS" else duration_ms,
            None
            if tokens is None
            else {"input": tokens[0], "output": tokens[1], "total": tokens[0] + tokens[1]},
            cost_usd,
        )
        self.traces.append(trace)
        return trace

    def log_feedback(self, trace: FakeTrace, name: str, value: float | bool | None) -> None:
        trace.assessments.append(FakeAssessment(name, None if value is None else float(value)))

    # ------------------------------------------------------------------ the protocol

    def _call(self, endpoint: str) -> None:
        self.calls[endpoint] += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        if endpoint in self.broken:
            raise self.broken[endpoint]

    def experiments(self) -> list[Experiment]:
        self._call("experiments/search")
        return list(self.experiments_by_id.values())

    def runs_page(
        self, experiment_ids: Sequence[str], where: RunFilter, page_token: str | None = None
    ) -> RunPage:
        self._call("runs/search")
        matching = [
            self._view(f.run, where)
            for f in self.runs.values()
            if self._matches(f.run, experiment_ids, where)
        ]
        matching.sort(
            key=lambda r: (-1 if r.start_time_ms is None else r.start_time_ms, r.run_id),
            reverse=where.newest_first,
        )
        offset = int(page_token or 0)
        size = min(self.page_size, where.max_results or self.page_size)
        page = matching[offset : offset + size]
        more = offset + size < len(matching)
        return RunPage(page, str(offset + size) if more else None)

    def _matches(self, run: Run, experiment_ids: Sequence[str], where: RunFilter) -> bool:
        views = {"active": ("active",), "deleted": ("deleted",), "all": ("active", "deleted")}
        return (
            run.experiment_id in experiment_ids
            and run.lifecycle_stage in views[where.view]
            and (
                where.started_since_ms is None
                or (run.start_time_ms or -1) >= where.started_since_ms
            )
            and (
                where.ended_since_ms is None
                or (run.end_time_ms is not None and run.end_time_ms >= where.ended_since_ms)
            )
            and (where.status is None or run.status == where.status)
            and (not where.run_ids or run.run_id in where.run_ids)
        )

    def _view(self, run: Run, _where: RunFilter) -> Run:
        fake = self.runs[run.run_id]
        latest = tuple(
            LatestMetric(k, top.value, top.step, top.timestamp_ms)
            for k, ps in sorted(fake.points.items())
            if ps
            for top in [max(ps, key=_order_key)]
        )
        return replace(run, metrics=latest)

    def registry(self) -> Registry:
        self._call("registered-models/search")
        self._call("model-versions/search")
        return Registry(tuple(self.models), tuple(self.versions))

    def histories(self, wanted: Sequence[HistoryRequest]) -> list[MetricPoint]:
        out: list[MetricPoint] = []
        for start in range(0, len(wanted), 100):
            self._call("metrics/get-history-bulk-interval")
            for w in wanted[start : start + 100]:
                self.history_requests.append(w)
                fake = self.runs.get(w.run_id)
                if fake is None:
                    raise MlflowError(
                        f"MLflow metrics/get-history-bulk-interval answered 404: run {w.run_id}"
                    )
                out.extend(
                    p
                    for p in fake.points.get(w.key, [])
                    if (w.start_step is None or p.step >= w.start_step) and p.step <= w.end_step
                )
        return out

    def trace_metrics(self, query: TraceQuery) -> list[TracePoint]:
        self._call("traces/metrics")
        self.trace_queries.append(query)
        if not self.traces_supported:
            raise TracesUnsupportedError("MLflow has no trace metrics API (HTTP 404)")
        rows = self._trace_rows(query)
        groups: dict[tuple[int | None, tuple[tuple[str, str], ...]], list[float]] = {}
        for bucket, dims, value in rows:
            groups.setdefault((bucket, dims), []).append(value)
        if not query.dimensions and not query.bucket_seconds:
            groups.setdefault((None, ()), [])
        out = []
        for (bucket, dims), values in sorted(groups.items(), key=lambda g: (g[0][0] or 0, g[0][1])):
            answer = {a: _aggregate(a, values) for a in query.aggregations}
            kept = {k: v for k, v in answer.items() if v is not None}
            if kept:
                out.append(TracePoint(dict(dims), kept, bucket))
        return out

    def _trace_rows(
        self, query: TraceQuery
    ) -> list[tuple[int | None, tuple[tuple[str, str], ...], float]]:
        """(bucket, dimensions, aggregated value) of each row the query reads."""
        rows = []
        for t in self.traces:
            if t.experiment_id not in query.experiment_ids:
                continue
            if query.start_ms is not None and t.timestamp_ms < query.start_ms:
                continue
            if query.end_ms is not None and t.timestamp_ms > query.end_ms:
                continue
            bucket = None
            if query.bucket_seconds:
                size = query.bucket_seconds * 1000
                bucket = t.timestamp_ms // size * size
            base = {"trace_name": t.name, "trace_status": t.state}
            for value, extra in self._values(t, query):
                dims = {**base, **extra}
                picked = tuple((d, dims.get(d)) for d in query.dimensions)
                if value is None or any(v is None for _, v in picked):
                    continue
                rows.append((bucket, tuple((d, str(v)) for d, v in picked), value))
        return rows

    @staticmethod
    def _values(
        t: FakeTrace, query: TraceQuery
    ) -> list[tuple[float | None, dict[str, str | None]]]:
        if query.view == "ASSESSMENTS":
            valid = [a for a in t.assessments if a.valid]
            if query.metric == "assessment_count":
                return [(1.0, {"assessment_name": a.name}) for a in valid]
            return [(a.value, {"assessment_name": a.name}) for a in valid]
        if query.view == "SPANS":
            return [(t.cost_usd, {})]
        if query.metric == "trace_count":
            return [(1.0, {})]
        if query.metric == "latency":
            return [(None if t.duration_ms is None else float(t.duration_ms), {})]
        kind = query.metric.removesuffix("_tokens")
        return [(None if t.tokens is None else float(t.tokens[kind]), {})]

    # ------------------------------------------------------------------ test helpers

    def all_points(
        self, run_ids: Sequence[str] | None = None
    ) -> set[tuple[str, str, int, int, float]]:
        """Every point MLflow holds (of these runs), as comparable tuples."""
        ids = self.runs if run_ids is None else run_ids
        return {
            (p.run_id, p.key, p.step, p.timestamp_ms, p.identity[2])
            for r in ids
            for ps in self.runs[r].points.values()
            for p in ps
        }

    def requests(self) -> int:
        return sum(self.calls.values())
