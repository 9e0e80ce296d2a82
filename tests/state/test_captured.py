"""Unit tests for exporter.state.captured: the stored form of a queued batch round-trips
exactly (every float, NaN and the infinities included), is compact and says its version."""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.state import captured
from exporter.trace_model import BucketSample

CONTEXT = RunContext("7", "churn ✓", "brave-owl", {"team": "ml", "note": "ü"})


def bits(value: float) -> bytes:
    return struct.pack(">d", value)


@pytest.mark.parametrize(
    "value",
    [
        0.0,
        -0.0,
        0.1,
        1 / 3,
        5e-324,
        sys.float_info.max,  # MLflow's SQL store keeps +inf as this
        -sys.float_info.max,
        math.inf,
        -math.inf,
        math.nan,
        -math.nan,
    ],
)
def test_a_value_comes_back_with_the_same_bits(value: float) -> None:
    batch = CapturedBatch(
        (MetricPoint("run-a", "loss", value, 3, 1_700_000_000_000),),
        {"run-a": CONTEXT},
        (BucketSample("7", "f", (("status", "OK"),), 60_000, value),),
        created_ms=5,
    )

    back = captured.loads(captured.dumps(batch))

    assert bits(back.points[0].value) == bits(value)
    assert bits(back.buckets[0].value) == bits(value)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["run-a", "run-b"]),
            st.text(min_size=1, max_size=20),
            st.floats(allow_nan=False),
            st.integers(min_value=-(2**63), max_value=2**63 - 1),
            st.integers(min_value=0, max_value=2**62),
        ),
        max_size=20,
    ),
    st.integers(min_value=0, max_value=2**62),
)
def test_any_batch_of_points_round_trips_exactly(
    rows: list[tuple[str, str, float, int, int]], created_ms: int
) -> None:
    points = tuple(MetricPoint(r, k, v, s, t) for r, k, v, s, t in rows)
    contexts = dict.fromkeys({p.run_id for p in points}, CONTEXT)
    batch = CapturedBatch(points, contexts, created_ms=created_ms)

    back = captured.loads(captured.dumps(batch))

    assert back == batch
    assert [bits(p.value) for p in back.points] == [bits(p.value) for p in points]


def test_trace_buckets_and_their_labels_round_trip() -> None:
    labels = (("experiment_id", "7"), ("quantile", "0.95"))
    batch = CapturedBatch(buckets=(BucketSample("7", "mlflow_trace_latency", labels, 60_000, 1.5),))

    assert captured.loads(captured.dumps(batch)) == batch


def test_the_stored_form_is_compressed_versioned_json() -> None:
    batch = CapturedBatch(
        (MetricPoint("run-a", "loss", 0.5, 1, 2),), {"run-a": CONTEXT}, created_ms=9
    )

    body = json.loads(zlib.decompress(captured.dumps(batch)))

    assert body["v"] == 1
    assert body["created_ms"] == 9
    assert body["points"] == [["run-a", "loss", 0.5, 1, 2]]
    assert body["runs"] == {"run-a": ["7", "churn ✓", "brave-owl", {"team": "ml", "note": "ü"}]}


def test_the_same_batch_is_stored_as_the_same_bytes() -> None:
    batch = CapturedBatch(
        (MetricPoint("run-b", "x", 1.0, 1, 2), MetricPoint("run-a", "x", 2.0, 1, 2)),
        {"run-b": CONTEXT, "run-a": CONTEXT},
    )
    assert captured.dumps(batch) == captured.dumps(batch)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"not zlib", "not a stored batch"),
        (zlib.compress(b'{"v": 2, "points": []}'), "version 2"),
        (zlib.compress(b"[]"), "version None"),
    ],
)
def test_bytes_that_are_not_a_stored_batch_of_this_version_are_refused(
    data: bytes, words: str
) -> None:
    with pytest.raises(ValueError, match=words):
        captured.loads(data)
