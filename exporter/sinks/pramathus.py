"""Pramathus: metric points -> batched JSON payloads -> durable spool -> HTTP POST.

Points are first written to the spool in the same SQLite transaction that advances the
watermarks, so a point is either still to be read from MLflow or safely spooled. Spooled
batches are then POSTed oldest first and removed only after a 2xx: delivery is at-least-once,
and each batch keeps one `Idempotency-Key` across retries so a receiver can drop repeats.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential_jitter,
)

from exporter.config import PramathusSettings
from exporter.logs import MASK
from exporter.model import MetricPoint
from exporter.state import SpooledBatch, StateStore

SOURCE = "mlflow"


def iso8601(ms: float) -> str:
    """Milliseconds since the epoch as `2024-01-15T10:29:45.123Z`."""
    moment = datetime.fromtimestamp(ms / 1000.0, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RunContext:
    """What a point's metadata says about its run."""

    experiment_name: str
    tags: Mapping[str, str]


def public_tags(tags: Mapping[str, str], max_len: int) -> dict[str, str]:
    """User tags (MLflow's own `mlflow.*` tags left out), each value cut to `max_len`."""
    return {
        k: (v if len(v) <= max_len else v[:max_len])
        for k, v in tags.items()
        if not k.startswith("mlflow.")
    }


def point_json(point: MetricPoint, ctx: RunContext) -> dict[str, Any]:
    """One entry of the payload's `metrics` list.

    JSON has no NaN or infinity: such a value is sent as `null`, and `metadata.non_finite`
    says which it was ("NaN", "Infinity", "-Infinity"), so the point is not lost.
    """
    value: float | None = point.value
    metadata: dict[str, Any] = {
        "run_id": point.run_id,
        "experiment_name": ctx.experiment_name,
        "step": point.step,
        "tags": dict(ctx.tags),
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


class DeliveryError(Exception):
    """Pramathus did not take a batch; `retryable` says whether a later try may succeed."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


@dataclass
class DrainResult:
    batches: int = 0
    points: int = 0
    dead_lettered: int = 0
    error: str | None = None  # why draining stopped early, if it did


@dataclass
class PramathusSink:
    """Spools batches and POSTs them. `post`, `sleep` and `clock` are injectable for tests."""

    settings: PramathusSettings
    state: StateStore
    post: Callable[..., requests.Response] = requests.post
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.time
    on_dropped: Callable[[int], None] = field(default=lambda n: None)

    def spool(
        self,
        points: Sequence[MetricPoint],
        contexts: Mapping[str, RunContext],
        marks: Sequence[tuple[str, str, int, int]],
    ) -> int:
        """Batch `points` into the spool and advance `marks`, atomically. Returns batches."""
        s = self.settings
        now_ms = self.clock() * 1000
        batches = 0
        with self.state.transaction() as db:
            for start in range(0, len(points), s.batch_size):
                chunk = points[start : start + s.batch_size]
                entries = [point_json(p, contexts[p.run_id]) for p in chunk]
                body = build_payload(entries, now_ms)
                self.state.spool_add(db, str(uuid.uuid4()), int(now_ms), len(chunk), body)
                batches += 1
            self.state.advance(db, marks)
            dropped = self.state.spool_trim(
                db, s.spool_max_points, oldest_first=s.spool_overflow == "drop_oldest"
            )
        if dropped:
            self.on_dropped(dropped)
        return batches

    def drain(self, should_stop: Callable[[], bool] = lambda: False) -> DrainResult:
        """POST spooled batches oldest first until the spool is empty, a batch keeps failing,
        the delivery budget is spent, or `should_stop()`."""
        result = DrainResult()
        deadline = self.clock() + self.settings.delivery_budget_seconds
        for batch in self.state.spool_batches():
            if should_stop():
                result.error = "stopped"
                break
            if self.clock() >= deadline:
                result.error = "delivery budget spent; the rest stays spooled"
                break
            try:
                self._send_with_retries(batch, deadline)
            except DeliveryError as exc:
                if exc.retryable:
                    self.state.spool_failed(batch.id, str(exc))
                    result.error = str(exc)
                    break  # keep order: later batches wait for this one
                self.state.dead_letter(batch, exc.status, str(exc))
                result.dead_lettered += 1
                result.error = str(exc)
                continue
            self.state.spool_done(batch.id)
            result.batches += 1
            result.points += batch.points
        return result

    def _send_with_retries(self, batch: SpooledBatch, deadline: float) -> None:
        s = self.settings

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            hinted = exc.retry_after if isinstance(exc, DeliveryError) else None
            backoff = wait_exponential_jitter(multiplier=0.5, max=30)(state)
            delay = hinted if hinted is not None else backoff
            return max(0.0, min(delay, deadline - self.clock()))

        retrying = Retrying(
            retry=retry_if_exception(lambda e: isinstance(e, DeliveryError) and e.retryable),
            stop=stop_after_attempt(s.max_attempts)
            | stop_after_delay(max(0.0, deadline - self.clock())),
            wait=wait,
            sleep=self.sleep,
            reraise=True,
        )
        retrying(self._send_once, batch)

    def _send_once(self, batch: SpooledBatch) -> None:
        s = self.settings
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": batch.idempotency_key,
            "User-Agent": "mlflow-monitoring-exporter",
        }
        if s.api_key is not None:
            headers["Authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        verify: bool | str = s.ca_bundle or s.verify_tls
        try:
            response = self.post(
                str(s.endpoint),
                data=batch.body,
                headers=headers,
                timeout=s.timeout_seconds,
                verify=verify,
            )
        except requests.Timeout:
            raise DeliveryError(f"Pramathus timed out after {s.timeout_seconds:g}s") from None
        except requests.RequestException as exc:
            raise DeliveryError(f"cannot reach Pramathus: {type(exc).__name__}") from None
        status = response.status_code
        if 200 <= status < 300:
            return
        text = response.text
        if s.api_key is not None:  # some endpoints echo the key they refuse: never repeat it
            text = text.replace(s.api_key.get_secret_value(), MASK)
        excerpt = text[:200].replace("\n", " ")
        retryable = status >= 500 or status in (408, 425, 429)
        raise DeliveryError(
            f"Pramathus answered HTTP {status}: {excerpt}",
            status=status,
            retryable=retryable,
            retry_after=_retry_after(response.headers.get("Retry-After")),
        )
