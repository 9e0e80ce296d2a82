"""Trace history buckets as remote write request bodies, queued on the remote write sink's
own queue (same retries, splitting, set-aside and self-metrics as run points).

A sample's timestamp is its bucket's start; labels are the experiment's and the series'
own (`status`, `quantile`, `kind`, `assessment_name`).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from exporter.naming import label_value
from exporter.sinks import remote_write as wire
from exporter.state.outbox import EncodedBatch
from exporter.trace_model import BucketSample


def encode_buckets(samples: Sequence[BucketSample], batch_size: int) -> list[EncodedBatch]:
    """Batches of at most `batch_size` samples, each series' samples in time order."""
    ordered = sorted(samples, key=lambda s: (s.family, s.labels, s.bucket_ms))
    batches = []
    for start in range(0, len(ordered), max(1, batch_size)):
        chunk = ordered[start : start + batch_size]
        series: dict[tuple[str, tuple[tuple[str, str], ...]], list[tuple[int, float]]] = {}
        for s in chunk:
            series.setdefault((s.family, s.labels), []).append((s.bucket_ms, s.value))
        body = wire.encode(
            [
                wire.TimeSeries.of(family, {k: label_value(v) for k, v in labels}, points)
                for (family, labels), points in series.items()
            ]
        )
        batches.append(EncodedBatch(str(uuid.uuid4()), len(chunk), body))
    return batches
