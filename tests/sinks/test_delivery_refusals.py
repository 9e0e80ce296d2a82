"""Unit tests for the delivery rule under refusals: blocked sinks, 413 and 400 bisection.

A point is delivered (a 2xx for the request that carried it), still queued, or set aside
with a reason. The queue is a real `StateStore` outbox in tmp_path; the endpoint is one of
the small fakes below, each imitating one way a real endpoint or proxy misbehaves:

- `BodyLimit`: a proxy in front of Pramathus that answers 413 above `limit` bytes (nginx's
  `client_max_body_size`) and 200 otherwise, recording the size of every request;
- `RefusesValues`: an endpoint answering 400 to any batch holding one of `refused` values
  (a validation error on some points) and 200 otherwise, recording what it accepted;
- `WrongKeyThenRight`: an endpoint answering 401 until `fixed` is set, then 200.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import SecretStr

from exporter.config import PramathusSettings
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.sinks.delivery import (
    Answer,
    Drainer,
    Outcome,
    Reply,
    post_batch,
    reply_for,
)
from exporter.sinks.pramathus import PramathusSink
from exporter.state import StateStore
from exporter.state.outbox import QueueEntry, QueueTotals
from tests.fakes import FakeClock, FakePost, FakeResponse, FakeSleep
from tests.fakes.sinks import FakeStepSink
from tests.support.planned import enqueue

ENDPOINT = "https://pramathus.example.com/api/metrics"
T0 = 1_705_314_000_000
CONTEXTS = {"run-a": RunContext("1", "churn", "brave-owl", {"team": "ml"})}
FIXES = {cause: f"fix {cause}" for cause in ("credentials", "redirect", "endpoint")}


def values(body: bytes) -> list[float]:
    return [m["value"] for m in json.loads(body)["metrics"]]


class BodyLimit:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sizes: list[int] = []
        self.accepted: list[float] = []

    def __call__(self, url: str, data: bytes = b"", **_: Any) -> FakeResponse:
        self.sizes.append(len(data))
        if len(data) > self.limit:
            return FakeResponse(413, "<html>413 Request Entity Too Large</html>")
        self.accepted.extend(values(data))
        return FakeResponse(200)


class RefusesValues:
    def __init__(self, refused: set[float]) -> None:
        self.refused = refused
        self.calls = 0
        self.accepted: list[float] = []

    def __call__(self, url: str, data: bytes = b"", **_: Any) -> FakeResponse:
        self.calls += 1
        got = values(data)
        if self.refused & set(got):
            return FakeResponse(400, '{"error": "invalid value"}')
        self.accepted.extend(got)
        return FakeResponse(200)


class WrongKeyThenRight:
    def __init__(self) -> None:
        self.fixed = False
        self.calls = 0
        self.accepted: list[float] = []

    def __call__(
        self, url: str, data: bytes = b"", headers: Mapping[str, str] | None = None, **_: Any
    ) -> FakeResponse:
        self.calls += 1
        if not self.fixed:
            return FakeResponse(401, "invalid api key")
        self.accepted.extend(values(data))
        return FakeResponse(200)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path)
    yield store
    store.close()


def sink(post: Any, **overrides: Any) -> PramathusSink:
    settings = PramathusSettings(
        enabled=True, endpoint=ENDPOINT, api_key=SecretStr("k-123456"), **overrides
    )
    return PramathusSink(settings, post=post)


def queue(state: StateStore, s: PramathusSink, n: int) -> None:
    pts = [MetricPoint("run-a", "loss", float(i), i, T0 + i) for i in range(n)]
    enqueue(state, s, pts, CONTEXTS, T0)


def drain(state: StateStore, s: PramathusSink) -> Any:
    clock = FakeClock()
    return Drainer(s, state.outbox(s.name), clock, FakeSleep(clock)).drain()


def set_aside(state: StateStore) -> list[tuple[str, int, int | None]]:
    rows = state.db.conn.execute("SELECT reason, points, status FROM dead_letter ORDER BY id")
    return [tuple(r) for r in rows]


def test_a_401_keeps_every_point_queued_stops_the_drain_and_a_right_key_delivers_all(
    state: StateStore,
) -> None:
    post = WrongKeyThenRight()
    s = sink(post, batch_size=10)
    queue(state, s, 30)

    first = drain(state, s)

    assert post.calls == 1  # not retried, and no later batch tried
    assert first.blocked == "credentials"
    assert "PRAMATHUS_API_KEY" in (first.error or "")
    assert state.outbox(s.name).totals() == QueueTotals(3, 30)
    assert set_aside(state) == []

    post.fixed = True
    second = drain(state, s)

    assert (second.points, second.blocked, second.error) == (30, None, None)
    assert sorted(post.accepted) == [float(i) for i in range(30)]


def test_a_413_splits_the_batch_until_accepted_and_remembers_the_accepted_size(
    state: StateStore,
) -> None:
    post = BodyLimit(limit=4096)
    s = sink(post, batch_size=100)
    queue(state, s, 100)

    result = drain(state, s)

    assert sorted(post.accepted) == [float(i) for i in range(100)]
    assert result.points == 100
    assert set_aside(state) == []
    limit = state.outbox(s.name).body_limit()
    assert limit is not None
    assert limit <= 4096

    # Later batches larger than what was accepted are split before any is sent.
    post.sizes.clear()
    queue(state, s, 100)
    assert drain(state, s).points == 100
    assert max(post.sizes) <= limit
    assert all(size <= 4096 for size in post.sizes)


def test_a_single_point_too_large_for_the_endpoint_is_set_aside_as_too_large(
    state: StateStore,
) -> None:
    post = BodyLimit(limit=10)
    s = sink(post, batch_size=2)
    queue(state, s, 2)

    result = drain(state, s)

    assert result.set_aside == {"too_large": 2}
    assert set_aside(state) == [("too_large", 1, 413), ("too_large", 1, 413)]
    assert state.outbox(s.name).totals() == QueueTotals(0, 0)


def test_a_400_on_some_points_sets_aside_only_those(state: StateStore) -> None:
    post = RefusesValues({3.0, 12.0})
    s = sink(post, batch_size=16)
    queue(state, s, 16)

    result = drain(state, s)

    assert sorted(post.accepted) == [float(i) for i in range(16) if i not in (3, 12)]
    assert result.set_aside == {"rejected": 2}
    assert set_aside(state) == [("rejected", 1, 400), ("rejected", 1, 400)]


def test_set_aside_points_can_be_replayed_with_their_keys_and_then_delivered(
    state: StateStore,
) -> None:
    post = RefusesValues({1.0})
    s = sink(post, batch_size=1)
    queue(state, s, 3)
    drain(state, s)
    outbox = state.outbox(s.name)
    [aside] = outbox.set_aside_batches("rejected")
    key = state.db.conn.execute("SELECT idempotency_key FROM dead_letter").fetchone()[0]

    with state.transaction():
        moved = outbox.replay(reason="too_large")
    assert moved == QueueTotals(0, 0)
    with state.transaction():
        moved = outbox.replay(reason="rejected")

    assert moved == QueueTotals(1, 1)
    assert (aside.reason, aside.points, aside.status) == ("rejected", 1, 400)
    assert outbox.set_aside_batches() == []
    assert [b.idempotency_key for b in outbox.batches()] == [key]
    post.refused = set()
    assert drain(state, s).points == 1
    assert sorted(post.accepted) == [0.0, 1.0, 2.0]


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_keeps_points_queued_and_blocks_the_sink(state: StateStore, status: int) -> None:
    calls: list[str] = []

    def post(url: str, **kwargs: Any) -> FakeResponse:
        calls.append(url)
        assert kwargs["allow_redirects"] is False
        return FakeResponse(status, "", {"Location": "https://pramathus.example.com/moved"})

    s = sink(post, batch_size=5)
    queue(state, s, 10)

    result = drain(state, s)

    assert calls == [ENDPOINT]
    assert result.blocked == "redirect"
    assert result.points == 0
    assert "https://pramathus.example.com/moved" in (result.error or "")
    assert state.outbox(s.name).totals() == QueueTotals(2, 10)


def test_blocked_is_an_outcome_of_its_own() -> None:
    assert Outcome.BLOCKED.value == "blocked"


# ---------------------------------------------------------------- what each status gets


@pytest.mark.parametrize(
    ("status", "outcome", "detail"),
    [
        (200, Outcome.ACCEPTED, ""),
        (299, Outcome.ACCEPTED, ""),
        (300, Outcome.BLOCKED, "redirect"),
        (301, Outcome.BLOCKED, "redirect"),
        (399, Outcome.BLOCKED, "redirect"),
        (400, Outcome.REFUSED, "rejected"),
        (401, Outcome.BLOCKED, "credentials"),
        (403, Outcome.BLOCKED, "credentials"),
        (404, Outcome.BLOCKED, "endpoint"),
        (405, Outcome.BLOCKED, "endpoint"),
        (410, Outcome.BLOCKED, "endpoint"),
        (409, Outcome.REFUSED, "rejected"),
        (413, Outcome.REFUSED, "too_large"),
        (422, Outcome.REFUSED, "rejected"),
        (429, Outcome.RETRY, ""),
        (500, Outcome.RETRY, ""),
    ],
)
def test_each_status_gets_one_outcome_for_every_sink(
    status: int, outcome: Outcome, detail: str
) -> None:
    reply = reply_for(status, "HTTP", FIXES)

    assert reply.outcome is outcome
    if outcome is Outcome.BLOCKED:
        assert reply.cause == detail
        assert reply.message.endswith(f"points stay queued; fix {detail}")
    if outcome is Outcome.REFUSED:
        assert reply.reason == detail
        assert reply.splittable is (status in (400, 413, 422))


def test_a_redirect_message_names_the_location_or_says_there_was_none() -> None:
    moved = reply_for(301, "HTTP 301", FIXES, location="https://new.test/in")
    bare = reply_for(302, "HTTP 302", FIXES)
    refused = reply_for(401, "HTTP 401", FIXES, location="https://new.test/in")

    assert moved.message == (
        "HTTP 301 (redirected to https://new.test/in; a POST is never re-sent as a GET): "
        "points stay queued; fix redirect"
    )
    assert bare.message == (
        "HTTP 302 (redirected; a POST is never re-sent as a GET): points stay queued; fix redirect"
    )
    assert refused.message == "HTTP 401: points stay queued; fix credentials"


# ---------------------------------------------------------------- the drainer's edges


def scripted_queue(state: StateStore, s: FakeStepSink, bodies: list[bytes]) -> None:
    """One batch per body: points whose steps are the body's numbers, in time order."""
    entries = []
    for i, body in enumerate(bodies):
        steps = json.loads(body)
        pts = tuple(MetricPoint("run-a", "x", 0.0, n, T0 + at) for at, n in enumerate(steps))
        entries.append(QueueEntry(f"k{i}", len(pts), CapturedBatch(pts)))
    with state.transaction():
        state.outbox(s.name).add(entries)


def scripted_drain(state: StateStore, s: FakeStepSink) -> Any:
    clock = FakeClock()
    return Drainer(s, state.outbox(s.name), clock, FakeSleep(clock)).drain()


def test_a_blocked_reply_without_a_cause_blocks_as_an_endpoint_problem(state: StateStore) -> None:
    s = FakeStepSink([Reply(Outcome.BLOCKED, "no")])
    scripted_queue(state, s, [b"[1]"])

    assert scripted_drain(state, s).blocked == "endpoint"


def test_a_body_exactly_at_the_learnt_limit_is_sent_whole(state: StateStore) -> None:
    s = FakeStepSink([])
    state.outbox(s.name).set_body_limit(len(b"[1, 2]"))
    scripted_queue(state, s, [b"[1, 2]", b"[1, 2, 3]"])

    scripted_drain(state, s)

    assert s.bodies == [b"[1, 2]", b"[1]", b"[2, 3]"]


def test_a_single_point_over_the_learnt_limit_is_sent_not_split(state: StateStore) -> None:
    s = FakeStepSink([])
    state.outbox(s.name).set_body_limit(2)
    scripted_queue(state, s, [b"[1234]"])

    assert scripted_drain(state, s).points == 1
    assert s.bodies == [b"[1234]"]


def test_parts_split_before_sending_are_retried_within_the_same_budget(
    state: StateStore,
) -> None:
    s = FakeStepSink([Reply(Outcome.RETRY, "busy", 503)])
    state.outbox(s.name).set_body_limit(4)
    scripted_queue(state, s, [b"[1, 2]"])

    result = scripted_drain(state, s)

    assert (result.points, result.error) == (2, None)
    assert s.bodies == [b"[1]", b"[1]", b"[2]"]


def test_the_limit_is_the_largest_body_accepted_after_a_413_in_that_drain(
    state: StateStore,
) -> None:
    too_large = Reply(Outcome.REFUSED, "413", 413, reason="too_large", splittable=True)
    s = FakeStepSink([Reply(Outcome.ACCEPTED), too_large])
    state.outbox(s.name).set_body_limit(99)  # learnt before: replaced by what is learnt now
    scripted_queue(state, s, [b"[1, 2, 3, 4, 5]", b"[1, 2, 300]", b"[10, 2]"])

    scripted_drain(state, s)

    # Before the 413 nothing is learnt; after it [1] (3 bytes), [2, 300] (8), [10, 2] (7).
    assert s.bodies[2:] == [b"[1]", b"[2, 300]", b"[10, 2]"]
    assert state.outbox(s.name).body_limit() == len(b"[2, 300]")


def test_each_attempt_waits_at_most_what_is_left_of_the_budget(state: StateStore) -> None:
    timeouts: list[float] = []
    clock = FakeClock()

    def slow(url: str, timeout: float = 0.0, **_: Any) -> FakeResponse:
        timeouts.append(timeout)
        clock.advance(timeout)  # the endpoint never answers in time
        return FakeResponse(503, "busy")

    s = sink(slow, batch_size=10, timeout_seconds=10, delivery_budget_seconds=25)
    queue(state, s, 3)

    Drainer(s, state.outbox(s.name), clock, FakeSleep(clock)).drain()

    assert timeouts[:2] == [10, 10]
    assert all(t <= 10 for t in timeouts)
    assert sum(timeouts) <= 25 + 1.0  # never past the budget but for the last second's floor
    assert min(timeouts) >= 1.0


@pytest.mark.parametrize(("budget", "expected"), [(13.5, [10.0, 3.5]), (10.5, [10.0, 1.0])])
def test_the_last_attempt_gets_what_is_left_of_the_budget_or_one_second(
    state: StateStore, budget: float, expected: list[float]
) -> None:
    timeouts: list[float] = []
    clock = FakeClock()

    def slow(url: str, timeout: float = 0.0, **_: Any) -> FakeResponse:
        timeouts.append(timeout)
        clock.advance(timeout)  # answers only when the client gives up
        return FakeResponse(503, "busy", {"Retry-After": "0"})

    s = sink(slow, batch_size=10, timeout_seconds=10, delivery_budget_seconds=budget)
    queue(state, s, 1)

    Drainer(s, state.outbox(s.name), clock, FakeSleep(clock)).drain()

    assert timeouts == pytest.approx(expected)


def test_an_accepted_reply_carries_the_status_the_endpoint_answered() -> None:
    assert reply_for(204, "HTTP 204", FIXES).status == 204
    assert reply_for(200, "HTTP 200", FIXES).status == 200


def test_a_batch_whose_row_cannot_be_written_is_not_sent(state: StateStore) -> None:
    # A full or read-only state refuses the claim's write; a trigger makes SQLite refuse it
    # for the first batch's row only, so a claim that wrote no row would let it go out.
    s = FakeStepSink([])
    scripted_queue(state, s, [b"[1]", b"[2]"])
    first = next(iter(state.outbox(s.name).batches())).id
    state.db.conn.execute(
        "CREATE TEMP TRIGGER full BEFORE UPDATE ON spool "
        f"WHEN OLD.id = {first} BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
    )

    with pytest.raises(sqlite3.Error, match="disk is full"):
        scripted_drain(state, s)

    assert s.bodies == []


# ---------------------------------------------------------------- one POST: post_batch


def _post_batch(post: FakePost) -> Answer | Reply:
    return post_batch(
        post,
        "https://in.test/v1",
        name="the receiver",
        variable="IN_URL",
        timeout=2.5,
        data=b"x",
        headers={},
    )


def test_a_batch_that_gets_an_answer_comes_back_with_it_and_the_url_that_gave_it() -> None:
    post = FakePost([FakeResponse(307, "", {"Location": "/v2"}), FakeResponse(202, "ok")])

    answer = _post_batch(post)

    assert isinstance(answer, Answer)
    assert answer.response.status_code == 202
    assert answer.url == "https://in.test/v2"
    assert [(c.data, c.timeout) for c in post.calls] == [(b"x", 2.5), (b"x", 2.5)]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (
            requests.Timeout("read timed out"),
            "the receiver timed out after 2.5s at https://in.test/v1",
        ),
        (
            requests.ConnectionError("Connection refused"),
            (
                "cannot reach the receiver at https://in.test/v1 (connection refused): is it up, "
                "and is IN_URL right?"
            ),
        ),
    ],
)
def test_a_batch_that_gets_no_answer_is_retried_with_one_line_naming_the_setting(
    error: Exception, message: str
) -> None:
    reply = _post_batch(FakePost([error]))

    assert reply == Reply(Outcome.RETRY, message)
