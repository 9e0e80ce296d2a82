"""Seed a real MLflow server through its Python client (what a training job would do)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient


def make_run(
    client: MlflowClient,
    experiment_id: str,
    history: Mapping[str, Sequence[float]],
    status: str = "FINISHED",
    tags: Mapping[str, str] | None = None,
    name: str | None = None,
) -> str:
    """One run whose metric `key` took the given values at steps 0, 1, 2..."""
    run = client.create_run(experiment_id, run_name=name, tags=dict(tags or {}))
    now = int(time.time() * 1000)
    metrics = [
        Metric(key, value, now + step, step)
        for key, values in history.items()
        for step, value in enumerate(values)
    ]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run.info.run_id, metrics=metrics[i : i + 1000])
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status=status)
    return str(run.info.run_id)


def log_points(
    client: MlflowClient, run_id: str, key: str, values: Sequence[float], first_step: int
) -> None:
    now = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(key, v, now + i, first_step + i) for i, v in enumerate(values)]
    )


def mlflow_points(client: MlflowClient, run_ids: Sequence[str]) -> set[tuple[Any, ...]]:
    """Every logged point, as (run_id, key, step, value-or-repr) — what Pramathus must get."""
    points = set()
    for run_id in run_ids:
        run = client.get_run(run_id)
        for key in run.data.metrics:
            for m in client.get_metric_history(run_id, key):
                points.add((run_id, key, m.step, _comparable(m.value)))
    return points


def _comparable(value: float) -> Any:
    return value if not math.isnan(value) and abs(value) != float("inf") else repr(value)
