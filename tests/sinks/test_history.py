"""Unit tests for exporter.sinks.history: captured points as remote write value and step series.

Bodies are decoded with `remote_write.decode`; answers come from `FakePost` through a real
`RemoteWriteClient` (no socket).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import requests

from exporter.config import RemoteWriteSettings
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.naming import MAX_LABEL_VALUE
from exporter.sinks import remote_write as rw
from exporter.sinks.delivery import Outcome, Outgoing, Reply, queue_entries
from exporter.sinks.history import STEP_FAMILY, RemoteWriteSink
from exporter.sinks.trace_history import plan_buckets
from exporter.trace_model import BucketSample
from tests.fakes import FakePost, FakeResponse

URL = "http://receiver.test:9090/api/v1/write"
NOW_MS = 1_795_000_000_000
RUN = "0123456789abcdef0123456789abcdef"
CONTEXTS = {RUN: RunContext("7", "churn model", "brave-owl", {"team": "ml"})}


def make_sink(post: Any = None, length: int = 12, **overrides: Any) -> RemoteWriteSink:
    settings = RemoteWriteSettings(enabled=True, url=URL, **overrides)
    client = rw.RemoteWriteClient(settings, post=post or FakePost())
    return RemoteWriteSink(settings, run_id_length=lambda: length, client=client)


def point(
    key: str = "val/loss", value: float = 0.5, step: int = 1, ts: int = NOW_MS, run: str = RUN
) -> MetricPoint:
    return MetricPoint(run, key, value, step, ts)


@dataclass
class Encoded:
    """What the sink would send (`batches`) and set aside (`refused`), encoded."""

    batches: list[Outgoing]
    refused: dict[str, list[Outgoing]]


def encode(
    sink: RemoteWriteSink,
    points: Sequence[MetricPoint],
    contexts: Mapping[str, RunContext],
    now_ms: int,
) -> Encoded:
    """The sink's plan of these points, each group captured then encoded as at delivery."""
    planned = sink.plan(points, contexts, now_ms)

    def bodies(groups: Sequence[Sequence[MetricPoint]]) -> list[Outgoing]:
        entries = queue_entries(sink, groups, contexts, now_ms)
        return [Outgoing(e.idempotency_key, e.points, sink.encode(e.batch)) for e in entries]

    return Encoded(
        bodies(planned.batches), {r: bodies(groups) for r, groups in planned.refused.items()}
    )


def series_of(batches: list[Outgoing]) -> dict[tuple[tuple[str, str], ...], list[Any]]:
    """Labels -> samples over all bodies."""
    out: dict[tuple[tuple[str, str], ...], list[Any]] = {}
    for b in batches:
        for ts in rw.decode(b.body):
            out.setdefault(ts.labels, []).extend(ts.samples)
    return out


def labels(name: str, **extra: str) -> tuple[tuple[str, str], ...]:
    base = {
        "__name__": name,
        "experiment_id": "7",
        "experiment_name": "churn model",
        "run_id": RUN[:12],
        "run_name": "brave-owl",
        "metric_key": "val/loss",
    }
    return tuple(sorted({**base, **extra}.items()))


def queued(b: Outgoing) -> Outgoing:
    return b


# ---------------------------------------------------------------- labels and series


def test_a_point_becomes_a_value_sample_and_a_step_sample_with_the_same_labels() -> None:
    encoded = encode(make_sink(), [point(value=0.25, step=40)], CONTEXTS, NOW_MS)

    assert series_of(encoded.batches) == {
        labels("mlflow_val_loss"): [(NOW_MS, 0.25)],
        labels(STEP_FAMILY): [(NOW_MS, 40.0)],
    }
    assert encoded.refused == {}


def test_the_run_id_label_is_cut_to_the_length_in_force_when_encoding() -> None:
    length = [12]
    s = make_sink()
    s.run_id_length = lambda: length[0]
    batch = CapturedBatch((point(),), CONTEXTS)
    [at_capture, _] = rw.decode(s.encode(batch))
    length[0] = 16  # a later cycle, when the queued batch is delivered

    [ts, _] = rw.decode(s.encode(batch))

    assert dict(at_capture.labels)["run_id"] == RUN[:12]
    assert dict(ts.labels)["run_id"] == RUN[:16]


def test_the_series_name_comes_from_naming_and_metric_key_keeps_the_original_key() -> None:
    encoded = encode(
        make_sink(), [point(key="train.f1 score"), point(key="x_total")], CONTEXTS, NOW_MS
    )

    names = {(dict(k)["__name__"], dict(k)["metric_key"]) for k in series_of(encoded.batches)}
    assert names == {
        ("mlflow_train_f1_score", "train.f1 score"),
        ("mlflow_x_total_value", "x_total"),
        (STEP_FAMILY, "train.f1 score"),
        (STEP_FAMILY, "x_total"),
    }


def test_long_names_are_cut_like_pushgateway_labels_and_unknown_runs_get_empty_labels() -> None:
    contexts = {RUN: RunContext("7", "e" * 400, "r" * 400, {})}
    other = "f" * 32
    encoded = encode(make_sink(), [point(), point(run=other)], contexts, NOW_MS)

    found = {dict(k)["run_id"]: dict(k) for k in series_of(encoded.batches)}
    assert len(found[RUN[:12]]["experiment_name"]) == MAX_LABEL_VALUE
    assert found[RUN[:12]]["run_name"].endswith("…")
    assert (found[other[:12]]["experiment_id"], found[other[:12]]["run_name"]) == ("", "")


def test_non_finite_values_are_sent_as_they_are() -> None:
    pts = [point(value=math.nan, ts=NOW_MS), point(value=math.inf, ts=NOW_MS + 1, step=2)]
    samples = series_of(encode(make_sink(), pts, CONTEXTS, NOW_MS).batches)[
        labels("mlflow_val_loss")
    ]
    assert math.isnan(samples[0][1])
    assert samples[1][1] == math.inf


# ---------------------------------------------------------------- batches count samples


def test_batch_size_counts_samples_two_per_point() -> None:
    pts = [point(ts=NOW_MS + i, step=i) for i in range(5)]

    batches = encode(make_sink(batch_size=4), pts, CONTEXTS, NOW_MS).batches

    assert [b.points for b in batches] == [4, 4, 2]
    assert [rw.sample_count(b.body) for b in batches] == [4, 4, 2]
    assert len({b.idempotency_key for b in batches}) == 3


def test_an_odd_batch_size_never_exceeds_its_sample_count() -> None:
    pts = [point(ts=NOW_MS + i, step=i) for i in range(5)]
    batches = encode(make_sink(batch_size=5), pts, CONTEXTS, NOW_MS).batches
    assert [b.points for b in batches] == [4, 4, 2]


# ---------------------------------------------------------------- set aside before sending


def test_of_two_points_sharing_a_timestamp_the_higher_step_is_sent_and_the_other_refused() -> None:
    pts = [point(step=5, value=0.5), point(step=3, value=0.3)]

    encoded = encode(make_sink(), pts, CONTEXTS, NOW_MS)

    assert series_of(encoded.batches) == {
        labels("mlflow_val_loss"): [(NOW_MS, 0.5)],
        labels(STEP_FAMILY): [(NOW_MS, 5.0)],
    }
    assert list(encoded.refused) == ["duplicate_timestamp"]
    assert series_of(encoded.refused["duplicate_timestamp"]) == {
        labels("mlflow_val_loss"): [(NOW_MS, 0.3)],
        labels(STEP_FAMILY): [(NOW_MS, 3.0)],
    }
    assert sum(b.points for b in encoded.refused["duplicate_timestamp"]) == 2


def test_the_higher_step_wins_whichever_comes_first() -> None:
    encoded = encode(
        make_sink(), [point(step=3, value=0.3), point(step=5, value=0.5)], CONTEXTS, NOW_MS
    )
    assert series_of(encoded.batches)[labels(STEP_FAMILY)] == [(NOW_MS, 5.0)]


def test_of_three_points_sharing_a_timestamp_the_highest_step_is_sent_and_two_refused() -> None:
    pts = [point(step=1, value=0.1), point(step=5, value=0.5), point(step=3, value=0.3)]

    encoded = encode(make_sink(), pts, CONTEXTS, NOW_MS)

    assert series_of(encoded.batches)[labels(STEP_FAMILY)] == [(NOW_MS, 5.0)]
    assert sum(b.points for b in encoded.refused["duplicate_timestamp"]) == 4


def test_too_old_points_sharing_a_timestamp_are_all_refused_as_too_old() -> None:
    old = NOW_MS - 7_200_000
    pts = [point(ts=old, step=1), point(ts=old, step=2)]

    encoded = encode(make_sink(max_sample_age="1h"), pts, CONTEXTS, NOW_MS)

    assert sum(b.points for b in encoded.refused["too_old"]) == 4


def test_of_same_step_points_sharing_a_timestamp_the_higher_value_is_sent() -> None:
    encoded = encode(make_sink(), [point(value=0.9), point(value=0.2)], CONTEXTS, NOW_MS)
    assert series_of(encoded.batches)[labels("mlflow_val_loss")] == [(NOW_MS, 0.9)]


def test_of_same_step_negative_points_sharing_a_timestamp_the_higher_value_is_sent() -> None:
    encoded = encode(make_sink(), [point(value=-1.0), point(value=-2.0)], CONTEXTS, NOW_MS)
    assert series_of(encoded.batches)[labels("mlflow_val_loss")] == [(NOW_MS, -1.0)]


def test_points_at_different_timestamps_or_of_other_series_are_not_duplicates() -> None:
    pts = [point(ts=NOW_MS), point(ts=NOW_MS + 1), point(key="acc"), point(run="f" * 32)]
    encoded = encode(make_sink(), pts, {**CONTEXTS, "f" * 32: CONTEXTS[RUN]}, NOW_MS)
    assert encoded.refused == {}
    assert sum(b.points for b in encoded.batches) == 8


def test_points_older_than_max_sample_age_are_refused_as_too_old_without_a_request() -> None:
    post = FakePost()
    hour = 3_600_000
    pts = [point(ts=NOW_MS - hour - 1, step=1), point(ts=NOW_MS - hour, step=2), point(step=3)]

    encoded = encode(make_sink(post, max_sample_age="1h"), pts, CONTEXTS, NOW_MS)

    assert list(encoded.refused) == ["too_old"]
    assert series_of(encoded.refused["too_old"])[labels(STEP_FAMILY)] == [(NOW_MS - hour - 1, 1.0)]
    sent = series_of(encoded.batches)[labels(STEP_FAMILY)]
    assert sent == [(NOW_MS - hour, 2.0), (NOW_MS, 3.0)]  # the boundary itself is kept
    assert post.calls == []


def test_without_max_sample_age_no_point_is_too_old() -> None:
    encoded = encode(make_sink(), [point(ts=0)], CONTEXTS, NOW_MS)
    assert encoded.refused == {}


# ---------------------------------------------------------------- queued batches


def test_a_queued_batch_encodes_to_the_same_body_every_time_and_counts_two_per_point() -> None:
    batch = CapturedBatch((point(ts=NOW_MS), point(ts=NOW_MS + 1, step=2)), CONTEXTS, created_ms=1)
    s = make_sink()

    assert s.encode(batch) == s.encode(batch)
    assert s.count(batch) == 4
    assert rw.sample_count(s.encode(batch)) == 4


def test_points_set_aside_for_sharing_a_timestamp_encode_as_one_series_entry_each() -> None:
    # A replayed `duplicate_timestamp` batch still encodes: the receiver decides.
    batch = CapturedBatch((point(step=1, value=0.1), point(step=2, value=0.2)), CONTEXTS)

    series = rw.decode(make_sink().encode(batch))

    assert [(dict(ts.labels)["__name__"], ts.samples) for ts in series] == [
        ("mlflow_val_loss", ((NOW_MS, 0.1),)),
        (STEP_FAMILY, ((NOW_MS, 1.0),)),
        ("mlflow_val_loss", ((NOW_MS, 0.2),)),
        (STEP_FAMILY, ((NOW_MS, 2.0),)),
    ]


def test_trace_buckets_are_encoded_as_their_own_series_one_sample_each() -> None:
    labels_ = (("experiment_id", "7"), ("status", "OK"))
    buckets = tuple(
        BucketSample("7", "mlflow_trace_history", labels_, NOW_MS + i * 60_000, float(i))
        for i in (1, 0)
    )
    batch = CapturedBatch(buckets=buckets, created_ms=NOW_MS)
    s = make_sink()

    [ts] = rw.decode(s.encode(batch))

    assert dict(ts.labels) == {"__name__": "mlflow_trace_history", **dict(labels_)}
    assert ts.samples == ((NOW_MS, 0.0), (NOW_MS + 60_000, 1.0))
    assert s.count(batch) == 2


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    ("answer", "outcome", "reason", "splittable"),
    [
        (FakeResponse(400, "out of bounds\n"), Outcome.REFUSED, "too_old", True),
        (FakeResponse(500, "too old sample\n"), Outcome.REFUSED, "too_old", True),
        (FakeResponse(400, "out of order sample\n"), Outcome.REFUSED, "out_of_order", True),
        (
            FakeResponse(400, "duplicate sample for timestamp\n"),
            Outcome.REFUSED,
            "out_of_order",
            True,
        ),
        (FakeResponse(400, "snappy: corrupt input\n"), Outcome.REFUSED, "rejected", True),
        (FakeResponse(409, "conflict\n"), Outcome.REFUSED, "rejected", False),
        (FakeResponse(413, "too large\n"), Outcome.REFUSED, "too_large", True),
        (FakeResponse(401, "unauthorized\n"), Outcome.BLOCKED, "rejected", False),
    ],
)
def test_refusals_map_to_set_aside_reasons_and_age_or_order_ones_can_be_split(
    answer: FakeResponse, outcome: Outcome, reason: str, splittable: bool
) -> None:
    reply = make_sink(FakePost([answer])).send(queued(Outgoing("k", 2, b"")))

    assert (reply.outcome, reply.reason, reply.splittable) == (outcome, reason, splittable)
    assert reply.status == answer.status_code
    assert f"HTTP {answer.status_code}" in reply.message


def test_an_accepted_request_is_accepted() -> None:
    reply = make_sink(FakePost([FakeResponse(204, "")])).send(queued(Outgoing("k", 2, b"")))
    assert reply == Reply(Outcome.ACCEPTED, status=204)


def test_a_busy_receiver_means_retry_after_what_it_asks() -> None:
    busy = FakeResponse(503, "unavailable\n", {"Retry-After": "7"})

    reply = make_sink(FakePost([busy])).send(queued(Outgoing("k", 2, b"")))

    assert (reply.outcome, reply.status, reply.retry_after) == (Outcome.RETRY, 503, 7.0)


def test_a_connection_error_means_retry_without_a_status() -> None:
    post = FakePost([requests.ConnectionError("Connection refused")])
    reply = make_sink(post).send(queued(Outgoing("k", 2, b"")))
    assert (reply.outcome, reply.status) == (Outcome.RETRY, None)
    assert URL in reply.message


def test_the_body_and_remote_write_headers_are_posted() -> None:
    post = FakePost([204])
    [b] = encode(make_sink(post), [point()], CONTEXTS, NOW_MS).batches

    make_sink(post).send(queued(b))

    assert post.calls[0].data == b.body
    assert post.calls[0].headers["Content-Encoding"] == "snappy"


# ---------------------------------------------------------------- settings


def test_queue_settings_come_from_the_remote_write_section_and_attempts_are_unbounded() -> None:
    s = make_sink(queue_max_samples=99, queue_overflow="drop_newest", delivery_budget_seconds=9)
    assert (s.queue_max_points, s.overflow, s.budget_seconds, s.max_attempts) == (
        99,
        "drop_newest",
        9.0,
        0,
    )
    assert s.name == "remote_write"


def test_a_sink_without_a_client_makes_one_from_its_settings() -> None:
    settings = RemoteWriteSettings(enabled=True, url=URL)
    s = RemoteWriteSink(settings)
    assert isinstance(s.client, rw.RemoteWriteClient)
    assert s.client.settings is settings
    assert s.run_id_length() == 12


def test_trace_buckets_are_planned_in_batches_of_batch_size_each_series_in_time_order() -> None:
    a, b = (("status", "OK"),), (("status", "ERROR"),)
    samples = [
        BucketSample("7", "f", a, NOW_MS + 60_000, 2.0),
        BucketSample("7", "f", b, NOW_MS, 9.0),
        BucketSample("7", "f", a, NOW_MS, 1.0),
    ]

    groups = plan_buckets(samples, batch_size=2)

    assert [[(s.labels, s.bucket_ms - NOW_MS) for s in g] for g in groups] == [
        [(b, 0), (a, 0)],
        [(a, 60_000)],
    ]
