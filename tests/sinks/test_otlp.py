"""The OTLP sink: encoding with the OpenTelemetry proto messages, answers as the OTLP/HTTP
spec says, and delivery through the framework's queue.

`FakePost` (`tests/fakes/__init__.py`) stands in for `requests.post`; bodies are decoded with the same
`opentelemetry-proto` messages a receiver uses. The queue is a real `StateStore` outbox.
"""

from __future__ import annotations

import gzip
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import requests
import structlog.testing
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsPartialSuccess,
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)

from exporter.config import OtlpSettings
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.sinks.delivery import Drainer, Outcome, Outgoing
from exporter.sinks.otlp import OtlpSink, data_point_count
from exporter.state import StateStore
from tests.fakes import FakeClock, FakePost, FakeResponse, FakeSleep
from tests.support.planned import enqueue, outgoing

URL = "https://otlp.vendor.example/v1/metrics"
RUN = "0123456789abcdef0123456789abcdef"
CONTEXTS = {RUN: RunContext("7", "churn", "lucky-fox", {})}


def settings(**overrides: Any) -> OtlpSettings:
    return OtlpSettings.model_validate({"enabled": True, "endpoint": URL, **overrides})


def sink(post: FakePost | None = None, **overrides: Any) -> OtlpSink:
    fake = cast("Callable[..., requests.Response]", post or FakePost())
    return OtlpSink(settings(**overrides), run_id_length=lambda: 12, post=fake)


def points(n: int, key: str = "val/loss") -> list[MetricPoint]:
    return [MetricPoint(RUN, key, 1.0 / (i + 1), i, 1_700_000_000_000 + i) for i in range(n)]


def decoded(body: bytes) -> list[tuple[str, int, float, dict[str, str]]]:
    """(metric name, time_unix_nano, value, attributes) of every data point of a body."""
    request = ExportMetricsServiceRequest.FromString(body)
    return [
        (
            m.name,
            dp.time_unix_nano,
            dp.as_double,
            {a.key: a.value.string_value for a in dp.attributes},
        )
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        for dp in m.gauge.data_points
    ]


def queued(body: bytes, points: int = 1) -> Outgoing:
    return Outgoing("key-1", points, body)


# ---------------------------------------------------------------------- encoding


def test_every_point_is_a_gauge_data_point_at_its_own_time_with_its_attributes() -> None:
    [batch] = outgoing(sink(), points(2), CONTEXTS)

    assert batch.points == 2
    attributes = {
        "metric_key": "val/loss",
        "run_id": RUN[:12],
        "run_name": "lucky-fox",
        "experiment_id": "7",
        "experiment_name": "churn",
    }
    assert decoded(batch.body) == [
        ("mlflow_val_loss", 1_700_000_000_000 * 1_000_000, 1.0, attributes),
        ("mlflow_val_loss", 1_700_000_000_001 * 1_000_000, 0.5, attributes),
    ]
    request = ExportMetricsServiceRequest.FromString(batch.body)
    [resource] = request.resource_metrics
    assert {a.key: a.value.string_value for a in resource.resource.attributes} == {
        "service.name": "mlflow-monitoring"
    }
    assert resource.scope_metrics[0].scope.name == "mlflow-monitoring"


def test_the_run_id_attribute_follows_the_length_decided_for_the_cycle() -> None:
    length = [12]
    s = OtlpSink(settings(), run_id_length=lambda: length[0])
    batch = CapturedBatch(tuple(points(1)), CONTEXTS, created_ms=0)
    at_capture = s.encode(batch)
    length[0] = 14  # a later cycle, when the batch is delivered

    assert decoded(at_capture)[0][3]["run_id"] == RUN[:12]
    assert decoded(s.encode(batch))[0][3]["run_id"] == RUN[:14]


def test_mlflows_stored_infinities_and_nan_go_out_as_such() -> None:
    values = [sys.float_info.max, -sys.float_info.max, math.nan]
    pts = [MetricPoint(RUN, "x", v, i, 1_000 + i) for i, v in enumerate(values)]

    [batch] = outgoing(sink(service_name="ml"), pts, CONTEXTS)

    got = [v for _, _, v, _ in decoded(batch.body)]
    assert got[:2] == [math.inf, -math.inf]
    assert math.isnan(got[2])


def test_batches_hold_at_most_batch_size_points() -> None:
    s = sink(batch_size=4)
    pts = points(5) + points(3, key="acc")

    batches = outgoing(s, pts, CONTEXTS)

    assert [b.points for b in batches] == [4, 4]
    assert data_point_count(batches[1].body) == 4
    assert [v for _, _, v, _ in decoded(batches[1].body)] == [0.2, 1.0, 0.5, 1 / 3]


def test_a_batch_encodes_to_the_same_body_every_time() -> None:
    s = sink()
    batch = CapturedBatch(tuple(points(3)), CONTEXTS, created_ms=5)

    assert s.encode(batch) == s.encode(batch)
    assert s.count(batch) == 3


# ---------------------------------------------------------------------- sending


def test_a_batch_is_posted_as_gzip_protobuf_with_the_vendor_headers() -> None:
    post = FakePost()
    s = sink(post, compression="gzip", headers={"DD-API-KEY": "k-123"})
    [batch] = outgoing(s, points(1), CONTEXTS)

    reply = s.send(queued(batch.body), timeout=3)

    assert reply.outcome is Outcome.ACCEPTED
    [call] = post.calls
    assert call.url == URL
    assert call.timeout == 3
    assert call.headers["Content-Type"] == "application/x-protobuf"
    assert call.headers["Content-Encoding"] == "gzip"
    assert call.headers["DD-API-KEY"] == "k-123"
    assert gzip.decompress(call.data) == batch.body


def test_a_redirect_to_another_origin_carries_no_vendor_header_only_the_body_and_its_type() -> None:
    moved = FakeResponse(307, "", {"Location": "https://elsewhere.example/v1/metrics"})
    post = FakePost([moved, 200])
    vendor = {"DD-API-KEY": "k-123", "x-honeycomb-team": "team-key", "X-Scope-OrgID": "t1"}
    s = sink(post, compression="gzip", headers=vendor)
    [batch] = outgoing(s, points(1), CONTEXTS)

    reply = s.send(queued(batch.body), timeout=3)

    assert reply.outcome is Outcome.ACCEPTED
    first, second = post.calls
    assert vendor.items() <= first.headers.items()
    assert second.url == "https://elsewhere.example/v1/metrics"
    assert set(second.headers) == {"Content-Type", "Content-Encoding", "User-Agent"}
    assert second.data == first.data


def test_without_compression_the_body_goes_as_it_is() -> None:
    post = FakePost()
    s = sink(post)

    s.send(queued(b"raw"))

    assert post.calls[0].data == b"raw"
    assert "Content-Encoding" not in post.calls[0].headers


@pytest.mark.parametrize("status", [429, 502, 503, 504])
def test_the_spec_retryable_statuses_are_retried_honouring_retry_after(status: int) -> None:
    post = FakePost([FakeResponse(status, "busy", {"Retry-After": "7"})])

    reply = sink(post).send(queued(b""))

    assert reply.outcome is Outcome.RETRY
    assert reply.retry_after == 7
    assert f"answered HTTP {status}" in reply.message


@pytest.mark.parametrize(
    ("status", "outcome", "reason"),
    [
        (400, Outcome.REFUSED, "rejected"),
        (413, Outcome.REFUSED, "too_large"),
        (409, Outcome.REFUSED, "rejected"),
        (401, Outcome.BLOCKED, "rejected"),
        (404, Outcome.BLOCKED, "rejected"),
        (500, Outcome.RETRY, "rejected"),
    ],
)
def test_other_statuses_mean_what_they_mean_for_every_sink(
    status: int, outcome: Outcome, reason: str
) -> None:
    reply = sink(FakePost([status])).send(queued(b""))

    assert reply.outcome is outcome
    assert reply.reason == reason


def test_a_refused_key_is_named_with_the_setting_to_fix_and_never_echoed() -> None:
    post = FakePost([FakeResponse(403, "bad key x-honeycomb-team: hc-secret-9", {})])

    reply = sink(post, headers={"x-honeycomb-team": "hc-secret-9"}).send(queued(b""))

    assert reply.outcome is Outcome.BLOCKED
    assert reply.cause == "credentials"
    assert "hc-secret-9" not in reply.message
    assert "OTEL_EXPORTER_OTLP_HEADERS" in reply.message


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (requests.ConnectionError("refused"), "cannot reach the OTLP endpoint"),
        (requests.Timeout("slow"), "timed out after 10s"),
    ],
)
def test_an_unreachable_or_slow_endpoint_is_retried(error: Exception, words: str) -> None:
    reply = sink(FakePost([error])).send(queued(b""))

    assert reply.outcome is Outcome.RETRY
    assert words in reply.message


def test_a_partial_success_is_accepted_counted_and_logged() -> None:
    answer = ExportMetricsServiceResponse(
        partial_success=ExportMetricsPartialSuccess(
            rejected_data_points=2, error_message="2 points too old"
        )
    )
    post = FakePost([FakeResponse(200, "", {}, answer.SerializeToString())])
    s = sink(post)

    with structlog.testing.capture_logs() as logs:
        reply = s.send(queued(b"", points=5))

    assert reply.outcome is Outcome.ACCEPTED
    assert reply.dropped_by_receiver == 2
    [line] = [e for e in logs if e["event"] == "otlp.partial_success"]
    assert line["rejected_data_points"] == 2
    assert line["error_message"] == "2 points too old"


def test_an_answer_that_is_not_protobuf_still_counts_its_2xx() -> None:
    s = sink(FakePost([FakeResponse(200, "{}", {}, b"\xff\xff not protobuf")]))

    reply = s.send(queued(b""))

    assert reply.outcome is Outcome.ACCEPTED
    assert reply.dropped_by_receiver == 0


# ---------------------------------------------------------------------- delivery


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path)
    yield store
    store.close()


def test_a_receiver_down_then_up_gets_each_point_once_and_a_refused_point_is_set_aside(
    state: StateStore,
) -> None:
    clock = FakeClock(1_700_000_000.0)
    post = FakePost([503, 503, 200, 400, 400, 200])
    s = sink(post, batch_size=2)
    outbox = state.outbox("otlp")
    enqueue(state, s, points(4), CONTEXTS)

    drained = Drainer(s, outbox, clock, FakeSleep(clock)).drain()

    assert drained.points == 3
    assert drained.set_aside == {"rejected": 1}
    assert outbox.totals().points == 0
    assert len(post.calls) == 6  # two 503s, the first batch, the second whole then halved
    accepted = [p for call in (post.calls[2], post.calls[5]) for p in decoded(call.data)]
    assert [v for _, _, v, _ in accepted] == [1.0, 0.5, 0.25]
    [aside] = outbox.set_aside_batches("rejected")
    assert aside.points == 1
