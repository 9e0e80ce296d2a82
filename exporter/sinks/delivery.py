"""Delivering a sink's queue: oldest batch first, retried within the delivery budget.

Every history sink (Pramathus, remote write) plugs in through `DeliverySink`: it encodes
captured points into request bodies, sends one body once and says what the answer means.
This module owns what is common: retries with capped exponential backoff and jitter
(honouring `Retry-After`) for as long as the sink's delivery budget allows, keeping queue
order, setting aside what can never succeed (splitting a batch first when the sink can
isolate the samples that were refused), and stopping promptly when asked.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Protocol

from tenacity import RetryCallState, Retrying, retry_if_result, wait_exponential_jitter

from exporter.model import MetricPoint, RunContext
from exporter.state.outbox import EncodedBatch, Outbox, QueuedBatch


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"  # may succeed later: 5xx, 408, 425, 429, timeouts, connection errors
    REFUSED = "refused"  # can never succeed as it is


@dataclass(frozen=True, slots=True)
class Reply:
    """What one attempt to send a batch came to."""

    outcome: Outcome
    message: str = ""
    status: int | None = None
    retry_after: float | None = None
    reason: str = "rejected"  # why a refused batch is set aside (a metric label value)
    splittable: bool = False  # the refusal may concern only some samples: split and retry


@dataclass(frozen=True, slots=True)
class Encoded:
    """Points as request bodies, and bodies of points the sink can never take (by reason)."""

    batches: list[EncodedBatch]
    refused: dict[str, list[EncodedBatch]] = field(default_factory=dict)


class DeliverySink(Protocol):
    """A destination for captured points, with its own queue."""

    @property
    def name(self) -> str: ...

    @property
    def budget_seconds(self) -> float: ...

    @property
    def max_attempts(self) -> int:
        """Tries per batch per cycle; 0 = as many as the budget allows."""
        ...

    @property
    def queue_max_points(self) -> int: ...

    @property
    def drop_oldest(self) -> bool: ...

    def encode(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Encoded:
        """Request bodies for these points (each with a stable idempotency key)."""
        ...

    def send(self, batch: QueuedBatch) -> Reply:
        """One attempt to deliver one batch."""
        ...

    def split(self, body: bytes) -> list[EncodedBatch]:
        """Two halves of a batch's body (only called when a reply was `splittable`)."""
        ...


@dataclass
class DrainResult:
    batches: int = 0
    points: int = 0
    set_aside: dict[str, int] = field(default_factory=dict)  # reason -> points
    error: str | None = None  # why draining stopped early or what was refused
    stopped: bool = False


@dataclass
class Drainer:
    """Sends one sink's queue. `clock` and `sleep` are injectable for tests."""

    sink: DeliverySink
    outbox: Outbox
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep

    def drain(self, should_stop: Callable[[], bool] = lambda: False) -> DrainResult:
        """Send queued batches oldest first until the queue is empty, a batch must wait,
        the delivery budget is spent, or `should_stop()`."""
        result = DrainResult()
        deadline = self.clock() + self.sink.budget_seconds
        for batch in self.outbox.batches():
            if should_stop():
                result.stopped = True
                break
            if self.clock() >= deadline:
                result.error = (
                    f"{self.sink.name}: delivery budget of {self.sink.budget_seconds:g}s spent; "
                    "the rest stays queued for the next cycle"
                )
                break
            if not self._deliver(batch, deadline, result):
                break  # keep order: later batches wait for this one
        return result

    def _deliver(self, batch: QueuedBatch, deadline: float, result: DrainResult) -> bool:
        reply = self._send_with_retries(batch, deadline)
        if reply.outcome is Outcome.ACCEPTED:
            self.outbox.done(batch.id)
            result.batches += 1
            result.points += batch.points
            return True
        if reply.outcome is Outcome.RETRY:
            self.outbox.failed(batch.id, reply.message)
            result.error = reply.message
            return False
        if reply.splittable and batch.points > 1:
            return self._split(batch, deadline, result)
        self.outbox.set_aside(
            batch, int(self.clock() * 1000), reply.reason, reply.status, reply.message
        )
        result.set_aside[reply.reason] = result.set_aside.get(reply.reason, 0) + batch.points
        result.error = reply.message
        return True

    def _split(self, batch: QueuedBatch, deadline: float, result: DrainResult) -> bool:
        """Replace a partly refused batch by its halves and deliver those at once, so the
        refused samples end up alone and set aside while the others land."""
        parts = self.outbox.replace(batch, self.sink.split(batch.body))
        return all(self._deliver(part, deadline, result) for part in parts)

    def _send_with_retries(self, batch: QueuedBatch, deadline: float) -> Reply:
        def wait(state: RetryCallState) -> float:
            hinted = _last_reply(state).retry_after
            backoff = wait_exponential_jitter(multiplier=0.5, max=30)(state)
            delay = hinted if hinted is not None else backoff
            return max(0.0, min(delay, deadline - self.clock()))

        attempts = self.sink.max_attempts

        def stop(state: RetryCallState) -> bool:
            # The injected clock, not tenacity's, so a test's fake time bounds retries too.
            out_of_attempts = bool(attempts) and state.attempt_number >= attempts
            return out_of_attempts or self.clock() >= deadline

        retrying = Retrying(
            retry=retry_if_result(lambda r: r.outcome is Outcome.RETRY),
            stop=stop,
            wait=wait,
            sleep=self.sleep,
            retry_error_callback=_last_reply,
        )
        reply: Reply = retrying(self.sink.send, batch)
        return reply


def _last_reply(state: RetryCallState) -> Reply:
    """The reply of the attempt just made (tenacity asks only after an attempt)."""
    assert state.outcome is not None
    reply: Reply = state.outcome.result()
    return reply


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """A `Retry-After` header (seconds, or an HTTP date) as seconds from `now`; None if absent
    or unreadable. Never negative."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None
