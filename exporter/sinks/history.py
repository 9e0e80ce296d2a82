"""Remote write as a history sink: every captured point at its own timestamp.

Each MLflow point becomes two samples at the point's timestamp: the value, in the series
`mlflow_<key>` named as for the Pushgateway, and its step, in `mlflow_metric_step` with the
same labels. The step is a series, never a label: a label per step would make a new series
for every step (unbounded cardinality).

Labels: `experiment_id`, `experiment_name`, `run_id` (shortened like the Pushgateway's),
`run_name`, `metric_key` (the original key). Receivers keep one value per series and
timestamp: of points sharing one, the highest step is sent and the others are set aside
(`duplicate_timestamp`). Samples older than `max_sample_age` are set aside (`too_old`)
without a request; receivers that refuse samples for their age or order get them split
out and set aside by the delivery loop.

The sink also consumes the trace history buckets (`consumes`, `plan_buckets`;
`trace_history.py`): a queued batch holds points or buckets, and `encode` renders either
when the batch is delivered, with the `run_id` length decided for the delivering cycle.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from exporter.config import RemoteWriteSettings
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.naming import label_value, metric_family_name
from exporter.sinks import remote_write as wire
from exporter.sinks import trace_history
from exporter.sinks.delivery import (
    POINTS,
    TRACE_BUCKETS,
    Outcome,
    Outgoing,
    Planned,
    Reply,
    reply_for,
)
from exporter.trace_model import BucketSample

STEP_FAMILY = "mlflow_metric_step"
SAMPLES_PER_POINT = 2

_REFUSALS = {
    wire.Verdict.TOO_OLD: "too_old",
    wire.Verdict.OUT_OF_ORDER: "out_of_order",
    wire.Verdict.REJECTED: "rejected",
}

Labels = tuple[tuple[str, str], ...]

FIXES = {
    "credentials": (
        "set REMOTE_WRITE_BEARER_TOKEN (remote_write.bearer_token) or REMOTE_WRITE_USERNAME/"
        "REMOTE_WRITE_PASSWORD to credentials the receiver accepts (or remote_write.headers)"
    ),
    "redirect": "set REMOTE_WRITE_URL (remote_write.url) to the URL it moved to",
    "endpoint": "check REMOTE_WRITE_URL (remote_write.url)",
}


@dataclass
class RemoteWriteSink:
    """The remote write `DeliverySink`; queue sizes and counts are in samples."""

    settings: RemoteWriteSettings
    run_id_length: Callable[[], int] = lambda: 12
    client: wire.RemoteWriteClient | None = None
    name: str = "remote_write"

    def __post_init__(self) -> None:
        if self.client is None:
            self.client = wire.RemoteWriteClient(self.settings)

    @property
    def budget_seconds(self) -> float:
        return self.settings.delivery_budget_seconds

    @property
    def max_attempts(self) -> int:
        return 0

    @property
    def queue_max_points(self) -> int:
        return self.settings.queue_max_samples

    @property
    def overflow(self) -> str:
        return self.settings.queue_overflow

    @property
    def consumes(self) -> frozenset[str]:
        """Captured points and the trace history buckets."""
        return frozenset({POINTS, TRACE_BUCKETS})

    # ------------------------------------------------------------------ encoding

    def plan(
        self,
        points: Sequence[MetricPoint],
        contexts: Mapping[str, RunContext],  # noqa: ARG002 - the protocol's; labels at encode
        now_ms: int,
    ) -> Planned:
        """Batches of at most `batch_size` samples; too old and same-timestamp points aside."""
        oldest = (
            now_ms - int(self.settings.max_sample_age * 1000)
            if self.settings.max_sample_age
            else None
        )
        keep, duplicates, too_old = _sort_out(points, oldest)
        refused = {
            reason: [group]
            for reason, group in (("too_old", too_old), ("duplicate_timestamp", duplicates))
            if group
        }
        per_batch = max(1, self.settings.batch_size // SAMPLES_PER_POINT)
        batches = [keep[start : start + per_batch] for start in range(0, len(keep), per_batch)]
        return Planned(batches, refused)

    def plan_buckets(self, samples: Sequence[BucketSample]) -> list[tuple[BucketSample, ...]]:
        """Trace buckets in batches of at most `batch_size` samples (one per bucket)."""
        return trace_history.plan_buckets(samples, self.settings.batch_size)

    def count(self, batch: CapturedBatch) -> int:
        """Samples: two per point (value and step), one per trace bucket."""
        return len(batch.points) * SAMPLES_PER_POINT + len(batch.buckets)

    def encode(self, batch: CapturedBatch) -> bytes:
        """A write request of the batch's points (labels with this cycle's `run_id`
        length) and buckets."""
        series = _series(batch.points, batch.contexts, self.run_id_length())
        return wire.encode([*series, *trace_history.bucket_series(batch.buckets)])

    # ------------------------------------------------------------------ sending

    def send(self, batch: Outgoing, timeout: float | None = None) -> Reply:
        assert self.client is not None
        sent = self.client.send(batch.body, timeout)
        if sent.verdict is wire.Verdict.ACCEPTED:
            return Reply(Outcome.ACCEPTED, status=sent.status)
        if sent.verdict is wire.Verdict.RETRY:
            return Reply(Outcome.RETRY, sent.message, sent.status, sent.retry_after)
        if sent.verdict is wire.Verdict.REJECTED and sent.status is not None:
            # By status, as for every sink: blocked by a setting, too large, or refused
            # points to bisect out.
            return reply_for(sent.status, sent.message, FIXES, location=sent.location)
        return Reply(
            Outcome.REFUSED,
            sent.message,
            sent.status,
            reason=_REFUSALS[sent.verdict],
            splittable=sent.verdict is not wire.Verdict.REJECTED,
        )


def _rank(p: MetricPoint) -> tuple[int, float]:
    """Which of two points at one timestamp a receiver gets: the higher step, then value
    (NaN lowest)."""
    return (p.step, -math.inf if math.isnan(p.value) else p.value)


def _sort_out(
    points: Iterable[MetricPoint], oldest_ms: int | None
) -> tuple[list[MetricPoint], list[MetricPoint], list[MetricPoint]]:
    """(points to send, same-timestamp losers, too old): per (run, key, timestamp) the point
    with the highest step (then value) is the one a receiver gets."""
    best: dict[tuple[str, str, int], MetricPoint] = {}
    losers, too_old = [], []
    for p in points:
        if oldest_ms is not None and p.timestamp_ms < oldest_ms:
            too_old.append(p)
            continue
        slot = (p.run_id, p.key, p.timestamp_ms)
        held = best.get(slot)
        if held is None:
            best[slot] = p
        elif _rank(p) > _rank(held):
            losers.append(held)
            best[slot] = p
        else:
            losers.append(p)
    keep = sorted(best.values(), key=lambda p: (p.run_id, p.key, p.timestamp_ms))
    return keep, losers, too_old


def _infinite(value: float) -> float:
    """MLflow's SQL store keeps ±inf as ±the largest float; send it as ±Inf again.

    Besides being what was logged, it matters: VictoriaMetrics stores a block's values as
    integers sharing one decimal exponent, and a value of 1.8e308 turns every other value
    of its block into 0.
    """
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def _series(
    points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], length: int
) -> list[wire.TimeSeries]:
    """The value and step series of these points. Points sharing a series and a timestamp
    (set aside as `duplicate_timestamp`, then replayed) each get their own series entry."""
    values: dict[tuple[str, str], list[MetricPoint]] = {}
    for p in points:
        values.setdefault((p.run_id, p.key), []).append(p)
    out = []
    for group in values.values():
        if len({p.timestamp_ms for p in group}) == len(group):
            out += _pair(group, contexts, length)
        else:
            out += [s for p in group for s in _pair([p], contexts, length)]
    return out


def _pair(
    points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], length: int
) -> list[wire.TimeSeries]:
    """The value and step series of points of one run and key at distinct timestamps."""
    run_id, key = points[0].run_id, points[0].key
    samples = [(p.timestamp_ms, _infinite(p.value)) for p in points]
    steps = [(p.timestamp_ms, float(p.step)) for p in points]
    ctx = contexts.get(run_id) or RunContext("", "", "", {})
    labels = {
        "experiment_id": ctx.experiment_id,
        "experiment_name": label_value(ctx.experiment_name),
        "run_id": run_id[:length],
        "run_name": label_value(ctx.run_name),
        "metric_key": key,
    }
    return [
        wire.TimeSeries.of(metric_family_name(key), labels, samples),
        wire.TimeSeries.of(STEP_FAMILY, labels, steps),
    ]
