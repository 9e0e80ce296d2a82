"""OTLP metrics as a history sink: every captured point at its own time, for vendors.

Each batch is one `ExportMetricsServiceRequest` (the `opentelemetry-proto` messages) sent
over OTLP/HTTP as protobuf, gzip-compressed when `otlp.compression` says so. A point becomes
one gauge data point at its own `time_unix_nano`, in the metric named as for Prometheus
(`val/loss` -> `mlflow_val_loss`), with the attributes `metric_key` (the original key),
`run_id` (shortened like the Prometheus label, decided for the cycle), `run_name`,
`experiment_id` and `experiment_name`; the resource carries `service.name`.

Answers follow the OTLP/HTTP specification: 2xx is delivered, and a `partial_success` in
its body (points the receiver dropped: never to be retried) is logged and counted; 429,
502, 503 and 504 are retried with backoff, honouring `Retry-After`; any other status means
what it means for every sink (`delivery.reply_for`: credentials and URLs block the sink
with the points kept, 400 and 413 split the batch until the refused points are set aside,
other 4xx set aside, other 5xx retried: a retry within the budget costs nothing).
Batches are planned by count at capture and encoded at delivery (the `run_id` length is
the delivering cycle's). Queueing, retries, splitting and set-aside are the delivery
framework's.
"""

from __future__ import annotations

import gzip
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
import structlog
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    Gauge,
    Metric,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from exporter import __version__
from exporter.config import OtlpSettings
from exporter.logs import redact
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.naming import label_value, metric_family_name
from exporter.sinks.delivery import (
    POINTS,
    Outcome,
    Outgoing,
    Planned,
    Reply,
    post_batch,
    reply_for,
    retry_after_seconds,
)

log = structlog.get_logger("exporter.sinks.otlp")

SCOPE = "mlflow-monitoring"
# The OTLP/HTTP specification's retryable statuses; others are what they are for any sink.
RETRYABLE = frozenset({429, 502, 503, 504})
FIXES = {
    "credentials": (
        "set OTEL_EXPORTER_OTLP_HEADERS (otlp.headers) to the key the endpoint expects, "
        "e.g. api-key=..., DD-API-KEY=... or x-honeycomb-team=..."
    ),
    "redirect": "set OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (otlp.endpoint) to the URL it moved to",
    "endpoint": (
        "check OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (otlp.endpoint; with "
        "OTEL_EXPORTER_OTLP_ENDPOINT, /v1/metrics is appended)"
    ),
}


def _text(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))


def _finite_or_infinite(value: float) -> float:
    """MLflow's SQL store keeps ±inf as ±the largest float: send it as ±inf again."""
    return math.copysign(math.inf, value) if abs(value) == sys.float_info.max else value


def encode_request(
    points: Sequence[MetricPoint],
    contexts: Mapping[str, RunContext],
    run_id_length: int,
    service_name: str,
) -> bytes:
    """One request body: a gauge per metric key, a data point per point."""
    metrics: dict[str, Metric] = {}
    for p in points:
        metric = metrics.get(p.key)
        if metric is None:
            metric = metrics[p.key] = Metric(name=metric_family_name(p.key), gauge=Gauge())
        ctx = contexts.get(p.run_id) or RunContext("", "", "", {})
        metric.gauge.data_points.append(
            NumberDataPoint(
                time_unix_nano=p.timestamp_ms * 1_000_000,
                as_double=_finite_or_infinite(p.value),
                attributes=[
                    _text("metric_key", p.key),
                    _text("run_id", p.run_id[:run_id_length]),
                    _text("run_name", label_value(ctx.run_name)),
                    _text("experiment_id", ctx.experiment_id),
                    _text("experiment_name", label_value(ctx.experiment_name)),
                ],
            )
        )
    return _request(list(metrics.values()), service_name)


def _request(metrics: Sequence[Metric], service_name: str) -> bytes:
    request = ExportMetricsServiceRequest(
        resource_metrics=[
            ResourceMetrics(
                resource=Resource(attributes=[_text("service.name", service_name)]),
                scope_metrics=[
                    ScopeMetrics(
                        scope=InstrumentationScope(name=SCOPE, version=__version__),
                        metrics=list(metrics),
                    )
                ],
            )
        ]
    )
    body: bytes = request.SerializeToString()
    return body


def data_point_count(body: bytes) -> int:
    """The data points a request body holds."""
    request = ExportMetricsServiceRequest.FromString(body)
    return sum(
        len(m.gauge.data_points)
        for rm in request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )


@dataclass
class OtlpSink:
    """The OTLP `DeliverySink`; `post` is injectable for tests."""

    settings: OtlpSettings
    run_id_length: Callable[[], int] = lambda: 12
    post: Callable[..., requests.Response] = field(default=requests.post, repr=False)
    clock: Callable[[], float] = field(default=time.time, repr=False)
    name: str = "otlp"

    @property
    def budget_seconds(self) -> float:
        return self.settings.delivery_budget_seconds

    @property
    def max_attempts(self) -> int:
        return 0

    @property
    def queue_max_points(self) -> int:
        return self.settings.queue_max_points

    @property
    def overflow(self) -> str:
        return self.settings.queue_overflow

    @property
    def consumes(self) -> frozenset[str]:
        """Captured points only (no trace buckets)."""
        return frozenset({POINTS})

    def plan(
        self,
        points: Sequence[MetricPoint],
        contexts: Mapping[str, RunContext],  # noqa: ARG002 - the protocol's
        now_ms: int,  # noqa: ARG002 - the protocol's; a point carries its own time
    ) -> Planned:
        """Batches of at most `batch_size` points."""
        size = self.settings.batch_size
        return Planned([points[start : start + size] for start in range(0, len(points), size)])

    def count(self, batch: CapturedBatch) -> int:
        return len(batch.points)

    def encode(self, batch: CapturedBatch) -> bytes:
        """One request body (uncompressed: `send` compresses), `run_id` cut to the length
        of the delivering cycle."""
        return encode_request(
            batch.points, batch.contexts, self.run_id_length(), self.settings.service_name
        )

    def send(self, batch: Outgoing, timeout: float | None = None) -> Reply:
        s = self.settings
        wait = s.timeout_seconds if timeout is None else min(s.timeout_seconds, timeout)
        headers = {
            **s.headers,
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"mlflow-monitoring-exporter/{__version__}",
        }
        body = batch.body
        if s.compression == "gzip":
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        endpoint = str(s.endpoint)
        answer = post_batch(
            self.post,
            endpoint,
            name="the OTLP endpoint",
            variable="OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            timeout=wait,
            data=body,
            headers=headers,
            verify=s.ca_bundle or s.verify_tls,
        )
        if isinstance(answer, Reply):
            return answer
        return self._reply(answer.response, answer.url, batch)

    def _reply(self, response: Any, url: str, batch: Outgoing) -> Reply:
        status = response.status_code
        endpoint = str(self.settings.endpoint)
        if 200 <= status < 300:
            dropped = self._partial_success(response.content, batch)
            return Reply(Outcome.ACCEPTED, status=status, dropped_by_receiver=dropped)
        # A receiver may echo the headers it refused: never let a key reach a log line.
        text = redact(response.text, list(self.settings.headers.values()))
        where = "" if url == endpoint else f" at {url}"
        message = (
            f"OTLP endpoint {endpoint} answered HTTP {status}{where}: "
            f"{text[:200].replace(chr(10), ' ')}"
        )
        retry_after = retry_after_seconds(response.headers.get("Retry-After"), self.clock())
        if status in RETRYABLE:
            return Reply(Outcome.RETRY, message, status, retry_after)
        return reply_for(
            status, message, FIXES, location=response.headers.get("Location"), retry_after=None
        )

    def _partial_success(self, content: bytes, batch: Outgoing) -> int:
        """The points a receiver accepted the request without (the OTLP spec: never
        retried), logged once."""
        try:
            answer = ExportMetricsServiceResponse.FromString(content or b"")
        except DecodeError:
            return 0  # some receivers answer JSON or text: the 2xx is what counts
        rejected = answer.partial_success.rejected_data_points
        if rejected or answer.partial_success.error_message:
            log.warning(
                "otlp.partial_success",
                rejected_data_points=rejected,
                batch_points=batch.points,
                error_message=answer.partial_success.error_message[:200],
            )
        return int(rejected)
