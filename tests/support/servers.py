"""Start the real servers the integration tests talk to, on free 127.0.0.1 ports.

MLflow (SQLite, one worker, job runner off: the lean settings from shared FACTS), the Debian
Pushgateway, Prometheus and Alertmanager binaries, each with its own temp data directory.
Every wait is bounded; every process is killed on stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll `url` until it answers 200, the process dies, or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    cmd: list[str]
    env: dict[str, str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)

    def restart(self, ready_path: str, timeout: float = 60) -> None:
        """Start the same command again on the same port (outage tests)."""
        self.stop()
        self.proc = _spawn(self.cmd, self.log, self.env)
        wait_http(self.url + ready_path, timeout, self.proc)


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # The child keeps its own copy of the descriptor; the parent's can close at once.
    with log.open("ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def start(
    name: str,
    cmd: list[str],
    port: int,
    workdir: Path,
    ready_path: str,
    timeout: float,
    env: dict[str, str] | None = None,
) -> Server:
    log = workdir / f"{name}.log"
    server = Server(name, _spawn(cmd, log, env), port, log, cmd, env)
    try:
        wait_http(server.url + ready_path, timeout, server.proc)
    except Exception:
        server.stop()
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"{name} did not start:\n{tail}") from None
    return server


def start_mlflow(workdir: Path, port: int | None = None, workers: int = 1) -> Server:
    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        str(VENV_BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--default-artifact-root",
        str(workdir / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    return start("mlflow", cmd, port, workdir, "/health", 90, env)


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not installed (apt-get install {name})")
    return path


def start_pushgateway(
    workdir: Path, port: int | None = None, persistence_file: Path | None = None
) -> Server:
    """A Pushgateway keeping groups in memory only unless `persistence_file` is given.

    Debian's build defaults `--persistence.file` to /var/lib/prometheus/pushgateway.data, which
    every instance would share (and reload groups from) across test sessions; never use it.
    """
    port = port or free_port()
    cmd = [
        binary("prometheus-pushgateway"),
        f"--web.listen-address=127.0.0.1:{port}",
        f"--persistence.file={persistence_file or ''}",
    ]
    return start("pushgateway", cmd, port, workdir, "/-/ready", 20)


def start_prometheus(workdir: Path, config: str, port: int | None = None) -> Server:
    """Prometheus with `config` (YAML text) written to workdir/prometheus.yml."""
    port = port or free_port()
    cfg = workdir / "prometheus.yml"
    cfg.write_text(config)
    (workdir / "tsdb").mkdir(exist_ok=True)
    cmd = [
        binary("prometheus"),
        f"--config.file={cfg}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
    ]
    return start("prometheus", cmd, port, workdir, "/-/ready", 30)


def start_alertmanager(workdir: Path, config_file: Path, port: int | None = None) -> Server:
    port = port or free_port()
    (workdir / "am-data").mkdir(exist_ok=True)
    cmd = [
        binary("prometheus-alertmanager"),
        f"--config.file={config_file}",
        f"--storage.path={workdir / 'am-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    return start("alertmanager", cmd, port, workdir, "/-/ready", 30)


def prom_query(prometheus: Server, expr: str) -> list[dict[str, object]]:
    """Instant query; returns the result vector (raises on a query error)."""
    r = requests.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise AssertionError(f"query {expr!r} failed: {body}")
    return body["data"]["result"]  # type: ignore[no-any-return]


def wait_for_query(
    prometheus: Server, expr: str, timeout: float = 30, min_results: int = 1
) -> list[dict[str, object]]:
    """Poll until `expr` returns at least `min_results` series (bounded)."""
    deadline = time.monotonic() + timeout
    result: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        result = prom_query(prometheus, expr)
        if len(result) >= min_results:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{expr!r} returned {len(result)} series after {timeout}s")
