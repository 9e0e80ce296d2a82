"""A third-party sink installed next to the exporter, against the real MLflow server.

The example package under tests/plugins/example_sink declares the sink `example` through the
`mlflow_monitoring.sinks` entry point. It is installed with pip into a temp directory put on
the PYTHONPATH of real `exporter` processes, as an operator installs a plugin: nothing in
exporter/ names it. It must receive every point MLflow's client wrote, once, across two
`export-once` runs; have its self-metrics and health stage in `exporter continuous`; and a
broken install must stop the exporter with one line naming its entry point.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.poll import poll_until, stop_process
from tests.support.seed import log_points, make_run, mlflow_points

pytestmark = pytest.mark.integration

PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "example_sink"


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package installed with pip into a directory of its own."""
    source = tmp_path_factory.mktemp("plugin-src") / "example_sink"
    shutil.copytree(PLUGIN, source)  # pip's build leaves files next to the sources
    target = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target)]
        + [str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return target


def _received(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _points(rows: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    return Counter((r["point"][0], r["point"][1], r["point"][2], r["point"][4]) for r in rows)


def test_an_installed_sink_package_receives_every_point_once_over_two_runs(
    exporter_env: ExporterEnv, plugin_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "example.jsonl"
    env = {"PYTHONPATH": str(plugin_path), "EXAMPLE_SINK_FILE": str(out)}

    def export_once() -> subprocess.CompletedProcess[str]:
        return exporter_env.run("export-once", timeout=120, **env)

    exp = exporter_env.experiment()
    runs = [
        make_run(exporter_env.client, exp, {"loss": [0.9, 0.5, 0.3], "acc": [0.1, 0.6]})
        for _ in range(2)
    ]

    first = export_once()
    assert first.returncode == 0, first.stderr
    assert "sent to example" in first.stdout
    second = export_once()
    assert second.returncode == 0, second.stderr

    received = _points(_received(out))
    assert set(received) == mlflow_points(exporter_env.client, runs)
    assert set(received.values()) == {1}


def test_check_config_runs_an_installed_sinks_own_probe(
    exporter_env: ExporterEnv, plugin_path: Path, tmp_path: Path
) -> None:
    def check(out: Path) -> list[str]:
        done = exporter_env.run(
            "check-config", PYTHONPATH=str(plugin_path), EXAMPLE_SINK_FILE=str(out)
        )
        return [line for line in done.stdout.splitlines() if line.startswith(("ok", "FAIL"))]

    writable = tmp_path / "example.jsonl"
    nowhere = tmp_path / "missing-dir" / "example.jsonl"

    assert f"ok   example: example sink can write {writable}" in check(writable)
    assert f"FAIL example: example sink cannot write {nowhere}: check EXAMPLE_SINK_FILE" in check(
        nowhere
    )


def test_an_installed_sink_has_its_self_metrics_and_health_stage(
    exporter_env: ExporterEnv, plugin_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "example.jsonl"
    exp = exporter_env.experiment()
    run = make_run(exporter_env.client, exp, {"loss": [0.9, 0.5]}, status="RUNNING")
    port, log = servers.free_port(), tmp_path / "exporter.log"
    env = {
        **exporter_env.env,
        "PYTHONPATH": str(plugin_path),
        "EXAMPLE_SINK_FILE": str(out),
        "EXAMPLE_SINK_DOWN": "1",
        "EXPORTER_HOST": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "exporter", "continuous", "--port", str(port), "--interval", "1"]
    with open(log, "ab") as sink_log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=sink_log, stderr=subprocess.STDOUT, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        health = poll_until(
            "the example stage failing in /healthz",
            lambda: _failing_health(base),
            90,
            0.5,
            lambda: log.read_text(errors="replace")[-3000:],
        )
        assert "example: example sink at" in health
        log_points(exporter_env.client, run, "loss", [0.25], first_step=2)
        metrics = poll_until(
            "the example sink's queue and errors in /metrics",
            lambda: _metrics_with(base, "mlflow_exporter_example_spool_points 3.0"),
            90,
            0.5,
            lambda: log.read_text(errors="replace")[-3000:],
        )
        assert 'mlflow_exporter_errors_total{stage="example"}' in metrics
        assert "mlflow_exporter_example_points_sent_total 0.0" in metrics
        assert proc.poll() is None
    finally:
        stop_process(proc, 15)
    assert not out.exists()  # down: nothing delivered, everything still queued


def _failing_health(base: str) -> str | None:
    try:
        answer = requests.get(f"{base}/healthz", timeout=5)
    except requests.RequestException:
        return None
    return answer.text if answer.status_code == 503 and "example" in answer.text else None


def _metrics_with(base: str, needle: str) -> str | None:
    try:
        text = requests.get(f"{base}/metrics", timeout=5).text
    except requests.RequestException:
        return None
    return text if needle in text else None


def test_a_broken_sink_package_stops_the_exporter_with_one_line_naming_it(
    exporter_env: ExporterEnv, plugin_path: Path
) -> None:
    done = exporter_env.run("export-once", PYTHONPATH=str(plugin_path), EXAMPLE_SINK_BREAK="1")

    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: invalid configuration (1 problem)")
    assert "'example' (example_sink:SPEC) in mlflow_monitoring.sinks cannot be loaded" in lines[1]
    assert "EXAMPLE_SINK_BREAK" in lines[1]
    assert len(lines) == 2
