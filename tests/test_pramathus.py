"""Unit tests for exporter.sinks.pramathus: payload contract, spool, delivery and retries.

The sink runs against a real StateStore in tmp_path; HTTP, sleeping and time are the fakes
from tests/fakes.py, so nothing here opens a socket or waits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.config import PramathusSettings
from exporter.model import MetricPoint
from exporter.sinks.pramathus import (
    SOURCE,
    PramathusSink,
    RunContext,
    build_payload,
    iso8601,
    point_json,
    public_tags,
)
from exporter.state import StateStore

from .fakes import FakeClock, FakePost, FakeResponse, SleepRecorder

ENDPOINT = "https://pramathus.example.com/api/metrics"
API_KEY = "test-api-key-123"
NOW = 1_705_314_585.123  # 2024-01-15T10:29:45.123Z
CTX = RunContext("churn-model", {"team": "ml"})
CONTEXTS = {"run-a": CTX, "run-b": RunContext("other", {})}
FAST = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def strict_loads(body: bytes) -> Any:
    """json.loads that rejects NaN/Infinity/-Infinity, as a strict JSON parser would."""

    def reject(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(body, parse_constant=reject)


def point(
    key: str = "val/loss", value: float = 0.5, step: int = 1, run: str = "run-a"
) -> MetricPoint:
    return MetricPoint(run, key, value, step, 1_705_314_000_000 + step)


def make_settings(**overrides: Any) -> PramathusSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "endpoint": ENDPOINT,
        "api_key": API_KEY,
        "batch_size": 2,
        "max_attempts": 3,
    }
    values.update(overrides)
    return PramathusSettings(**values)


class Harness:
    """A PramathusSink wired to a real StateStore and the fakes, plus what it recorded."""

    def __init__(self, state: StateStore, post: FakePost, **overrides: Any) -> None:
        self.state = state
        self.post = post
        self.clock = FakeClock(NOW)
        self.sleep = SleepRecorder(self.clock)
        self.dropped: list[int] = []
        self.sink = PramathusSink(
            settings=make_settings(**overrides),
            state=state,
            post=post,
            sleep=self.sleep,
            clock=self.clock,
            on_dropped=self.dropped.append,
        )

    def spool(self, *points: MetricPoint) -> int:
        marks = [(p.run_id, p.key, p.step, p.timestamp_ms) for p in points]
        return self.sink.spool(list(points), CONTEXTS, marks)

    def sent_steps(self) -> list[list[int]]:
        """The `metadata.step`s of each request's metrics, in request order."""
        return [
            [m["metadata"]["step"] for m in strict_loads(call.data)["metrics"]]
            for call in self.post.calls
        ]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateStore]:
    store = StateStore(tmp_path / "state")
    yield store
    store.close()


# ---------------------------------------------------------------- payload contract


def test_iso8601_is_utc_with_milliseconds_and_z() -> None:
    assert iso8601(NOW * 1000) == "2024-01-15T10:29:45.123Z"
    assert iso8601(0) == "1970-01-01T00:00:00.000Z"


def test_point_json_has_exactly_the_contract_fields() -> None:
    entry = point_json(MetricPoint("run-a", "val/loss", 0.25, 7, 1_705_314_585_123), CTX)
    assert entry == {
        "name": "val/loss",  # the original MLflow key, not the Prometheus name
        "value": 0.25,
        "timestamp": "2024-01-15T10:29:45.123Z",
        "metadata": {
            "run_id": "run-a",
            "experiment_name": "churn-model",
            "step": 7,
            "tags": {"team": "ml"},
        },
    }


def test_build_payload_has_timestamp_source_and_metrics() -> None:
    entries = [point_json(point(step=s), CTX) for s in (1, 2)]
    body = strict_loads(build_payload(entries, NOW * 1000))
    assert set(body) == {"timestamp", "source", "metrics"}
    assert body["timestamp"] == "2024-01-15T10:29:45.123Z"
    assert body["source"] == SOURCE == "mlflow"
    assert body["metrics"] == entries


@pytest.mark.parametrize(
    ("value", "marker"),
    [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")],
)
def test_non_finite_value_is_sent_as_null_with_a_marker(value: float, marker: str) -> None:
    entry = point_json(point(value=value), CTX)
    assert entry["value"] is None
    assert entry["metadata"]["non_finite"] == marker
    body = strict_loads(build_payload([entry], NOW * 1000))  # strict JSON, no NaN literal
    assert body["metrics"][0]["value"] is None
    assert body["metrics"][0]["metadata"]["non_finite"] == marker


def test_finite_value_has_no_non_finite_marker() -> None:
    assert "non_finite" not in point_json(point(value=-0.0), CTX)["metadata"]


def test_unicode_keys_are_sent_verbatim_as_utf8() -> None:
    body = build_payload([point_json(point(key="准确率/top1"), CTX)], NOW * 1000)
    assert "准确率/top1".encode() in body
    assert strict_loads(body)["metrics"][0]["name"] == "准确率/top1"


def test_public_tags_drops_mlflow_tags_and_cuts_long_values() -> None:
    tags = {
        "mlflow.runName": "run-1",
        "mlflow.source.git.commit": "abc",
        "team": "ml",
        "notes": "x" * 300,
        "mlflowish": "kept",  # only the `mlflow.` namespace is MLflow's own
    }
    assert public_tags(tags, max_len=10) == {"team": "ml", "notes": "x" * 10, "mlflowish": "kept"}


# ---------------------------------------------------------------- spool + drain


def test_spool_then_drain_sends_batches_oldest_first_with_bearer_and_idempotency_key(
    state: StateStore,
) -> None:
    h = Harness(state, FakePost())
    assert h.spool(*(point(step=s) for s in range(5))) == 3  # batch_size 2 -> 2 + 2 + 1
    assert state.spool_totals() == (3, 5)

    result = h.sink.drain()

    assert (result.batches, result.points, result.dead_lettered, result.error) == (3, 5, 0, None)
    assert h.sent_steps() == [[0, 1], [2, 3], [4]]
    spooled_keys = h.post.idempotency_keys
    assert len(set(spooled_keys)) == 3  # one key per batch
    for call in h.post.calls:
        assert call.url == ENDPOINT
        assert call.headers["Authorization"] == f"Bearer {API_KEY}"
        assert call.headers["Content-Type"] == "application/json"
        assert call.timeout == 10.0
        assert call.verify is True
        body = strict_loads(call.data)
        assert body["source"] == "mlflow"
        assert body["timestamp"] == "2024-01-15T10:29:45.123Z"
    assert state.spool_totals() == (0, 0)
    assert h.sleep.delays == []


def test_spool_advances_watermarks_in_the_same_step(state: StateStore) -> None:
    h = Harness(state, FakePost())
    h.spool(point(step=3), point(key="acc", step=9))
    marks = state.watermarks()
    assert marks[("run-a", "val/loss")][0] == 3
    assert marks[("run-a", "acc")][0] == 9


def test_spool_of_a_point_without_context_spools_nothing(state: StateStore) -> None:
    h = Harness(state, FakePost())
    with pytest.raises(KeyError):
        h.spool(point(step=1), point(step=2, run="run-unknown"))
    assert state.spool_totals() == (0, 0)
    assert state.watermarks() == {}


def test_no_api_key_means_no_authorization_header(state: StateStore) -> None:
    h = Harness(state, FakePost(), api_key=None)
    h.spool(point())
    h.sink.drain()
    assert "Authorization" not in h.post.calls[0].headers


def test_ca_bundle_is_passed_as_verify(state: StateStore) -> None:
    h = Harness(state, FakePost(), ca_bundle="/etc/ssl/private-ca.pem")
    h.spool(point())
    h.sink.drain()
    assert h.post.calls[0].verify == "/etc/ssl/private-ca.pem"


def test_503_then_200_is_retried_and_delivered_once_with_the_same_idempotency_key(
    state: StateStore,
) -> None:
    h = Harness(state, FakePost([503, 200]))
    h.spool(point())
    result = h.sink.drain()
    assert (result.batches, result.points, result.error) == (1, 1, None)
    assert len(h.post.calls) == 2
    first, second = h.post.idempotency_keys
    assert first == second
    assert h.post.calls[0].data == h.post.calls[1].data
    assert len(h.sleep.delays) == 1
    assert 0 < h.sleep.delays[0] <= 30  # exponential backoff with jitter
    assert state.spool_totals() == (0, 0)


def test_429_with_retry_after_waits_exactly_that_long(state: StateStore) -> None:
    h = Harness(state, FakePost([FakeResponse(429, "slow down", {"Retry-After": "3"}), 200]))
    h.spool(point())
    result = h.sink.drain()
    assert h.sleep.delays == [3.0]
    assert result.batches == 1
    assert state.spool_totals() == (0, 0)


def test_retry_after_is_capped_by_the_delivery_budget(state: StateStore) -> None:
    slow = FakeResponse(503, "maintenance", {"Retry-After": "3600"})
    h = Harness(state, FakePost([slow, 200]), delivery_budget_seconds=60)
    h.spool(point())
    h.sink.drain()
    assert h.sleep.delays == [60.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_client_error_is_not_retried_and_goes_to_dead_letter(
    state: StateStore, status: int
) -> None:
    h = Harness(state, FakePost([FakeResponse(status, "bad batch")]))
    h.spool(*(point(step=s) for s in range(4)))  # two batches

    result = h.sink.drain()

    assert len(h.post.calls) == 2  # the bad batch once, then the next batch
    assert h.sent_steps() == [[0, 1], [2, 3]]
    assert h.sleep.delays == []
    assert state.dead_letter_count() == 1
    assert (result.batches, result.points, result.dead_lettered) == (1, 2, 1)
    assert result.error is not None
    assert f"HTTP {status}" in result.error
    assert state.spool_totals() == (0, 0)


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
def test_transient_status_is_retried(state: StateStore, status: int) -> None:
    h = Harness(state, FakePost([status, 200]))
    h.spool(point())
    assert h.sink.drain().batches == 1
    assert len(h.post.calls) == 2
    assert state.dead_letter_count() == 0


def test_connection_errors_keep_the_batch_spooled_until_a_later_drain_delivers(
    state: StateStore,
) -> None:
    down = [requests.ConnectionError("refused") for _ in range(3)]
    h = Harness(state, FakePost(down))
    h.spool(*(point(step=s) for s in range(3)))  # two batches: [0, 1] and [2]

    failed = h.sink.drain()

    assert failed.error == "cannot reach Pramathus: ConnectionError"
    assert (failed.batches, failed.points, failed.dead_lettered) == (0, 0, 0)
    assert len(h.post.calls) == 3  # max_attempts on the oldest batch, then stop
    assert len(h.sleep.delays) == 2
    assert state.spool_totals() == (2, 3)  # nothing lost
    assert state.dead_letter_count() == 0
    assert next(state.spool_batches()).attempts == 1
    key_while_down = h.post.idempotency_keys[0]

    delivered = h.sink.drain()  # the endpoint is back (script exhausted -> 200)

    assert (delivered.batches, delivered.points, delivered.error) == (2, 3, None)
    assert h.sent_steps()[-2:] == [[0, 1], [2]]
    assert h.post.idempotency_keys[3] == key_while_down  # same batch, same key
    assert state.spool_totals() == (0, 0)


def test_timeout_is_retried_and_reported(state: StateStore) -> None:
    h = Harness(state, FakePost([requests.Timeout() for _ in range(3)]))
    h.spool(point())
    result = h.sink.drain()
    assert result.error == "Pramathus timed out after 10s"
    assert state.spool_totals() == (1, 1)


def test_error_report_does_not_contain_the_api_key(state: StateStore) -> None:
    h = Harness(state, FakePost([FakeResponse(401, f"bad key {API_KEY[:4]}")]))
    h.spool(point())
    result = h.sink.drain()
    assert result.error is not None
    assert API_KEY not in result.error


def test_should_stop_leaves_the_spool_untouched(state: StateStore) -> None:
    h = Harness(state, FakePost())
    h.spool(point())
    result = h.sink.drain(should_stop=lambda: True)
    assert result.error == "stopped"
    assert h.post.calls == []
    assert state.spool_totals() == (1, 1)


def test_drain_stops_between_batches_once_the_delivery_budget_is_spent(
    state: StateStore,
) -> None:
    h = Harness(state, FakePost(), batch_size=1, delivery_budget_seconds=60)
    h.spool(*(point(step=s) for s in range(5)))
    post = h.post

    def slow_post(*args: Any, **kwargs: Any) -> FakeResponse:
        h.clock.advance(25)  # each request takes 25 s of the 60 s budget
        return post(*args, **kwargs)

    h.sink.post = slow_post  # type: ignore[assignment]
    result = h.sink.drain()
    assert len(post.calls) <= 3
    assert state.spool_totals()[0] >= 2
    assert result.error is not None


# ---------------------------------------------------------------- spool overflow


def test_spool_overflow_drop_oldest_drops_oldest_batches_and_reports_the_count(
    state: StateStore,
) -> None:
    h = Harness(state, FakePost(), spool_max_points=3, spool_overflow="drop_oldest")
    h.spool(point(step=0), point(step=1))
    assert h.dropped == []
    h.spool(point(step=2), point(step=3))  # 4 points > 3: the oldest batch goes
    assert h.dropped == [2]
    assert state.spool_totals() == (1, 2)
    h.sink.drain()
    assert h.sent_steps() == [[2, 3]]


def test_spool_overflow_drop_newest_keeps_the_oldest_batches(state: StateStore) -> None:
    h = Harness(state, FakePost(), spool_max_points=3, spool_overflow="drop_newest")
    h.spool(point(step=0), point(step=1))
    h.spool(point(step=2), point(step=3))
    assert h.dropped == [2]
    h.sink.drain()
    assert h.sent_steps() == [[0, 1]]


def test_spool_within_bound_drops_nothing(state: StateStore) -> None:
    h = Harness(state, FakePost(), spool_max_points=4)
    h.spool(point(step=0), point(step=1))
    h.spool(point(step=2), point(step=3))
    assert h.dropped == []
    assert state.spool_totals() == (2, 4)


# ---------------------------------------------------------------- properties

metric_points = st.builds(
    MetricPoint,
    run_id=st.sampled_from(["run-a", "run-b"]),
    key=st.text(min_size=1, max_size=40),
    value=st.floats(allow_nan=True, allow_infinity=True),
    step=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    timestamp_ms=st.integers(min_value=0, max_value=4_102_444_800_000),
)


@FAST
@given(st.lists(metric_points, max_size=20))
def test_any_points_make_strict_json_that_round_trips_names_and_steps(
    points: list[MetricPoint],
) -> None:
    entries = [point_json(p, CONTEXTS[p.run_id]) for p in points]
    body = strict_loads(build_payload(entries, NOW * 1000))
    assert [m["name"] for m in body["metrics"]] == [p.key for p in points]
    assert [m["metadata"]["step"] for m in body["metrics"]] == [p.step for p in points]
    assert [m["metadata"]["run_id"] for m in body["metrics"]] == [p.run_id for p in points]
    for sent, p in zip(body["metrics"], points, strict=True):
        if math.isfinite(p.value):
            assert sent["value"] == p.value
            assert "non_finite" not in sent["metadata"]
        else:
            assert sent["value"] is None
            assert float(sent["metadata"]["non_finite"]) == p.value or math.isnan(p.value)
