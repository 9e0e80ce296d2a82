"""Unit tests for exporter.mlflow_source.RestSource over a fake HTTP session.

`FakeSession` imitates the part of `requests.Session` the source uses: `request(method,
url, timeout=..., json=...|params=...)` returning an object with `status_code`, `text` and
`json()`. Each test routes endpoints to canned MLflow answers (shapes copied from MLflow
3.17's REST API) and inspects the requests made.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from exporter.config import MlflowSettings
from exporter.mlflow_source import (
    BULK_MAX_POINTS,
    TRACE_MAX_RESULTS,
    MlflowError,
    RestSource,
    TracesUnsupportedError,
    all_runs,
    filter_string,
    runs_by_id,
)
from exporter.model import HistoryRequest, RunFilter
from exporter.trace_model import TraceQuery


@dataclass
class FakeHttpResponse:
    status_code: int = 200
    body: Any = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body if isinstance(self.body, str) else json.dumps(self.body)

    def json(self) -> Any:
        if isinstance(self.body, str):
            return json.loads(self.body)
        return self.body


@dataclass
class FakeSession:
    """Answers `request` through `route(endpoint, payload)`; records every call."""

    route: Callable[[str, dict[str, Any]], FakeHttpResponse | Exception]
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def request(self, method: str, url: str, timeout: float, **kwargs: Any) -> FakeHttpResponse:
        self.urls.append(url)
        endpoint = url.split("/mlflow/", 1)[1]
        payload = kwargs.get("json") or kwargs.get("params") or {}
        self.calls.append((method, endpoint, payload))
        answer = self.route(endpoint, payload)
        if isinstance(answer, Exception):
            raise answer
        return answer


def source(route: Callable[[str, dict[str, Any]], Any], **settings: Any) -> RestSource:
    return RestSource(
        MlflowSettings(tracking_uri="http://mlflow:5000", max_retries=1, **settings),
        FakeSession(route),  # type: ignore[arg-type]
        sleep=lambda _s: None,
    )


def ok(body: Any) -> FakeHttpResponse:
    return FakeHttpResponse(200, body)


RUN = {
    "info": {
        "run_id": "a" * 32,
        "experiment_id": "7",
        "run_name": "r1",
        "status": "FINISHED",
        "user_id": "alice",
        "start_time": "1700000000000",
        "end_time": 1700000100000,
        "lifecycle_stage": "active",
    },
    "data": {
        "metrics": [
            {"key": "loss", "value": 0.5, "step": "3", "timestamp": 1700000050000},
            {"key": "nan", "value": "NaN", "timestamp": 1},
        ],
        "tags": [{"key": "team", "value": "growth"}],
    },
}


# ---------------------------------------------------------------------- answers of the wrong shape


@pytest.mark.parametrize(
    "body",
    [[], "<html>proxy error</html>", 42],
    ids=["a JSON list", "an HTML page", "a number"],
)
def test_an_answer_that_is_not_a_json_object_is_an_error_never_an_empty_list(body: Any) -> None:
    s = source(lambda _e, _p: FakeHttpResponse(200, body))
    with pytest.raises(MlflowError) as info:
        s.experiments()
    assert "experiments/search" in str(info.value)
    assert "\n" not in str(info.value)


def test_an_item_missing_a_field_names_the_endpoint_and_the_field() -> None:
    s = source(lambda _e, _p: ok({"experiments": [{"name": "no id"}]}))
    with pytest.raises(MlflowError, match=r"experiments/search .*unexpected shape.*experiment_id"):
        s.experiments()


def test_a_list_that_is_not_a_list_is_an_error() -> None:
    s = source(lambda _e, _p: ok({"runs": {"not": "a list"}}))
    with pytest.raises(MlflowError, match="'runs' is not a list"):
        s.runs_page(["1"], RunFilter())


def test_an_empty_answer_is_an_empty_list_as_mlflow_leaves_empty_lists_out() -> None:
    assert source(lambda _e, _p: ok({})).experiments() == []


# ---------------------------------------------------------------------- parsing and requests


def test_runs_are_parsed_with_latest_metrics_tags_and_lifecycle() -> None:
    page = source(lambda _e, _p: ok({"runs": [RUN], "next_page_token": "tok"})).runs_page(
        ["7"], RunFilter()
    )
    [run] = page.runs
    assert page.next_page_token == "tok"
    assert (run.run_id, run.experiment_id, run.status, run.start_time_ms) == (
        "a" * 32,
        "7",
        "FINISHED",
        1700000000000,
    )
    assert run.metrics[0].step == 3
    assert run.metrics[1].value != run.metrics[1].value  # NaN
    assert run.tags == {"team": "growth"}


def test_a_run_search_sends_the_filter_view_order_and_page_token() -> None:
    s = source(lambda _e, _p: ok({}), page_size=50)
    s.runs_page(["1", "2"], RunFilter(ended_since_ms=5, view="all", newest_first=True), "t1")
    method, endpoint, payload = s.session.calls[0]  # type: ignore[attr-defined]
    assert (method, endpoint) == ("POST", "runs/search")
    assert payload == {
        "experiment_ids": ["1", "2"],
        "max_results": 50,
        "run_view_type": "ALL",
        "order_by": ["attributes.start_time DESC", "attributes.run_id DESC"],
        "filter": "attributes.end_time >= 5",
        "page_token": "t1",
    }


def test_a_run_search_asks_for_fewer_runs_when_the_filter_caps_its_page() -> None:
    s = source(lambda _e, _p: ok({}), page_size=1000)
    s.runs_page(["1"], RunFilter(view="deleted", max_results=100))
    s.runs_page(["1"], RunFilter(max_results=5000))
    sizes = [payload["max_results"] for _m, _e, payload in s.session.calls]  # type: ignore[attr-defined]
    assert sizes == [100, 1000]


def test_filters_are_joined_with_and_and_unsafe_ids_are_dropped() -> None:
    where = RunFilter(started_since_ms=1, status="RUNNING", run_ids=("abc", "x' OR '1"))
    assert filter_string(where) == (
        "attributes.start_time >= 1 AND attributes.status = 'RUNNING' "
        "AND attributes.run_id IN ('abc')"
    )
    with pytest.raises(ValueError, match="not a run status"):
        filter_string(RunFilter(status="x' OR 1"))


def test_all_runs_follows_page_tokens_and_runs_by_id_chunks_ids() -> None:
    pages = {None: ({"runs": [RUN], "next_page_token": "2"}), "2": {"runs": [RUN]}}
    s = source(lambda _e, p: ok(pages[p.get("page_token")]))
    assert len(list(all_runs(s, ["7"], RunFilter()))) == 2
    ids = [f"{i:032x}" for i in range(150)]
    s2 = source(lambda _e, _p: ok({}))
    list(runs_by_id(s2, ["7"], ids, view="all"))
    filters = [c[2]["filter"] for c in s2.session.calls]  # type: ignore[attr-defined]
    assert len(filters) == 2
    assert filters[0].count("'") == 200


def test_the_registry_joins_aliases_to_versions() -> None:
    answers = {
        "registered-models/search": {
            "registered_models": [
                {"name": "churn", "aliases": [{"alias": "champion", "version": "2"}]}
            ]
        },
        "model-versions/search": {
            "model_versions": [
                {"name": "churn", "version": "1", "run_id": "r1", "current_stage": "Archived"},
                {"name": "churn", "version": "2", "creation_timestamp": 5},
            ]
        },
    }
    registry = source(lambda e, _p: ok(answers[e])).registry()
    assert registry.models == ("churn",)
    v1, v2 = registry.versions
    assert (v1.stage, v1.aliases, v1.run_id) == ("Archived", (), "r1")
    assert (v2.stage, v2.aliases, v2.run_id, v2.creation_time_ms) == (
        "None",
        ("champion",),
        None,
        5,
    )


# ---------------------------------------------------------------------- histories


def _points(run_id: str, steps: range) -> list[dict[str, Any]]:
    return [{"run_id": run_id, "step": s, "timestamp": s, "value": float(s)} for s in steps]


def test_bulk_reads_take_the_chunk_range_and_keep_each_runs_own_window() -> None:
    def route(_e: str, p: dict[str, Any]) -> FakeHttpResponse:
        return ok({"metrics": _points("a", range(10)) + _points("b", range(10))})

    s = source(route)
    got = s.histories([HistoryRequest("a", "loss", 5, 9), HistoryRequest("b", "loss", 2, 9)])
    [(_, _, payload)] = s.session.calls  # type: ignore[attr-defined]
    assert (payload["start_step"], payload["end_step"]) == (2, 9)
    assert sorted((p.run_id, p.step) for p in got) == [("a", s) for s in range(5, 10)] + [
        ("b", s) for s in range(2, 10)
    ]


def test_a_whole_read_sends_a_range_from_the_lowest_int64_step_so_sqlite_uses_its_index() -> None:
    s = source(lambda _e, _p: ok({}))
    s.histories([HistoryRequest("a", "loss", None, 9), HistoryRequest("b", "loss", 3, 12)])
    [(_, _, payload)] = s.session.calls  # type: ignore[attr-defined]
    assert (payload["start_step"], payload["end_step"]) == (-(2**63), 12)


def test_a_sampled_whole_read_is_read_again_with_get_history() -> None:
    many = [{"run_id": "a", "step": s, "timestamp": s, "value": 1.0} for s in range(3000)]

    def route(endpoint: str, p: dict[str, Any]) -> FakeHttpResponse:
        if endpoint == "metrics/get-history":
            return ok({"metrics": many})
        held = [m for m in many if p["start_step"] <= m["step"] <= p["end_step"]]
        return ok({"metrics": held[:BULK_MAX_POINTS]})

    s = source(route)
    got = s.histories([HistoryRequest("a", "loss", None, 2999)])
    assert len(got) == 3000
    endpoints = [endpoint for _, endpoint, _ in s.session.calls]  # type: ignore[attr-defined]
    assert endpoints.count("metrics/get-history") == 1


def test_a_sampled_run_is_read_again_by_halving_its_range_until_nothing_is_sampled() -> None:
    everything = range(6000)

    def route(endpoint: str, p: dict[str, Any]) -> FakeHttpResponse:
        low, high = p["start_step"], p["end_step"]
        steps = [s for s in everything if low <= s <= high]
        if len(steps) > BULK_MAX_POINTS:  # MLflow samples: exactly max_results points
            step = len(steps) / BULK_MAX_POINTS
            steps = [steps[int(i * step)] for i in range(BULK_MAX_POINTS)]
        return ok({"metrics": _points("a", steps)})  # type: ignore[arg-type]

    s = source(route)
    got = s.histories([HistoryRequest("a", "loss", 0, 5999)])
    assert sorted(p.step for p in got) == list(everything)


def test_one_step_holding_more_points_than_an_answer_is_read_with_get_history() -> None:
    # `log_metric` without a step logs everything at step 0: no range can split that.
    many = [{"run_id": "a", "step": 0, "timestamp": t, "value": 1.0} for t in range(3000)]
    later = [{"run_id": "a", "step": 1, "timestamp": t, "value": 2.0} for t in range(10)]

    def route(endpoint: str, p: dict[str, Any]) -> FakeHttpResponse:
        if endpoint == "metrics/get-history":
            page = p.get("page_token")
            body = (many + later)[:2000] if page is None else (many + later)[2000:]
            return ok({"metrics": body, **({} if page else {"next_page_token": "p2"})})
        held = [m for m in many + later if p["start_step"] <= m["step"] <= p["end_step"]]
        return ok({"metrics": held[:BULK_MAX_POINTS]})

    s = source(route)
    got = s.histories([HistoryRequest("a", "loss", 0, 1)])
    assert sorted((p.step, p.timestamp_ms) for p in got) == sorted(
        (m["step"], m["timestamp"]) for m in many + later
    )


# ---------------------------------------------------------------------- errors and retries


def test_connection_errors_are_retried_then_one_line_naming_the_server() -> None:
    s = source(lambda _e, _p: requests.ConnectionError("[Errno 111] Connection refused')"))
    with pytest.raises(MlflowError) as info:
        s.experiments()
    message = str(info.value)
    assert message.startswith("cannot reach MLflow at http://mlflow:5000 (connection refused)")
    assert "MLFLOW_TRACKING_URI" in message
    assert len(s.session.calls) == 2  # type: ignore[attr-defined]


def test_5xx_and_429_are_retried_but_4xx_is_not() -> None:
    answers = [FakeHttpResponse(503, "busy"), ok({"experiments": []})]
    s = source(lambda _e, _p: answers.pop(0))
    assert s.experiments() == []
    s4 = source(lambda _e, _p: FakeHttpResponse(403, "forbidden"))
    with pytest.raises(MlflowError, match="answered HTTP 403: forbidden"):
        s4.experiments()
    assert len(s4.session.calls) == 1  # type: ignore[attr-defined]


def test_a_timeout_says_which_setting_to_raise() -> None:
    s = source(lambda _e, _p: requests.Timeout())
    with pytest.raises(MlflowError, match=r"timed out after 30s.*mlflow\.timeout_seconds"):
        s.experiments()


def test_requests_are_counted_per_endpoint() -> None:
    seen: list[str] = []
    s = source(lambda _e, _p: ok({}))
    s.on_request = seen.append
    s.experiments()
    s.registry()
    assert seen == ["experiments/search", "registered-models/search", "model-versions/search"]
    assert s.requests_made == 3


def test_credentials_go_in_the_session_never_in_messages() -> None:
    bearer = RestSource.from_settings(MlflowSettings(token="tok-123"))  # type: ignore[arg-type]
    assert bearer.session.headers["Authorization"] == "Bearer tok-123"
    basic = RestSource.from_settings(
        MlflowSettings(username="u", password="p"),  # type: ignore[arg-type]
    )
    assert basic.session.auth == ("u", "p")
    insecure = RestSource.from_settings(MlflowSettings(insecure_tls=True))
    assert insecure.session.verify is False


# ------------------------------------------------------------------------------ traces

TRACE_QUERY = TraceQuery(
    ("1", "2"),
    "TRACES",
    "latency",
    ("AVG", "P50", "P99.9"),
    ("trace_name",),
    start_ms=1_000,
    end_ms=60_999,
    bucket_seconds=60,
)


def test_a_trace_query_is_sent_to_the_v3_api_with_percentiles_spelled_out() -> None:
    answer = {
        "data_points": [
            {
                "metric_name": "latency",
                "dimensions": {"trace_name": "chat", "time_bucket": "2026-12-04T20:47:00+00:00"},
                "values": {"AVG": 12.5, "P50.0": 10.0, "P99.9": 40},
            }
        ]
    }
    src = source(lambda _e, _p: ok(answer))
    (point,) = src.trace_metrics(TRACE_QUERY)

    session: Any = src.session
    assert session.urls == ["http://mlflow:5000/api/3.0/mlflow/traces/metrics"]
    assert session.calls[0][2] == {
        "experiment_ids": ["1", "2"],
        "view_type": "TRACES",
        "metric_name": "latency",
        "aggregations": [
            {"aggregation_type": "AVG"},
            {"aggregation_type": "PERCENTILE", "percentile_value": 50.0},
            {"aggregation_type": "PERCENTILE", "percentile_value": 99.9},
        ],
        "dimensions": ["trace_name"],
        "start_time_ms": 1_000,
        "end_time_ms": 60_999,
        "time_interval_seconds": 60,
        "max_results": TRACE_MAX_RESULTS,
    }
    assert point.dimensions == {"trace_name": "chat"}
    assert point.values == {"AVG": 12.5, "P50": 10.0, "P99.9": 40.0}
    assert point.bucket_ms == 1_796_417_220_000


def test_a_query_without_range_or_dimensions_sends_neither() -> None:
    src = source(lambda _e, _p: ok({}))
    assert (
        src.trace_metrics(TraceQuery(("1",), "ASSESSMENTS", "assessment_count", ("COUNT",))) == []
    )
    session: Any = src.session
    assert set(session.calls[0][2]) == {
        "experiment_ids",
        "view_type",
        "metric_name",
        "aggregations",
        "max_results",
    }


@pytest.mark.parametrize("status", [404, 501])
def test_a_server_without_trace_metrics_is_unsupported_and_not_retried(status: int) -> None:
    src = source(lambda _e, _p: FakeHttpResponse(status, "<html>Not Found</html>"))
    with pytest.raises(TracesUnsupportedError, match=f"HTTP {status}"):
        src.trace_metrics(TRACE_QUERY)
    assert src.requests_made == 1


def test_other_trace_errors_stay_plain_errors() -> None:
    src = source(lambda _e, _p: FakeHttpResponse(403, {"error_code": "PERMISSION_DENIED"}))
    with pytest.raises(MlflowError, match="403") as caught:
        src.trace_metrics(TRACE_QUERY)
    assert not isinstance(caught.value, TracesUnsupportedError)
