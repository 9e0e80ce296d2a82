"""Seed an MLflow SQLite store with N runs fast, before its server starts.

MLflow's own client creates the schema and the experiments; runs, metric histories, latest
metrics and tags are then bulk-inserted with plain SQL into the same tables MLflow writes
(`runs`, `metrics`, `latest_metrics`, `tags`). That takes seconds for 20,000 runs where the
REST API takes half an hour. The benchmark checks the result through the REST API.
"""

from __future__ import annotations

import random
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

METRICS = (
    "accuracy",
    "loss",
    "f1_score",
    "precision",
    "recall",
    "val_loss",
    "val_accuracy",
    "auc",
    "learning_rate",
    "epoch_time",
)


def seed(
    db_path: Path,
    artifacts: Path,
    runs: int,
    experiments: int,
    steps: int = 5,
    seed_value: int = 7,
    running: int = 40,
) -> list[str]:
    """Create `experiments` experiments holding `runs` runs in all, `running` of them RUNNING
    (the same number whatever `runs`, so that what an exporter must poll every cycle does not
    grow with the store); return the run ids."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db_path}")
    exp_ids = [
        int(client.create_experiment(f"bench-{i}", artifact_location=str(artifacts)))
        for i in range(experiments)
    ]
    rng = random.Random(seed_value)
    # Runs ended more than a day ago: a settle window (at most an hour in the benchmarks) holds
    # none of them, so idle cycles measure idle and only a delta's runs settle.
    now = int(time.time() * 1000) - runs * 1000 - 86_400_000
    run_rows: list[tuple[Any, ...]] = []
    metric_rows: list[tuple[Any, ...]] = []
    latest_rows: list[tuple[Any, ...]] = []
    tag_rows: list[tuple[Any, ...]] = []
    ids: list[str] = []
    every = max(1, runs // max(1, running))  # the running runs, spread over the store
    for i in range(runs):
        run_id = uuid.UUID(int=rng.getrandbits(128)).hex
        ids.append(run_id)
        start = now + i * 1000
        status = "RUNNING" if i % every == 0 and i // every < running else "FINISHED"
        run_rows.append(
            (
                run_id,
                f"run-{i}",
                "UNKNOWN",
                "",
                "",
                "bench",
                status,
                start,
                None if status == "RUNNING" else start + 900,
                "",
                "active",
                f"{artifacts}/{run_id}",
                exp_ids[i % experiments],
            )
        )
        tag_rows.append(("mlflow.runName", f"run-{i}", run_id))
        tag_rows.append(("team", "bench", run_id))
        for key in METRICS:
            metric_rows.extend(
                (key, rng.random(), start + step, run_id, step, 0) for step in range(steps)
            )
            latest_rows.append((key, metric_rows[-1][1], start + steps - 1, steps - 1, 0, run_id))
    db = sqlite3.connect(db_path)
    with db:
        db.executemany(
            "INSERT INTO runs(run_uuid, name, source_type, source_name, entry_point_name, "
            "user_id, status, start_time, end_time, source_version, lifecycle_stage, "
            "artifact_uri, experiment_id) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            run_rows,
        )
        db.executemany("INSERT INTO tags(key, value, run_uuid) VALUES(?,?,?)", tag_rows)
        db.executemany(
            "INSERT INTO metrics(key, value, timestamp, run_uuid, step, is_nan) "
            "VALUES(?,?,?,?,?,?)",
            metric_rows,
        )
        db.executemany(
            "INSERT INTO latest_metrics(key, value, timestamp, step, is_nan, "
            "run_uuid) VALUES(?,?,?,?,?,?)",
            latest_rows,
        )
    db.close()
    return ids
