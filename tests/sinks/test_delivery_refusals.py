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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from exporter.config import PramathusSettings
from exporter.model import MetricPoint, RunContext
from exporter.sinks.delivery import Drainer, Outcome
from exporter.sinks.pramathus import PramathusSink
from exporter.state import StateStore
from exporter.state.outbox import QueueTotals
from tests.fakes import FakeClock, FakeResponse, SleepRecorder

ENDPOINT = "https://pramathus.example.com/api/metrics"
T0 = 1_705_314_000_000
CONTEXTS = {"run-a": RunContext("1", "churn", "brave-owl", {"team": "ml"})}


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
    with state.transaction():
        state.outbox(s.name).add(s.encode(pts, CONTEXTS, T0).batches, T0)


def drain(state: StateStore, s: PramathusSink) -> Any:
    clock = FakeClock()
    return Drainer(s, state.outbox(s.name), clock, SleepRecorder(clock)).drain()


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
