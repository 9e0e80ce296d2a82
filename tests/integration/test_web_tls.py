"""TLS and basic auth on the exporter's own endpoints, against real clients.

`exporter continuous` runs with an exporter-toolkit web config file naming certificates this
test makes with the real `openssl` (a throwaway CA); `requests` checks the chain with the
CA file, and a real Prometheus scrapes `/metrics` with `scheme: https`, `tls_config` and
`basic_auth`, as the chart's ServiceMonitor makes the Prometheus Operator do.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import requests
import yaml

from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.certs import Certs, bcrypt_hash, make_certs

pytestmark = pytest.mark.integration

PASSWORD = "scrape-pw-7Qx"
WAIT = 60.0


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return make_certs(tmp_path / "certs")


def start_exporter(
    exporter_env: ExporterEnv, tmp_path: Path, web_config: Mapping[str, object]
) -> tuple[subprocess.Popen[bytes], int, Path]:
    path = tmp_path / "web-config.yml"
    path.write_text(yaml.safe_dump(dict(web_config)))
    port = servers.free_port()
    log = tmp_path / "exporter.log"
    env = {
        **exporter_env.env,
        "EXPORTER_WEB_CONFIG_FILE": str(path),
        "EXPORTER_PORT": str(port),
        "EXPORT_INTERVAL": "5",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exporter", "continuous"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def wait_alive(url: str, proc: subprocess.Popen[bytes], log: Path, **kwargs: object) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"exporter exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{url}/livez", timeout=5, **kwargs).status_code == 200:  # type: ignore[arg-type]
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    pytest.fail(f"{url}/livez not up within {WAIT}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def tls_exporter(
    exporter_env: ExporterEnv, tmp_path: Path, certs: Certs
) -> Iterator[tuple[str, Certs]]:
    config = {
        "tls_server_config": {
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
        },
        "basic_auth_users": {"prometheus": bcrypt_hash(PASSWORD, rounds=10)},
    }
    proc, port, log = start_exporter(exporter_env, tmp_path, config)
    url = f"https://127.0.0.1:{port}"
    try:
        wait_alive(url, proc, log, verify=str(certs.ca))
        yield url, certs
    finally:
        stop(proc)


def test_requests_with_the_ca_file_reach_the_probes_openly_and_metrics_with_credentials(
    tls_exporter: tuple[str, Certs],
) -> None:
    url, certs = tls_exporter
    ca = str(certs.ca)
    for probe in ("/livez", "/healthz", "/readyz"):
        assert requests.get(url + probe, verify=ca, timeout=10).status_code in (200, 503)
    for path in ("/metrics", "/mlflow/metrics"):
        denied = requests.get(url + path, verify=ca, timeout=10)
        assert denied.status_code == 401
        assert denied.headers["WWW-Authenticate"].startswith("Basic")
        wrong = requests.get(url + path, verify=ca, timeout=10, auth=("prometheus", "nope"))
        assert wrong.status_code == 401
        ok = requests.get(url + path, verify=ca, timeout=10, auth=("prometheus", PASSWORD))
        assert ok.status_code == 200
    metrics = requests.get(url + "/metrics", verify=ca, timeout=10, auth=("prometheus", PASSWORD))
    assert "mlflow_exporter_cycles_total" in metrics.text


def test_a_client_trusting_another_ca_or_speaking_plain_http_is_refused(
    tls_exporter: tuple[str, Certs],
) -> None:
    url, certs = tls_exporter
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(url + "/livez", verify=str(certs.other_ca), timeout=10)
    with pytest.raises(requests.RequestException):
        requests.get(url.replace("https://", "http://") + "/livez", timeout=10)
    # The server survives both and still answers a good client.
    assert requests.get(url + "/livez", verify=str(certs.ca), timeout=10).status_code == 200


def test_a_silent_client_does_not_hold_up_the_others(tls_exporter: tuple[str, Certs]) -> None:
    """The TLS handshake happens in the connection's own thread: a client that connects and
    says nothing (a stalled handshake) does not block the accept loop."""
    url, certs = tls_exporter
    host, port = url.removeprefix("https://").split(":")
    with socket.create_connection((host, int(port)), timeout=10):
        started = time.monotonic()
        answer = requests.get(url + "/livez", verify=str(certs.ca), timeout=10)
        assert answer.status_code == 200
        assert time.monotonic() - started < 5


def test_curl_with_the_ca_file_and_basic_auth(tls_exporter: tuple[str, Certs]) -> None:
    url, certs = tls_exporter
    done = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", str(certs.ca), "-u", f"prometheus:{PASSWORD}"]
        + [f"{url}/metrics"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mlflow_exporter_cycles_total" in done.stdout


def test_a_required_client_certificate_is_checked(
    exporter_env: ExporterEnv, tmp_path: Path, certs: Certs
) -> None:
    config = {
        "tls_server_config": {
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
            "client_ca_file": str(certs.ca),
            "client_auth_type": "RequireAndVerifyClientCert",
        }
    }
    proc, port, log = start_exporter(exporter_env, tmp_path, config)
    url = f"https://127.0.0.1:{port}"
    client = (str(certs.client_cert), str(certs.client_key))
    try:
        wait_alive(url, proc, log, verify=str(certs.ca), cert=client)
        with pytest.raises(requests.RequestException):
            requests.get(url + "/metrics", verify=str(certs.ca), timeout=10)
        ok = requests.get(url + "/metrics", verify=str(certs.ca), cert=client, timeout=10)
        assert ok.status_code == 200
    finally:
        stop(proc)


def test_prometheus_scrapes_with_basic_auth_and_tls_config(
    tls_exporter: tuple[str, Certs], tmp_path: Path
) -> None:
    url, certs = tls_exporter
    target = url.removeprefix("https://")

    def job(name: str, password: str) -> dict[str, object]:
        return {
            "job_name": name,
            "scheme": "https",
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "tls_config": {"ca_file": str(certs.ca)},
            "basic_auth": {"username": "prometheus", "password": password},
            "static_configs": [{"targets": [target]}],
        }

    config = {
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [job("exporter", PASSWORD), job("wrong-password", "nope")],
    }
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    prometheus = servers.start_prometheus(workdir, yaml.safe_dump(config))
    want = {"exporter": "1", "wrong-password": "0"}
    up: dict[str, object] = {}
    try:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and up != want:
            time.sleep(0.5)
            up = {r["metric"]["job"]: r["value"][1] for r in servers.prom_query(prometheus, "up")}  # type: ignore[index]
        cycles = servers.prom_query(prometheus, 'mlflow_exporter_cycles_total{job="exporter"}')
    finally:
        prometheus.stop()
    assert up == want
    assert cycles, "Prometheus scraped no exporter self-metric over TLS"


def test_a_bad_web_config_stops_the_real_process_with_exit_2(tmp_path: Path, certs: Certs) -> None:
    path = tmp_path / "web-config.yml"
    path.write_text(
        f"tls_server_config:\n  cert_file: {certs.server_cert}\n  key_file: {tmp_path}/gone.key\n"
        "basic_auth_users:\n  prometheus: clear-text-pw\n"
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "EXPORTER_WEB_CONFIG_FILE": str(path),
        "EXPORTER_STATE_DIR": str(tmp_path / "state"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "continuous"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "basic_auth_users.prometheus: not a bcrypt hash" in done.stderr
    assert f"tls_server_config.key_file: no such file {tmp_path}/gone.key" in done.stderr
    assert "clear-text-pw" not in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists()  # stopped before anything started


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    """The Dockerfile's HEALTHCHECK command, as the container runs it, once."""
    env = {**os.environ, "EXPORTER_PORT": str(port)}
    return subprocess.run(
        [sys.executable, "-m", "exporter.healthcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def assert_becomes_healthy(port: int) -> None:
    """/healthz turns 200 once a cycle succeeded: run the check until it passes, to a bound."""
    deadline = time.monotonic() + WAIT
    while True:
        result = run_healthcheck(port)
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, result.stderr
        time.sleep(1)


def test_the_container_health_check_passes_under_tls_and_fails_once_the_exporter_is_gone(
    exporter_env: ExporterEnv, tmp_path: Path, certs: Certs
) -> None:
    config = {
        "tls_server_config": {
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
        }
    }
    proc, port, log = start_exporter(exporter_env, tmp_path, config)
    try:
        wait_alive(f"https://127.0.0.1:{port}", proc, log, verify=str(certs.ca))
        assert_becomes_healthy(port)
    finally:
        stop(proc)
    gone = run_healthcheck(port)
    assert gone.returncode == 1
    assert gone.stderr.startswith("unhealthy: http://127.0.0.1:")
    assert "Traceback" not in gone.stderr


def test_the_container_health_check_passes_over_plain_http(
    exporter_env: ExporterEnv, tmp_path: Path
) -> None:
    proc, port, log = start_exporter(exporter_env, tmp_path, {})
    try:
        wait_alive(f"http://127.0.0.1:{port}", proc, log)
        assert_becomes_healthy(port)
    finally:
        stop(proc)
