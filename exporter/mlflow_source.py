"""Reading MLflow: the `MlflowSource` protocol and its REST implementation.

The cycle only ever talks to MLflow through `MlflowSource`, in plain `model` dataclasses, so
unit tests swap in an in-memory fake (`tests/fakes/mlflow_server.py`). The REST implementation uses
`requests` rather than the `mlflow` package: that import alone costs ~2 s and ~170 MB per
process (see shared FACTS), and the REST API is where the cheap bulk endpoints live.

Every answer is checked for shape: JSON that is not an object, or an item without the fields
the exporter relies on, is an `MlflowError` naming the endpoint, never an empty result (an
error page read as "no experiments" would empty the mirror and delete every pushed group).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import requests
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from exporter.config import MlflowSettings
from exporter.errors import reason
from exporter.model import (
    Experiment,
    HistoryRequest,
    LatestMetric,
    MetricPoint,
    ModelVersion,
    Registry,
    Run,
    RunFilter,
    RunPage,
    RunView,
)
from exporter.trace_model import TracePoint, TraceQuery

API = "/api/2.0/mlflow"
API_V3 = "/api/3.0/mlflow"  # traces
# Data points one trace metrics answer may carry; an answer this long may have been cut.
TRACE_MAX_RESULTS = 10_000

# `get-history-bulk-interval` returns at most this many points per run, sampled above it,
# for at most this many runs per request (MLflow 3.17, `server/handlers.py`).
BULK_MAX_POINTS = 2500
BULK_MAX_RUNS = 100
HISTORY_PAGE = 25_000  # `get-history` page size
# A whole read still sends a step range, spanning MLflow's int64 `step` column: on a SQLite
# store without planner statistics (MLflow never runs ANALYZE), a request without a range is
# answered by scanning every point of the key in the store for each run (2.7 s per call at
# 20,000 runs), while a range makes SQLite use `index_metrics_run_uuid_key_step` (0.17 s).
STEP_MIN = -(2**63)
# MLflow takes many experiment ids per search; chunks keep each request and its SQL modest.
EXPERIMENTS_PER_SEARCH = 500
RUNS_PER_ID_FILTER = 100


class MlflowError(Exception):
    """MLflow could not be read; the message is one line, safe to show a user."""


class MlflowHttpError(MlflowError):
    """MLflow answered with an HTTP error status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class TracesUnsupportedError(MlflowError):
    """The server has no trace metrics API (MLflow 2, a file store, an older MLflow 3)."""


_VIEWS = {"active": "ACTIVE_ONLY", "deleted": "DELETED_ONLY", "all": "ALL"}


class MlflowSource(Protocol):
    """What a cycle needs from MLflow. Every method raises `MlflowError` on failure."""

    def experiments(self) -> list[Experiment]:
        """Every experiment, active and deleted."""
        ...

    def runs_page(
        self, experiment_ids: Sequence[str], where: RunFilter, page_token: str | None = None
    ) -> RunPage:
        """One page of the runs of these experiments matching `where`."""
        ...

    def registry(self) -> Registry:
        """Registered models and all their versions, with aliases and stages."""
        ...

    def histories(self, wanted: Sequence[HistoryRequest]) -> list[MetricPoint]:
        """Every point of the requested series within their step ranges (one key per call)."""
        ...

    def trace_metrics(self, query: TraceQuery) -> list[TracePoint]:
        """One server-side aggregation over traces (`TracesUnsupportedError` when the
        server has no such API)."""
        ...


def all_runs(
    source: MlflowSource, experiment_ids: Sequence[str], where: RunFilter
) -> Iterator[Run]:
    """Every run matching `where`, page after page, in chunks of experiments."""
    for start in range(0, len(experiment_ids), EXPERIMENTS_PER_SEARCH):
        chunk = experiment_ids[start : start + EXPERIMENTS_PER_SEARCH]
        token: str | None = None
        while True:
            page = source.runs_page(chunk, where, token)
            yield from page.runs
            token = page.next_page_token
            if not token:
                break


def runs_by_id(
    source: MlflowSource, experiment_ids: Sequence[str], run_ids: Sequence[str], view: RunView
) -> Iterator[Run]:
    """The runs among `run_ids` in `view` (ids MLflow does not know are simply absent)."""
    for start in range(0, len(run_ids), RUNS_PER_ID_FILTER):
        chunk = tuple(run_ids[start : start + RUNS_PER_ID_FILTER])
        yield from all_runs(source, experiment_ids, RunFilter(run_ids=chunk, view=view))


# ------------------------------------------------------------------------------ REST


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    # 501 Not Implemented never turns into an answer by retrying.
    return isinstance(exc, _HttpStatusError) and (
        (exc.status >= 500 and exc.status != 501) or exc.status == 429
    )


class _HttpStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


@dataclass
class RestSource:
    """`MlflowSource` over MLflow's REST API, with bounded retries.

    `on_request(endpoint)` is called once per HTTP request (the self-metrics count them).
    """

    settings: MlflowSettings
    session: requests.Session
    on_request: Callable[[str], None] = lambda _endpoint: None
    sleep: Callable[[float], None] = time.sleep
    requests_made: int = 0

    @classmethod
    def from_settings(
        cls, settings: MlflowSettings, on_request: Callable[[str], None] | None = None
    ) -> RestSource:
        session = requests.Session()
        if settings.token is not None:
            session.headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        elif settings.username is not None and settings.password is not None:
            session.auth = (
                settings.username.get_secret_value(),
                settings.password.get_secret_value(),
            )
        session.verify = False if settings.insecure_tls else (settings.ca_bundle or True)
        return cls(settings, session, on_request or (lambda _endpoint: None))

    # -------------------------------------------------------------- the protocol

    def experiments(self) -> list[Experiment]:
        payload = {"max_results": 1000, "view_type": "ALL"}
        items = self._pages("POST", "experiments/search", payload, "experiments")
        return [_parse("experiments/search", parse_experiment, e) for e in items]

    def runs_page(
        self, experiment_ids: Sequence[str], where: RunFilter, page_token: str | None = None
    ) -> RunPage:
        order = "DESC" if where.newest_first else "ASC"
        payload: dict[str, Any] = {
            "experiment_ids": list(experiment_ids),
            "max_results": min(self.settings.page_size, where.max_results or 50_000),
            "run_view_type": _VIEWS[where.view],
            "order_by": [f"attributes.start_time {order}", f"attributes.run_id {order}"],
        }
        if text := filter_string(where):
            payload["filter"] = text
        if page_token:
            payload["page_token"] = page_token
        data = self.call("POST", "runs/search", payload)
        runs = [_parse("runs/search", parse_run, r) for r in _items(data, "runs", "runs/search")]
        token = data.get("next_page_token")
        return RunPage(runs, str(token) if token else None)

    def registry(self) -> Registry:
        names: list[str] = []
        aliases: dict[tuple[str, str], list[str]] = {}
        for model in self._pages(
            "GET", "registered-models/search", {"max_results": 1000}, "registered_models"
        ):
            name = _parse("registered-models/search", lambda m: str(m["name"]), model)
            names.append(name)
            for a in model.get("aliases", []):
                aliases.setdefault((name, str(a["version"])), []).append(str(a["alias"]))
        versions = [
            _parse("model-versions/search", parse_model_version, v, aliases)
            for v in self._pages(
                "GET", "model-versions/search", {"max_results": 1000}, "model_versions"
            )
        ]
        return Registry(tuple(names), tuple(versions))

    def histories(self, wanted: Sequence[HistoryRequest]) -> list[MetricPoint]:
        """Up to 100 runs per `get-history-bulk-interval` call over the chunk's step range.

        A run that comes back with the per-run maximum may have been sampled by MLflow: its
        range is halved until nothing is sampled, and a single step holding more points than
        one answer carries is read whole with `get-history`, so no point is ever skipped.
        """
        points: list[MetricPoint] = []
        for start in range(0, len(wanted), BULK_MAX_RUNS):
            chunk = wanted[start : start + BULK_MAX_RUNS]
            points.extend(self._bulk(chunk))
        return points

    def trace_metrics(self, query: TraceQuery) -> list[TracePoint]:
        endpoint = "traces/metrics"
        try:
            data = self.call("POST", endpoint, trace_query_body(query), api=API_V3)
        except MlflowHttpError as exc:
            if exc.status in (404, 501):
                raise TracesUnsupportedError(
                    f"MLflow at {self.settings.tracking_uri} has no trace metrics API "
                    f"({API_V3}/{endpoint} answered HTTP {exc.status}: MLflow 2, a file store "
                    "or an MLflow 3 older than the traces metrics endpoint)"
                ) from None
            raise
        return [
            _parse(endpoint, parse_trace_point, p) for p in _items(data, "data_points", endpoint)
        ]

    # -------------------------------------------------------------- histories

    def _bulk(self, chunk: Sequence[HistoryRequest]) -> list[MetricPoint]:
        key = chunk[0].key
        low = [w.start_step for w in chunk]
        payload: dict[str, Any] = {
            "run_ids": [w.run_id for w in chunk],
            "metric_key": key,
            "max_results": BULK_MAX_POINTS,
        }
        whole = None in low
        payload["start_step"] = STEP_MIN if whole else min(s for s in low if s is not None)
        payload["end_step"] = max(payload["start_step"], *(w.end_step for w in chunk))
        got: dict[str, list[MetricPoint]] = {w.run_id: [] for w in chunk}
        data = self.call("GET", "metrics/get-history-bulk-interval", payload)
        for m in _items(data, "metrics", "metrics/get-history-bulk-interval"):
            point = _parse("metrics/get-history-bulk-interval", parse_point, m, None, key)
            if point.run_id in got:
                got[point.run_id].append(point)
        out: list[MetricPoint] = []
        for w in chunk:
            run_points = got[w.run_id]
            if len(run_points) >= BULK_MAX_POINTS:  # possibly sampled: read it exactly
                run_points = self._exact(
                    w, None if whole else payload["start_step"], payload["end_step"]
                )
            out.extend(p for p in run_points if _within(p, w))
        return out

    def _exact(self, w: HistoryRequest, low: int | None, high: int | None) -> list[MetricPoint]:
        """Every point of one series in [low, high], splitting the range while sampled."""
        if low is None or high is None:
            return self._full_history(w.run_id, w.key)
        if low >= high:  # one step holds more points than an answer carries
            return [p for p in self._full_history(w.run_id, w.key) if p.step == low]
        middle = low + (high - low) // 2
        points: list[MetricPoint] = []
        for a, b in ((low, middle), (middle + 1, high)):
            payload = {
                "run_ids": [w.run_id],
                "metric_key": w.key,
                "max_results": BULK_MAX_POINTS,
                "start_step": a,
                "end_step": b,
            }
            data = self.call("GET", "metrics/get-history-bulk-interval", payload)
            part = [
                _parse("metrics/get-history-bulk-interval", parse_point, m, None, w.key)
                for m in _items(data, "metrics", "metrics/get-history-bulk-interval")
            ]
            points.extend(self._exact(w, a, b) if len(part) >= BULK_MAX_POINTS else part)
        return points

    def _full_history(self, run_id: str, key: str) -> list[MetricPoint]:
        payload = {"run_id": run_id, "metric_key": key, "max_results": HISTORY_PAGE}
        return [
            _parse("metrics/get-history", parse_point, m, run_id, key)
            for m in self._pages("GET", "metrics/get-history", payload, "metrics")
        ]

    # -------------------------------------------------------------- HTTP

    def call(
        self, method: str, endpoint: str, payload: dict[str, Any], api: str = API
    ) -> dict[str, Any]:
        """One API call, retried on connection errors, timeouts, 429 and 5xx."""
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.settings.max_retries + 1),
            wait=wait_exponential_jitter(multiplier=0.5, max=5),
            reraise=True,
            sleep=self.sleep,
        )
        try:
            return retrying(self._once, method, endpoint, payload, api)
        except requests.Timeout:
            raise MlflowError(
                f"MLflow {endpoint} timed out after {self.settings.timeout_seconds:g}s at "
                f"{self.settings.tracking_uri}; raise mlflow.timeout_seconds if the server is slow"
            ) from None
        except requests.ConnectionError as exc:
            raise MlflowError(
                f"cannot reach MLflow at {self.settings.tracking_uri} ({reason(exc)}): "
                "is the server up, and is MLFLOW_TRACKING_URI right?"
            ) from None
        except _HttpStatusError as exc:
            raise MlflowHttpError(exc.status, f"MLflow {endpoint} answered {exc}") from None

    def _once(
        self, method: str, endpoint: str, payload: dict[str, Any], api: str = API
    ) -> dict[str, Any]:
        self.requests_made += 1
        self.on_request(endpoint)
        url = f"{self.settings.tracking_uri}{api}/{endpoint}"
        kwargs: dict[str, Any] = {"params" if method == "GET" else "json": payload}
        response = self.session.request(
            method, url, timeout=self.settings.timeout_seconds, **kwargs
        )
        if response.status_code >= 400:
            raise _HttpStatusError(response.status_code, response.text[:200].replace("\n", " "))
        try:
            data = response.json()  # MLflow writes NaN/Infinity literals; json accepts them
        except ValueError:
            raise MlflowError(
                f"MLflow {endpoint} answered HTTP {response.status_code} with a body that is "
                f"not JSON: is {self.settings.tracking_uri} MLflow's address (not a proxy page)?"
            ) from None
        if not isinstance(data, dict):
            raise MlflowError(
                f"MLflow {endpoint} answered a JSON {type(data).__name__}, not an object: "
                f"is {self.settings.tracking_uri} MLflow's address?"
            )
        return data

    def _pages(
        self, method: str, endpoint: str, payload: dict[str, Any], items: str
    ) -> Iterator[dict[str, Any]]:
        token: str | None = None
        for _ in itertools.count():
            data = self.call(
                method, endpoint, {**payload, **({"page_token": token} if token else {})}
            )
            yield from _items(data, items, endpoint)
            token = data.get("next_page_token")
            if not token:
                return


def _items(data: dict[str, Any], name: str, endpoint: str) -> list[dict[str, Any]]:
    # MLflow leaves empty lists out of its JSON, so a missing list is an empty one.
    items = data.get(name, [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise MlflowError(f"MLflow {endpoint} answered an unexpected shape: {name!r} is not a list")
    return items


def _parse(endpoint: str, parse: Callable[..., Any], item: Any, *args: Any) -> Any:
    """Apply a parser, turning a missing or malformed field into a one-line `MlflowError`."""
    try:
        return parse(item, *args)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
        raise MlflowError(f"MLflow {endpoint} answered an unexpected shape ({what})") from None


def _within(point: MetricPoint, w: HistoryRequest) -> bool:
    return (w.start_step is None or point.step >= w.start_step) and point.step <= w.end_step


def filter_string(where: RunFilter) -> str:
    """`where` in MLflow's search syntax (conditions joined with AND)."""
    parts = []
    if where.started_since_ms is not None:
        parts.append(f"attributes.start_time >= {int(where.started_since_ms)}")
    if where.ended_since_ms is not None:
        parts.append(f"attributes.end_time >= {int(where.ended_since_ms)}")
    if where.status is not None:
        parts.append(f"attributes.status = '{_quote(where.status)}'")
    if where.run_ids:
        ids = ", ".join(f"'{r}'" for r in where.run_ids if re.fullmatch(r"[0-9A-Za-z_-]+", r))
        parts.append(f"attributes.run_id IN ({ids})")
    return " AND ".join(parts)


def _quote(text: str) -> str:
    if not re.fullmatch(r"[A-Z_]+", text):
        raise ValueError(f"not a run status: {text!r}")
    return text


# ------------------------------------------------------------------------------ parsing


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _float(value: Any) -> float:
    # MLflow may hand values back as numbers or as the strings "NaN"/"Infinity".
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_experiment(raw: dict[str, Any]) -> Experiment:
    """An `experiments/search` item."""
    return Experiment(
        experiment_id=str(raw["experiment_id"]),
        name=str(raw.get("name", "")),
        lifecycle_stage=str(raw.get("lifecycle_stage", "active")),
        creation_time_ms=_int_or_none(raw.get("creation_time")),
        last_update_time_ms=_int_or_none(raw.get("last_update_time")),
    )


def parse_run(raw: dict[str, Any]) -> Run:
    """A `runs/search` item."""
    info, data = raw["info"], raw.get("data", {})
    metrics = tuple(
        LatestMetric(
            key=str(m["key"]),
            value=_float(m.get("value")),
            step=int(m.get("step") or 0),
            timestamp_ms=int(m.get("timestamp") or 0),
        )
        for m in data.get("metrics", [])
    )
    tags = {str(t["key"]): str(t.get("value", "")) for t in data.get("tags", [])}
    return Run(
        run_id=str(info.get("run_id") or info["run_uuid"]),
        experiment_id=str(info["experiment_id"]),
        run_name=str(info.get("run_name") or tags.get("mlflow.runName", "")),
        status=str(info.get("status", "RUNNING")),
        user_id=str(info.get("user_id", "")),
        start_time_ms=_int_or_none(info.get("start_time")),
        end_time_ms=_int_or_none(info.get("end_time")),
        metrics=metrics,
        tags=tags,
        lifecycle_stage=str(info.get("lifecycle_stage", "active")),
    )


def parse_model_version(
    raw: dict[str, Any], aliases: dict[tuple[str, str], list[str]]
) -> ModelVersion:
    """A `model-versions/search` item; aliases come from the registered models' answer."""
    name, version = str(raw["name"]), str(raw["version"])
    return ModelVersion(
        model_name=name,
        version=version,
        run_id=str(raw["run_id"]) if raw.get("run_id") else None,
        stage=str(raw.get("current_stage") or "None"),
        status=str(raw.get("status", "READY")),
        aliases=tuple(sorted(aliases.get((name, version), []))),
        creation_time_ms=_int_or_none(raw.get("creation_timestamp")),
    )


def parse_point(m: dict[str, Any], run_id: str | None, key: str) -> MetricPoint:
    """A history item (bulk answers carry their run id, `get-history` ones do not)."""
    return MetricPoint(
        run_id=str(run_id or m["run_id"]),
        key=key,
        value=_float(m.get("value")),
        step=int(m.get("step") or 0),
        timestamp_ms=int(m.get("timestamp") or 0),
    )


def trace_query_body(query: TraceQuery) -> dict[str, Any]:
    """`query` as the JSON body of `traces/metrics`."""
    aggregations: list[dict[str, Any]] = []
    for key in query.aggregations:
        if key.startswith("P"):
            aggregations.append(
                {"aggregation_type": "PERCENTILE", "percentile_value": float(key[1:])}
            )
        else:
            aggregations.append({"aggregation_type": key})
    body: dict[str, Any] = {
        "experiment_ids": list(query.experiment_ids),
        "view_type": query.view,
        "metric_name": query.metric,
        "aggregations": aggregations,
        "max_results": TRACE_MAX_RESULTS,
    }
    if query.dimensions:
        body["dimensions"] = list(query.dimensions)
    if query.start_ms is not None:
        body["start_time_ms"] = query.start_ms
    if query.end_ms is not None:
        body["end_time_ms"] = query.end_ms
    if query.bucket_seconds is not None:
        body["time_interval_seconds"] = query.bucket_seconds
    return body


def parse_trace_point(raw: dict[str, Any]) -> TracePoint:
    """A `traces/metrics` data point: percentile keys `P95.0` become `P95`, the
    `time_bucket` dimension (ISO 8601) becomes the bucket's start in milliseconds."""
    dimensions = {str(k): str(v) for k, v in dict(raw.get("dimensions") or {}).items()}
    bucket = dimensions.pop("time_bucket", None)
    values: dict[str, float] = {}
    for key, value in dict(raw.get("values") or {}).items():
        name = f"P{float(key[1:]):g}" if key.startswith("P") else str(key)
        values[name] = _float(value)
    bucket_ms = None
    if bucket is not None:
        bucket_ms = int(datetime.fromisoformat(bucket).timestamp() * 1000)
    return TracePoint(dimensions, values, bucket_ms)
