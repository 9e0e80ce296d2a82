"""Trace history buckets for the remote write sink's own queue (same retries, splitting,
set-aside and self-metrics as run points).

`plan_buckets` groups a cycle's buckets into queued batches; `bucket_series` renders a
batch's buckets as remote write series when the sink delivers it. A sample's timestamp is
its bucket's start; labels are the experiment's and the series' own (`status`,
`quantile`, `kind`, `assessment_name`).
"""

from __future__ import annotations

from collections.abc import Sequence

from exporter.naming import label_value
from exporter.sinks import remote_write as wire
from exporter.trace_model import BucketSample


def plan_buckets(
    samples: Sequence[BucketSample], batch_size: int
) -> list[tuple[BucketSample, ...]]:
    """Batches of at most `batch_size` samples, each series' samples in time order."""
    ordered = sorted(samples, key=lambda s: (s.family, s.labels, s.bucket_ms))
    size = max(1, batch_size)
    return [tuple(ordered[start : start + size]) for start in range(0, len(ordered), size)]


def bucket_series(samples: Sequence[BucketSample]) -> list[wire.TimeSeries]:
    """The series of some buckets (one per family and labels)."""
    series: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[int, float]]] = {}
    for s in samples:
        series.setdefault((s.family, s.labels), []).append((s.bucket_ms, s.value))
    return [
        wire.TimeSeries.of(family, {k: label_value(v) for k, v in labels}, points)
        for (family, labels), points in series.items()
    ]
