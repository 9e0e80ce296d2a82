"""`generate-sample`: realistic experiments, runs, curves and registry entries in MLflow.

This is the one place that imports the `mlflow` package (slow to import, so only here).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any

import click

from exporter.config import Settings

EXPERIMENT_NAMES = [
    "churn-prediction",
    "fraud-detection",
    "demand-forecast",
    "image-tagging",
    "search-ranking",
    "sentiment-analysis",
    "price-elasticity",
    "anomaly-watch",
]
RUN_SPACING_MS = 15 * 60_000
STEP_MS = 10_000  # one logged step every 10 s: a 30-step run lasts 5 minutes
# Final statuses in a realistic mix; RUNNING runs are left open on purpose.
STATUS_CYCLE = [
    "FINISHED",
    "FINISHED",
    "FAILED",
    "FINISHED",
    "KILLED",
    "FINISHED",
    "RUNNING",
    "FINISHED",
]


@dataclass(frozen=True)
class SampleSpec:
    experiments: int = 3
    runs: int = 8
    steps: int = 30
    seed: int = 42
    model_name: str = "churn-classifier"


def curves(rng: random.Random, steps: int, quality: float) -> dict[str, list[float]]:
    """Training curves that look like a real classifier converging (quality in 0..1)."""
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "accuracy",
            "loss",
            "precision",
            "recall",
            "f1_score",
            "val/loss",
            "val/accuracy",
            "learning_rate",
        )
    }
    for step in range(steps):
        progress = 1 - math.exp(-4 * (step + 1) / steps)
        acc = 0.5 + (0.35 + 0.13 * quality) * progress + rng.gauss(0, 0.008)
        precision = min(0.999, acc + rng.gauss(0.01, 0.01))
        recall = min(0.999, acc - 0.02 + rng.gauss(0, 0.01))
        out["accuracy"].append(min(acc, 0.999))
        out["loss"].append(
            max(0.01, 1.2 * (1 - progress) + 0.15 * (1 - quality) + rng.gauss(0, 0.01))
        )
        out["precision"].append(precision)
        out["recall"].append(recall)
        out["f1_score"].append(2 * precision * recall / (precision + recall))
        out["val/loss"].append(out["loss"][-1] * 1.08 + rng.gauss(0, 0.01))
        out["val/accuracy"].append(out["accuracy"][-1] - 0.015)
        out["learning_rate"].append(1e-3 * (0.95**step))
    return out


def generate(settings: Settings, spec: SampleSpec, progress: bool = False) -> str:
    """Create the sample data; returns a one-line summary."""
    # Fail fast on an unreachable server instead of MLflow's default two minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=settings.mlflow.tracking_uri)
    rng = random.Random(spec.seed)
    now_ms = int(time.time() * 1000)
    finished: list[tuple[float, str, str]] = []  # (accuracy, run_id, artifact_uri)
    total = spec.experiments * spec.runs
    bar_file = sys.stdout if progress else open(os.devnull, "w")  # noqa: SIM115
    # MLflow prints a "View run" line per run on stdout; keep stdout for our summary only.
    with (
        contextlib.redirect_stdout(io.StringIO()),
        click.progressbar(length=total, label="generating runs", file=bar_file) as bar,
    ):
        for e in range(spec.experiments):
            base = EXPERIMENT_NAMES[e % len(EXPERIMENT_NAMES)]
            name = base if e < len(EXPERIMENT_NAMES) else f"{base}-{e}"
            existing = client.get_experiment_by_name(name)
            exp_id = (
                existing.experiment_id
                if existing
                else client.create_experiment(
                    name, tags={"team": rng.choice(["growth", "risk", "platform"])}
                )
            )
            for r in range(spec.runs):
                finished.extend(
                    _one_run(client, rng, spec, exp_id, e, r, now_ms, Metric, Param, RunTag)
                )
                bar.update(1)
    versions = _register(client, spec.model_name, sorted(finished, reverse=True)[:3])
    return (
        f"created {total} runs in {spec.experiments} experiments and {versions} versions "
        f"of model {spec.model_name!r} at {settings.mlflow.tracking_uri}"
    )


def _one_run(
    client: Any,
    rng: random.Random,
    spec: SampleSpec,
    exp_id: str,
    e: int,
    r: int,
    now_ms: int,
    Metric: Any,
    Param: Any,
    RunTag: Any,
) -> list[tuple[float, str, str]]:
    # Runs start every 15 minutes up to now; counted from the newest run, the status cycle
    # puts a FAILED run within the last hour, so a fresh stack shows the alert firing.
    ago = (spec.experiments - e) * spec.runs - r  # 1 for the newest run
    status = STATUS_CYCLE[(ago - 1) % len(STATUS_CYCLE)]
    start = now_ms - ago * RUN_SPACING_MS
    lr, batch = rng.choice([1e-2, 3e-3, 1e-3, 3e-4]), rng.choice([32, 64, 128, 256])
    run = client.create_run(
        exp_id,
        start_time=start,
        run_name=f"run-{e}-{r}-lr{lr:g}",
        tags={
            "model_type": rng.choice(["xgboost", "mlp", "logreg"]),
            "dataset": f"v{rng.randint(1, 4)}",
            "owner": "sample",
        },
    )
    run_id = run.info.run_id
    series = curves(rng, spec.steps, quality=rng.uniform(0.2, 1.0))
    # A failed or killed run stops early, like a crash or a cancelled job.
    steps = spec.steps if status in ("FINISHED", "RUNNING") else max(1, spec.steps // 2)
    metrics = [
        Metric(key, value, start + (step + 1) * STEP_MS, step)
        for key, values in series.items()
        for step, value in enumerate(values[:steps])
    ]
    params = [
        Param("learning_rate", str(lr)),
        Param("batch_size", str(batch)),
        Param("optimizer", rng.choice(["adam", "sgd", "adamw"])),
        Param("epochs", str(spec.steps)),
    ]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics per batch
        client.log_batch(
            run_id,
            metrics=metrics[i : i + 1000],
            params=params if i == 0 else [],
            tags=[RunTag("mlflow.note.content", "generated by exporter")] if i == 0 else [],
        )
    if status == "RUNNING":
        return []
    client.set_terminated(run_id, status=status, end_time=start + (steps + 1) * STEP_MS)
    if status != "FINISHED":
        return []
    return [(series["accuracy"][steps - 1], run_id, run.info.artifact_uri)]


def _register(client: Any, name: str, best: list[tuple[float, str, str]]) -> int:
    """Register the best runs as versions; newest gets Staging + challenger, best Production
    + champion (stages are deprecated in MLflow but still used by many registries)."""
    if not best:
        return 0
    if not _exists(client, name):
        client.create_registered_model(name, description="Sample model made by generate-sample")
    created = []
    for _acc, run_id, artifact_uri in best:
        mv = client.create_model_version(name, source=f"{artifact_uri}/model", run_id=run_id)
        created.append(mv.version)
    _stage(client, name, created[0], "Production")
    client.set_registered_model_alias(name, "champion", created[0])
    if len(created) > 1:
        _stage(client, name, created[1], "Staging")
        client.set_registered_model_alias(name, "challenger", created[1])
    return len(created)


def _exists(client: Any, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except Exception:  # MLflow raises RestException for a missing model
        return False
    return True


def _stage(client: Any, name: str, version: str, stage: str) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stage API's deprecation warning
        client.transition_model_version_stage(name, version, stage)
