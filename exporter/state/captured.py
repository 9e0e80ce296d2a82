"""The stored form of a queued batch: a `CapturedBatch` as compact, compressed JSON.

Version 1 is `{"v": 1, "created_ms": ..., "runs": {run_id: [experiment_id, experiment_name,
run_name, tags]}, "points": [[run_id, key, value, step, timestamp_ms], ...], "buckets":
[[experiment_id, family, [[name, value], ...], bucket_ms, value], ...]}`, zlib-compressed.

Values round-trip exactly: a finite float is written as Python writes it (the shortest text
that reads back as the same float, so MLflow's ±max-float and -0.0 stay what they are), and
NaN and ±inf, which JSON lacks, as a string of their 64 bits in hex (`"7ff0000000000000"`).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from typing import Any

from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.trace_model import BucketSample

VERSION = 1


def _value(value: float) -> float | str:
    if math.isfinite(value):
        return value
    return struct.pack(">d", value).hex()


def _float(value: float | str) -> float:
    if isinstance(value, str):
        return float(struct.unpack(">d", bytes.fromhex(value))[0])
    return float(value)


def dumps(batch: CapturedBatch) -> bytes:
    """The stored bytes of a batch."""
    body: dict[str, Any] = {
        "v": VERSION,
        "created_ms": batch.created_ms,
        "runs": {
            run_id: [c.experiment_id, c.experiment_name, c.run_name, dict(c.tags)]
            for run_id, c in sorted(batch.contexts.items())
        },
        "points": [
            [p.run_id, p.key, _value(p.value), p.step, p.timestamp_ms] for p in batch.points
        ],
        "buckets": [
            [
                b.experiment_id,
                b.family,
                [list(pair) for pair in b.labels],
                b.bucket_ms,
                _value(b.value),
            ]
            for b in batch.buckets
        ],
    }
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return zlib.compress(text.encode())


def loads(data: bytes) -> CapturedBatch:
    """A batch from its stored bytes; ValueError if they are not a batch of a known version."""
    try:
        body = json.loads(zlib.decompress(data))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not a stored batch: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != VERSION:
        version = body.get("v") if isinstance(body, dict) else None
        raise ValueError(f"stored batch of version {version!r}, this exporter reads {VERSION}")
    return CapturedBatch(
        points=tuple(
            MetricPoint(run_id, key, _float(value), int(step), int(ts))
            for run_id, key, value, step, ts in body["points"]
        ),
        contexts={
            run_id: RunContext(exp_id, exp_name, run_name, dict(tags))
            for run_id, (exp_id, exp_name, run_name, tags) in body["runs"].items()
        },
        buckets=tuple(
            BucketSample(exp_id, family, tuple((k, v) for k, v in labels), int(ms), _float(value))
            for exp_id, family, labels, ms, value in body["buckets"]
        ),
        created_ms=int(body["created_ms"]),
    )
