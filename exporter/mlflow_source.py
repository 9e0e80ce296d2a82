"""Reading MLflow: a thin REST client and pure collectors that return `model` dataclasses.

The exporter talks to MLflow's REST API with `requests` rather than importing the `mlflow`
package: that import alone costs ~2 s and ~170 MB per process (see shared FACTS), and the REST
API is where the cheap bulk endpoints live.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import requests
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from exporter.config import ExportSettings, MlflowSettings, name_filter
from exporter.model import Experiment, LatestMetric, MetricPoint, ModelVersion, Run

API = "/api/2.0/mlflow"


class MlflowError(Exception):
    """MLflow could not be read; the message is one line, safe to show a user."""


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return True
    return isinstance(exc, _HttpStatusError) and (exc.status >= 500 or exc.status == 429)


class _HttpStatusError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status


@dataclass
class MlflowClient:
    """Authenticated JSON calls to one MLflow server, with bounded retries.

    `on_request(endpoint)` is called once per HTTP request (the self-metrics count them).
    """

    settings: MlflowSettings
    session: requests.Session
    on_request: Callable[[str], None] = lambda endpoint: None
    sleep: Callable[[float], None] = time.sleep
    requests_made: int = 0

    @classmethod
    def from_settings(
        cls, settings: MlflowSettings, on_request: Callable[[str], None] | None = None
    ) -> MlflowClient:
        session = requests.Session()
        if settings.token is not None:
            session.headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        elif settings.username is not None and settings.password is not None:
            session.auth = (
                settings.username.get_secret_value(),
                settings.password.get_secret_value(),
            )
        session.verify = False if settings.insecure_tls else (settings.ca_bundle or True)
        return cls(settings, session, on_request or (lambda endpoint: None))

    def call(self, method: str, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One API call, retried on connection errors, timeouts, 429 and 5xx."""
        retrying = Retrying(
            retry=retry_if_exception(_retryable),
            stop=stop_after_attempt(self.settings.max_retries + 1),
            wait=wait_exponential_jitter(multiplier=0.5, max=5),
            reraise=True,
            sleep=self.sleep,
        )
        try:
            return retrying(self._once, method, endpoint, payload)
        except requests.Timeout:
            raise MlflowError(
                f"MLflow {endpoint} timed out after {self.settings.timeout_seconds:g}s"
            ) from None
        except requests.ConnectionError as exc:
            raise MlflowError(
                f"cannot reach MLflow at {self.settings.tracking_uri}: {_root_cause(exc)}"
            ) from None
        except _HttpStatusError as exc:
            raise MlflowError(f"MLflow {endpoint} answered {exc}") from None

    def _once(self, method: str, endpoint: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.requests_made += 1
        self.on_request(endpoint)
        url = f"{self.settings.tracking_uri}{API}/{endpoint}"
        kwargs: dict[str, Any] = {"params" if method == "GET" else "json": payload}
        response = self.session.request(
            method, url, timeout=self.settings.timeout_seconds, **kwargs
        )
        if response.status_code >= 400:
            raise _HttpStatusError(response.status_code, response.text[:200].replace("\n", " "))
        try:
            data = response.json()  # MLflow writes NaN/Infinity literals; json accepts them
        except ValueError:
            raise _HttpStatusError(response.status_code, "response is not JSON") from None
        return data if isinstance(data, dict) else {}

    def pages(
        self,
        method: str,
        endpoint: str,
        payload: dict[str, Any],
        items: str,
        max_pages: int | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield every item of a paged list endpoint (of its first `max_pages` pages)."""
        token: str | None = None
        for _ in itertools.count() if max_pages is None else range(max_pages):
            data = self.call(
                method, endpoint, {**payload, **({"page_token": token} if token else {})}
            )
            yield from data.get(items, [])
            token = data.get("next_page_token")
            if not token:
                return


def _root_cause(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text.splitlines()[0][:160]


# ---------------------------------------------------------------------------- collectors


def _int_or_none(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _float(value: Any) -> float:
    # MLflow may hand values back as numbers or as the strings "NaN"/"Infinity".
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def parse_run(raw: dict[str, Any]) -> Run:
    """A `runs/search` item as a `Run`."""
    info, data = raw.get("info", {}), raw.get("data", {})
    metrics = tuple(
        LatestMetric(
            key=m["key"],
            value=_float(m.get("value")),
            step=int(m.get("step") or 0),
            timestamp_ms=int(m.get("timestamp") or 0),
        )
        for m in data.get("metrics", [])
    )
    tags = {t["key"]: str(t.get("value", "")) for t in data.get("tags", [])}
    return Run(
        run_id=info.get("run_id") or info["run_uuid"],
        experiment_id=str(info["experiment_id"]),
        run_name=info.get("run_name") or tags.get("mlflow.runName", ""),
        status=info.get("status", "RUNNING"),
        user_id=info.get("user_id", ""),
        start_time_ms=_int_or_none(info.get("start_time")),
        end_time_ms=_int_or_none(info.get("end_time")),
        metrics=metrics,
        tags=tags,
    )


def shard_of(experiment_id: str, shard_count: int) -> int:
    """The shard owning an experiment: a stable hash, the same in every process and release."""
    digest = hashlib.sha256(experiment_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % shard_count


def select_experiments(
    experiments: list[Experiment], export: ExportSettings
) -> tuple[list[Experiment], int]:
    """Apply include/exclude patterns and MAX_EXPERIMENTS; return (kept, number cut).

    Patterns match the whole experiment name; the most recently updated experiments are kept.
    """
    if export.shard_count > 1:  # other shards' experiments are theirs, not "cut"
        experiments = [
            e
            for e in experiments
            if shard_of(e.experiment_id, export.shard_count) == export.shard_index
        ]
    allowed = name_filter(export.include_experiments, export.exclude_experiments)
    kept = [e for e in experiments if allowed(e.name)]
    kept.sort(key=lambda e: (e.last_update_time_ms or 0, e.experiment_id), reverse=True)
    if export.max_experiments:
        kept = kept[: export.max_experiments]
    return kept, len(experiments) - len(kept)


def list_experiments(client: MlflowClient) -> list[Experiment]:
    """Every active experiment."""
    payload = {"max_results": 1000, "view_type": "ACTIVE_ONLY"}
    return [
        Experiment(
            experiment_id=str(e["experiment_id"]),
            name=e.get("name", ""),
            lifecycle_stage=e.get("lifecycle_stage", "active"),
            creation_time_ms=_int_or_none(e.get("creation_time")),
            last_update_time_ms=_int_or_none(e.get("last_update_time")),
        )
        for e in client.pages("POST", "experiments/search", payload, "experiments")
    ]


# MLflow takes many experiment ids per search; chunks keep each request and its SQL modest.
EXPERIMENTS_PER_SEARCH = 100
RUNS_PER_ID_FILTER = 100


def search_runs(
    client: MlflowClient,
    experiment_ids: Sequence[str],
    filter_string: str = "",
    view: str = "ACTIVE_ONLY",
    max_pages: int | None = None,
    newest_first: bool = False,
) -> Iterator[Run]:
    """Runs of these experiments matching `filter_string`, page after page.

    Ordered by ascending start time unless `newest_first`: `page_token` is an offset, and new
    runs then land at the end instead of shifting pages under the reader.
    """
    order = "DESC" if newest_first else "ASC"
    for start in range(0, len(experiment_ids), EXPERIMENTS_PER_SEARCH):
        payload = {
            "experiment_ids": list(experiment_ids[start : start + EXPERIMENTS_PER_SEARCH]),
            "max_results": client.settings.page_size,
            "run_view_type": view,
            "order_by": [f"attributes.start_time {order}", f"attributes.run_id {order}"],
            **({"filter": filter_string} if filter_string else {}),
        }
        items = client.pages("POST", "runs/search", payload, "runs", max_pages=max_pages)
        yield from (parse_run(r) for r in items)


def runs_by_id(
    client: MlflowClient, experiment_ids: Sequence[str], run_ids: Sequence[str]
) -> Iterator[Run]:
    """The active runs among `run_ids` (deleted ones are simply absent)."""
    for start in range(0, len(run_ids), RUNS_PER_ID_FILTER):
        quoted = ", ".join(
            f"'{r}'"
            for r in run_ids[start : start + RUNS_PER_ID_FILTER]
            if re.fullmatch(r"[0-9a-zA-Z_-]+", r)
        )
        yield from search_runs(client, experiment_ids, f"attributes.run_id IN ({quoted})")


def read_registry(client: MlflowClient) -> tuple[list[str], list[ModelVersion]]:
    """Registered model names and all their versions, with aliases and (deprecated) stages."""
    names: list[str] = []
    aliases: dict[tuple[str, str], list[str]] = {}
    for model in client.pages(
        "GET", "registered-models/search", {"max_results": 1000}, "registered_models"
    ):
        names.append(model["name"])
        for a in model.get("aliases", []):
            aliases.setdefault((model["name"], str(a["version"])), []).append(a["alias"])
    versions = [
        ModelVersion(
            model_name=v["name"],
            version=str(v["version"]),
            run_id=v.get("run_id") or None,
            stage=v.get("current_stage") or "None",
            status=v.get("status", "READY"),
            aliases=tuple(sorted(aliases.get((v["name"], str(v["version"])), []))),
        )
        for v in client.pages(
            "GET", "model-versions/search", {"max_results": 1000}, "model_versions"
        )
    ]
    return names, versions


def read_history(
    client: MlflowClient, run_id: str, key: str, after: tuple[int, int] | None
) -> list[MetricPoint]:
    """Every logged point of (run, key) strictly after the `(step, timestamp_ms)` mark."""
    payload = {"run_id": run_id, "metric_key": key, "max_results": 25000}
    points = [
        _point(run_id, key, m)
        for m in client.pages("GET", "metrics/get-history", payload, "metrics")
    ]
    if after is not None:
        points = [p for p in points if (p.step, p.timestamp_ms) > after]
    points.sort(key=lambda p: (p.step, p.timestamp_ms))
    return points


# `get-history-bulk-interval` returns at most this many points per run, sampled above it.
BULK_MAX_POINTS = 2500
BULK_MAX_RUNS = 100


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """Points of (run, key) after `after` (None: all), up to the latest step MLflow reported."""

    run_id: str
    key: str
    after: tuple[int, int] | None
    last_step: int


def read_histories(client: MlflowClient, wanted: Sequence[HistoryRequest]) -> list[MetricPoint]:
    """New points of many (run, key) series of ONE key, in as few requests as MLflow allows.

    Up to 100 runs go in one `get-history-bulk-interval` call over the steps still missing. A
    run that comes back with the per-run maximum may have been sampled: it is re-read in full
    with `get-history`, so no point is ever skipped.
    """
    points: list[MetricPoint] = []
    for start in range(0, len(wanted), BULK_MAX_RUNS):
        chunk = wanted[start : start + BULK_MAX_RUNS]
        key = chunk[0].key
        payload = {
            "run_ids": [w.run_id for w in chunk],
            "metric_key": key,
            "max_results": BULK_MAX_POINTS,
            "start_step": min((w.after[0] if w.after else 0) for w in chunk),
            "end_step": max(max(w.last_step for w in chunk), 0),
        }
        got: dict[str, list[MetricPoint]] = {w.run_id: [] for w in chunk}
        for m in client.call("GET", "metrics/get-history-bulk-interval", payload).get(
            "metrics", []
        ):
            if m.get("run_id") in got:
                got[m["run_id"]].append(_point(m["run_id"], key, m))
        for w in chunk:
            run_points = got[w.run_id]
            if len(run_points) >= BULK_MAX_POINTS:
                run_points = read_history(client, w.run_id, key, None)
            points.extend(
                p for p in run_points if w.after is None or (p.step, p.timestamp_ms) > w.after
            )
    points.sort(key=lambda p: (p.run_id, p.step, p.timestamp_ms))
    return points


def _point(run_id: str, key: str, m: dict[str, Any]) -> MetricPoint:
    return MetricPoint(
        run_id=run_id,
        key=key,
        value=_float(m.get("value")),
        step=int(m.get("step") or 0),
        timestamp_ms=int(m.get("timestamp") or 0),
    )
