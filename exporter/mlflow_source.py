"""Reading MLflow: a thin REST client and pure collectors that return `model` dataclasses.

The exporter talks to MLflow's REST API with `requests` rather than importing the `mlflow`
package: that import alone costs ~2 s and ~170 MB per process (see shared FACTS), and the REST
API is where the cheap bulk endpoints live.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests
from tenacity import (
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from exporter.config import ExportSettings, MlflowSettings
from exporter.model import Experiment, LatestMetric, MetricPoint, ModelVersion, Run, Snapshot

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
            wait=wait_exponential_jitter(initial=0.5, max=5),
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
        self, method: str, endpoint: str, payload: dict[str, Any], items: str
    ) -> Iterator[dict[str, Any]]:
        """Yield every item of a paged list endpoint."""
        token: str | None = None
        while True:
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


def select_experiments(
    experiments: list[Experiment], export: ExportSettings
) -> tuple[list[Experiment], int]:
    """Apply include/exclude patterns and MAX_EXPERIMENTS; return (kept, number cut).

    Patterns match the whole experiment name; the most recently updated experiments are kept.
    """
    include = [re.compile(p) for p in export.include_experiments]
    exclude = [re.compile(p) for p in export.exclude_experiments]
    kept = [
        e
        for e in experiments
        if (not include or any(p.fullmatch(e.name) for p in include))
        and not any(p.fullmatch(e.name) for p in exclude)
    ]
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


def list_runs(client: MlflowClient, experiment_id: str) -> list[Run]:
    """Every active run of one experiment, with the latest value of each metric."""
    payload = {
        "experiment_ids": [experiment_id],
        "max_results": client.settings.page_size,
        "run_view_type": "ACTIVE_ONLY",
        # Ascending start time keeps the offset-based page tokens stable while runs are added.
        "order_by": ["attributes.start_time ASC"],
    }
    return [parse_run(r) for r in client.pages("POST", "runs/search", payload, "runs")]


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


def collect_snapshot(client: MlflowClient, export: ExportSettings) -> Snapshot:
    """Read experiments, their runs and the registry into one `Snapshot`."""
    experiments, cut = select_experiments(list_experiments(client), export)
    runs = {e.experiment_id: list_runs(client, e.experiment_id) for e in experiments}
    names, versions = read_registry(client)
    return Snapshot(experiments, runs, names, versions, excluded={"experiments": cut})


def read_history(
    client: MlflowClient, run_id: str, key: str, after: tuple[int, int] | None
) -> list[MetricPoint]:
    """Every logged point of (run, key) strictly after the `(step, timestamp_ms)` mark."""
    payload = {"run_id": run_id, "metric_key": key, "max_results": 25000}
    points = [
        MetricPoint(
            run_id=run_id,
            key=key,
            value=_float(m.get("value")),
            step=int(m.get("step") or 0),
            timestamp_ms=int(m.get("timestamp") or 0),
        )
        for m in client.pages("GET", "metrics/get-history", payload, "metrics")
    ]
    if after is not None:
        points = [p for p in points if (p.step, p.timestamp_ms) > after]
    points.sort(key=lambda p: (p.step, p.timestamp_ms))
    return points
