"""Pramathus: captured points as the seed contract's JSON batches, POSTed one at a time.

Encoding is pure (`point_json`, `build_payload`): `PramathusSink.plan` groups points by
count and body size at capture, `encode` renders a queued batch at delivery (its payload
`timestamp` is the batch's capture time, so every retry sends the same body), and `send`
makes one POST and says what the answer means. Queueing, retries, splitting and setting
aside live in `delivery.py`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from exporter.config import PramathusSettings
from exporter.logs import redact, secret_forms
from exporter.model import CapturedBatch, MetricPoint, RunContext
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

SOURCE = "mlflow"
FIXES = {
    "credentials": "set PRAMATHUS_API_KEY (pramathus.api_key) to a key the endpoint accepts",
    "redirect": "set PRAMATHUS_ENDPOINT (pramathus.endpoint) to the URL it moved to",
    "endpoint": "check PRAMATHUS_ENDPOINT (pramathus.endpoint)",
}


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


def _entry_bytes(entry: dict[str, Any]) -> int:
    """What one entry adds to a body (its JSON and the `, ` joining it to the next)."""
    return len(json.dumps(entry, ensure_ascii=False, allow_nan=False).encode()) + 2


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
    def overflow(self) -> str:
        return self.settings.spool_overflow

    @property
    def consumes(self) -> frozenset[str]:
        """Captured points only (no trace buckets)."""
        return frozenset({POINTS})

    def plan(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Planned:
        """Batches of up to `batch_size` points and `max_body_bytes` bytes; a point that
        alone is larger than that is set aside as `too_large`."""
        s = self.settings
        room = s.max_body_bytes - len(build_payload([], now_ms))
        out: list[list[MetricPoint]] = []
        too_large: list[list[MetricPoint]] = []
        members: list[MetricPoint] = []
        used = 0
        for point in points:
            size = _entry_bytes(point_json(point, contexts[point.run_id], s.max_tag_value_length))
            if size > room:
                too_large.append([point])
                continue
            if len(members) == s.batch_size or used + size > room:
                out.append(members)
                members, used = [], 0
            members.append(point)
            used += size
        if members:
            out.append(members)
        # A last batch short of `batch_size` may take points captured later this cycle.
        return Planned(
            out, {"too_large": too_large} if too_large else {}, 0 < len(members) < s.batch_size
        )

    def count(self, batch: CapturedBatch) -> int:
        return len(batch.points)

    def encode(self, batch: CapturedBatch) -> bytes:
        """The payload of a queued batch, stamped with its capture time."""
        tag = self.settings.max_tag_value_length
        entries = [point_json(p, batch.contexts[p.run_id], tag) for p in batch.points]
        return build_payload(entries, batch.created_ms)

    def send(self, batch: Outgoing, timeout: float | None = None) -> Reply:
        s = self.settings
        wait = s.timeout_seconds if timeout is None else min(s.timeout_seconds, timeout)
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch.idempotency_key,
            "User-Agent": "mlflow-monitoring-exporter",
        }
        if s.api_key is not None:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        answer = post_batch(
            self.post,
            str(s.endpoint),
            name="Pramathus",
            variable="PRAMATHUS_ENDPOINT",
            timeout=wait,
            data=batch.body,
            headers=headers,
            verify=s.ca_bundle or s.verify_tls,
        )
        if isinstance(answer, Reply):
            return answer
        response, url = answer.response, answer.url
        status = response.status_code
        if 200 <= status < 300:
            return Reply(Outcome.ACCEPTED, status=status)
        text = response.text
        # Some endpoints echo the key they refuse, or the whole Authorization header.
        text = redact(text, secret_forms([s.api_key.get_secret_value()] if s.api_key else []))
        where = "" if url == str(s.endpoint) else f" at {url}"
        message = f"Pramathus answered HTTP {status}{where}: {text[:200].replace(chr(10), ' ')}"
        return reply_for(
            status,
            message,
            FIXES,
            location=response.headers.get("Location"),
            retry_after=retry_after_seconds(response.headers.get("Retry-After"), time.time()),
        )
