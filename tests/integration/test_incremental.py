"""Incremental cycles against a real MLflow: each cycle costs what changed, nothing is missed."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from exporter.app import open_runner
from exporter.config import load_settings
from exporter.planners.scope import shard_of
from exporter.runner import Runner
from exporter.selfmetrics import SelfMetrics
from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.receiver import Receiver
from tests.support.seed import log_points, make_run, mlflow_points

pytestmark = pytest.mark.integration


def _requests(metrics: SelfMetrics) -> int:
    return int(
        sum(
            s.value
            for m in metrics.registry.collect()
            if m.name == "mlflow_exporter_mlflow_requests"
            for s in m.samples
            if s.name.endswith("_total")
        )
    )


class Cycles:
    """An in-process exporter on the test's environment, counting its MLflow requests."""

    def __init__(self, env: ExporterEnv, tmp: Path, **overrides: Any) -> None:
        self.metrics = SelfMetrics()
        settings = load_settings(env.env["EXPORTER_CONFIG"], env=env.env, overrides=overrides)
        self._ctx = open_runner(settings, metrics=self.metrics)
        self.runner: Runner = self._ctx.__enter__()

    def run(self) -> tuple[int, Any]:
        """One cycle; returns (MLflow requests it made, result)."""
        before = _requests(self.metrics)
        result = self.runner.run_cycle()
        assert result.ok, result.errors
        return _requests(self.metrics) - before, result

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


@pytest.fixture
def cycles(exporter_env: ExporterEnv, tmp_path: Path) -> Iterator[Cycles]:
    c = Cycles(exporter_env, tmp_path)
    yield c
    c.close()


def test_an_idle_cycle_makes_a_handful_of_requests_whatever_the_number_of_runs(
    exporter_env: ExporterEnv, cycles: Cycles
) -> None:
    exp = exporter_env.experiment()
    for i in range(30):
        make_run(exporter_env.client, exp, {"loss": [1.0, 0.5], "acc": [0.1 * (i % 10)]})
    cycles.run()
    idle, result = cycles.run()
    # Runs and registry take about 8, the traces stage 2 (one probe each for traces and
    # assessments over every experiment): issue 18's budget is 12 in all.
    assert idle <= 12
    assert result.runs == 30
    assert result.points_spooled == 0


def test_a_delta_cycle_reads_only_the_runs_that_changed(
    exporter_env: ExporterEnv, cycles: Cycles, receiver: Receiver
) -> None:
    exp = exporter_env.experiment()
    running = make_run(exporter_env.client, exp, {"loss": [3.0]}, status="RUNNING")
    for _ in range(20):
        make_run(exporter_env.client, exp, {"loss": [1.0, 0.5]})
    cycles.run()
    idle, _ = cycles.run()

    log_points(exporter_env.client, running, "loss", [2.0, 1.0], first_step=1)
    new = make_run(exporter_env.client, exp, {"loss": [9.0]})
    delta, result = cycles.run()
    assert result.points_spooled == 3  # two new points of the running run, one of the new run
    assert delta <= idle + 2  # one bulk history read per metric key of the changed runs
    assert {
        (p["metadata"]["run_id"], p["metadata"]["step"]) for p in receiver.accepted_points()
    } >= {(running, 1), (running, 2), (new, 0)}


def test_ended_and_deleted_runs_are_seen_within_one_cycle(
    exporter_env: ExporterEnv, cycles: Cycles, prometheus: servers.Server
) -> None:
    exp = exporter_env.experiment()
    running = make_run(exporter_env.client, exp, {"loss": [3.0]}, status="RUNNING")
    doomed = make_run(exporter_env.client, exp, {"loss": [1.0]})
    cycles.run()

    exporter_env.client.set_terminated(running, status="FAILED")
    exporter_env.client.delete_run(doomed)
    cycles.run()

    job = exporter_env.job
    status = servers.wait_for_query(
        prometheus, f'mlflow_run_info{{job="{job}",run_id="{running[:12]}",status="FAILED"}}'
    )
    assert status
    deadline_ok = servers.wait_for_query(
        prometheus, f'mlflow_experiment_runs{{job="{job}",status="FAILED"}} == 1'
    )
    assert deadline_ok
    assert not servers.prom_query(prometheus, f'mlflow_loss{{job="{job}",run_id="{doomed[:12]}"}}')


def test_a_second_process_resumes_incrementally_from_the_state_directory(
    exporter_env: ExporterEnv,
) -> None:
    exp = exporter_env.experiment()
    for _ in range(15):
        make_run(exporter_env.client, exp, {"loss": [1.0, 0.5, 0.25]})
    assert exporter_env.run("export-once").returncode == 0
    again = exporter_env.run("export-once")
    assert again.returncode == 0
    assert "0 points sent" in again.stdout
    requests_made = int(again.stdout.split(" MLflow requests")[0].rsplit(" ", 1)[-1])
    assert requests_made <= 12  # runs and registry, plus the traces stage's two probes


def test_cardinality_bounds_cut_runs_and_metrics_and_count_what_they_cut(
    exporter_env: ExporterEnv, tmp_path: Path, pushgateway: servers.Server
) -> None:
    exp = exporter_env.experiment()
    make_run(exporter_env.client, exp, {"loss": [1.0], "debug_x": [2.0]}, status="RUNNING")
    for _ in range(5):
        make_run(exporter_env.client, exp, {"loss": [1.0], "debug_x": [2.0]})
    bounded = Cycles(
        exporter_env,
        tmp_path,
        **{"export.max_runs_per_experiment": 2, "export.exclude_metrics": ["debug_.*"]},
    )
    try:
        bounded.run()
        text = requests.get(f"{pushgateway.url}/metrics", timeout=5).text
    finally:
        bounded.close()
    mine = [line for line in text.splitlines() if f'job="{exporter_env.job}"' in line]
    assert sum(line.startswith("mlflow_loss{") for line in mine) == 3  # 2 newest + RUNNING one
    assert not any(line.startswith("mlflow_debug_x") for line in mine)
    assert any(
        'status="FINISHED"' in line and line.endswith(" 5")
        for line in mine
        if line.startswith("mlflow_experiment_runs{")
    )
    excluded = {
        s.labels["kind"]: s.value
        for m in bounded.metrics.registry.collect()
        if m.name == "mlflow_exporter_excluded"
        for s in m.samples
    }
    assert excluded["runs"] == 3
    assert excluded["metrics"] == 1


def test_three_shards_export_every_experiment_and_point_exactly_once(
    exporter_env: ExporterEnv, pushgateway: servers.Server, receiver: Receiver
) -> None:
    exps = [exporter_env.experiment(f"e{i}") for i in range(6)]
    runs = [make_run(exporter_env.client, e, {"loss": [1.0, 0.5]}) for e in exps]
    for index in range(3):
        done = exporter_env.run(
            "export-once",
            EXPORTER_SHARD_INDEX=str(index),
            EXPORTER_SHARD_COUNT="3",
            EXPORTER_STATE_DIR=str(exporter_env.state_dir / f"shard{index}"),
        )
        assert done.returncode == 0, done.stderr
    data = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=5).json()["data"]
    groups = Counter(
        g["labels"].get("experiment_id", "registry")
        for g in data
        if g["labels"]["job"] == exporter_env.job
    )
    assert groups == Counter({**dict.fromkeys(exps, 1), "registry": 1})
    assert len({shard_of(e, 3) for e in exps}) > 1  # the split really spread them
    received = Counter(
        (m["metadata"]["run_id"], m["name"], m["metadata"]["step"])
        for m in receiver.accepted_points()
    )
    assert set(received) == {p[:3] for p in mlflow_points(exporter_env.client, runs)}
    assert set(received.values()) == {1}


def test_only_changed_groups_are_pushed_again_and_everything_after_a_gateway_restart(
    exporter_env: ExporterEnv, tmp_path: Path
) -> None:
    (tmp_path / "pg").mkdir()
    pg = servers.start_pushgateway(tmp_path / "pg")
    env = {**exporter_env.env, "PROMETHEUS_GATEWAY": pg.url}
    quiet, busy = exporter_env.experiment("quiet"), exporter_env.experiment("busy")
    make_run(exporter_env.client, quiet, {"loss": [1.0]})
    running = make_run(exporter_env.client, busy, {"loss": [2.0]}, status="RUNNING")
    cycles = Cycles(ExporterEnv(**{**exporter_env.__dict__, "env": env}), tmp_path)
    try:
        _, first = cycles.run()
        _, idle = cycles.run()
        log_points(exporter_env.client, running, "loss", [1.5], first_step=1)
        _, changed = cycles.run()
        pg.restart("/-/ready")
        _, after_restart = cycles.run()
        groups = requests.get(f"{pg.url}/api/v1/metrics", timeout=5).json()["data"]
    finally:
        cycles.close()
        pg.stop()
    assert first.pushed_series > 0
    assert idle.pushed_series == 0  # nothing changed: nothing re-pushed
    busy_only = changed.pushed_series
    assert 0 < busy_only < first.pushed_series
    assert after_restart.pushed_series == first.pushed_series  # all groups again
    ids = {
        g["labels"].get("experiment_id") for g in groups if g["labels"]["job"] == exporter_env.job
    }
    assert {quiet, busy} <= ids


def test_runs_leave_the_pushgateway_as_they_leave_the_run_window_and_new_runs_appear(
    exporter_env: ExporterEnv, tmp_path: Path, pushgateway: servers.Server, receiver: Receiver
) -> None:
    client, exp = exporter_env.client, exporter_env.experiment()
    month_ago = int(time.time() * 1000) - 30 * 86_400_000
    old = client.create_run(exp, start_time=month_ago).info.run_id
    log_points(client, old, "loss", [1.0, 0.5], first_step=0)
    client.set_terminated(old, end_time=month_ago + 1000)
    recent = make_run(client, exp, {"loss": [2.0]})
    window = Cycles(
        exporter_env,
        tmp_path,
        **{"series.run_window": "20s", "series.min_runs_per_experiment": 0},
    )

    def exported() -> set[str]:
        text = requests.get(f"{pushgateway.url}/metrics", timeout=5).text
        mine = [x for x in text.splitlines() if f'job="{exporter_env.job}"' in x]
        return {r[:12] for r in (old, recent, new) if any(f'run_id="{r[:12]}"' in x for x in mine)}

    new = ""
    try:
        window.run()
        first = exported()
        new = make_run(client, exp, {"loss": [3.0]}, status="RUNNING")
        deadline = time.monotonic() + 90
        while recent[:12] in exported() and time.monotonic() < deadline:
            window.run()
            time.sleep(1)
        last = exported()
    finally:
        window.close()
    assert first == {recent[:12]}  # the month-old run has no per-run series
    assert last == {new[:12]}  # the recent one left 20 s after it ended; the new one is in
    received = {
        (p["metadata"]["run_id"], p["metadata"]["step"]) for p in receiver.accepted_points()
    }
    assert {(old, 0), (old, 1), (recent, 0), (new, 0)} <= received  # history gets every point


def test_an_experiments_newest_run_from_before_the_window_shows_its_values_without_logging_times(
    exporter_env: ExporterEnv, tmp_path: Path, pushgateway: servers.Server
) -> None:
    client = exporter_env.client
    quiet, busy = exporter_env.experiment("quiet"), exporter_env.experiment("busy")
    month_ago = int(time.time() * 1000) - 30 * 86_400_000
    old = client.create_run(quiet, start_time=month_ago).info.run_id
    log_points(client, old, "loss", [1.0, 0.5], first_step=0)
    client.set_terminated(old, end_time=month_ago + 1000)
    recent = make_run(client, busy, {"loss": [2.0]})
    cycles = Cycles(
        exporter_env,
        tmp_path,
        **{"series.run_window": "1d", "series.min_runs_per_experiment": 1},
    )
    try:
        cycles.run()
    finally:
        cycles.close()
    text = requests.get(f"{pushgateway.url}/metrics", timeout=5).text

    def families_of(run_id: str) -> set[str]:
        return {
            line.split("{", 1)[0]
            for line in text.splitlines()
            if f'run_id="{run_id[:12]}"' in line and f'job="{exporter_env.job}"' in line
        }

    per_key = {"mlflow_loss", "mlflow_metric_step", "mlflow_metric_timestamp_seconds"}
    assert families_of(recent) >= per_key | {"mlflow_run_info"}
    assert families_of(old) >= {"mlflow_loss", "mlflow_metric_step", "mlflow_run_end_time_seconds"}
    assert "mlflow_metric_timestamp_seconds" not in families_of(old)
