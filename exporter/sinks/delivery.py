"""Delivering a sink's queue: oldest batch first, retried within the delivery budget.

Every history sink (Pramathus, remote write, OTLP, an installed one) plugs in through
`DeliverySink`, in three steps:

- `plan` (at capture): which captured points go together in a batch, and which the sink can
  never take (set aside at once, by reason); it may measure sizes but keeps no bytes. The
  queue stores each batch in one neutral form (`CapturedBatch`), whatever the sink;
- `encode` (at delivery): the request body of a captured batch, deterministic (every retry
  of one idempotency key carries the same body), with the labels of the delivering cycle;
- `send`: one attempt with one body, and what the answer means (`Reply`).

What a sink consumes (`consumes`): every sink takes captured points (`POINTS`); a sink that
also takes the trace history buckets declares `TRACE_BUCKETS` and plans them into batches
(`BucketSink.plan_buckets`), and the traces stage queues them on every such sink.

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
  for as long as the sink's delivery budget allows, keeps queue order, splits (`halves`:
  by time, the older half sent first) and sets aside, remembers the largest body accepted
  after a 413, and stops promptly when asked. A row queued by a version before 4 holds a
  wire body: it is sent as it is, and when it would need splitting it is set aside with
  its reason instead (counted, replayable).
"""

from __future__ import annotations

import enum
import math
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urljoin, urlsplit

import requests
from tenacity import RetryCallState, Retrying, retry_if_result, wait_exponential_jitter

from exporter.errors import reason
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.state.outbox import Outbox, QueuedBatch, QueueEntry
from exporter.trace_model import BucketSample


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
class Planned:
    """Points grouped into batches, and groups of points the sink can never take (by
    reason). No bytes: each batch is queued in the neutral form and encoded at delivery.

    `open_tail` says the last batch is not full: points captured later in the same cycle
    may join it (it is planned again with them), so a batch holds up to `batch_size`
    points across keys and runs."""

    batches: Sequence[Sequence[MetricPoint]]
    refused: Mapping[str, Sequence[Sequence[MetricPoint]]] = field(default_factory=dict)
    open_tail: bool = False


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One request of a batch: its idempotency key, its count in the sink's unit, and the
    body the sink encoded (or a wire body queued by an older version)."""

    idempotency_key: str
    points: int
    body: bytes


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

    def plan(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Planned:
        """Batches of these points, and those refused for good (no request made)."""
        ...

    def count(self, batch: CapturedBatch) -> int:
        """What a batch counts in the sink's unit (queue bounds, self-metrics)."""
        ...

    def encode(self, batch: CapturedBatch) -> bytes:
        """The request body of a batch: the same bytes for the same batch."""
        ...

    def send(self, request: Outgoing, timeout: float | None = None) -> Reply:
        """One attempt to deliver one request, waiting at most `timeout` seconds (what is
        left of the delivery budget) when it is shorter than the sink's own timeout."""
        ...


# What a sink may consume (`BucketSink.consumes`): captured points, trace history buckets.
POINTS = "points"
TRACE_BUCKETS = "trace_buckets"
CONSUMABLE = frozenset({POINTS, TRACE_BUCKETS})


@runtime_checkable
class BucketSink(DeliverySink, Protocol):
    """A `DeliverySink` that also takes the trace history buckets.

    `consumes` is optional on a sink, so it is not a `DeliverySink` member: a Protocol
    member cannot carry a default for the classes that only match it (a third-party sink
    would have to declare it). A sink without it takes points only (`consumes(sink)`); one
    that declares `TRACE_BUCKETS` has `plan_buckets` too (the registry checks it when it
    builds the sink), so nothing outside the sink reads its settings to batch buckets.
    """

    @property
    def consumes(self) -> frozenset[str]:
        """What it takes: `POINTS` and `TRACE_BUCKETS`."""
        ...

    def plan_buckets(self, samples: Sequence[BucketSample]) -> Sequence[Sequence[BucketSample]]:
        """One cycle's trace buckets grouped into batches (each queued as one `CapturedBatch`)."""
        ...


def consumes(sink: DeliverySink) -> frozenset[str]:
    """What a sink declares it consumes (its `consumes`); `POINTS` when it declares nothing."""
    declared: Iterable[str] = getattr(sink, "consumes", (POINTS,))
    return frozenset(declared)


def bucket_sinks(sinks: Iterable[DeliverySink]) -> list[BucketSink]:
    """The sinks that declare they take trace buckets (and can plan them), in order."""
    return [s for s in sinks if TRACE_BUCKETS in consumes(s) and isinstance(s, BucketSink)]


def queue_entries(
    sink: DeliverySink,
    groups: Sequence[Sequence[MetricPoint]],
    contexts: Mapping[str, RunContext],
    now_ms: int,
) -> list[QueueEntry]:
    """Planned groups as entries to queue: each a captured batch with the contexts of its
    runs, a new idempotency key and its count in the sink's unit."""
    entries = []
    for group in groups:
        runs = {p.run_id for p in group}
        batch = CapturedBatch(
            points=tuple(group),
            contexts={r: contexts[r] for r in sorted(runs) if r in contexts},
            created_ms=now_ms,
        )
        entries.append(QueueEntry(str(uuid.uuid4()), sink.count(batch), batch))
    return entries


def halves(batch: CapturedBatch) -> tuple[CapturedBatch, CapturedBatch]:
    """Two halves of a batch by time, the older half first (a receiver without an
    out-of-order window refuses for good a sample older than one it stored for its series,
    and receivers refuse samples for their age: cutting by time isolates those in few
    steps). Each half keeps the contexts of its runs and the batch's `created_ms`.
    ValueError for a batch of fewer than 2 points and buckets."""
    if batch.size < 2:
        raise ValueError(f"cannot split a batch of {batch.size}")
    points = sorted(batch.points, key=lambda p: (p.timestamp_ms, p.run_id, p.key, p.step))
    buckets = sorted(batch.buckets, key=lambda b: (b.bucket_ms, b.family, b.labels))
    # Both are in time order, so the older half is a prefix of each.
    stamps = sorted(
        [(p.timestamp_ms, True) for p in points] + [(b.bucket_ms, False) for b in buckets]
    )
    older = stamps[: len(stamps) // 2]
    n_points = sum(is_point for _, is_point in older)
    n_buckets = len(older) - n_points
    return (
        _part(batch, points[:n_points], buckets[:n_buckets]),
        _part(batch, points[n_points:], buckets[n_buckets:]),
    )


def _part(
    batch: CapturedBatch, points: Sequence[MetricPoint], buckets: Sequence[BucketSample]
) -> CapturedBatch:
    runs = {p.run_id for p in points}
    contexts = {r: c for r, c in batch.contexts.items() if r in runs}
    return CapturedBatch(tuple(points), contexts, tuple(buckets), batch.created_ms)


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
        captured = batch.captured()  # None: a wire body queued by an older version
        body = batch.body if captured is None else self.sink.encode(captured)
        splittable = captured is not None and captured.size > 1
        limit = self._limit
        if limit is not None and len(body) > limit and splittable:
            # A receiver refused bodies this large before: split before sending.
            assert captured is not None
            return self._split(batch, captured, deadline, result)
        self.outbox.claim(batch)  # raises if the state cannot record it: send nothing
        reply = self._send_with_retries(
            Outgoing(batch.idempotency_key, batch.points, body), deadline
        )
        if reply.outcome is Outcome.ACCEPTED:
            self.outbox.done(batch.id)
            result.batches += 1
            result.points += batch.points
            result.dropped_by_receiver += reply.dropped_by_receiver
            if self._refused_large:
                self._learnt = max(self._learnt or 0, len(body))
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
        if reply.splittable and splittable:
            assert captured is not None
            return self._split(batch, captured, deadline, result)
        message = reply.message
        if reply.splittable and captured is None:
            message += " (queued by an older version as a request body: set aside whole)"
        self.outbox.set_aside(batch, int(self.clock() * 1000), reply.reason, reply.status, message)
        result.set_aside[reply.reason] = result.set_aside.get(reply.reason, 0) + batch.points
        result.error = message
        return True

    def _split(
        self, batch: QueuedBatch, captured: CapturedBatch, deadline: float, result: DrainResult
    ) -> bool:
        """Replace a partly refused batch by its halves, each under a new idempotency key,
        and deliver those at once (older half first), so the refused points end up alone
        and set aside while the others land."""
        parts = [
            QueueEntry(str(uuid.uuid4()), self.sink.count(half), half) for half in halves(captured)
        ]
        queued = self.outbox.replace(batch, parts)
        return all(self._deliver(part, deadline, result) for part in queued)

    def _send_with_retries(self, request: Outgoing, deadline: float) -> Reply:
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
            timeout = max(MIN_ATTEMPT_SECONDS, deadline - self.clock())
            return self.sink.send(request, timeout=timeout)

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
