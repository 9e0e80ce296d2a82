"""Unit tests for exporter.sinks.pushgateway: start time, group listing, push and delete.

No socket: `http_get` is a `FakeGet` answering with real `requests.Response` objects built
in memory, and prometheus_client's urllib opener is replaced by a `FakeOpener`, so the push
and delete requests (method, URL, headers, body) are exactly what prometheus_client would send.
"""

from __future__ import annotations

import base64
import json
import math
import urllib.error
from email.message import Message
from typing import Any

import prometheus_client.exposition
import pytest
import requests
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import PrometheusSettings
from exporter.planners.series import REGISTRY_KEY, GroupKey, experiment_key
from exporter.sinks.pushgateway import PushedGroup, PushError, Pushgateway
from tests.fakes.http import FakeGet, FakeOpener, http_response

GATEWAY = "http://pushgateway.test:9091"
STATUS = {
    "status": "success",
    "data": {"start_time": "2024-01-15T10:00:00.123Z", "build": {"version": "1.7.0"}},
}


def gateway(*answers: requests.Response | BaseException, **overrides: Any) -> Pushgateway:
    settings = PrometheusSettings(gateway=GATEWAY, **overrides)
    return Pushgateway(settings, http_get=FakeGet(answers))


@pytest.fixture
def opener(monkeypatch: pytest.MonkeyPatch) -> FakeOpener:
    fake = FakeOpener()
    monkeypatch.setattr(prometheus_client.exposition, "build_opener", fake)
    return fake


def family(name: str, *values: float) -> GaugeMetricFamily:
    f = GaugeMetricFamily(name, f"{name} help", labels=["run_id"])
    for i, v in enumerate(values):
        f.add_metric([f"r{i}"], v)
    return f


# ---------------------------------------------------------------- start time


def test_start_time_is_read_from_the_status_api() -> None:
    gw = gateway(http_response(200, json.dumps(STATUS)), timeout_seconds=4)

    assert gw.start_time() == "2024-01-15T10:00:00.123Z"

    [call] = gw.http_get.calls  # type: ignore[attr-defined]
    assert call.url == f"{GATEWAY}/api/v1/status"
    assert call.kwargs == {"timeout": 4.0, "auth": None}


def test_start_time_is_asked_with_basic_auth_when_credentials_are_set() -> None:
    gw = gateway(http_response(200, json.dumps(STATUS)), username="pg", password="pg-pass-1")
    gw.start_time()
    assert gw.http_get.calls[0].kwargs["auth"] == ("pg", "pg-pass-1")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "error",
    [
        requests.ConnectionError(
            "HTTPConnectionPool: Max retries exceeded ([Errno 111] Connection refused)"
        ),
        requests.Timeout("HTTPConnectionPool: Read timed out. (read timeout=10)"),
    ],
)
def test_an_unreachable_gateway_is_named_with_what_to_check(error: Exception) -> None:
    with pytest.raises(PushError) as info:
        gateway(error).start_time()

    message = str(info.value)
    assert message.startswith(f"Pushgateway at {GATEWAY} cannot be reached (")
    assert message.endswith("is it running, and is PROMETHEUS_GATEWAY right?")
    assert "\n" not in message
    assert ("connection refused" in message) or ("timed out" in message)


def test_an_http_error_from_the_status_api_is_named() -> None:
    with pytest.raises(PushError) as info:
        gateway(http_response(503, "down")).start_time()
    assert str(info.value).startswith(f"Pushgateway at {GATEWAY} cannot be reached (503 ")


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"status": "success", "data": {}}),
        json.dumps({"status": "error"}),
        json.dumps(["not", "a", "mapping"]),
    ],
)
def test_a_json_answer_without_a_start_time_asks_whether_it_is_a_pushgateway(body: str) -> None:
    with pytest.raises(PushError) as info:
        gateway(http_response(200, body)).start_time()

    assert str(info.value) == (
        f"Pushgateway at {GATEWAY} answered {GATEWAY}/api/v1/status without a start time: "
        "is PROMETHEUS_GATEWAY a Pushgateway (not Prometheus or a proxy)?"
    )


def test_an_answer_that_is_not_json_asks_whether_it_is_a_pushgateway() -> None:
    with pytest.raises(PushError) as info:
        gateway(http_response(200, "<html>Welcome to nginx</html>")).start_time()
    assert "is PROMETHEUS_GATEWAY a Pushgateway" in str(info.value)


# ---------------------------------------------------------------- existing groups


EXPOSITION = """\
# HELP mlflow_loss Latest value of an MLflow run metric.
# TYPE mlflow_loss gauge
mlflow_loss{experiment_id="1",instance="",job="mlflow_metrics",run_id="abc"} 0.5
# HELP push_failure_time_seconds Last Unix time when changing this group in the Pushgateway failed.
# TYPE push_failure_time_seconds gauge
push_failure_time_seconds{experiment_id="1",instance="",job="mlflow_metrics"} 0
push_failure_time_seconds{experiment_id="99",instance="",job="mlflow_metrics"} 0
# HELP push_time_seconds Last Unix time when changing this group in the Pushgateway succeeded.
# TYPE push_time_seconds gauge
push_time_seconds{experiment_id="1",instance="",job="mlflow_metrics"} 1.7053145851234567e+09
push_time_seconds{group="registry",instance="",job="mlflow_metrics"} 1.705314585e+09
push_time_seconds{experiment_id="7",instance="",job="other_job"} 1.705314585e+09
push_time_seconds{experiment_id="12",instance="node-3",job="mlflow_metrics"} 1.705314585e+09
push_time_seconds{instance="",job="mlflow_metrics_v2"} 1.705314585e+09
# HELP pushgateway_build_info A metric with a constant '1' value.
pushgateway_build_info{version="1.7.0"} 1
"""


def test_existing_groups_are_this_jobs_push_time_lines_without_job_and_empty_instance() -> None:
    gw = gateway(
        http_response(200, EXPOSITION, {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
    )

    groups = gw.existing_groups()

    assert groups == [
        experiment_key("1"),
        REGISTRY_KEY,
        GroupKey((("experiment_id", "12"), ("instance", "node-3"))),
    ]
    [call] = gw.http_get.calls  # type: ignore[attr-defined]
    assert call.url == f"{GATEWAY}/metrics"
    assert call.kwargs["stream"] is True


def test_existing_groups_of_an_empty_gateway_are_none() -> None:
    assert gateway(http_response(200, "", {"Content-Type": "text/plain"})).existing_groups() == []


@pytest.mark.parametrize(
    "answer",
    [
        lambda: requests.ConnectionError("[Errno 111] Connection refused"),
        lambda: http_response(500, "boom"),
        # A response's body is a stream, read once: each run of the test gets a fresh one.
        lambda: http_response(
            200, 'push_time_seconds{job="mlflow_metrics" 1\n', {"Content-Type": "text/plain"}
        ),
    ],
)
def test_a_gateway_that_cannot_list_its_groups_is_named(answer: Any) -> None:
    with pytest.raises(PushError) as info:
        gateway(answer()).existing_groups()
    message = str(info.value)
    assert message.startswith(f"Pushgateway at {GATEWAY} did not list its groups (")
    assert "\n" not in message


# ---------------------------------------------------------------- push and delete


def test_a_push_puts_the_group_and_counts_its_series_and_non_finite_values(
    opener: FakeOpener,
) -> None:
    families = [
        family("mlflow_loss", 0.5, math.nan, math.inf),
        family("mlflow_acc", -math.inf, 1.0),
        family("exporter_own_gauge", math.nan),  # not a user value: not counted as non-finite
    ]

    pushed = gateway(timeout_seconds=3).push(experiment_key("42"), families)

    assert pushed == PushedGroup(series=6, nonfinite=3)
    [request] = opener.requests
    assert request.method == "PUT"
    assert request.url == f"{GATEWAY}/metrics/job/mlflow_metrics/experiment_id/42"
    assert request.timeout == 3.0
    assert "authorization" not in request.headers
    pushed_families = {f.name: f for f in text_string_to_metric_families(request.body.decode())}
    assert set(pushed_families) == {"mlflow_loss", "mlflow_acc", "exporter_own_gauge"}
    assert [s.labels["run_id"] for s in pushed_families["mlflow_loss"].samples] == [
        "r0",
        "r1",
        "r2",
    ]


def test_the_registry_group_is_put_under_its_own_key_and_job(opener: FakeOpener) -> None:
    gateway(job_name="team_a").push(REGISTRY_KEY, [family("mlflow_registered_models", 2)])
    assert opener.requests[0].url == f"{GATEWAY}/metrics/job/team_a/group/registry"


def test_delete_removes_exactly_one_group(opener: FakeOpener) -> None:
    gateway().delete(experiment_key("7"))

    [request] = opener.requests
    assert (request.method, request.url) == (
        "DELETE",
        f"{GATEWAY}/metrics/job/mlflow_metrics/experiment_id/7",
    )


def test_push_and_delete_use_basic_auth_when_credentials_are_set(opener: FakeOpener) -> None:
    gw = gateway(username="pg", password="pg-pass-1")

    gw.push(experiment_key("1"), [family("mlflow_loss", 1.0)])
    gw.delete(experiment_key("1"))

    expected = "Basic " + base64.b64encode(b"pg:pg-pass-1").decode()
    assert [r.headers["authorization"] for r in opener.requests] == [expected, expected]


@pytest.mark.parametrize(
    ("error", "why"),
    [
        (
            urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")),
            "connection refused",
        ),
        (
            urllib.error.URLError(OSError(-2, "Name or service not known")),
            "name or service not known",
        ),
        (urllib.error.URLError(TimeoutError("timed out")), "timed out"),
        (
            urllib.error.HTTPError(f"{GATEWAY}/metrics", 400, "Bad Request", Message(), None),
            "HTTP 400 Bad Request",
        ),
        (
            OSError("error talking to pushgateway: 500 boom\nsecond line"),
            "error talking to pushgateway: 500 boom",
        ),
    ],
)
def test_a_failed_push_or_delete_names_the_gateway_and_why_on_one_line(
    opener: FakeOpener, error: OSError, why: str
) -> None:
    opener.script.extend([error, error])
    gw = gateway()

    with pytest.raises(PushError) as pushed:
        gw.push(experiment_key("1"), [family("mlflow_loss", 1.0)])
    with pytest.raises(PushError) as deleted:
        gw.delete(experiment_key("1"))

    check = "is it running, and is PROMETHEUS_GATEWAY right?"
    assert str(pushed.value) == (
        f"Pushgateway at {GATEWAY}: could not push a group to it ({why}): {check}"
    )
    assert str(deleted.value) == (
        f"Pushgateway at {GATEWAY}: could not delete a group from it ({why}): {check}"
    )


def test_a_push_to_an_unreachable_gateway_says_what_to_check(opener: FakeOpener) -> None:
    opener.script.append(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    with pytest.raises(PushError) as info:
        gateway().push(experiment_key("1"), [family("mlflow_loss", 1.0)])
    assert "PROMETHEUS_GATEWAY" in str(info.value)
