"""Session-wide real servers and a per-test exporter environment.

One MLflow, one Pushgateway and one Prometheus (scraping the Pushgateway every second with
`honor_labels: true`) serve the whole session. Tests stay independent by giving each its own
experiment-name prefix (the exporter only includes those), Pushgateway job name and state dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.support import history_servers, servers
from tests.support.receiver import Receiver

pytestmark = pytest.mark.integration

PROMETHEUS_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: pushgateway
    honor_labels: true
    static_configs:
      - targets: ["127.0.0.1:{pg_port}"]
"""


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    server = servers.start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pushgateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    server = servers.start_pushgateway(tmp_path_factory.mktemp("pushgateway"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prometheus(
    tmp_path_factory: pytest.TempPathFactory, pushgateway: servers.Server
) -> Iterator[servers.Server]:
    config = PROMETHEUS_CONFIG.format(pg_port=pushgateway.port)
    server = servers.start_prometheus(tmp_path_factory.mktemp("prometheus"), config)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_client(mlflow_server: servers.Server) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server.url)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@dataclass
class ExporterEnv:
    """Environment for one test's exporter runs, isolated by prefix, job and state dir."""

    prefix: str
    job: str
    env: dict[str, str]
    state_dir: Path
    client: MlflowClient
    experiment_ids: list[str] = field(default_factory=list)

    def experiment(self, suffix: str = "exp") -> str:
        exp_id = self.client.create_experiment(f"{self.prefix}{suffix}")
        self.experiment_ids.append(exp_id)
        return str(exp_id)

    def run(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
        """Run `python -m exporter ARGS` with this environment; bounded in time."""
        return subprocess.run(
            [sys.executable, "-m", "exporter", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture
def exporter_env(
    tmp_path: Path,
    mlflow_server: servers.Server,
    pushgateway: servers.Server,
    mlflow_client: MlflowClient,
    receiver: Receiver,
) -> ExporterEnv:
    tag = uuid.uuid4().hex[:8]
    prefix = f"t{tag}-"
    config = tmp_path / "config.yaml"
    config.write_text(f"export:\n  include_experiments: ['{prefix}.*']\n  max_experiments: 0\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PRAMATHUS_"))},
        "EXPORTER_CONFIG": str(config),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "PROMETHEUS_GATEWAY": f"127.0.0.1:{pushgateway.port}",
        "PROMETHEUS_JOB_NAME": f"job_{tag}",
        "PRAMATHUS_ENABLED": "true",
        "PRAMATHUS_ENDPOINT": receiver.url,
        "PRAMATHUS_API_KEY": f"key-{tag}-secret",
        "PRAMATHUS_BATCH_SIZE": "7",
        "EXPORTER_STATE_DIR": str(tmp_path / "state"),
        "LOG_FORMAT": "json",
    }
    return ExporterEnv(prefix, f"job_{tag}", env, tmp_path / "state", mlflow_client)


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """One VictoriaMetrics per test module: tests keep apart by experiment or series."""
    server = history_servers.start_victoria_metrics(tmp_path_factory.mktemp("victoria-metrics"))
    yield server
    server.stop()


@pytest.fixture
def prometheus_receiver(tmp_path: Path) -> Iterator[Callable[[str | None], servers.Server]]:
    """Starts Prometheus remote-write receivers with the given out-of-order window (None:
    none); stops them after the test."""
    started: list[servers.Server] = []

    def start(window: str | None) -> servers.Server:
        workdir = tmp_path / f"prometheus-receiver-{len(started)}"
        started.append(history_servers.start_prometheus_receiver(workdir, window))
        return started[-1]

    yield start
    for server in started:
        server.stop()
