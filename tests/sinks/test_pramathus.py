"""Unit tests for exporter.sinks.pramathus: the payload contract and what one POST means.

`FakePost` stands in for `requests.post`; nothing here opens a socket. Retries and queueing
are delivery's (tests/sinks/test_delivery.py); here `send` is called once per answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any, cast

import pytest
import requests

from exporter.config import PramathusSettings
from exporter.logs import MASK
from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.sinks.delivery import Outcome, Outgoing, retry_after_seconds
from exporter.sinks.pramathus import (
    SOURCE,
    PramathusSink,
    build_payload,
    iso8601,
    point_json,
    public_tags,
)
from tests.fakes import FakePost, FakeResponse
from tests.support.planned import outgoing

ENDPOINT = "https://pramathus.example.com/api/metrics"
API_KEY = "pk_live_7f3Kq9ZrTOPSECRET"
NOW_MS = 1_705_314_585_123  # 2024-01-15T10:29:45.123Z
CTX = RunContext(
    "7",
    "churn-model",
    "brave-owl",
    {"team": "ml", "mlflow.user": "alice", "mlflow.source.name": "train.py", "note": "x" * 300},
)
CONTEXTS = {"run-a": CTX, "run-b": RunContext("8", "other", "calm-fox", {})}


def strict_loads(body: bytes) -> Any:
    """json.loads refusing NaN and infinities, as strict JSON parsers do."""

    def reject(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(body, parse_constant=reject)


def sink(post: Any = None, **overrides: Any) -> PramathusSink:
    settings: dict[str, Any] = {"enabled": True, "endpoint": ENDPOINT, "api_key": API_KEY}
    settings.update(overrides)
    # FakePost answers FakeResponse, standing in for `requests.post` and its Response.
    fake = cast("Callable[..., requests.Response]", post or FakePost())
    return PramathusSink(PramathusSettings(**settings), post=fake)


def batch(body: bytes = b'{"metrics": []}', key: str = "key-1") -> Outgoing:
    return Outgoing(idempotency_key=key, points=1, body=body)


# ---------------------------------------------------------------- encoding


def test_iso8601_is_utc_with_milliseconds_and_a_z() -> None:
    assert iso8601(NOW_MS) == "2024-01-15T10:29:45.123Z"
    assert iso8601(0) == "1970-01-01T00:00:00.000Z"
    assert iso8601(1_705_314_585_000) == "2024-01-15T10:29:45.000Z"


def test_a_point_becomes_exactly_the_contract_entry() -> None:
    point = MetricPoint("run-a", "val/loss", 0.25, 7, NOW_MS)

    entry = point_json(point, CTX, max_tag=256)

    assert entry == {
        "name": "val/loss",
        "value": 0.25,
        "timestamp": "2024-01-15T10:29:45.123Z",
        "metadata": {
            "run_id": "run-a",
            "experiment_name": "churn-model",
            "step": 7,
            "tags": {"team": "ml", "note": "x" * 256},
        },
    }


def test_the_payload_has_timestamp_source_and_metrics_only() -> None:
    entries = [point_json(MetricPoint("run-a", "acc", 0.9, 1, NOW_MS - 1000), CTX, 10)]

    payload = strict_loads(build_payload(entries, NOW_MS))

    assert payload == {
        "timestamp": "2024-01-15T10:29:45.123Z",
        "source": SOURCE,
        "metrics": entries,
    }
    assert SOURCE == "mlflow"


def test_mlflow_tags_are_left_out_and_long_values_cut() -> None:
    tags = {"mlflow.runName": "x", "team": "ml", "long": "abcdef", "mlflowish": "kept"}
    assert public_tags(tags, 3) == {"team": "ml", "long": "abc", "mlflowish": "kep"}
    assert public_tags(tags, 0) == {"team": "", "long": "", "mlflowish": ""}


@pytest.mark.parametrize(
    ("value", "marker"),
    [(math.nan, "NaN"), (math.inf, "Infinity"), (-math.inf, "-Infinity")],
)
def test_a_non_finite_value_is_sent_as_null_and_named_in_metadata(
    value: float, marker: str
) -> None:
    entry = point_json(MetricPoint("run-a", "loss", value, 3, NOW_MS), CTX, 256)

    assert entry["value"] is None
    assert entry["metadata"]["non_finite"] == marker
    body = strict_loads(build_payload([entry], NOW_MS))  # still strict JSON
    assert body["metrics"][0]["value"] is None


def test_a_finite_value_has_no_non_finite_marker() -> None:
    entry = point_json(MetricPoint("run-a", "loss", -0.0, 3, NOW_MS), CTX, 256)
    assert entry["value"] == 0.0
    assert "non_finite" not in entry["metadata"]


def test_non_ascii_keys_and_tags_are_sent_as_utf8_text() -> None:
    ctx = RunContext("7", "実験 🚀", "r", {"équipe": "données"})
    entry = point_json(MetricPoint("run-a", "précision/損失", 1.0, 1, NOW_MS), ctx, 256)

    body = build_payload([entry], NOW_MS)

    assert "précision/損失".encode() in body
    assert strict_loads(body)["metrics"][0]["metadata"]["experiment_name"] == "実験 🚀"


def test_points_are_encoded_in_batches_of_batch_size_with_their_own_keys() -> None:
    pts = [
        MetricPoint("run-a" if i % 2 else "run-b", "loss", float(i), i, NOW_MS) for i in range(5)
    ]
    s = sink(batch_size=2)

    planned = s.plan(pts, CONTEXTS, NOW_MS + 5)
    sent = outgoing(s, pts, CONTEXTS, NOW_MS + 5)

    assert [len(b) for b in planned.batches] == [2, 2, 1]
    assert planned.refused == {}
    assert planned.open_tail  # the short last batch may take later points
    assert [b.points for b in sent] == [2, 2, 1]
    assert len({b.idempotency_key for b in sent}) == 3
    bodies = [strict_loads(b.body) for b in sent]
    assert [[m["value"] for m in b["metrics"]] for b in bodies] == [[0.0, 1.0], [2.0, 3.0], [4.0]]
    assert {b["timestamp"] for b in bodies} == {iso8601(NOW_MS + 5)}
    assert bodies[0]["metrics"][0]["metadata"]["experiment_name"] == "other"


def test_a_full_last_batch_is_not_left_open() -> None:
    pts = [MetricPoint("run-a", "loss", float(i), i, NOW_MS) for i in range(4)]
    assert not sink(batch_size=2).plan(pts, CONTEXTS, NOW_MS).open_tail


def test_a_batch_is_cut_before_it_exceeds_max_body_bytes() -> None:
    pts = [MetricPoint("run-a", "loss", float(i), i, NOW_MS) for i in range(40)]
    limit = 2048

    sent = outgoing(sink(batch_size=500, max_body_bytes=limit), pts, CONTEXTS, NOW_MS)

    sizes = [len(b.body) for b in sent]
    assert max(sizes) <= limit
    assert sum(b.points for b in sent) == 40
    # Each batch is as full as the limit allows: one more entry would not have fitted.
    entry = len(sent[0].body) // sent[0].points
    assert all(size > limit - 2 * entry for size in sizes[:-1])


def test_a_point_larger_than_max_body_bytes_alone_is_set_aside_as_too_large() -> None:
    huge = RunContext("7", "churn", "r", {"blob": "x" * 3000})
    pts = [
        MetricPoint("run-a", "loss", 1.0, 1, NOW_MS),
        MetricPoint("run-h", "loss", 2.0, 1, NOW_MS),
    ]

    planned = sink(max_body_bytes=1024, max_tag_value_length=5000).plan(
        pts, {**CONTEXTS, "run-h": huge}, NOW_MS
    )

    assert planned.batches == [[pts[0]]]
    assert planned.refused == {"too_large": [[pts[1]]]}


def test_a_queued_batch_is_encoded_with_its_capture_time_the_same_on_every_delivery() -> None:
    s = sink()
    pts = (MetricPoint("run-a", "loss", 0.5, 3, NOW_MS - 60_000),)
    captured = CapturedBatch(pts, {"run-a": CTX}, created_ms=NOW_MS)

    body = s.encode(captured)

    assert body == s.encode(captured)
    assert strict_loads(body)["timestamp"] == iso8601(NOW_MS)
    assert [m["value"] for m in strict_loads(body)["metrics"]] == [0.5]
    assert s.count(captured) == 1


def test_queue_settings_come_from_the_pramathus_section() -> None:
    s = sink(
        spool_max_points=7, spool_overflow="drop_newest", delivery_budget_seconds=12, max_attempts=4
    )
    assert (s.queue_max_points, s.overflow, s.budget_seconds, s.max_attempts) == (
        7,
        "drop_newest",
        12.0,
        4,
    )
    assert sink().overflow == "wait"


# ---------------------------------------------------------------- one POST


def test_a_post_carries_the_body_key_bearer_token_and_content_headers() -> None:
    post = FakePost()
    sent = batch(b'{"metrics": [1]}', key="4b1d-key")

    reply = sink(post, timeout_seconds=4).send(sent)

    assert reply.outcome is Outcome.ACCEPTED
    assert reply.status == 200
    [call] = post.calls
    assert call.url == ENDPOINT
    assert call.data == b'{"metrics": [1]}'
    assert call.headers == {
        "Content-Type": "application/json",
        "Idempotency-Key": "4b1d-key",
        "User-Agent": "mlflow-monitoring-exporter",
        "Authorization": f"Bearer {API_KEY}",
    }
    assert call.timeout == 4.0
    assert call.verify is True


def test_no_api_key_means_no_authorization_header() -> None:
    post = FakePost()
    sink(post, api_key=None).send(batch())
    assert "Authorization" not in post.calls[0].headers


def test_tls_verification_follows_the_ca_bundle_or_verify_tls() -> None:
    post = FakePost()
    sink(post, ca_bundle="/etc/ssl/corp.pem").send(batch())
    sink(post, verify_tls=False).send(batch())
    assert [c.verify for c in post.calls] == ["/etc/ssl/corp.pem", False]


def test_the_same_batch_is_always_sent_with_the_same_idempotency_key() -> None:
    post = FakePost([503, 200])
    s = sink(post)
    queued = batch(key="stable")
    s.send(queued)
    s.send(queued)
    assert post.idempotency_keys == ["stable", "stable"]


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_means_accepted(status: int) -> None:
    reply = sink(FakePost([status])).send(batch())
    assert (reply.outcome, reply.status) == (Outcome.ACCEPTED, status)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425, 429])
def test_5xx_408_425_and_429_may_succeed_later(status: int) -> None:
    reply = sink(FakePost([FakeResponse(status, "busy\ntry later")])).send(batch())

    assert (reply.outcome, reply.status) == (Outcome.RETRY, status)
    assert reply.message == f"Pramathus answered HTTP {status}: busy try later"


@pytest.mark.parametrize("status", [409, 418, 451])
def test_other_4xx_are_refused_for_good_whole(status: int) -> None:
    reply = sink(FakePost([FakeResponse(status, "no")])).send(batch())

    assert (reply.outcome, reply.status, reply.reason) == (Outcome.REFUSED, status, "rejected")
    assert reply.splittable is False
    assert reply.message == f"Pramathus answered HTTP {status}: no"


@pytest.mark.parametrize(
    ("status", "reason"), [(400, "rejected"), (422, "rejected"), (413, "too_large")]
)
def test_400_422_and_413_are_split_to_find_the_refused_points(status: int, reason: str) -> None:
    reply = sink(FakePost([FakeResponse(status, "no")])).send(batch())

    assert (reply.outcome, reply.reason, reply.splittable) == (Outcome.REFUSED, reason, True)


@pytest.mark.parametrize(
    ("status", "cause", "setting"),
    [
        (401, "credentials", "PRAMATHUS_API_KEY"),
        (403, "credentials", "PRAMATHUS_API_KEY"),
        (404, "endpoint", "PRAMATHUS_ENDPOINT"),
        (405, "endpoint", "PRAMATHUS_ENDPOINT"),
    ],
)
def test_401_403_and_a_wrong_url_block_the_sink_naming_the_setting(
    status: int, cause: str, setting: str
) -> None:
    reply = sink(FakePost([FakeResponse(status, "no")])).send(batch())

    assert (reply.outcome, reply.cause, reply.status) == (Outcome.BLOCKED, cause, status)
    assert reply.message.startswith(f"Pramathus answered HTTP {status}: no: points stay queued;")
    assert setting in reply.message


@pytest.mark.parametrize("status", [301, 302, 303])
def test_a_redirect_that_would_turn_the_post_into_a_get_is_not_followed(status: int) -> None:
    moved = FakeResponse(status, "<html>moved</html>", {"Location": "/moved"})
    post = FakePost([moved])

    reply = sink(post).send(batch())

    assert len(post.calls) == 1
    assert (reply.outcome, reply.cause) == (Outcome.BLOCKED, "redirect")
    assert "redirected to /moved" in reply.message
    assert "PRAMATHUS_ENDPOINT" in reply.message


@pytest.mark.parametrize("status", [307, 308])
def test_307_and_308_are_followed_with_the_same_body_and_key_to_the_same_origin(
    status: int,
) -> None:
    post = FakePost([FakeResponse(status, "", {"Location": "/v2/metrics"}), 200])
    queued = batch(body=b'{"metrics": [1]}', key="k-1")

    reply = sink(post).send(queued)

    assert reply.outcome is Outcome.ACCEPTED
    assert [c.url for c in post.calls] == [ENDPOINT, "https://pramathus.example.com/v2/metrics"]
    assert {c.data for c in post.calls} == {b'{"metrics": [1]}'}
    assert post.calls[1].headers["Authorization"] == f"Bearer {API_KEY}"
    assert post.calls[1].headers["Idempotency-Key"] == "k-1"


def test_a_307_to_another_origin_is_followed_without_the_credentials() -> None:
    post = FakePost([FakeResponse(307, "", {"Location": "https://elsewhere.test/in"}), 200])

    reply = sink(post).send(batch())

    assert reply.outcome is Outcome.ACCEPTED
    assert post.calls[1].url == "https://elsewhere.test/in"
    assert "Authorization" not in post.calls[1].headers
    assert post.calls[1].headers["Idempotency-Key"] == "key-1"


def test_a_redirect_loop_ends_as_a_blocked_redirect() -> None:
    post = FakePost(default=FakeResponse(308, "", {"Location": "/again"}))

    reply = sink(post).send(batch())

    assert len(post.calls) == 6
    assert (reply.outcome, reply.cause) == (Outcome.BLOCKED, "redirect")
    assert "at https://pramathus.example.com/again" in reply.message


def test_a_long_error_body_is_cut_to_one_short_line() -> None:
    reply = sink(FakePost([FakeResponse(400, "line\n" * 100)])).send(batch())
    assert "\n" not in reply.message
    assert len(reply.message) == len("Pramathus answered HTTP 400: ") + 200


def test_retry_after_of_a_refusing_answer_is_passed_on() -> None:
    reply = sink(FakePost([FakeResponse(429, "", {"Retry-After": "7"})])).send(batch())
    assert reply.retry_after == 7.0


def test_the_api_key_echoed_by_a_refusing_server_is_masked() -> None:
    echo = FakeResponse(401, f'{{"error": "invalid key {API_KEY}", "hint": "Bearer {API_KEY}"}}')

    reply = sink(FakePost([echo])).send(batch())

    assert API_KEY not in reply.message
    assert reply.message.startswith(
        f'Pramathus answered HTTP 401: {{"error": "invalid key {MASK}", "hint": "Bearer {MASK}"}}'
    )


def test_a_timeout_is_retried_with_a_one_line_message() -> None:
    post = FakePost([requests.Timeout("read timed out\nafter 3s")])

    reply = sink(post, timeout_seconds=3).send(batch())

    assert reply.outcome is Outcome.RETRY
    assert reply.status is None
    assert "\n" not in reply.message
    assert "timed out after 3s" in reply.message


def test_a_timeout_message_names_the_endpoint() -> None:
    reply = sink(FakePost([requests.Timeout("slow")]), timeout_seconds=3).send(batch())
    assert ENDPOINT in reply.message


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (
            requests.ConnectionError("Max retries exceeded\n[Errno 111] Connection refused"),
            "connection refused",
        ),
        (requests.exceptions.SSLError("certificate verify failed"), "certificate verify failed"),
        (requests.exceptions.ChunkedEncodingError("broken"), "broken"),
    ],
)
def test_a_connection_error_is_retried_with_a_one_line_message_naming_the_endpoint(
    error: requests.RequestException, why: str
) -> None:
    reply = sink(FakePost([error])).send(batch())

    assert reply.outcome is Outcome.RETRY
    assert "\n" not in reply.message
    assert reply.message == (
        f"cannot reach Pramathus at {ENDPOINT} ({why}): is it up, and is PRAMATHUS_ENDPOINT right?"
    )


# ---------------------------------------------------------------- Retry-After


NOW = 1_705_314_585.0


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("1", 1.0), ("0", 0.0), ("2.5", 2.5), ("120", 120.0), ("-3", 0.0)],
)
def test_retry_after_in_seconds(header: str, seconds: float) -> None:
    assert retry_after_seconds(header, now=NOW) == seconds


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    in_90s = format_datetime(datetime.fromtimestamp(NOW + 90, tz=UTC), usegmt=True)
    ago = format_datetime(datetime.fromtimestamp(NOW - 90, tz=UTC), usegmt=True)

    assert retry_after_seconds(in_90s, now=NOW) == pytest.approx(90.0)
    assert retry_after_seconds(ago, now=NOW) == 0.0


@pytest.mark.parametrize("header", [None, "", "soon", "1.5 minutes", "Wed, 99 Foo 2024"])
def test_retry_after_that_is_absent_or_garbage_is_none(header: str | None) -> None:
    assert retry_after_seconds(header, now=NOW) is None


@pytest.mark.parametrize("header", ["inf", "nan"])
def test_retry_after_that_is_not_a_finite_number_is_none(header: str) -> None:
    assert retry_after_seconds(header, now=NOW) is None


def test_without_an_api_key_a_refusal_body_is_shown_as_it_is() -> None:
    reply = sink(FakePost([FakeResponse(409, "conflict")]), api_key=None).send(batch())
    assert reply.message == "Pramathus answered HTTP 409: conflict"
