"""GenAI traces, decided: what to ask MLflow's trace aggregation, and what its answers mean
(pure functions over value types; `exporter/traces.py` executes them).

Cost model. MLflow aggregates over the experiments a call names, summed, without an
experiment dimension and without a "changed since" filter. So a cycle first probes all its
experiments at once (trace counts by state, and assessments held: two requests); when the
answer equals the sum of what each experiment showed last time, nothing moved. Otherwise
the set is halved and each half probed again, down to the single experiments that moved
(about 3 requests per level for one busy experiment among many). Counts add up, so the
expected value of any subset is known from the last per-experiment fingerprints.

Then, per experiment:
- moved: its all-time counts, tokens, cost and assessments by name, and the per-bucket
  counts of the buckets not yet written to history (late-change accounting);
- traces within the window (`window_seconds`): latency quantiles and assessment means over
  the window, every cycle until the window holds none;
- buckets closed and settled (`settle_seconds` after their end) that hold traces: one
  sample per bucket and series through remote write, once; what changes in them later
  moves the live series and is counted as a late change.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

from prometheus_client.core import GaugeMetricFamily, Metric

from exporter.trace_model import (
    PERCENTILE_KEYS,
    STATUSES,
    TOKEN_KINDS,
    BucketSample,
    Fingerprint,
    NamedValues,
    TraceLive,
    TracePoint,
    TraceQuery,
)

# Experiments one probe names at most (the request body and MLflow's SQL stay modest).
PROBE_CHUNK = 1000
# Buckets one bucketed read spans at most, so an answer stays below MLflow's result limit
# even with a few dimension values per bucket.
MAX_BUCKETS_PER_READ = 1000
LATENCY_AGGS = PERCENTILE_KEYS


# ---------------------------------------------------------------------------------- probing


def status_probe(ids: Sequence[str]) -> TraceQuery:
    """Traces held by these experiments, by state (all time)."""
    return TraceQuery(tuple(ids), "TRACES", "trace_count", ("COUNT",), ("trace_status",))


def assessment_probe(ids: Sequence[str]) -> TraceQuery:
    """Assessments held by these experiments (all time, valid ones)."""
    return TraceQuery(tuple(ids), "ASSESSMENTS", "assessment_count", ("COUNT",))


def statuses_of(points: Iterable[TracePoint]) -> tuple[tuple[str, int], ...]:
    """A status probe's answer as a fingerprint's sorted (state, count) pairs."""
    counts: dict[str, int] = {}
    for p in points:
        status = p.dimensions.get("trace_status", "")
        counts[status] = counts.get(status, 0) + int(p.values.get("COUNT", 0))
    return tuple(sorted((s, n) for s, n in counts.items() if n))


def count_of(points: Iterable[TracePoint]) -> int:
    """The COUNT of an answer without dimensions (summed, should there be several)."""
    return sum(int(p.values.get("COUNT", 0)) for p in points)


def expected(ids: Iterable[str], stored: Mapping[str, Fingerprint]) -> Fingerprint:
    """What a probe of `ids` shows if none of them moved since last read."""
    total = Fingerprint()
    for i in ids:
        total += stored.get(i, Fingerprint())
    return total


class Step(enum.Enum):
    SAME = "same"  # nothing under this node moved
    ASK_ASSESSMENTS = "ask_assessments"  # probe its assessments before deciding
    SPLIT = "split"  # something under it moved: probe both halves
    MOVED = "moved"  # a single experiment that moved: read it


def bisect_step(
    node: Sequence[str],
    want: Fingerprint,
    statuses: tuple[tuple[str, int], ...],
    assessments: int | None,
) -> Step:
    """The next step for a probed node. Assessments are only asked when trace counts did
    not already show a move (and always for a single experiment, to fingerprint it)."""
    single = len(node) == 1
    if statuses != want.statuses:
        if not single:
            return Step.SPLIT
        return Step.ASK_ASSESSMENTS if assessments is None else Step.MOVED
    if assessments is None:
        return Step.ASK_ASSESSMENTS
    if assessments == want.assessments:
        return Step.SAME
    return Step.MOVED if single else Step.SPLIT


def halves(node: Sequence[str]) -> list[tuple[str, ...]]:
    """A node's two halves (probed in turn)."""
    middle = len(node) // 2
    return [tuple(node[:middle]), tuple(node[middle:])]


def chunks(ids: Sequence[str], size: int = PROBE_CHUNK) -> list[tuple[str, ...]]:
    """The root nodes: experiments in probes of at most `size`."""
    return [tuple(ids[i : i + size]) for i in range(0, len(ids), size)]


# ---------------------------------------------------------------------------------- marks


@dataclass(frozen=True, slots=True)
class Marks:
    """What the state keeps per experiment between cycles."""

    experiment_id: str
    fingerprint: Fingerprint = field(default_factory=Fingerprint)
    written_until_ms: int = 0  # history is written for buckets before this
    last_trace_ms: int | None = None  # end of the newest bucket known to hold traces
    # (bucket start, traces, assessments) of buckets not yet written that hold any.
    pending: tuple[tuple[int, int, int], ...] = ()
    settled_traces: int = 0  # traces before `written_until_ms`, as last known
    settled_assessments: int = 0
    live: TraceLive | None = None


def first_marks(experiment_id: str, now_ms: int, backfill_ms: int, bucket_ms: int) -> Marks:
    """Marks of an experiment seen for the first time: history from `backfill_ms` ago."""
    return Marks(experiment_id, written_until_ms=floor(now_ms - backfill_ms, bucket_ms))


def floor(ms: int, bucket_ms: int) -> int:
    """The start of the bucket holding `ms`."""
    return ms // bucket_ms * bucket_ms


def due_end(now_ms: int, settle_ms: int, bucket_ms: int) -> int:
    """Buckets starting before this have closed and settled."""
    return floor(now_ms - settle_ms, bucket_ms)


def read_ranges(start_ms: int, end_ms: int, bucket_ms: int) -> list[tuple[int, int]]:
    """[start, end) as inclusive (start, end) ranges of at most `MAX_BUCKETS_PER_READ`."""
    span = MAX_BUCKETS_PER_READ * bucket_ms
    return [(s, min(s + span, end_ms) - 1) for s in range(start_ms, end_ms, span)]


# ---------------------------------------------------------------------------------- reading


def moved_queries(experiment_id: str) -> dict[str, TraceQuery]:
    """All-time reads of an experiment that moved (one request each)."""
    ids = (experiment_id,)
    queries = {
        "names": TraceQuery(
            ids, "TRACES", "trace_count", ("COUNT",), ("trace_status", "trace_name")
        ),
        "cost": TraceQuery(ids, "SPANS", "total_cost", ("SUM",)),
        "assessments": TraceQuery(
            ids, "ASSESSMENTS", "assessment_count", ("COUNT",), ("assessment_name",)
        ),
    }
    for kind in TOKEN_KINDS:
        queries[f"tokens:{kind}"] = TraceQuery(
            ids, "TRACES", f"{kind}_tokens", ("SUM",), ("trace_name",)
        )
    return queries


def token_total_queries(experiment_id: str) -> dict[str, TraceQuery]:
    """Token sums without the name dimension (traces without a name exist)."""
    return {
        kind: TraceQuery((experiment_id,), "TRACES", f"{kind}_tokens", ("SUM",))
        for kind in TOKEN_KINDS
    }


def pending_queries(
    experiment_id: str, start_ms: int, end_ms: int, bucket_s: int
) -> list[tuple[TraceQuery, TraceQuery]]:
    """Per-bucket trace and assessment counts over [start, end), in ranges."""
    ids = (experiment_id,)
    return [
        (
            TraceQuery(ids, "TRACES", "trace_count", ("COUNT",), (), s, e, bucket_s),
            TraceQuery(ids, "ASSESSMENTS", "assessment_count", ("COUNT",), (), s, e, bucket_s),
        )
        for s, e in read_ranges(start_ms, end_ms, bucket_s * 1000)
    ]


def window_queries(experiment_id: str, now_ms: int, window_ms: int) -> dict[str, TraceQuery]:
    """Reads over the last window: latency quantiles (whole and by name), assessment means."""
    ids, start = (experiment_id,), now_ms - window_ms
    return {
        "latency": TraceQuery(ids, "TRACES", "latency", LATENCY_AGGS, (), start, now_ms),
        "latency_names": TraceQuery(
            ids, "TRACES", "latency", LATENCY_AGGS, ("trace_name",), start, now_ms
        ),
        "means": TraceQuery(
            ids, "ASSESSMENTS", "assessment_value", ("AVG",), ("assessment_name",), start, now_ms
        ),
    }


def in_window(marks: Marks, now_ms: int, window_ms: int) -> bool:
    """Whether the window may hold traces of this experiment."""
    return marks.last_trace_ms is not None and marks.last_trace_ms > now_ms - window_ms


def top_names(counts: Mapping[str, float], limit: int) -> tuple[list[str], int]:
    """The `limit` most frequent names (ties by name), and how many were left out."""
    ordered = sorted(counts, key=lambda n: (-counts[n], n))
    return sorted(ordered[:limit]), max(0, len(ordered) - limit)


def _by(points: Iterable[TracePoint], dim: str, value: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in points:
        if dim in p.dimensions and value in p.values:
            key = p.dimensions[dim]
            out[key] = out.get(key, 0.0) + p.values[value]
    return out


@dataclass(frozen=True, slots=True)
class MovedRead:
    """The answers of `moved_queries` (and `token_total_queries` when asked)."""

    fingerprint: Fingerprint
    answers: Mapping[str, Sequence[TracePoint]]
    token_totals: Mapping[str, Sequence[TracePoint]] | None = None


def names_cover(read: MovedRead, limit: int) -> bool:
    """Whether per-name answers sum to the experiment's totals: every trace has a name and
    no answer was cut. Otherwise token totals need their own reads."""
    names = read.answers["names"]
    counted = sum(int(p.values.get("COUNT", 0)) for p in names)
    return counted == read.fingerprint.traces and len(names) < limit


def live_from_moved(
    read: MovedRead,
    previous: TraceLive | None,
    max_names: int,
    max_assessment_names: int,
    last_trace_ms: int | None,
) -> TraceLive | None:
    """The all-time part of an experiment's live series (window parts kept from before);
    None when it holds no traces and no assessments."""
    fp = read.fingerprint
    if fp.traces == 0 and fp.assessments == 0:
        return None
    a = read.answers
    name_counts = _by(a["names"], "trace_name", "COUNT")
    kept, cut = top_names(name_counts, max_names)
    per_name_status: dict[str, dict[str, int]] = {n: {} for n in kept}
    for p in a["names"]:
        name = p.dimensions.get("trace_name")
        if name in per_name_status:
            status = p.dimensions.get("trace_status", "")
            per_name_status[name][status] = int(p.values.get("COUNT", 0))
    tokens_by_name = {kind: _by(a[f"tokens:{kind}"], "trace_name", "SUM") for kind in TOKEN_KINDS}
    if read.token_totals is not None:
        totals = {
            kind: sum(p.values["SUM"] for p in read.token_totals[kind] if "SUM" in p.values)
            for kind in TOKEN_KINDS
            if any("SUM" in p.values for p in read.token_totals[kind])
        }
    else:
        totals = {kind: sum(v.values()) for kind, v in tokens_by_name.items() if v}
    old = previous or TraceLive(NamedValues())
    by_name = {
        n: NamedValues(
            per_name_status[n],
            {k: tokens_by_name[k][n] for k in TOKEN_KINDS if n in tokens_by_name[k]},
            old.by_name[n].latency_ms if n in old.by_name else {},
        )
        for n in kept
    }
    assessment_counts = _by(a["assessments"], "assessment_name", "COUNT")
    kept_assessments, _ = top_names(assessment_counts, max_assessment_names)
    cost = [p.values["SUM"] for p in a["cost"] if "SUM" in p.values]
    return TraceLive(
        totals=NamedValues(dict(fp.statuses), totals, old.totals.latency_ms),
        by_name=by_name,
        cost_usd=sum(cost) if cost else None,
        assessments={n: int(assessment_counts[n]) for n in kept_assessments},
        assessment_means={n: v for n, v in old.assessment_means.items() if n in kept_assessments},
        names_cut=cut,
        last_trace_ms=last_trace_ms,
    )


def with_window(live: TraceLive, answers: Mapping[str, Sequence[TracePoint]] | None) -> TraceLive:
    """`live` with its window parts from `answers` (None: the window holds no traces)."""
    answers = answers or {"latency": [], "latency_names": [], "means": []}
    whole: dict[str, float] = {}
    for p in answers["latency"]:
        whole.update({k: v for k, v in p.values.items() if k in LATENCY_AGGS})
    named: dict[str, dict[str, float]] = {}
    for p in answers["latency_names"]:
        name = p.dimensions.get("trace_name", "")
        if name in live.by_name:
            named[name] = {k: v for k, v in p.values.items() if k in LATENCY_AGGS}
    means = {
        n: v
        for n, v in _by(answers["means"], "assessment_name", "AVG").items()
        if n in live.assessments
    }
    return replace(
        live,
        totals=replace(live.totals, latency_ms=whole),
        by_name={n: replace(v, latency_ms=named.get(n, {})) for n, v in live.by_name.items()},
        assessment_means=means,
    )


# ---------------------------------------------------------------------------------- pending


@dataclass(frozen=True, slots=True)
class Pending:
    """What the per-bucket counts of the unwritten buckets say."""

    buckets: tuple[tuple[int, int, int], ...]  # (start, traces, assessments), non-empty ones
    late_traces: int  # changes before the written horizon since last known
    late_assessments: int
    settled_traces: int
    settled_assessments: int
    last_trace_ms: int | None


def account_pending(
    marks: Marks,
    fingerprint: Fingerprint,
    traces: Iterable[TracePoint],
    assessments: Iterable[TracePoint],
    bucket_ms: int,
    first_sight: bool,
) -> Pending:
    """Compare all-time counts with the unwritten buckets' counts: what is left lies before
    the written horizon, and any difference from last time landed late."""
    per: dict[int, list[int]] = {}
    for p in traces:
        if p.bucket_ms is not None:
            per.setdefault(p.bucket_ms, [0, 0])[0] += int(p.values.get("COUNT", 0))
    for p in assessments:
        if p.bucket_ms is not None:
            per.setdefault(p.bucket_ms, [0, 0])[1] += int(p.values.get("COUNT", 0))
    buckets = tuple(sorted((b, t, a) for b, (t, a) in per.items() if t or a))
    before_traces = fingerprint.traces - sum(t for _, t, _ in buckets)
    before_assessments = fingerprint.assessments - sum(a for _, _, a in buckets)
    with_traces = [b for b, t, _ in buckets if t]
    last = max(with_traces) + bucket_ms if with_traces else marks.last_trace_ms
    return Pending(
        buckets,
        0 if first_sight else abs(before_traces - marks.settled_traces),
        0 if first_sight else abs(before_assessments - marks.settled_assessments),
        before_traces,
        before_assessments,
        last,
    )


def advance(marks: Marks, end_ms: int) -> Marks:
    """Marks once every bucket before `end_ms` is written (or needs no writing)."""
    if end_ms <= marks.written_until_ms:
        return marks
    done = [b for b in marks.pending if b[0] < end_ms]
    return replace(
        marks,
        written_until_ms=end_ms,
        pending=tuple(b for b in marks.pending if b[0] >= end_ms),
        settled_traces=marks.settled_traces + sum(t for _, t, _ in done),
        settled_assessments=marks.settled_assessments + sum(a for _, _, a in done),
    )


def due_with_traces(marks: Marks, end_ms: int) -> bool:
    """Whether a closed, settled bucket not yet written holds traces or assessments."""
    return any(b[0] < end_ms for b in marks.pending)


# ---------------------------------------------------------------------------------- history


def history_queries(
    experiment_id: str, start_ms: int, end_ms: int, bucket_s: int
) -> list[dict[str, TraceQuery]]:
    """Bucketed reads of [start, end) for history samples, in ranges."""
    ids = (experiment_id,)
    out = []
    for s, e in read_ranges(start_ms, end_ms, bucket_s * 1000):
        queries = {
            "traces": TraceQuery(
                ids, "TRACES", "trace_count", ("COUNT",), ("trace_status",), s, e, bucket_s
            ),
            "latency": TraceQuery(ids, "TRACES", "latency", LATENCY_AGGS, (), s, e, bucket_s),
            "means": TraceQuery(
                ids,
                "ASSESSMENTS",
                "assessment_value",
                ("AVG",),
                ("assessment_name",),
                s,
                e,
                bucket_s,
            ),
        }
        for kind in TOKEN_KINDS:
            queries[f"tokens:{kind}"] = TraceQuery(
                ids, "TRACES", f"{kind}_tokens", ("SUM",), (), s, e, bucket_s
            )
        # Costs are bucketed by their LLM span's start (MLflow's rollup day rule).
        queries["cost"] = TraceQuery(ids, "SPANS", "total_cost", ("SUM",), (), s, e, bucket_s)
        out.append(queries)
    return out


def bucket_samples(
    experiment_id: str,
    experiment_name: str,
    answers: Mapping[str, Sequence[TracePoint]],
    assessment_names: Iterable[str],
) -> list[BucketSample]:
    """One sample per bucket and series: traces by state (every state, in buckets holding
    traces), latency quantiles in seconds, token sums, assessment means (bounded names)."""
    exp = (("experiment_id", experiment_id), ("experiment_name", experiment_name))
    rows: list[tuple[str, tuple[str, str] | None, int, float]] = []
    counts: dict[int, dict[str, float]] = {}
    for p in _bucketed(answers["traces"], "COUNT"):
        counts.setdefault(p.bucket_ms or 0, {})[p.dimensions.get("trace_status", "")] = p.values[
            "COUNT"
        ]
    rows.extend(
        ("traces", ("status", status), bucket, by_status.get(status, 0.0))
        for bucket, by_status in sorted(counts.items())
        for status in sorted({*STATUSES, *by_status})
    )
    rows.extend(
        ("latency_seconds", ("quantile", q), p.bucket_ms or 0, p.values[key] / 1000)
        for key, q in zip(LATENCY_AGGS, QUANTILE_LABELS, strict=True)
        for p in _bucketed(answers["latency"], key)
    )
    rows.extend(
        ("tokens", ("kind", kind), p.bucket_ms or 0, p.values["SUM"])
        for kind in TOKEN_KINDS
        for p in _bucketed(answers[f"tokens:{kind}"], "SUM")
    )
    rows.extend(
        ("cost_usd", None, p.bucket_ms or 0, p.values["SUM"])
        for p in _bucketed(answers.get("cost", ()), "SUM")
    )
    allowed = set(assessment_names)
    for p in _bucketed(answers["means"], "AVG"):
        name = p.dimensions.get("assessment_name", "")
        if name in allowed:
            rows.append(
                ("assessment_value", ("assessment_name", name), p.bucket_ms or 0, p.values["AVG"])
            )
    return [
        BucketSample(
            experiment_id,
            f"mlflow_trace_bucket_{suffix}",
            (*exp, label) if label else exp,
            bucket,
            value,
        )
        for suffix, label, bucket, value in rows
    ]


def _bucketed(points: Iterable[TracePoint], key: str) -> Iterator[TracePoint]:
    return (p for p in points if p.bucket_ms is not None and key in p.values)


# ---------------------------------------------------------------------------------- series

QUANTILE_LABELS = ("0.5", "0.95", "0.99")


@dataclass
class _Families:
    by_name: dict[str, GaugeMetricFamily] = field(default_factory=dict)

    def add(self, name: str, doc: str, labels: Mapping[str, str], value: float) -> None:
        family = self.by_name.get(name)
        if family is None:
            family = self.by_name[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)


def trace_families(live: TraceLive | None, experiment_id: str, name: str) -> list[Metric]:
    """The live trace series of one experiment (none when it holds no traces)."""
    if live is None:
        return []
    f = _Families()
    exp = {"experiment_id": experiment_id, "experiment_name": name}
    _named(f, exp, live.totals, "mlflow_trace", "mlflow_traces")
    if live.cost_usd is not None:
        f.add("mlflow_trace_cost_usd", "Cost of every trace's LLM calls (USD).", exp, live.cost_usd)
    if live.last_trace_ms is not None:
        f.add(
            "mlflow_trace_last_bucket_end_seconds",
            "End of the newest history bucket holding traces (Unix time).",
            exp,
            live.last_trace_ms / 1000,
        )
    for assessment, n in sorted(live.assessments.items()):
        labels = {**exp, "assessment_name": assessment}
        f.add("mlflow_trace_assessments", "Assessments held, by name.", labels, n)
        if assessment in live.assessment_means:
            f.add(
                "mlflow_trace_assessment_value",
                "Mean assessment value over the window's traces (booleans as 1/0).",
                labels,
                live.assessment_means[assessment],
            )
    for trace_name, values in sorted(live.by_name.items()):
        labels = {**exp, "trace_name": trace_name}
        _named(f, labels, values, "mlflow_trace_name", "mlflow_trace_name_traces")
    return list(f.by_name.values())


def _named(
    f: _Families, labels: Mapping[str, str], values: NamedValues, prefix: str, count: str
) -> None:
    for status in sorted({*STATUSES, *values.statuses}):
        f.add(
            count,
            "Traces held, by state.",
            {**labels, "status": status},
            values.statuses.get(status, 0),
        )
    for kind in TOKEN_KINDS:
        if kind in values.tokens:
            f.add(
                f"{prefix}_tokens",
                "Tokens used by every trace, by kind.",
                {**labels, "kind": kind},
                values.tokens[kind],
            )
    for key, q in zip(LATENCY_AGGS, QUANTILE_LABELS, strict=True):
        if key in values.latency_ms:
            f.add(
                f"{prefix}_latency_seconds",
                "Trace latency quantile over the window's traces.",
                {**labels, "quantile": q},
                values.latency_ms[key] / 1000,
            )
