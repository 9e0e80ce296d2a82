"""The Helm chart's StatefulSet, played with real processes on loopback (no cluster).

The chart is rendered by the real Helm engine with `shards: 3`; each pod's container is
started as it would run in the cluster: its args, and its environment as a kubelet would
give it (tests.support.chart.PodPlay: downward-API fields resolved to the pod's name,
namespace and ordinal; the ConfigMap and the Pramathus key Secret written out as the files
they mount; each PersistentVolumeClaim a directory named like the claim). Only what one
network namespace forces is changed: 127.0.0.1 and a port of its own per pod. MLflow,
Pushgateway and the Pramathus receiver are real servers on loopback, addressed from the
chart's values as a cluster's service names would be.

Then the release is upgraded to `shards: 4` on the same volumes, and new points are logged:
nothing is lost, and only the experiments jump consistent hash moved to the new shard are
sent again (by it, under the same idempotency keys).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from exporter.planners.scope import shard_of
from tests.integration.conftest import ExporterEnv
from tests.support import servers
from tests.support.chart import PodPlay, objects, pod_plays
from tests.support.receiver import Receiver, point_of
from tests.support.seed import make_run, mlflow_points

pytestmark = pytest.mark.integration

WAIT = 120.0  # bound on every wait below
CYCLES = 2  # successful cycles every pod must have run before the checks
PRAMATHUS_KEY = "pk-chart-play-Zq9"


def values(
    shards: int, exporter_env: ExporterEnv, mlflow: servers.Server, receiver: Receiver
) -> dict[str, Any]:
    """The values an operator would give, with loopback servers as the cluster services."""
    return {
        "shards": shards,
        "config": {
            "mlflow": {"tracking_uri": mlflow.url},
            "prometheus": {
                "mode": "push",
                "gateway": exporter_env.env["PROMETHEUS_GATEWAY"],
                "job_name": exporter_env.job,
            },
            "pramathus": {"enabled": True, "endpoint": receiver.url, "batch_size": 50},
            "export": {
                "interval_seconds": 1,
                "include_experiments": [f"{re.escape(exporter_env.prefix)}.*"],
            },
        },
        "secrets": {"pramathusApiKey": {"name": "pramathus", "key": "api-key"}},
    }


@dataclass
class Pod:
    play: PodPlay
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    def metric(self, name: str) -> float:
        text = requests.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def start_pods(plays: list[PodPlay], workdir: Path) -> list[Pod]:
    """One `exporter <args>` per pod, with that pod's environment."""
    # Nothing of the test runner's own exporter settings leaks in: only what the pod gets.
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "PRAMATHUS_", "PROMETHEUS_", "EXPORT", "REMOTE_WRITE_"))
        and k not in ("LOG_LEVEL", "LOG_FORMAT", "MAX_EXPERIMENTS")
    }
    pods = []
    for play in plays:
        [container] = play.statefulset["spec"]["template"]["spec"]["containers"]
        env = {**base, **play.env()}
        port = servers.free_port()
        env["EXPORTER_HOST"], env["EXPORTER_PORT"] = "127.0.0.1", str(port)
        log = workdir / f"{play.pod_name}-{len(list(workdir.glob('*.log')))}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "exporter", *container["args"]],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        pods.append(Pod(play, port, log, proc))
    return pods


def stop_pods(pods: list[Pod]) -> None:
    for pod in pods:
        if pod.proc.poll() is None:
            pod.proc.terminate()
    for pod in pods:
        try:
            pod.proc.wait(20)
        except subprocess.TimeoutExpired:
            pod.proc.kill()
            pod.proc.wait(5)


def wait_for_cycles(pods: list[Pod]) -> None:
    """Until every pod has run CYCLES more successful cycles than now (bounded)."""
    name = 'mlflow_exporter_cycles_total{result="success"}'
    deadline = time.monotonic() + WAIT
    pending = {p.play.pod_name for p in pods}
    while pending and time.monotonic() < deadline:
        for pod in pods:
            if pod.proc.poll() is not None:
                pytest.fail(f"{pod.play.pod_name} exited {pod.proc.returncode}:\n{pod.tail()}")
            with contextlib.suppress(requests.RequestException):
                if pod.metric(name) >= CYCLES:
                    pending.discard(pod.play.pod_name)
        time.sleep(0.5)
    if pending:
        logs = "\n".join(f"--- {p.play.pod_name}\n{p.tail()}" for p in pods)
        pytest.fail(f"no {CYCLES} successful cycles within {WAIT}s: {sorted(pending)}\n{logs}")


def wait_for_points(receiver: Receiver, want: set[tuple[Any, ...]]) -> None:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if want <= {point_of(m) for m in receiver.accepted_points()}:
            return
        time.sleep(0.5)


@dataclass
class Seeded:
    runs: dict[str, list[str]]  # experiment id -> run ids

    def points(self, exporter_env: ExporterEnv, experiments: set[str] | None = None) -> set[Any]:
        runs = [r for e, rs in self.runs.items() if experiments is None or e in experiments
                for r in rs]  # fmt: skip
        return mlflow_points(exporter_env.client, runs)


def seed(exporter_env: ExporterEnv) -> Seeded:
    """Experiments (one run of 2 metrics x 3 steps each) until each of 3 shards owns one and
    at least one moves when going to 4 shards; bounded."""
    runs: dict[str, list[str]] = {}
    owners: set[int] = set()
    moved = 0
    while (len(owners) < 3 or not moved or len(runs) < 6) and len(runs) < 60:
        exp = exporter_env.experiment(f"exp{len(runs)}")
        owners.add(shard_of(exp, 3))
        moved += shard_of(exp, 4) == 3
        runs[exp] = [
            make_run(exporter_env.client, exp, {"loss": [1.0, 0.5, 0.25], "acc": [0.1, 0.2, 0.3]})
        ]
    assert len(owners) == 3, owners
    assert moved, "no experiment moves to a fourth shard"
    return Seeded(runs)


def test_the_rendered_statefulset_exports_every_point_once_and_reshards_losing_nothing(
    exporter_env: ExporterEnv,
    mlflow_server: servers.Server,
    pushgateway: servers.Server,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    seeded = seed(exporter_env)
    secrets = {"pramathus": {"api-key": PRAMATHUS_KEY}}

    # ---- shards: 3
    rendered = objects(values(3, exporter_env, mlflow_server, receiver))
    plays = pod_plays(rendered, tmp_path, secrets=secrets)
    assert [p.pod_name for p in plays] == [f"mm-mlflow-monitoring-{n}" for n in range(3)]
    pods = start_pods(plays, tmp_path)
    try:
        wait_for_cycles(pods)
        want = seeded.points(exporter_env)
        wait_for_points(receiver, want)
        sent = {
            p.play.ordinal: p.metric("mlflow_exporter_pramathus_points_sent_total") for p in pods
        }
    finally:
        stop_pods(pods)

    delivered = Counter(point_of(m) for m in receiver.accepted_points())
    assert set(delivered) == want
    assert {p: n for p, n in delivered.items() if n > 1} == {}, "points delivered twice"
    assert all(
        r.headers.get("Authorization") == f"Bearer {PRAMATHUS_KEY}" for r in receiver.accepted()
    )
    # Each shard did its part: exactly the points of the experiments it owns.
    for ordinal in range(3):
        mine = {e for e in seeded.runs if shard_of(e, 3) == ordinal}
        assert sent[ordinal] == len(seeded.points(exporter_env, mine)), (ordinal, sent)
    assert held_groups(pushgateway, exporter_env) == Counter(
        {**dict.fromkeys(seeded.runs, 1), "registry": 1}
    )

    # ---- upgrade to shards: 4 on the same volumes, with new points while it happens
    before = len(receiver.accepted_points())
    for exp in list(seeded.runs)[:4]:
        seeded.runs[exp].append(make_run(exporter_env.client, exp, {"loss": [0.9, 0.8]}))
    rendered = objects(values(4, exporter_env, mlflow_server, receiver))
    plays = pod_plays(rendered, tmp_path, secrets=secrets)
    pods = start_pods(plays, tmp_path)
    try:
        wait_for_cycles(pods)
        want = seeded.points(exporter_env)
        wait_for_points(receiver, want)
    finally:
        stop_pods(pods)

    all_delivered = Counter(point_of(m) for m in receiver.accepted_points())
    assert set(all_delivered) == want, "points lost across the reshard"
    moved = {e for e in seeded.runs if shard_of(e, 3) != shard_of(e, 4)}
    assert moved, "nothing moved"
    assert all(shard_of(e, 4) == 3 for e in moved)  # only to the new shard
    moved_points = seeded.points(exporter_env, moved)
    again = {p for p, n in all_delivered.items() if n > 1}
    # Only a moved experiment is sent again (by its new shard, which has no marks for it);
    # the three shards that stay resend nothing.
    assert again <= moved_points, sorted(again - moved_points)[:5]
    after = Counter(point_of(m) for m in receiver.accepted_points()[before:])
    assert {p for p in after if after[p] > 1} == set(), "a point sent twice after the reshard"
    # Every experiment's Pushgateway group is still there, once: the old shards leave the
    # moved groups alone, the new shard pushed them.
    assert held_groups(pushgateway, exporter_env) == Counter(
        {**dict.fromkeys(seeded.runs, 1), "registry": 1}
    )


def held_groups(pushgateway: servers.Server, exporter_env: ExporterEnv) -> Counter[str]:
    groups = requests.get(f"{pushgateway.url}/api/v1/metrics", timeout=10).json()["data"]
    return Counter(
        g["labels"].get("experiment_id", g["labels"].get("group"))
        for g in groups
        if g["labels"].get("job") == exporter_env.job
    )


def scrape_jobs(monitor: dict[str, Any], targets: list[str]) -> list[dict[str, Any]]:
    """The Prometheus scrape jobs the Prometheus Operator makes of a ServiceMonitor's
    endpoints, with the Service's endpoints (one per pod) as static targets."""
    jobs = []
    for n, endpoint in enumerate(monitor["spec"]["endpoints"]):
        job: dict[str, Any] = {
            "job_name": f"serviceMonitor/{monitor['metadata']['name']}/{n}",
            "metrics_path": endpoint["path"],
            "scheme": endpoint["scheme"],
            "honor_labels": endpoint.get("honorLabels", False),
            # Intervals shortened so the test sees data within seconds.
            "scrape_interval": "1s",
            "scrape_timeout": "1s",
            "static_configs": [{"targets": targets}],
        }
        assert set(endpoint) <= {
            "port", "path", "scheme", "interval", "scrapeTimeout", "relabelings"
        }, f"cannot play {sorted(endpoint)}"  # fmt: skip
        relabel = [
            {"target_label": r["targetLabel"], "replacement": r["replacement"]}
            for r in endpoint.get("relabelings", [])
        ]
        if relabel:
            job["relabel_configs"] = relabel
        jobs.append(job)
    return jobs


def test_the_service_monitor_scrapes_every_shard_in_pull_mode(
    exporter_env: ExporterEnv,
    mlflow_server: servers.Server,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    seeded = seed(exporter_env)
    chart_values = values(3, exporter_env, mlflow_server, receiver)
    chart_values["config"]["prometheus"]["mode"] = "pull"
    chart_values["serviceMonitor"] = {"enabled": True}
    rendered = objects(chart_values)
    [monitor] = [o for o in rendered if o["kind"] == "ServiceMonitor"]
    plays = pod_plays(rendered, tmp_path, secrets={"pramathus": {"api-key": PRAMATHUS_KEY}})
    pods = start_pods(plays, tmp_path)
    prometheus = None
    try:
        wait_for_cycles(pods)
        targets = [f"127.0.0.1:{p.port}" for p in pods]
        jobs = scrape_jobs(monitor, targets)
        assert [j["metrics_path"] for j in jobs] == ["/metrics", "/mlflow/metrics"]
        workdir = tmp_path / "prometheus"
        workdir.mkdir()
        config = {"global": {"scrape_interval": "1s"}, "scrape_configs": jobs}
        prometheus = servers.start_prometheus(workdir, yaml.safe_dump(config))
        # Each shard's experiments, pulled from that shard, under the job the rules select.
        want = {
            f"127.0.0.1:{p.port}": sum(shard_of(e, 3) == p.play.ordinal for e in seeded.runs)
            for p in pods
        }
        query = f'count by (instance) (mlflow_experiment_info{{job="{exporter_env.job}"}})'
        got: dict[str, int] = {}
        up: dict[tuple[str, str], str] = {}
        deadline = time.monotonic() + WAIT
        # `up` carries each target's job label: the relabelled one where a relabeling sets it.
        job_label = {
            j["job_name"]: next(
                (
                    r["replacement"]
                    for r in j.get("relabel_configs", [])
                    if r["target_label"] == "job"
                ),
                j["job_name"],
            )
            for j in jobs
        }
        assert exporter_env.job in job_label.values()
        want_up = {(job_label[j["job_name"]], t) for j in jobs for t in targets}
        while time.monotonic() < deadline and (got != want or up != dict.fromkeys(want_up, "1")):
            time.sleep(0.5)
            got = {
                labels(r)["instance"]: int(value(r)) for r in servers.prom_query(prometheus, query)
            }
            up = {
                (labels(r)["job"], labels(r)["instance"]): value(r)
                for r in servers.prom_query(prometheus, "up")
            }
    finally:
        if prometheus is not None:
            prometheus.stop()
        stop_pods(pods)
    assert got == want
    assert up == dict.fromkeys(want_up, "1")  # every shard, both endpoints


def labels(result: dict[str, Any]) -> dict[str, str]:
    return result["metric"]  # type: ignore[no-any-return]


def value(result: dict[str, Any]) -> str:
    return str(result["value"][1])
