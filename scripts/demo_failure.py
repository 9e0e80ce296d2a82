"""Log one FAILED run that ends now, so the local stack's MlflowRunFailed alert fires.

The alert fires for a FAILED run whose end time is within the last hour. generate-sample's
runs are created once and age, so scripts/run-local.sh calls this on every start: a fresh
failure in experiment `stack-demo` (a few metric points, then terminated FAILED now).

    MLFLOW_TRACKING_URI=http://127.0.0.1:5000 python scripts/demo_failure.py

Prints one line: the run's name and id.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import time

EXPERIMENT = "stack-demo"
STEPS = 5
STEP_MS = 10_000


def log_failure(tracking_uri: str, experiment: str = EXPERIMENT) -> tuple[str, str]:
    """Create the FAILED run; returns (run name, run id)."""
    # Fail fast on an unreachable server instead of MLflow's default two minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    client = MlflowClient(tracking_uri=tracking_uri)
    now_ms = int(time.time() * 1000)
    start = now_ms - (STEPS + 1) * STEP_MS
    # Unique per start (to the second), so each start's alert is a new alert, not a repeat.
    name = time.strftime("demo-failure-%Y%m%d-%H%M%S", time.gmtime(now_ms / 1000))
    # MLflow's client prints a "View run" line on stdout; ours is the only line wanted there.
    with contextlib.redirect_stdout(io.StringIO()):
        existing = client.get_experiment_by_name(experiment)
        exp_id = (
            existing.experiment_id
            if existing
            else client.create_experiment(experiment, tags={"purpose": "run-local.sh demo alert"})
        )
        run = client.create_run(
            exp_id, start_time=start, run_name=name, tags={"owner": "run-local", "demo": "true"}
        )
        run_id = run.info.run_id
        # A loss that diverges: the kind of curve a crashed training job leaves behind.
        metrics = [
            Metric(key, value, start + (step + 1) * STEP_MS, step)
            for step in range(STEPS)
            for key, value in (("accuracy", 0.55 - 0.03 * step), ("loss", 0.9 * 1.6**step))
        ]
        client.log_batch(run_id, metrics=metrics, params=[Param("learning_rate", "0.3")])
        client.set_terminated(run_id, status="FAILED", end_time=now_ms)
    return name, run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000"),
        help="MLflow server (default: $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument("--experiment", default=EXPERIMENT)
    args = parser.parse_args(argv)
    name, run_id = log_failure(args.tracking_uri, args.experiment)
    print(f"logged FAILED run {name} ({run_id}) in experiment {args.experiment}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
