"""Pull mode against real processes: MLflow, `exporter continuous` and Prometheus running this
repo's prometheus.yml (rendered for loopback by scripts/render_prometheus.py).

With `PROMETHEUS_MODE=pull` Prometheus must hold the MLflow series scraped from the exporter's
`/mlflow/metrics` (job "mlflow_metrics", the exporter's instance), follow new points and
deletions from scrape to scrape, and need no Pushgateway: the exporter is pointed at a port
where nothing listens, and never tries it. In push mode the same endpoint answers 200 with
an empty exposition, so the scrape job can stay configured. Every wait is bounded.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from scripts.render_prometheus import render
from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.poll import poll_until, stop_process
from tests.support.seed import log_points, make_run

pytestmark = pytest.mark.integration

JOB = "mlflow_metrics"  # the pull scrape job in prometheus/prometheus.yml
T = TypeVar("T")


@contextmanager
def exporter(exporter_env: ExporterEnv, work: Path, mode: str) -> Iterator[tuple[int, Path]]:
    """`exporter continuous` in `mode`, a cycle a second, until it has succeeded once;
    stopped with SIGTERM (then SIGKILL) on the way out. Yields (port, log)."""
    port, log = servers.free_port(), work / f"exporter-{mode}.log"
    env = {**exporter_env.env, "PROMETHEUS_MODE": mode, "EXPORTER_HOST": "127.0.0.1"}
    cmd = [sys.executable, "-m", "exporter", "continuous", "--port", str(port), "--interval", "1"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        try:
            # /readyz answers 200 once a cycle has succeeded.
            servers.wait_http(f"http://127.0.0.1:{port}/readyz", 90, proc)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"exporter not ready: {exc}\n{_tail(log)}") from None
        yield port, log
        assert proc.poll() is None, f"exporter died:\n{_tail(log)}"
    finally:
        stop_process(proc, 15)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"


def _poll(
    what: str, probe: Callable[[], T | None], timeout: float, explain: Callable[[], str]
) -> T:
    """Call `probe` until it returns something truthy, at most `timeout` seconds."""
    return poll_until(what, probe, timeout, 0.5, explain)


def _diagnose(prometheus: servers.Server, port: int, log: Path) -> str:
    """What the pull target looks like from both ends, for a failure message."""
    try:
        body = requests.get(f"http://127.0.0.1:{port}/mlflow/metrics", timeout=10).text
    except requests.RequestException as exc:
        body = f"(cannot GET: {exc})"
    try:
        active = requests.get(f"{prometheus.url}/api/v1/targets", timeout=10).json()
        targets = [
            f"{t['labels']['job']} {t['scrapeUrl']} {t['health']} {t.get('lastError')!r}"
            for t in active["data"]["activeTargets"]
        ]
    except (requests.RequestException, ValueError, KeyError) as exc:
        targets = [f"(cannot list targets: {exc})"]
    return (
        f"/mlflow/metrics ({len(body)} bytes):\n{body[:1500]}\n"
        "targets:\n" + "\n".join(targets) + f"\nexporter log:\n{_tail(log)}"
    )


def _values(prometheus: servers.Server, expr: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each series an instant query returns."""
    out = []
    for result in servers.prom_query(prometheus, expr):
        series: dict[str, Any] = dict(result)
        out.append((dict(series["metric"]), float(series["value"][1])))
    return out


def _exposition(port: int, path: str) -> tuple[requests.Response, list[Any]]:
    response = requests.get(f"http://127.0.0.1:{port}{path}", timeout=10)
    return response, list(text_string_to_metric_families(response.text))


def test_prometheus_scrapes_mlflow_series_from_the_exporter_in_pull_mode(
    exporter_env: ExporterEnv, mlflow_client: MlflowClient, tmp_path: Path
) -> None:
    experiment_name = f"{exporter_env.prefix}pull"
    exp_id = exporter_env.experiment("pull")
    # A running run (read every cycle) whose loss went 0.9 -> 0.5 -> 0.3 so far, and a
    # finished one that will be deleted.
    live = make_run(
        mlflow_client, exp_id, {"loss": [0.9, 0.5, 0.3], "accuracy": [0.6, 0.7]}, "RUNNING"
    )
    doomed = make_run(mlflow_client, exp_id, {"loss": [0.8]}, name="doomed")
    model = f"{exporter_env.prefix}model"
    mlflow_client.create_registered_model(model)
    version = mlflow_client.create_model_version(model, source=f"runs:/{live}/model", run_id=live)
    mlflow_client.set_registered_model_alias(model, "champion", version.version)

    # No Pushgateway: the gateway setting names a port where nothing listens.
    no_gateway = servers.free_port()
    exporter_env.env["PROMETHEUS_GATEWAY"] = f"127.0.0.1:{no_gateway}"
    with exporter(exporter_env, tmp_path, "pull") as (port, log):
        ports = {
            "pushgateway": no_gateway,
            "exporter": port,
            "alertmanager": servers.free_port(),  # nothing there either; alerts just queue
            "prometheus": servers.free_port(),
        }
        prom_dir = tmp_path / "prometheus"
        config = render(prom_dir, ports, interval="1s")
        prometheus = servers.start_prometheus(prom_dir, config.read_text(), ports["prometheus"])
        try:

            def explain() -> str:
                return _diagnose(prometheus, port, log)

            loss = f'mlflow_loss{{job="{JOB}", experiment_name="{experiment_name}"}}'

            # The run's latest loss, scraped from /mlflow/metrics with the target's labels.
            def live_loss() -> list[tuple[dict[str, str], float]]:
                return [
                    (m, v) for m, v in _values(prometheus, loss) if live.startswith(m["run_id"])
                ]

            ((labels, value),) = _poll("latest loss of the running run", live_loss, 60, explain)
            assert value == 0.3
            assert labels["instance"] == f"127.0.0.1:{port}"
            assert labels["experiment_id"] == exp_id
            assert labels["metric_key"] == "loss"
            assert labels["model_stage"] == "none"  # the version has no stage, only an alias
            assert "exported_job" not in labels  # no clash with the target's job label
            assert "group" not in labels  # no Pushgateway grouping key

            runs = _values(
                prometheus,
                f'mlflow_experiment_runs{{job="{JOB}", experiment_name="{experiment_name}"}}',
            )
            counts = {m["status"]: v for m, v in runs}
            assert counts == {"RUNNING": 1, "SCHEDULED": 0, "FINISHED": 1, "FAILED": 0, "KILLED": 0}
            assert _values(
                prometheus,
                f'mlflow_model_alias_info{{job="{JOB}", model_name="{model}", alias="champion"}}',
            ), "registry series missing"
            stages = _values(
                prometheus, f'mlflow_registered_model_versions{{job="{JOB}", model_name="{model}"}}'
            )
            assert {m["stage"]: v for m, v in stages} == {
                "None": 1,
                "Staging": 0,
                "Production": 0,
                "Archived": 0,
            }

            # Built fresh on every scrape: a new point shows up, a deleted run disappears.
            log_points(mlflow_client, live, "loss", [0.1], first_step=3)
            mlflow_client.delete_run(doomed)
            _poll(
                "the new latest loss",
                lambda: [v for _, v in live_loss() if v == 0.1],
                60,
                explain,
            )
            run_info = f'mlflow_run_info{{job="{JOB}", experiment_name="{experiment_name}"}}'

            def doomed_gone() -> bool:
                run_ids = [m["run_id"] for m, _ in _values(prometheus, run_info)]
                return bool(run_ids) and not any(doomed.startswith(r) for r in run_ids)

            _poll("the deleted run's series gone", doomed_gone, 60, explain)

            # Nothing needed a Pushgateway: none was tried, cycles succeed, the pull target is
            # up and the pushgateway target (nothing listening) is down.
            own = f'job="mlflow-exporter", instance="127.0.0.1:{port}"'
            _poll(
                "self-metrics scraped",
                lambda: _values(prometheus, f"mlflow_exporter_up{{{own}}}"),
                30,
                explain,
            )
            ((_, errors),) = _values(
                prometheus, f'mlflow_exporter_errors_total{{{own}, stage="pushgateway"}}'
            )
            assert errors == 0
            ((_, pushed),) = _values(
                prometheus, f"mlflow_exporter_last_push_success_timestamp_seconds{{{own}}}"
            )
            assert pushed == 0
            # Each cycle reads the new points of every run it finds changed (the premise of
            # MlflowExporterPendingRunsStuck): none left pending between cycles.
            ((_, pending),) = _values(prometheus, f"mlflow_exporter_pending_runs{{{own}}}")
            assert pending == 0
            ((_, ok),) = _values(
                prometheus, f'mlflow_exporter_cycles_total{{{own}, result="success"}}'
            )
            assert ok >= 1
            up = {m["job"]: v for m, v in _values(prometheus, "up")}
            assert up == {JOB: 1, "mlflow-exporter": 1, "pushgateway": 0, "prometheus": 1}
            assert requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
            # The alert on failing pull scrapes is loaded and quiet.
            alerts = servers.prom_query(prometheus, 'ALERTS{alertname="MlflowPullScrapeFailing"}')
            assert alerts == []
        finally:
            prometheus.stop()


def test_the_pull_endpoint_answers_an_empty_exposition_in_push_mode(
    exporter_env: ExporterEnv, mlflow_client: MlflowClient, tmp_path: Path
) -> None:
    exp_id = exporter_env.experiment("push")
    make_run(mlflow_client, exp_id, {"loss": [0.4, 0.2]})
    with exporter(exporter_env, tmp_path, "push") as (port, log):

        def own() -> dict[str, float]:
            _, families = _exposition(port, "/metrics")
            return {s.name: s.value for f in families for s in f.samples if not s.labels}

        # A cycle has succeeded: there is data, pushed to the Pushgateway ...
        first = own()
        assert first["mlflow_exporter_last_push_success_timestamp_seconds"] > 0, _tail(log)
        # ... and idle cycles that push nothing still say the Pushgateway is up to date
        # (what MlflowExporterPushesFailing relies on instead of push_time_seconds).
        _poll(
            "an idle cycle after the first",
            lambda: [
                m
                for m in [own()]
                if m["mlflow_exporter_last_push_success_timestamp_seconds"]
                > first["mlflow_exporter_last_push_success_timestamp_seconds"]
                and m["mlflow_exporter_pushed_groups"] == 0
            ],
            30,
            lambda: _tail(log),
        )
        # ... and none of it on the pull endpoint, which still answers 200 (target stays up).
        response, families = _exposition(port, "/mlflow/metrics")
        assert response.status_code == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        assert response.text == ""
        assert families == []
