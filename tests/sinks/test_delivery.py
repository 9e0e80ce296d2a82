"""Unit tests for exporter.sinks.delivery: draining one sink's queue within its budget.

The queue is a real `StateStore` outbox in tmp_path. Time only moves when the drainer sleeps
(`FakeSleep` advancing a `FakeClock`) or when a fake server is slow (`FakeSlowPost`).
Pramathus answers come from `FakePost`; splitting is exercised with the remote write sink
against `FakeReceiver`, which refuses samples that are too old the way Prometheus does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from exporter.config import PramathusSettings, RemoteWriteSettings
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.sinks import remote_write as rw
from exporter.sinks.delivery import (
    POINTS,
    TRACE_BUCKETS,
    BucketSink,
    DeliverySink,
    Drainer,
    DrainResult,
    Outcome,
    Reply,
    bucket_sinks,
    consumes,
    halves,
    retry_after_seconds,
)
from exporter.sinks.history import RemoteWriteSink
from exporter.sinks.pramathus import PramathusSink
from exporter.state import StateStore, captured
from exporter.state.outbox import Outbox, QueuedBatch, QueueEntry, QueueTotals
from exporter.trace_model import BucketSample
from tests.fakes import FakeClock, FakePost, FakeResponse, FakeSleep
from tests.fakes.http import FakeSlowPost
from tests.fakes.remote_write import FakeReceiver
from tests.fakes.sinks import FakeDeliverySink, FakeStepSink
from tests.support import planned

ENDPOINT = "https://pramathus.example.com/api/metrics"
RW_URL = "http://receiver.test:9090/api/v1/write"
T0 = 1_705_314_000_000
CONTEXTS = {"run-a": RunContext("1", "churn", "brave-owl", {"team": "ml"})}


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path)
    yield store
    store.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


def points(n: int, start: int = 0) -> list[MetricPoint]:
    return [
        MetricPoint("run-a", "loss", float(i), i, T0 + i * 1000) for i in range(start, start + n)
    ]


def pramathus(post: Any, **overrides: Any) -> PramathusSink:
    settings = PramathusSettings(
        enabled=True, endpoint=ENDPOINT, api_key=SecretStr("k-123456"), **overrides
    )
    return PramathusSink(settings, post=post)


def enqueue(state: StateStore, sink: DeliverySink, pts: Sequence[MetricPoint]) -> list[QueuedBatch]:
    return planned.enqueue(state, sink, pts, CONTEXTS, T0)


def drainer(state: StateStore, sink: DeliverySink, clock: FakeClock, sleep: Any) -> Drainer:
    return Drainer(sink, state.outbox(sink.name), clock, sleep)


def dead_letters(state: StateStore) -> list[tuple[str, int | None, int, str]]:
    """(reason, status, points, error) of every set-aside batch, oldest first."""
    rows = state.db.conn.execute(
        "SELECT reason, status, points, error FROM dead_letter ORDER BY id"
    ).fetchall()
    return [tuple(r) for r in rows]


def attempts(state: StateStore) -> list[tuple[int, str | None]]:
    rows = state.db.conn.execute("SELECT attempts, last_error FROM spool ORDER BY id").fetchall()
    return [tuple(r) for r in rows]


def sent_values(post: FakePost) -> list[list[float]]:
    """The metric values each recorded POST carried."""
    return [[m["value"] for m in json.loads(c.data)["metrics"]] for c in post.calls]


# ---------------------------------------------------------------- retries within the budget


def test_five_transient_failures_then_success_are_delivered_within_the_default_budget(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    retry_in_1s = FakeResponse(429, "slow down", {"Retry-After": "1"})
    post = FakePost([503, 503, 503, retry_in_1s, 429, 200])
    sink = pramathus(post)
    assert (sink.budget_seconds, sink.max_attempts) == (30.0, 0)  # the defaults under test
    enqueue(state, sink, points(3))

    result = drainer(state, sink, clock, sleep).drain()

    assert result == DrainResult(batches=1, points=3)
    assert len(post.calls) == 6
    assert len(set(post.idempotency_keys)) == 1
    assert len({c.data for c in post.calls}) == 1
    assert state.outbox("pramathus").totals() == QueueTotals(0, 0)


def test_backoff_waits_grow_exponentially_and_retry_after_is_waited_exactly(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    start = clock()
    retry_in_1s = FakeResponse(429, "slow down", {"Retry-After": "1"})
    sink = pramathus(FakePost([503, 503, 503, retry_in_1s, 429, 200]))
    enqueue(state, sink, points(1))

    drainer(state, sink, clock, sleep).drain()

    first, second, third, hinted, fifth = sleep.delays
    assert hinted == 1.0
    # Capped exponential backoff from 0.5 s, plus up to 1 s of jitter.
    for delay, base in ((first, 0.5), (second, 1.0), (third, 2.0), (fifth, 8.0)):
        assert base <= delay <= base + 1
    assert clock() - start == pytest.approx(sum(sleep.delays))


def test_a_retry_after_longer_than_the_budget_is_cut_to_what_is_left_of_it(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    start = clock()
    wait_two_minutes = FakeResponse(429, "", {"Retry-After": "120"})
    post = FakePost([wait_two_minutes, wait_two_minutes])
    sink = pramathus(post)
    enqueue(state, sink, points(1))

    result = drainer(state, sink, clock, sleep).drain()

    assert sleep.delays == [30.0]
    assert clock() == start + 30.0
    assert len(post.calls) == 2  # one more try at the deadline, then no more
    assert result.batches == 0
    assert result.error is not None
    assert "HTTP 429" in result.error


def test_retries_stop_exactly_when_the_budget_is_spent_and_the_batch_stays_queued(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    deadline = clock() + 30.0
    post = FakePost(default=FakeResponse(503, "overloaded"))
    sink = pramathus(post)
    enqueue(state, sink, points(2))

    result = drainer(state, sink, clock, sleep).drain()

    assert clock() == deadline  # slept exactly the budget, not a moment more
    assert len(post.calls) == len(sleep.delays) + 1
    # The last wait was cut to what was left: backoff alone would have waited 16 s or more.
    assert sleep.delays[-1] < 16
    assert sum(sleep.delays[:-1]) + sleep.delays[-1] == pytest.approx(30.0)
    assert result.batches == 0
    assert result.error == "Pramathus answered HTTP 503: overloaded"
    assert state.outbox("pramathus").totals() == QueueTotals(1, 2)
    assert attempts(state) == [(1, "Pramathus answered HTTP 503: overloaded")]


def test_a_batch_that_keeps_failing_counts_one_attempt_per_drain_and_keeps_its_key(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost([503, 503])
    sink = pramathus(post, max_attempts=1)
    enqueue(state, sink, points(1))

    drainer(state, sink, clock, sleep).drain()
    drainer(state, sink, clock, sleep).drain()
    assert attempts(state) == [(2, "Pramathus answered HTTP 503: ")]
    result = drainer(state, sink, clock, sleep).drain()

    assert result.batches == 1
    assert len(set(post.idempotency_keys)) == 1
    assert len(post.calls) == 3


def test_max_attempts_caps_the_tries_of_a_batch_within_one_drain(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    start = clock()
    post = FakePost(default=FakeResponse(503, ""))
    sink = pramathus(post, max_attempts=3)
    enqueue(state, sink, points(1))

    result = drainer(state, sink, clock, sleep).drain()

    assert len(post.calls) == 3
    assert len(sleep.delays) == 2
    assert clock() - start < 30  # stopped by the attempt cap, not the budget
    assert result.error is not None


def test_connection_errors_are_retried_like_transient_statuses(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost([requests.ConnectionError("refused"), requests.Timeout("slow"), 200])
    sink = pramathus(post)
    enqueue(state, sink, points(1))

    result = drainer(state, sink, clock, sleep).drain()

    assert result.batches == 1
    assert len(post.calls) == 3


# ---------------------------------------------------------------- refusals and order


def test_a_refused_batch_is_set_aside_with_reason_and_status_and_later_batches_still_go(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    refusal = FakeResponse(409, '{"error": "bad metric"}')
    post = FakePost([200, refusal, 200])
    sink = pramathus(post, batch_size=2)
    enqueue(state, sink, points(6))

    result = drainer(state, sink, clock, sleep).drain()

    assert len(post.calls) == 3  # the refusal is not retried
    assert sent_values(post) == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert (result.batches, result.points) == (2, 4)
    assert result.set_aside == {"rejected": 2}
    assert result.error == 'Pramathus answered HTTP 409: {"error": "bad metric"}'
    assert dead_letters(state) == [
        ("rejected", 409, 2, 'Pramathus answered HTTP 409: {"error": "bad metric"}')
    ]
    assert state.outbox("pramathus").totals() == QueueTotals(0, 0)


def test_a_batch_that_must_wait_holds_back_every_later_batch(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost([200, 503, 200])
    sink = pramathus(post, batch_size=1, max_attempts=1)
    enqueue(state, sink, points(3))

    result = drainer(state, sink, clock, sleep).drain()

    assert sent_values(post) == [[0.0], [1.0]]  # the third batch is never tried
    assert (result.batches, result.points) == (1, 1)
    assert attempts(state) == [(1, "Pramathus answered HTTP 503: "), (0, None)]

    result = drainer(state, sink, clock, sleep).drain()
    assert sent_values(post)[2:] == [[1.0], [2.0]]  # oldest first again
    assert result.batches == 2


def test_should_stop_is_checked_between_batches(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost()
    sink = pramathus(post, batch_size=1)
    enqueue(state, sink, points(3))

    result = drainer(state, sink, clock, sleep).drain(should_stop=lambda: len(post.calls) >= 1)

    assert result.stopped is True
    assert (result.batches, len(post.calls)) == (1, 1)
    assert state.outbox("pramathus").totals() == QueueTotals(2, 2)


def test_should_stop_before_the_first_batch_sends_nothing(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost()
    sink = pramathus(post)
    enqueue(state, sink, points(2))

    result = drainer(state, sink, clock, sleep).drain(should_stop=lambda: True)

    assert result == DrainResult(stopped=True)
    assert post.calls == []


def test_a_spent_budget_leaves_later_batches_queued_with_a_message_saying_so(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost()
    sink = pramathus(FakeSlowPost(post, clock, 31.0), batch_size=1)
    enqueue(state, sink, points(3))

    result = drainer(state, sink, clock, sleep).drain()

    assert (result.batches, len(post.calls)) == (1, 1)
    assert result.error == (
        "pramathus: delivery budget of 30s spent; the rest stays queued for the next cycle"
    )
    assert state.outbox("pramathus").totals() == QueueTotals(2, 2)
    assert sleep.delays == []


def test_an_empty_queue_drains_to_nothing(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost()
    assert drainer(state, pramathus(post), clock, sleep).drain() == DrainResult()
    assert post.calls == []


# ---------------------------------------------------------------- splitting refused batches


def remote_write_sink(receiver: FakeReceiver, batch_size: int = 5000) -> RemoteWriteSink:
    settings = RemoteWriteSettings(enabled=True, url=RW_URL, batch_size=batch_size)
    return RemoteWriteSink(
        settings, run_id_length=lambda: 12, client=rw.RemoteWriteClient(settings, post=receiver)
    )


def stored_timestamps(receiver: FakeReceiver, family: str) -> list[int]:
    return sorted(
        t
        for labels, samples in receiver.stored.items()
        if dict(labels)["__name__"] == family
        for t in samples
    )


def test_a_partly_too_old_batch_is_bisected_until_only_the_old_samples_are_set_aside(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    # Points 0-2 are older than the receiver takes; 3-7 are fine. One request of 16 samples.
    receiver = FakeReceiver(oldest_ms=T0 + 3000)
    sink = remote_write_sink(receiver)
    [batch] = enqueue(state, sink, points(8))
    assert batch.points == 16

    result = drainer(state, sink, clock, sleep).drain()

    assert result.set_aside == {"too_old": 6}
    assert (result.points, result.error is not None) == (10, True)
    good = [T0 + i * 1000 for i in range(3, 8)]
    assert stored_timestamps(receiver, "mlflow_loss") == good
    assert stored_timestamps(receiver, "mlflow_metric_step") == good
    # Every set-aside batch holds only refused points, and nothing was retried or waited for.
    aside = state.db.conn.execute("SELECT body, reason, status, form FROM dead_letter").fetchall()
    old = {T0, T0 + 1000, T0 + 2000}
    for body, reason, status, form in aside:
        assert (reason, status, form) == ("too_old", 400, "captured")
        assert {p.timestamp_ms for p in captured.loads(body).points} <= old
    assert sum(sink.count(captured.loads(body)) for body, _, _, _ in aside) == 6
    assert sleep.delays == []
    assert state.outbox("remote_write").totals() == QueueTotals(0, 0)


def test_halves_of_a_split_batch_are_sent_older_first_right_away(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    receiver = FakeReceiver(oldest_ms=T0 + 2000)
    sink = remote_write_sink(receiver)
    enqueue(state, sink, points(4))  # 8 samples; points 0 and 1 too old

    drainer(state, sink, clock, sleep).drain()

    first_stamps = [min(t for ts in c.series for t, _ in ts.samples) for c in receiver.calls]
    # whole batch (refused), older half (refused), its halves..., then the newer half.
    assert next(c.status for c in receiver.calls) == 400
    assert first_stamps[1] == T0
    assert first_stamps[-1] == T0 + 2000
    assert receiver.calls[-1].status == 204
    accepted = [len(ts.samples) for c in receiver.calls if c.status == 204 for ts in c.series]
    assert sum(accepted) == 4


def test_a_single_refused_point_is_set_aside_without_splitting(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    sink = FakeStepSink([Reply(Outcome.REFUSED, "too old", 400, reason="too_old", splittable=True)])
    outbox = _queued(state, sink, [[1]])

    result = drainer(state, sink, clock, sleep).drain()

    assert sink.sent == [[1]]
    assert result.set_aside == {"too_old": 1}
    assert outbox.totals() == QueueTotals(0, 0)


def test_a_split_half_that_must_wait_stops_the_drain_and_stays_queued(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    sink = FakeStepSink(
        [
            Reply(Outcome.REFUSED, "too old", 400, reason="too_old", splittable=True),
            Reply(Outcome.RETRY, "receiver restarting", 503),
        ],
        max_attempts=1,
    )
    outbox = _queued(state, sink, [[1, 2, 3, 4], [5]])

    result = drainer(state, sink, clock, sleep).drain()

    assert sink.sent == [[1, 2, 3, 4], [1, 2]]  # the newer half and the later batch wait
    assert result.error == "receiver restarting"
    queued = [json.loads(sink.encode(captured.loads(b.body))) for b in outbox.batches()]
    assert sorted(queued) == [[1, 2], [3, 4], [5]]


def item(step: int) -> MetricPoint:
    """A point of the scripted sink: later steps are newer."""
    return MetricPoint("run-a", "loss", float(step), step, T0 + step)


# ---------------------------------------------------------------- boundaries


def _queued(state: StateStore, sink: FakeStepSink, items: list[list[int]]) -> Outbox:
    """Batches of the scripted sink's points, one per list of steps (keys `k0`, `k1`...)."""
    outbox = state.outbox(sink.name)
    with state.transaction():
        outbox.add(
            [
                QueueEntry(f"k{i}", len(it), CapturedBatch(tuple(item(s) for s in it)))
                for i, it in enumerate(items)
            ]
        )
    return outbox


def test_a_budget_spent_to_the_exact_second_sends_no_further_batch(
    state: StateStore, clock: FakeClock
) -> None:
    sink = FakeStepSink([])
    outbox = _queued(state, sink, [[1], [2]])

    class SendsForTheWholeBudget(Drainer):
        def _deliver(self, batch: QueuedBatch, deadline: float, result: DrainResult) -> bool:
            clock.now = deadline  # the first batch takes exactly what was left
            return super()._deliver(batch, deadline, result)

    result = SendsForTheWholeBudget(sink, outbox, clock, FakeSleep(clock)).drain()

    assert sink.sent == [[1]]
    assert result.error is not None
    assert "budget" in result.error


def test_a_refused_batch_of_two_points_is_split_into_single_points(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    refused = Reply(Outcome.REFUSED, "too old", 400, reason="too_old", splittable=True)
    sink = FakeStepSink([refused, refused])
    outbox = _queued(state, sink, [[1, 2]])

    result = Drainer(sink, outbox, clock, sleep).drain()

    assert sink.sent == [[1, 2], [1], [2]]
    assert (result.points, result.set_aside) == (1, {"too_old": 1})


def test_a_set_aside_batch_records_when_it_failed_in_milliseconds(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    sink = FakeStepSink([Reply(Outcome.REFUSED, "no", 400)])
    outbox = _queued(state, sink, [[1]])

    Drainer(sink, outbox, clock, sleep).drain()

    [(failed_ms,)] = state.db.conn.execute("SELECT failed_ms FROM dead_letter").fetchall()
    assert failed_ms == int(clock() * 1000)


def test_backoff_is_capped_at_thirty_seconds(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    busy = Reply(Outcome.RETRY, "busy")
    sink = FakeStepSink([busy] * 12)
    outbox = _queued(state, sink, [[1]])
    sink.budget_seconds = 10_000

    Drainer(sink, outbox, clock, sleep).drain()

    assert max(sleep.delays) == 30.0
    assert sink.sent[-1] == [1]


def test_a_wait_never_outlasts_what_is_left_of_the_budget(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    sink = FakeStepSink([Reply(Outcome.RETRY, "busy", retry_after=0.0)] * 3)
    sink.budget_seconds = 0.4
    outbox = _queued(state, sink, [[1]])

    Drainer(sink, outbox, clock, sleep).drain()

    assert sleep.delays
    assert all(d <= 0.4 for d in sleep.delays)
    assert sleep.delays[0] == 0.0  # Retry-After 0 is honoured as no wait at all


def test_retry_after_zero_and_non_finite_values() -> None:
    assert retry_after_seconds("0", now=0.0) == 0.0
    assert retry_after_seconds("inf", now=0.0) is None
    assert retry_after_seconds("-5", now=0.0) == 0.0


def test_points_receivers_said_they_dropped_add_up_over_the_batches_of_a_drain(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    sink = FakeStepSink(
        [
            Reply(Outcome.ACCEPTED, dropped_by_receiver=1),
            Reply(Outcome.ACCEPTED),
            Reply(Outcome.ACCEPTED, dropped_by_receiver=2),
        ]
    )
    outbox = _queued(state, sink, [[1, 2], [3], [4, 5]])

    result = Drainer(sink, outbox, clock, sleep).drain()

    assert (result.batches, result.points, result.dropped_by_receiver) == (3, 5, 3)
    assert list(outbox.batches()) == []


# ---------------------------------------------------------------- the captured form


def test_a_refused_batch_splits_by_time_older_half_first_each_half_under_a_new_key(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    refused = Reply(Outcome.REFUSED, "bad", 400, splittable=True)
    sink = FakeStepSink([refused])
    outbox = _queued(state, sink, [[4, 1, 3, 2]])  # queued out of time order

    result = Drainer(sink, outbox, clock, sleep).drain()

    assert sink.sent == [[4, 1, 3, 2], [1, 2], [3, 4]]
    assert sink.counts == [4, 2, 2]
    assert sink.keys[0] == "k0"
    assert len(set(sink.keys)) == 3
    assert (result.batches, result.points) == (2, 4)


def test_halves_keep_the_contexts_of_their_runs_and_the_capture_time() -> None:
    early = MetricPoint("run-a", "loss", 1.0, 1, T0)
    late = MetricPoint("run-b", "loss", 2.0, 1, T0 + 5)
    contexts = {**CONTEXTS, "run-b": RunContext("2", "other", "calm", {})}
    batch = CapturedBatch((late, early), contexts, created_ms=7)

    older, newer = halves(batch)

    assert older == CapturedBatch((early,), {"run-a": CONTEXTS["run-a"]}, created_ms=7)
    assert newer == CapturedBatch((late,), {"run-b": contexts["run-b"]}, created_ms=7)
    with pytest.raises(ValueError, match="cannot split a batch of 1"):
        halves(older)


def test_halves_of_a_batch_of_points_and_buckets_cut_both_by_time() -> None:
    pts = tuple(MetricPoint("run-a", "loss", 1.0, i, T0 + i) for i in (0, 1))
    buckets = tuple(BucketSample("1", "f", (), T0 + i, 1.0) for i in (2, 3))

    older, newer = halves(CapturedBatch(pts, CONTEXTS, buckets))

    assert (older.points, older.buckets) == (pts, ())
    assert (newer.points, newer.buckets) == ((), buckets)


def test_halves_of_trace_buckets_are_by_bucket_time() -> None:
    buckets = tuple(BucketSample("1", "f", (), T0 + i, float(i)) for i in (3, 0, 2, 1))

    older, newer = halves(CapturedBatch(buckets=buckets))

    assert [b.bucket_ms - T0 for b in older.buckets] == [0, 1]
    assert [b.bucket_ms - T0 for b in newer.buckets] == [2, 3]


def test_remote_write_counts_each_split_half_in_samples(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    receiver = FakeReceiver(oldest_ms=T0 + 2000)
    sink = remote_write_sink(receiver)
    enqueue(state, sink, points(4))  # 8 samples: points 0 and 1 too old

    result = drainer(state, sink, clock, sleep).drain()

    assert (result.set_aside, result.points) == ({"too_old": 4}, 4)
    aside = state.outbox(sink.name).set_aside_batches()
    assert [a.points for a in aside] == [2, 2]


def test_a_batch_retried_in_a_later_drain_carries_the_same_key_and_body(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost([503, 503, 200])
    sink = pramathus(post, max_attempts=2)
    enqueue(state, sink, points(2))

    first = drainer(state, sink, clock, sleep).drain()
    clock.advance(3600)  # an hour later, the next cycle's drain
    second = drainer(state, sink, clock, sleep).drain()

    assert (first.batches, second.batches) == (0, 1)
    assert len(set(post.idempotency_keys)) == 1
    assert len({c.data for c in post.calls}) == 1
    assert json.loads(post.calls[-1].data)["timestamp"] == "2024-01-15T10:20:00.000Z"


def wire_row(state: StateStore, sink: str, body: bytes, points: int, key: str = "old") -> None:
    """A row as a version before 4 queued it: a request body, no form given."""
    state.db.conn.execute(
        "INSERT INTO spool (sink, idempotency_key, created_ms, points, body) "
        "VALUES (?, ?, ?, ?, ?)",
        (sink, key, T0, points, body),
    )


def test_a_wire_row_of_an_older_version_is_sent_as_it_is_before_later_batches(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    post = FakePost([200, 200])
    sink = pramathus(post)
    wire_row(state, "pramathus", b'{"metrics": ["as queued"]}', 3)
    enqueue(state, sink, points(1))

    result = drainer(state, sink, clock, sleep).drain()

    assert (result.batches, result.points) == (2, 4)
    assert post.calls[0].data == b'{"metrics": ["as queued"]}'
    assert post.idempotency_keys[0] == "old"
    assert [m["value"] for m in json.loads(post.calls[1].data)["metrics"]] == [0.0]


@pytest.mark.parametrize(("status", "reason"), [(413, "too_large"), (400, "rejected")])
def test_a_wire_row_that_would_need_splitting_is_set_aside_whole_and_can_be_replayed(
    state: StateStore, clock: FakeClock, sleep: FakeSleep, status: int, reason: str
) -> None:
    post = FakePost([FakeResponse(status, "refused"), 200])
    sink = pramathus(post)
    wire_row(state, "pramathus", b'{"metrics": [1, 2, 3]}', 3)
    outbox = state.outbox("pramathus")

    result = drainer(state, sink, clock, sleep).drain()

    assert result.set_aside == {reason: 3}
    assert len(post.calls) == 1
    [aside] = outbox.set_aside_batches()
    assert (aside.reason, aside.points) == (reason, 3)
    assert aside.error == (
        f"Pramathus answered HTTP {status}: refused (queued by an older version as a request "
        "body: set aside whole)"
    )
    outbox.replay()
    assert drainer(state, sink, clock, sleep).drain().points == 3
    assert post.calls[1].data == b'{"metrics": [1, 2, 3]}'


def test_a_version_3_state_delivers_its_queued_request_body_once_after_the_upgrade(
    tmp_path: Path, clock: FakeClock, sleep: FakeSleep
) -> None:
    directory = tmp_path / "state"
    old = StateStore(directory)
    conn = old.db.conn
    for table in ("spool", "dead_letter"):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN form")  # the version 3 layout
    conn.execute("PRAGMA user_version = 3")
    wire_row(old, "pramathus", b'{"metrics": ["v3"]}', 2)
    old.close()

    post = FakePost([200])
    state = StateStore(directory)
    try:
        sink = pramathus(post)
        first = drainer(state, sink, clock, sleep).drain()
        second = drainer(state, sink, clock, sleep).drain()
    finally:
        state.close()

    assert (first.batches, first.points, second.batches) == (1, 2, 0)
    assert [c.data for c in post.calls] == [b'{"metrics": ["v3"]}']


def test_a_wire_row_refused_for_good_is_set_aside_with_the_message_as_it_came(
    state: StateStore, clock: FakeClock, sleep: FakeSleep
) -> None:
    sink = pramathus(FakePost([FakeResponse(409, "conflict")]))
    wire_row(state, "pramathus", b'{"metrics": [1]}', 1)

    result = drainer(state, sink, clock, sleep).drain()

    assert result.set_aside == {"rejected": 1}
    [aside] = state.outbox("pramathus").set_aside_batches()
    assert aside.error == "Pramathus answered HTTP 409: conflict"


# ---------------------------------------------------------------- what a sink consumes


class DeclaresBucketsOnly(FakeStepSink):
    """A sink that says it takes trace buckets but cannot plan them (no `plan_buckets`)."""

    consumes = frozenset({POINTS, TRACE_BUCKETS})


def test_a_sink_declaring_nothing_takes_points_only_and_remote_write_takes_buckets() -> None:
    remote_write: BucketSink = RemoteWriteSink(RemoteWriteSettings(enabled=True, url=RW_URL))

    assert consumes(FakeStepSink([])) == {POINTS}
    assert consumes(pramathus(FakePost([]))) == {POINTS}
    assert consumes(remote_write) == {POINTS, TRACE_BUCKETS}
    assert bucket_sinks([remote_write]) == [remote_write]


def test_trace_buckets_go_only_to_sinks_that_declare_them_and_can_plan_them() -> None:
    taker = FakeDeliverySink(name="taker", consumes=frozenset({POINTS, TRACE_BUCKETS}))
    points_only = FakeDeliverySink(name="points_only")  # has plan_buckets, declares points
    sinks: list[DeliverySink] = [points_only, taker, DeclaresBucketsOnly([]), FakeStepSink([])]

    assert bucket_sinks(sinks) == [taker]
    assert bucket_sinks([]) == []
