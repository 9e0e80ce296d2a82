"""Plain data about MLflow 3 traces (GenAI): aggregation queries, their answers, and what a
cycle keeps of them.

MLflow aggregates traces on the server (`POST /api/3.0/mlflow/traces/metrics`): one call
names experiments (summed, there is no experiment dimension), a view (`TRACES`, `SPANS`,
`ASSESSMENTS`), one metric, aggregations, dimensions and an optional time range, bucketed
when `bucket_seconds` is set. Times are milliseconds since the epoch; latency is in
milliseconds as MLflow gives it, converted to seconds where series are built.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

View = Literal["TRACES", "SPANS", "ASSESSMENTS"]

STATUSES = ("OK", "ERROR", "IN_PROGRESS")  # MLflow's trace states, each shown with zeros
QUANTILES = (0.5, 0.95, 0.99)
TOKEN_KINDS = ("input", "output", "total")
# Aggregation keys: MLflow's names, percentiles as `P<value>` (`P95`, `P99.9`).
PERCENTILE_KEYS = tuple(f"P{q * 100:g}" for q in QUANTILES)


@dataclass(frozen=True, slots=True)
class TraceQuery:
    """One trace metrics aggregation. `end_ms` is inclusive, as in MLflow."""

    experiment_ids: tuple[str, ...]
    view: View
    metric: str
    aggregations: tuple[str, ...]  # "COUNT", "SUM", "AVG", "MIN", "MAX", "P95", ...
    dimensions: tuple[str, ...] = ()
    start_ms: int | None = None
    end_ms: int | None = None
    bucket_seconds: int | None = None


@dataclass(frozen=True, slots=True)
class TracePoint:
    """One data point of an answer: its dimensions, bucket start (bucketed queries) and
    the values of the aggregations that had any input."""

    dimensions: Mapping[str, str]
    values: Mapping[str, float]
    bucket_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a cheap probe sees of some experiments' traces: counts by trace state, and
    assessments held. Counts add up over experiments, so an expected value of a group is
    the sum of its members' last fingerprints."""

    statuses: tuple[tuple[str, int], ...] = ()  # sorted (state, traces)
    assessments: int = 0

    @property
    def traces(self) -> int:
        return sum(n for _, n in self.statuses)

    def __add__(self, other: Fingerprint) -> Fingerprint:
        merged = dict(self.statuses)
        for status, n in other.statuses:
            merged[status] = merged.get(status, 0) + n
        return Fingerprint(
            tuple(sorted((s, n) for s, n in merged.items() if n)),
            self.assessments + other.assessments,
        )


@dataclass(frozen=True, slots=True)
class NamedValues:
    """Values of one experiment, or of one trace name within it."""

    statuses: Mapping[str, int] = field(default_factory=dict)
    tokens: Mapping[str, float] = field(default_factory=dict)  # kind -> sum
    latency_ms: Mapping[str, float] = field(default_factory=dict)  # "P95" -> ms, in window


@dataclass(frozen=True, slots=True)
class TraceLive:
    """The live trace series of one experiment, as last read."""

    totals: NamedValues
    by_name: Mapping[str, NamedValues] = field(default_factory=dict)  # bounded trace names
    cost_usd: float | None = None
    assessments: Mapping[str, int] = field(default_factory=dict)  # name -> held
    assessment_means: Mapping[str, float] = field(default_factory=dict)  # name -> window mean
    names_cut: int = 0  # trace names left out by the bound
    last_trace_ms: int | None = None  # end of the newest history bucket holding traces


@dataclass(frozen=True, slots=True)
class BucketSample:
    """One history sample of one experiment's closed bucket."""

    experiment_id: str
    family: str
    labels: tuple[tuple[str, str], ...]
    bucket_ms: int
    value: float
