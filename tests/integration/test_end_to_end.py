"""The exporter against a real MLflow, Pushgateway, Prometheus and HTTP receiver."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.receiver import Receiver, Reply
from tests.support.seed import log_points, make_run, mlflow_points

pytestmark = pytest.mark.integration

AWKWARD = {
    "accuracy": [0.5, 0.7, 0.9],
    "val/loss": [1.0, 0.6, 0.4],
    "val.loss": [2.0, 1.5],  # sanitises to the same name as val/loss
    "train.f1 score": [0.1, 0.2],
    "précision": [0.3, 0.35],
    "损失": [5.0, 4.0],
    "weird": [1.0, math.nan],
    "blowup": [1.0, math.inf],
}


def test_export_once_makes_mlflow_latest_values_queryable_in_prometheus(
    exporter_env: ExporterEnv, prometheus: servers.Server
) -> None:
    exp = exporter_env.experiment()
    run_id = make_run(exporter_env.client, exp, AWKWARD, tags={"team": "x" * 5000})

    done = exporter_env.run("export-once")
    assert done.returncode == 0, done.stderr

    job = exporter_env.job
    sel = f'job="{job}",run_id="{run_id[:12]}"'
    acc = servers.wait_for_query(prometheus, f"mlflow_accuracy{{{sel}}}")
    assert float(acc[0]["value"][1]) == pytest.approx(0.9)  # type: ignore[index]
    assert acc[0]["metric"]["experiment_name"] == f"{exporter_env.prefix}exp"  # type: ignore[index]
    assert acc[0]["metric"]["model_stage"] == "none"  # type: ignore[index]
    losses = servers.prom_query(prometheus, f"mlflow_val_loss{{{sel}}}")
    by_key = {s["metric"]["metric_key"]: float(s["value"][1]) for s in losses}  # type: ignore[index]
    assert by_key == {"val/loss": pytest.approx(0.4), "val.loss": pytest.approx(1.5)}
    weird = servers.prom_query(prometheus, f"mlflow_weird{{{sel}}}")
    assert weird[0]["value"][1] == "NaN"  # type: ignore[index]
    # MLflow's SQL store keeps +inf as the largest float; Prometheus must show what MLflow holds.
    held = exporter_env.client.get_run(run_id).data.metrics["blowup"]
    blowup = servers.prom_query(prometheus, f"mlflow_blowup{{{sel}}}")
    assert float(blowup[0]["value"][1]) == held  # type: ignore[index]
    assert servers.prom_query(prometheus, f"mlflow_train_f1_score{{{sel}}}")
    assert servers.prom_query(prometheus, f"mlflow_precision{{{sel}}}")
    runs = servers.prom_query(
        prometheus, f'mlflow_experiment_runs{{job="{job}",status="FINISHED"}}'
    )
    assert float(runs[0]["value"][1]) == 1  # type: ignore[index]
    assert servers.prom_query(
        prometheus, f'count by (experiment_name) (mlflow_accuracy{{job="{job}"}})'
    )
    # The README's join for run names, as written there, on this test's job.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    [join] = re.findall(r"`(mlflow_val_loss \* on \(experiment_id, run_id\)[^`]+)`", readme)
    ours = join.replace("mlflow_val_loss", f"mlflow_val_loss{{{sel}}}").replace(
        "mlflow_run_info", f'mlflow_run_info{{job="{job}"}}'
    )
    named = servers.prom_query(prometheus, ours)
    run_name = exporter_env.client.get_run(run_id).info.run_name
    assert {(s["metric"]["metric_key"], s["metric"]["run_name"]) for s in named} == {  # type: ignore[index]
        ("val/loss", run_name),
        ("val.loss", run_name),
    }


def test_every_logged_point_reaches_pramathus_exactly_once(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    exp = exporter_env.experiment()
    runs = [
        make_run(exporter_env.client, exp, AWKWARD),
        make_run(
            exporter_env.client,
            exp,
            {"loss": [float(i) for i in range(40)]},
            status="RUNNING",
            tags={"mlflow.user": "hidden", "stage": "dev"},
        ),
    ]

    assert exporter_env.run("export-once").returncode == 0
    expected = mlflow_points(exporter_env.client, runs)
    assert receiver.received_points() == expected
    assert len(receiver.accepted_points()) == len(expected)  # nothing sent twice

    first = receiver.accepted()[0]
    assert first.headers["Authorization"] == f"Bearer {exporter_env.env['PRAMATHUS_API_KEY']}"
    assert first.headers["Content-Type"] == "application/json"
    assert first.body["source"] == "mlflow"
    assert first.body["timestamp"].endswith("Z")
    assert len(first.body["metrics"]) <= 7  # PRAMATHUS_BATCH_SIZE
    loss_points = [m for m in receiver.accepted_points() if m["name"] == "loss"]
    assert loss_points[0]["metadata"]["tags"] == {"stage": "dev"}

    # Nothing new in MLflow: a second export sends nothing.
    before = len(receiver.requests)
    assert exporter_env.run("export-once").returncode == 0
    assert len(receiver.requests) == before

    # New points on the running run: only those are sent.
    log_points(exporter_env.client, runs[1], "loss", [0.5, 0.25], first_step=40)
    assert exporter_env.run("export-once").returncode == 0
    new = [m for r in receiver.accepted()[-1:] for m in r.body["metrics"]]
    assert [(m["name"], m["metadata"]["step"]) for m in new] == [("loss", 40), ("loss", 41)]
    assert receiver.received_points() == mlflow_points(exporter_env.client, runs)


def test_a_deleted_experiment_disappears_from_the_pushgateway(
    exporter_env: ExporterEnv, pushgateway: servers.Server
) -> None:
    keep, gone = exporter_env.experiment("keep"), exporter_env.experiment("gone")
    for exp in (keep, gone):
        make_run(exporter_env.client, exp, {"accuracy": [0.1]})
    assert exporter_env.run("export-once").returncode == 0
    assert _groups(pushgateway, exporter_env.job) >= {keep, gone}

    exporter_env.client.delete_experiment(gone)
    assert exporter_env.run("export-once").returncode == 0
    groups = _groups(pushgateway, exporter_env.job)
    assert keep in groups
    assert gone not in groups


def _groups(pushgateway: servers.Server, job: str) -> set[str]:
    data = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=5).json()["data"]
    return {g["labels"].get("experiment_id", "") for g in data if g["labels"]["job"] == job}


def test_pramathus_outage_keeps_points_spooled_until_it_returns(
    exporter_env: ExporterEnv, receiver: Receiver
) -> None:
    exp = exporter_env.experiment()
    runs = [make_run(exporter_env.client, exp, {"loss": [1.0, 0.5, 0.25]})]
    receiver.default = Reply(status=503)
    failed = exporter_env.run("export-once", timeout=60)
    assert failed.returncode == 1
    assert "pramathus" in failed.stderr.splitlines()[-1]
    assert exporter_env.env["PRAMATHUS_API_KEY"] not in failed.stderr + failed.stdout

    receiver.default = Reply(status=200)
    assert exporter_env.run("export-once").returncode == 0
    assert receiver.received_points() == mlflow_points(exporter_env.client, runs)


def test_export_once_fails_fast_with_one_line_when_mlflow_is_down(
    exporter_env: ExporterEnv,
) -> None:
    started = time.monotonic()
    done = exporter_env.run(
        "export-once", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{servers.free_port()}"
    )
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: mlflow: cannot reach MLflow")
    assert "Traceback" not in done.stderr


def test_continuous_serves_health_and_stops_cleanly_on_sigterm(
    exporter_env: ExporterEnv, prometheus: servers.Server
) -> None:
    exp = exporter_env.experiment()
    make_run(exporter_env.client, exp, {"accuracy": [0.8]})
    port = servers.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "continuous", "--interval", "1", "--port", str(port)],
        env=exporter_env.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/livez", 30, proc)  # type: ignore[arg-type]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            if health.json()["status"] == "ok":
                break
            time.sleep(0.3)
        assert health.status_code == 200
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        assert 'mlflow_exporter_cycles_total{result="success"}' in text
        assert "mlflow_exporter_up 1.0" in text
        assert exporter_env.env["PRAMATHUS_API_KEY"] not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert "cycle.succeeded" in events
    assert events[-1] == "scheduler.stopped"
    assert exporter_env.env["PRAMATHUS_API_KEY"] not in err


def test_check_config_masks_secrets_and_probes_each_backend(exporter_env: ExporterEnv) -> None:
    done = exporter_env.run("check-config")
    assert done.returncode == 0, done.stdout + done.stderr
    assert exporter_env.env["PRAMATHUS_API_KEY"] not in done.stdout
    assert "api_key: '**********'" in done.stdout
    for backend in ("mlflow", "pushgateway", "pramathus"):
        assert f"ok   {backend}:" in done.stdout


def test_generate_sample_fills_mlflow_with_every_status_and_a_registered_model(
    exporter_env: ExporterEnv, mlflow_server: servers.Server
) -> None:
    model = f"{exporter_env.prefix}model"
    done = exporter_env.run(
        "generate-sample",
        "--experiments",
        "2",
        "--runs",
        "8",
        "--steps",
        "5",
        "--model-name",
        model,
    )
    assert done.returncode == 0, done.stderr
    assert "created 16 runs" in done.stdout
    client = exporter_env.client
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], max_results=5000
    )
    assert {"FINISHED", "FAILED", "KILLED", "RUNNING"} <= {r.info.status for r in runs}
    registered = client.get_registered_model(model)
    assert set(registered.aliases) == {"champion", "challenger"}
