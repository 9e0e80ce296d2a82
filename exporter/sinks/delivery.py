"""Delivering a sink's queue: oldest batch first, retried within the delivery budget.

Every history sink (Pramathus, remote write) plugs in through `DeliverySink`: it encodes
captured points into request bodies, sends one body once and says what the answer means.
This module owns what is common, and one rule for every sink: a point is delivered (a 2xx
from the endpoint it was sent to, for the request that carried it), still queued, or set
aside with a reason an operator can see and replay (`exporter dead-letters`).

- `post_batch` makes the request (a timeout or connection error is a retry naming the
  setting to check) through `post_without_redirects`: a redirect never turns a POST into a GET
  (307/308 are followed with the same method and body, credentials only to the same
  origin; 301/302/303 are an error naming the new location);
- `status_outcome` says what a status means for the points: 2xx accepted; 5xx, 408, 425,
  429 retried; 3xx, 401, 403, 404, 405 block the sink for the cycle (a setting to fix, the
  points stay queued); 413 and 400/422 split the batch until only the refused points are
  left, set aside as `too_large` or `rejected`; other 4xx set aside as `rejected`;
- `Drainer` retries with capped exponential backoff and jitter (honouring `Retry-After`)
  for as long as the sink's delivery budget allows, keeps queue order, splits and sets
  aside, remembers the largest body accepted after a 413, and stops promptly when asked.
"""

from __future__ import annotations

import enum
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urljoin, urlsplit

import requests
from tenacity import RetryCallState, Retrying, retry_if_result, wait_exponential_jitter

from exporter.errors import reason
from exporter.model import MetricPoint, RunContext
from exporter.state.outbox import EncodedBatch, Outbox, QueuedBatch


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    RETRY = "retry"  # may succeed later: 5xx, 408, 425, 429, timeouts, connection errors
    REFUSED = "refused"  # can never succeed as it is
    BLOCKED = "blocked"  # a setting is wrong (credentials, endpoint): the points stay queued


# Why a sink's delivery is blocked (a self-metric label value): which setting to fix.
BLOCKED_CAUSES = ("credentials", "redirect", "endpoint")
MAX_REDIRECTS = 5
MIN_ATTEMPT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Reply:
    """What one attempt to send a batch came to."""

    outcome: Outcome
    message: str = ""
    status: int | None = None
    retry_after: float | None = None
    reason: str = "rejected"  # why a refused batch is set aside (a metric label value)
    splittable: bool = False  # the refusal may concern only some samples: split and retry
    cause: str = ""  # BLOCKED: one of BLOCKED_CAUSES
    # ACCEPTED: points the receiver said it dropped while acknowledging the request (an
    # OTLP partial success); never re-sent, as the receiver asks, but counted.
    dropped_by_receiver: int = 0


@dataclass(frozen=True, slots=True)
class Encoded:
    """Points as request bodies, and bodies of points the sink can never take (by reason).

    `open_tail` holds the points of the last batch when it is not full: points captured
    later in the same cycle may join them (re-encoded together), so a batch holds up to
    `batch_size` points across keys and runs."""

    batches: list[EncodedBatch]
    refused: dict[str, list[EncodedBatch]] = field(default_factory=dict)
    open_tail: Sequence[MetricPoint] = ()


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
    def overflow(self) -> str:
        """Past `queue_max_points`: `wait` (capture for this sink waits), or an opt-in
        `drop_oldest` / `drop_newest` (counted and logged as lost)."""
        ...

    def encode(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Encoded:
        """Request bodies for these points (each with a stable idempotency key)."""
        ...

    def send(self, batch: QueuedBatch, timeout: float | None = None) -> Reply:
        """One attempt to deliver one batch, waiting at most `timeout` seconds (what is
        left of the delivery budget) when it is shorter than the sink's own timeout."""
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
    blocked: str | None = None  # a BLOCKED_CAUSES value when a setting stopped delivery
    dropped_by_receiver: int = 0  # acknowledged points the receiver said it dropped


@dataclass
class Drainer:
    """Sends one sink's queue. `clock` and `sleep` are injectable for tests."""

    sink: DeliverySink
    outbox: Outbox
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    # The body size limit learnt by earlier drains (bodies above it are split unsent), and
    # the largest body accepted after a 413 in this drain (the new limit).
    _limit: int | None = field(default=None, init=False)
    _learnt: int | None = field(default=None, init=False)
    _refused_large: bool = field(default=False, init=False)

    def drain(self, should_stop: Callable[[], bool] = lambda: False) -> DrainResult:
        """Send queued batches oldest first until the queue is empty, a batch must wait,
        the delivery budget is spent, or `should_stop()`."""
        result = DrainResult()
        deadline = self.clock() + self.sink.budget_seconds
        self._limit = self.outbox.body_limit()
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
        limit = self._limit
        if limit is not None and len(batch.body) > limit and batch.points > 1:
            # A receiver refused bodies this large before: split before sending.
            return self._split(batch, deadline, result)
        self.outbox.claim(batch)  # raises if the state cannot record it: send nothing
        reply = self._send_with_retries(batch, deadline)
        if reply.outcome is Outcome.ACCEPTED:
            self.outbox.done(batch.id)
            result.batches += 1
            result.points += batch.points
            result.dropped_by_receiver += reply.dropped_by_receiver
            if self._refused_large:
                self._learnt = max(self._learnt or 0, len(batch.body))
                self.outbox.set_body_limit(self._learnt)
            return True
        if reply.outcome in (Outcome.RETRY, Outcome.BLOCKED):
            self.outbox.failed(batch.id, reply.message)
            result.error = reply.message
            if reply.outcome is Outcome.BLOCKED:
                result.blocked = reply.cause or "endpoint"
            return False
        if reply.reason == "too_large":
            self._refused_large = True
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

        def attempt() -> Reply:
            # An attempt never outlasts the budget (a floor keeps a last one meaningful).
            return self.sink.send(batch, timeout=max(MIN_ATTEMPT_SECONDS, deadline - self.clock()))

        reply: Reply = retrying(attempt)
        return reply


# Request header names that say they carry credentials (masked wherever they are logged).
CREDENTIAL_HEADER = re.compile(
    r"^(?:authorization|proxy-authorization|cookie)$|token|secret|password|api[-_]?key",
    re.IGNORECASE,
)
# The only headers a redirect carries to another origin: they describe the body. Every other
# header may be a credential whose name says nothing (a vendor's `x-honeycomb-team`, a
# tenant id), so a header a user configured never leaves the origin they named.
CROSS_ORIGIN_HEADERS = frozenset(
    {
        "content-type",
        "content-encoding",
        "user-agent",
        "idempotency-key",
        "x-prometheus-remote-write-version",
    }
)
RETRYABLE_4XX = frozenset({408, 425, 429})
SPLITTABLE_4XX = frozenset({400, 422})  # may concern only some points: bisect to find them
ENDPOINT_4XX = frozenset({404, 405, 410})  # the URL is wrong, not the points


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def post_without_redirects(
    post: Callable[..., Any], url: str, *, headers: Mapping[str, str], **kwargs: Any
) -> tuple[Any, str]:
    """POST to `url`, never letting a redirect change the request: (answer, URL it came from).

    `requests` would follow 301/302/303 by sending a GET without the body, whose 200 then
    looks like a delivery. Here 307 and 308 (which keep method and body by definition) are
    followed up to `MAX_REDIRECTS` times, every header while the origin stays the same and
    only `CROSS_ORIGIN_HEADERS` once it changes; any other 3xx is handed back for the caller
    to report.
    """
    target, sent = url, dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        response = post(target, headers=sent, allow_redirects=False, **kwargs)
        location = response.headers.get("Location")
        if response.status_code not in (307, 308) or not location:
            break
        target = urljoin(target, location)
        if _origin(target) != _origin(url):
            sent = {k: v for k, v in sent.items() if k.lower() in CROSS_ORIGIN_HEADERS}
    return response, target


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer to a batch, and the URL it came from (after 307/308 redirects)."""

    response: Any
    url: str


def post_batch(
    post: Callable[..., Any],
    url: str,
    *,
    name: str,
    variable: str,
    timeout: float,
    **kwargs: Any,
) -> Answer | Reply:
    """POST one batch (`post_without_redirects`): its `Answer`, or, when no answer came
    (timeout, connection error), a RETRY `Reply` naming `name`, `url` and the setting
    `variable` to check."""
    try:
        response, answered = post_without_redirects(post, url, timeout=timeout, **kwargs)
    except requests.Timeout:
        return Reply(Outcome.RETRY, f"{name} timed out after {timeout:g}s at {url}")
    except requests.RequestException as exc:
        return Reply(
            Outcome.RETRY,
            f"cannot reach {name} at {url} ({reason(exc)}): is it up, and is {variable} right?",
        )
    return Answer(response, answered)


def reply_for(
    status: int,
    message: str,
    fixes: Mapping[str, str],
    location: str | None = None,
    retry_after: float | None = None,
) -> Reply:
    """What an HTTP status means for the points of a request (the same for every sink).

    `fixes` maps a `BLOCKED_CAUSES` value to the setting to change, added to the message.
    """
    if 200 <= status < 300:
        return Reply(Outcome.ACCEPTED, status=status)
    if 300 <= status < 400 or status in (401, 403) or status in ENDPOINT_4XX:
        cause = (
            "redirect" if status < 400 else ("credentials" if status in (401, 403) else "endpoint")
        )
        moved = f" to {location}" if location else ""
        what = f" (redirected{moved}; a POST is never re-sent as a GET)" if status < 400 else ""
        return Reply(
            Outcome.BLOCKED,
            f"{message}{what}: points stay queued; {fixes[cause]}",
            status,
            cause=cause,
        )
    if status >= 500 or status in RETRYABLE_4XX:
        return Reply(Outcome.RETRY, message, status, retry_after)
    too_large = status == 413
    return Reply(
        Outcome.REFUSED,
        message,
        status,
        reason="too_large" if too_large else "rejected",
        splittable=too_large or status in SPLITTABLE_4XX,
    )


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
