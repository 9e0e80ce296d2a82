"""What an operator relies on, against real servers: retries bounded by the delivery budget,
whole-server counts whatever the bounds, and readiness."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import ExporterEnv
from tests.integration.test_faults import continuous
from tests.support import servers
from tests.support.receiver import Receiver, Reply
from tests.support.seed import make_run, mlflow_points

pytestmark = pytest.mark.integration


def test_transient_refusals_are_retried_within_the_budget_not_a_small_attempt_count(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    exp = exporter_env.experiment()
    runs = [make_run(exporter_env.client, exp, {"loss": [1.0, 0.5]})]
    receiver.script.extend(
        [Reply(503), Reply(503), Reply(503)]
        + [Reply(429, headers={"Retry-After": "1"}), Reply(429, headers={"Retry-After": "1"})]
    )

    done = exporter_env.run("export-once", timeout=90)

    assert done.returncode == 0, done.stderr  # the old code gave up after 5 attempts
    assert [r.status for r in receiver.requests] == [503, 503, 503, 429, 429, 200]
    assert receiver.received_points() == mlflow_points(exporter_env.client, runs)


def test_every_experiment_and_stage_is_counted_with_the_default_bounds(
    exporter_env: ExporterEnv, pushgateway: servers.Server, tmp_path: Path
) -> None:
    # The default config: no max_experiments (the fixture's config sets 0 = all explicitly).
    config = tmp_path / "default.yaml"
    config.write_text(f"export:\n  include_experiments: ['{exporter_env.prefix}.*']\n")
    exps = [exporter_env.experiment(f"e{i:02d}") for i in range(11)]
    for exp in exps:
        make_run(exporter_env.client, exp, {"accuracy": [0.9]})
    gone = exporter_env.experiment("gone")
    exporter_env.client.delete_experiment(gone)

    done = exporter_env.run("export-once", EXPORTER_CONFIG=str(config))

    assert done.returncode == 0, done.stderr
    data = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=5).json()["data"]
    mine = [g for g in data if g["labels"]["job"] == exporter_env.job]
    with_runs = {g["labels"].get("experiment_id") for g in mine if "mlflow_accuracy" in g}
    assert with_runs == set(exps)  # all 11 get per-run series: MAX_EXPERIMENTS defaults to all
    [registry] = [g for g in mine if g["labels"].get("group") == "registry"]
    counts = {
        m["labels"]["lifecycle_stage"]: float(m["value"])
        for m in registry["mlflow_experiments"]["metrics"]
    }
    assert counts == {"active": 11.0, "deleted": 1.0}
    stages = {m["labels"]["stage"] for m in registry["mlflow_model_versions"]["metrics"]}
    assert stages == {"None", "Staging", "Production", "Archived"}  # zeros present too


def test_readyz_answers_503_until_a_cycle_succeeds_and_livez_meanwhile_200(
    exporter_env: ExporterEnv, tmp_path: Path
) -> None:
    port = servers.free_port()
    (tmp_path / "mlflow").mkdir()
    with continuous(
        exporter_env, tmp_path / "exporter.log", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{port}"
    ) as c:
        deadline = time.monotonic() + 30
        while (r := c.get("/healthz")) is None or r.status_code != 503:
            assert time.monotonic() < deadline, "never failed against a missing MLflow"
            time.sleep(0.2)
        ready, live = c.get("/readyz"), c.get("/livez")
        assert ready is not None
        assert live is not None
        assert (ready.status_code, live.status_code) == (503, 200)
        assert ready.json()["status"] == "not ready"

        mlflow = servers.start_mlflow(tmp_path / "mlflow", port=port)
        try:
            deadline = time.monotonic() + 60
            while (r := c.get("/readyz")) is None or r.status_code != 200:
                assert time.monotonic() < deadline, "not ready after MLflow came up"
                time.sleep(0.2)
        finally:
            mlflow.stop()
        assert c.terminate() < 10
