"""Pramathus: captured points as the seed contract's JSON batches, POSTed one at a time.

Encoding is pure (`point_json`, `build_payload`); `PramathusSink.send` makes one POST and
says what the answer means. Queueing, retries and setting aside live in `delivery.py`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from exporter.config import PramathusSettings
from exporter.errors import reason
from exporter.logs import MASK
from exporter.model import MetricPoint, RunContext
from exporter.sinks.delivery import Encoded, Outcome, Reply, retry_after_seconds
from exporter.state.outbox import EncodedBatch, QueuedBatch

SOURCE = "mlflow"
RETRYABLE_4XX = (408, 425, 429)


def iso8601(ms: float) -> str:
    """Milliseconds since the epoch as `2024-01-15T10:29:45.123Z`."""
    moment = datetime.fromtimestamp(ms / 1000.0, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def public_tags(tags: Mapping[str, str], max_len: int) -> dict[str, str]:
    """User tags (MLflow's own `mlflow.*` tags left out), each value cut to `max_len`."""
    return {
        k: (v if len(v) <= max_len else v[:max_len])
        for k, v in tags.items()
        if not k.startswith("mlflow.")
    }


def point_json(point: MetricPoint, ctx: RunContext, max_tag: int) -> dict[str, Any]:
    """One entry of the payload's `metrics` list.

    JSON has no NaN or infinity: such a value is sent as `null`, and `metadata.non_finite`
    says which it was ("NaN", "Infinity", "-Infinity"), so the point is not lost.
    """
    value: float | None = point.value
    metadata: dict[str, Any] = {
        "run_id": point.run_id,
        "experiment_name": ctx.experiment_name,
        "step": point.step,
        "tags": public_tags(ctx.tags, max_tag),
    }
    if not math.isfinite(point.value):
        metadata["non_finite"] = json.dumps(point.value)  # 'NaN', 'Infinity', '-Infinity'
        value = None
    return {
        "name": point.key,
        "value": value,
        "timestamp": iso8601(point.timestamp_ms),
        "metadata": metadata,
    }


def build_payload(entries: Sequence[dict[str, Any]], now_ms: float) -> bytes:
    """The request body for one batch, as the seed's contract shapes it."""
    body = {"timestamp": iso8601(now_ms), "source": SOURCE, "metrics": list(entries)}
    return json.dumps(body, ensure_ascii=False, allow_nan=False).encode()


@dataclass
class PramathusSink:
    """The Pramathus `DeliverySink`. `post` is injectable for tests."""

    settings: PramathusSettings
    post: Callable[..., requests.Response] = requests.post
    name: str = "pramathus"

    @property
    def budget_seconds(self) -> float:
        return self.settings.delivery_budget_seconds

    @property
    def max_attempts(self) -> int:
        return self.settings.max_attempts

    @property
    def queue_max_points(self) -> int:
        return self.settings.spool_max_points

    @property
    def drop_oldest(self) -> bool:
        return self.settings.spool_overflow == "drop_oldest"

    def encode(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Encoded:
        size, max_tag = self.settings.batch_size, self.settings.max_tag_value_length
        out = []
        for start in range(0, len(points), size):
            chunk = points[start : start + size]
            entries = [point_json(p, contexts[p.run_id], max_tag) for p in chunk]
            out.append(EncodedBatch(str(uuid.uuid4()), len(chunk), build_payload(entries, now_ms)))
        return Encoded(out)

    def split(self, body: bytes) -> list[EncodedBatch]:
        raise NotImplementedError("Pramathus batches are accepted or refused whole")

    def send(self, batch: QueuedBatch) -> Reply:
        s = self.settings
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch.idempotency_key,
            "User-Agent": "mlflow-monitoring-exporter",
        }
        if s.api_key is not None:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        try:
            response = self.post(
                str(s.endpoint),
                data=batch.body,
                headers=headers,
                timeout=s.timeout_seconds,
                verify=s.ca_bundle or s.verify_tls,
            )
        except requests.Timeout:
            return Reply(
                Outcome.RETRY, f"Pramathus timed out after {s.timeout_seconds:g}s at {s.endpoint}"
            )
        except requests.RequestException as exc:
            return Reply(
                Outcome.RETRY,
                f"cannot reach Pramathus at {s.endpoint} ({reason(exc)}): is it up, "
                "and is PRAMATHUS_ENDPOINT right?",
            )
        status = response.status_code
        if 200 <= status < 300:
            return Reply(Outcome.ACCEPTED, status=status)
        text = response.text
        if s.api_key is not None:  # some endpoints echo the key they refuse: never repeat it
            text = text.replace(s.api_key.get_secret_value(), MASK)
        message = f"Pramathus answered HTTP {status}: {text[:200].replace(chr(10), ' ')}"
        retryable = status >= 500 or status in RETRYABLE_4XX
        return Reply(
            Outcome.RETRY if retryable else Outcome.REFUSED,
            message,
            status=status,
            retry_after=retry_after_seconds(response.headers.get("Retry-After"), time.time()),
            reason="rejected",
        )
