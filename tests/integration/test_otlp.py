"""The OTLP sink against a real OTLP/HTTP protobuf receiver, with MLflow's client writing.

The receiver is PyPI's `oteltap` (`python -m oteltap --port P`, a native OTLP/HTTP core),
which prints every `Metric` it receives as one NDJSON line. It does not take gzip bodies
(measured: oteltap 1.0.0 answers 400 "Failed to decode request body"), so bodies go
uncompressed here; gzip is checked in tests/sinks/test_otlp.py. Checked as for remote write:
every point arrives once, at its own timestamp, with its attributes; a receiver that was
down gets what waited, once, from a new exporter process; a run after that sends nothing.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.poll import poll_until, stop_process
from tests.support.seed import log_points, make_run

pytestmark = pytest.mark.integration

Point = tuple[str, str, int, float, str, str]  # run_id, key, time_unix_nano, value, exp id, name


@contextmanager
def oteltap(port: int, out: Path) -> Iterator[None]:
    """A real OTLP receiver on 127.0.0.1:`port` until the block ends (then SIGTERM)."""
    with open(out, "ab") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "oteltap", "--port", str(port)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        poll_until("oteltap listening", lambda: _listening(port), 30, 0.1, out.read_text)
        yield
    finally:
        stop_process(proc, 10)
    deadline = time.monotonic() + 30
    while _listening(port) and time.monotonic() < deadline:  # the port is free again
        time.sleep(0.1)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def received(out: Path) -> Counter[Point]:
    """Every data point the receiver printed, with its attributes."""
    points: Counter[Point] = Counter()
    for line in out.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        metric: dict[str, Any] = json.loads(line)
        for dp in metric.get("gauge", {}).get("dataPoints", []):
            attrs = {a["key"]: a["value"].get("stringValue", "") for a in dp["attributes"]}
            points[
                (
                    attrs["run_id"],
                    attrs["metric_key"],
                    int(dp["timeUnixNano"]),
                    float(dp["asDouble"]),
                    attrs["experiment_id"],
                    attrs["experiment_name"],
                )
            ] += 1
            assert metric["name"] == "mlflow_" + attrs["metric_key"].replace("/", "_")
    return points


def logged(env: ExporterEnv, exp: str, name: str, run_ids: list[str]) -> set[Point]:
    """What MLflow holds, as the receiver must show it."""
    out = set()
    for run_id in run_ids:
        for key in env.client.get_run(run_id).data.metrics:
            for m in env.client.get_metric_history(run_id, key):
                out.add((run_id[:12], key, m.timestamp * 1_000_000, m.value, exp, name))
    return out


def test_every_point_arrives_once_at_its_time_after_an_outage_and_restarts(
    exporter_env: ExporterEnv, tmp_path: Path
) -> None:
    port = servers.free_port()
    config = tmp_path / "otlp.yaml"
    config.write_text(
        f"export:\n  include_experiments: ['{exporter_env.prefix}.*']\n"
        "otlp:\n  delivery_budget_seconds: 2\n  batch_size: 7\n"
    )
    env = {
        "EXPORTER_CONFIG": str(config),
        "OTLP_ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=hc-secret-1",
    }

    def export_once() -> subprocess.CompletedProcess[str]:
        return exporter_env.run("export-once", timeout=120, **env)

    name = f"{exporter_env.prefix}exp"
    exp = exporter_env.experiment()
    runs = [
        make_run(exporter_env.client, exp, {"loss": [0.9, 0.5, 0.25], "val/acc": [0.1, 0.7]})
        for _ in range(2)
    ]
    first_out, second_out = tmp_path / "tap-1.ndjson", tmp_path / "tap-2.ndjson"

    with oteltap(port, first_out):
        done = export_once()
        assert done.returncode == 0, done.stderr
        want = logged(exporter_env, exp, name, runs)
        poll_until(
            "every point at the receiver",
            lambda: set(received(first_out)) >= want or None,
            30,
            0.2,
            lambda: first_out.read_text()[-2000:],
        )
        again = export_once()
        assert again.returncode == 0, again.stderr
    first = received(first_out)
    assert set(first) == want
    assert set(first.values()) == {1}

    # The receiver is down: the new points wait in the queue; the cycle says why.
    log_points(exporter_env.client, runs[0], "loss", [0.125, 0.0625], first_step=3)
    down = export_once()
    assert down.returncode == 1
    assert "otlp: cannot reach the OTLP endpoint" in down.stderr
    assert "hc-secret-1" not in down.stderr + down.stdout

    with oteltap(port, second_out):
        up = export_once()  # a new process: the queue was kept on disk
        assert up.returncode == 0, up.stderr
        late = logged(exporter_env, exp, name, runs) - want
        assert len(late) == 2
        poll_until(
            "the points that waited",
            lambda: set(received(second_out)) >= late or None,
            30,
            0.2,
            lambda: second_out.read_text()[-2000:],
        )
        export_once()
    second = received(second_out)
    assert set(second) == late
    assert set(second.values()) == {1}
