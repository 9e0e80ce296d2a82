"""Benchmark at 10,000 and 100,000 runs: boot, idle, series and latency, side by side.

For each N it builds an MLflow SQLite store of N finished runs that ended 30 days ago (10
keys x 5 steps each, `N // 2000` experiments, at least 1) in seconds: `bench.seed` writes
1,000 runs, then SQL copies their rows (runs, tags, metrics, latest_metrics) under new
uuid4 run ids, each copy a little older. Then, all on 127.0.0.1 with real servers:

- **direct store read**: every run and every point through MLflow's own store layer
  (`SqlAlchemyStore.search_runs` and `get_metric_history_bulk`, read-only, in this process,
  no HTTP): what a source reading a replica of MLflow's database would cost;
- **one-read scan**: one `runs/search` of every run (50,000 per page) against MLflow with
  one worker;
- **boot**: `exporter export-once` on an empty state directory, with
  `EXPORTER_MLFLOW_CONCURRENCY` 1 and 4, against `mlflow server --workers 1` and `--workers 4`
  (`--boots`): wall time, MLflow requests, MLflow CPU, exporter peak RSS, points the
  Pramathus stand-in received (each boot has its own) against what MLflow holds, and the
  `capture.progress` lines it logged, and the most requests in flight at once (a counting
  proxy, `bench/proxy.py`, sits between the exporter and MLflow);
- **idle**: `exporter continuous --interval 5` on the state of the default boot against the
  one-worker MLflow: MLflow CPU per idle minute, requests per minute, exporter CPU;
- **series**: the exporter's series on the Pushgateway and the size of its `/metrics` page;
- **new-point latency**: a run created through the REST API logs one point; seconds until
  its series is on the Pushgateway, twelve times, each after a random pause of up to one
  interval, so the points land at every phase of the cycle (probing right after the previous
  probe was seen would always log just after a push and measure one whole interval).

Usage: `.venv/bin/python -m bench.bench_scale [N ...] [--boots w4c1,w4c4,w1c1,w1c4]`
(default 10000). Results go to bench/results/scale-<N>.json; one Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from bench.bench_incremental import ROOT, cheapest_reads, group_cpu
from bench.proxy import CountingProxy
from bench.receiver import LeanReceiver
from bench.seed import METRICS, seed
from tests.support import servers

RESULTS = ROOT / "bench" / "results"
BASE_RUNS = 1000
STEPS = 5
DAY_MS = 86_400_000
INTERVAL = 5.0
LATENCY_TRIES = 12


# ---------------------------------------------------------------------------- the store


def build_store(workdir: Path, n: int, experiments: int) -> dict[str, Any]:
    """N finished runs, ended 30 days ago or more: 1,000 seeded, the rest copied by SQL."""
    started = time.perf_counter()
    db = workdir / "mlflow.db"
    seed(db, workdir / "artifacts", min(n, BASE_RUNS), experiments, steps=STEPS, running=0)
    conn = sqlite3.connect(db)
    with conn:
        base = [r for (r,) in conn.execute("SELECT run_uuid FROM runs")]
        shift = 30 * DAY_MS
        conn.execute(
            "UPDATE runs SET start_time = start_time - ?, end_time = end_time - ?", (shift, shift)
        )
        conn.execute("CREATE TEMP TABLE copy_of (old TEXT, new TEXT, age INTEGER)")
        for copy in range(1, -(-n // len(base))):
            take = base[: min(len(base), n - copy * len(base))]
            age = copy * len(base) * 1000  # each copy a little older than the last
            conn.execute("DELETE FROM copy_of")
            conn.executemany(
                "INSERT INTO copy_of VALUES (?, ?, ?)", [(r, uuid.uuid4().hex, age) for r in take]
            )
            conn.execute(
                "INSERT INTO runs (run_uuid, name, source_type, source_name, entry_point_name, "
                "user_id, status, start_time, end_time, source_version, lifecycle_stage, "
                "artifact_uri, experiment_id) SELECT c.new, r.name, r.source_type, "
                "r.source_name, r.entry_point_name, r.user_id, r.status, r.start_time - c.age, "
                "r.end_time - c.age, r.source_version, r.lifecycle_stage, r.artifact_uri, "
                "r.experiment_id FROM runs r JOIN copy_of c ON r.run_uuid = c.old"
            )
            conn.execute(
                "INSERT INTO tags (key, value, run_uuid) SELECT t.key, t.value, c.new "
                "FROM tags t JOIN copy_of c ON t.run_uuid = c.old"
            )
            conn.execute(
                "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) "
                "SELECT m.key, m.value, m.timestamp - c.age, c.new, m.step, m.is_nan "
                "FROM metrics m JOIN copy_of c ON m.run_uuid = c.old"
            )
            conn.execute(
                "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                "SELECT m.key, m.value, m.timestamp - c.age, m.step, m.is_nan, c.new "
                "FROM latest_metrics m JOIN copy_of c ON m.run_uuid = c.old"
            )
    runs, points = conn.execute(
        "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM metrics)"
    ).fetchone()
    conn.close()
    return {"seconds": time.perf_counter() - started, "runs": runs, "points": points}


def direct_read(db: Path, experiment_ids: list[str]) -> dict[str, Any]:
    """Every run and every point through MLflow's store layer, read-only, no HTTP."""
    from mlflow.entities import ViewType
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    # Read-only: SQLite opens the file with mode=ro, so nothing can be written to it.
    uri = f"sqlite:///file:{db}?mode=ro&uri=true"
    store = SqlAlchemyStore(uri, str(db.parent / "artifacts"))  # type: ignore[no-untyped-call]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    runs, token = [], None
    while True:
        page = store.search_runs(  # type: ignore[no-untyped-call]
            experiment_ids, "", ViewType.ACTIVE_ONLY, max_results=50_000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    scan = {"seconds": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    ids = [r.info.run_id for r in runs]
    points = 0
    for key in METRICS:
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            points += len(store.get_metric_history_bulk(chunk, key, 25_000))  # type: ignore[no-untyped-call]
    return {
        "runs": len(runs),
        "points": points,
        "scan": scan,
        "seconds": time.perf_counter() - wall0,
        "cpu_s": time.process_time() - cpu0,
    }


# ---------------------------------------------------------------------------- the exporter


def exporter_env(mlflow: servers.Server, gateway: servers.Server, job: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXPORT", "MLFLOW_"))}
    # A boot queues every point; the default delivery budget (30 s a cycle) would end an
    # `export-once` with most of them still queued (exit 1), so it gets an hour here.
    config = Path(tempfile.gettempdir()) / "bench-scale-exporter.yaml"
    config.write_text("pramathus:\n  delivery_budget_seconds: 3600\n")
    return {
        **env,
        "EXPORTER_CONFIG": str(config),
        "MLFLOW_TRACKING_URI": mlflow.url,
        "PROMETHEUS_GATEWAY": gateway.url,
        "PROMETHEUS_JOB_NAME": job,
        "PRAMATHUS_ENABLED": "true",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }


def boot(
    workdir: Path, mlflow: servers.Server, gateway: servers.Server, concurrency: int, label: str
) -> dict[str, Any]:
    """One `export-once` on an empty state, with its own Pramathus stand-in."""
    receiver = LeanReceiver(watch_step=-1)
    proxy = CountingProxy(mlflow.url)  # counts the requests in flight at once
    env = {
        **exporter_env(mlflow, gateway, f"scale_{label}"),
        "MLFLOW_TRACKING_URI": proxy.url,
        "PRAMATHUS_ENDPOINT": receiver.url,
        "EXPORTER_STATE_DIR": str(workdir / f"state-{label}"),
        "EXPORTER_MLFLOW_CONCURRENCY": str(concurrency),
    }
    cpu0, started = group_cpu(mlflow.proc.pid), time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.rss", "export-once"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
            timeout=3 * 3600,
        )
        seconds = time.perf_counter() - started
        got, through = receiver.snapshot(), proxy.snapshot()
    finally:
        receiver.stop()
        proxy.stop()
    if done.returncode != 0:
        raise RuntimeError(f"export-once failed ({done.returncode}): {done.stderr[-800:]}")
    progress = [json.loads(x) for x in done.stderr.splitlines() if '"capture.progress"' in x]
    return {
        "workers": label[1],
        "concurrency": concurrency,
        "seconds": seconds,
        "requests": int(done.stdout.split(" MLflow requests")[0].rsplit(" ", 1)[-1]),
        "most_in_flight": through["most_in_flight"],
        "mlflow_cpu_s": group_cpu(mlflow.proc.pid) - cpu0,
        "rss_mb": int(done.stderr.split("peak_rss_kb ")[-1].split()[0]) / 1024,
        "points_received": got["points"],
        "distinct_points": got["distinct_points"],
        "progress_lines": len(progress),
        "last_progress": progress[-1] if progress else None,
        "state_dir": env["EXPORTER_STATE_DIR"],
    }


def _gateway_series(gateway: servers.Server, job: str) -> tuple[int, int, str]:
    text = requests.get(f"{gateway.url}/metrics", timeout=60).text
    mine = [x for x in text.splitlines() if f'job="{job}"' in x and not x.startswith("#")]
    return len(mine), len(text.encode()), "\n".join(mine)


def _self_metric(url: str, name: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def continuous(workdir: Path, mlflow: servers.Server, state: str, idle_s: float) -> dict[str, Any]:
    """`continuous --interval 5` on a booted state: idle cost, series, new-point latency.

    It pushes to a Pushgateway of its own (which it fills whole at its first cycle), so the
    page holds its series and nothing of the boots'."""
    (workdir / "continuous-pushgateway").mkdir(exist_ok=True)
    gateway = servers.start_pushgateway(workdir / "continuous-pushgateway")
    port = servers.free_port()
    url = f"http://127.0.0.1:{port}"
    job = "scale_continuous"
    receiver = LeanReceiver(watch_step=-1)
    env = {
        **exporter_env(mlflow, gateway, job),
        "PRAMATHUS_ENDPOINT": receiver.url,
        "EXPORTER_STATE_DIR": state,
        "EXPORTER_PORT": str(port),
    }
    log = (workdir / "continuous.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "continuous", "--interval", str(INTERVAL)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    out: dict[str, Any] = {}
    try:
        servers.wait_http(f"{url}/livez", 60, proc)
        deadline = time.monotonic() + 600
        while _self_metric(url, "mlflow_exporter_cycles_total") < 3:  # the first push done
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the continuous exporter did not run 3 cycles")
            time.sleep(1)
        cpu = Path(f"/proc/{proc.pid}/stat")

        def own_cpu() -> float:
            fields = cpu.read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        r0 = _self_metric(url, "mlflow_exporter_mlflow_requests_total")
        m0, e0, t0 = group_cpu(mlflow.proc.pid), own_cpu(), time.monotonic()
        time.sleep(idle_s)
        minutes = (time.monotonic() - t0) / 60
        out["idle"] = {
            "minutes": minutes,
            "mlflow_cpu_s_per_minute": (group_cpu(mlflow.proc.pid) - m0) / minutes,
            "exporter_cpu_s_per_minute": (own_cpu() - e0) / minutes,
            "requests_per_minute": (_self_metric(url, "mlflow_exporter_mlflow_requests_total") - r0)
            / minutes,
        }
        series, page_bytes, _ = _gateway_series(gateway, job)
        out["series"] = {
            "pushgateway_series": series,
            "page_bytes": page_bytes,
            "self_metric": _self_metric(url, "mlflow_exporter_series "),
        }
        phases = random.Random(21)  # the same pauses in every run of the benchmark
        out["latency_s"] = []
        for _ in range(LATENCY_TRIES):
            time.sleep(phases.uniform(0, INTERVAL))
            out["latency_s"].append(new_point_latency(mlflow, gateway, job))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
        receiver.stop()
        gateway.stop()
        text = (workdir / "continuous.log").read_text(errors="replace")
        (RESULTS / f"scale-continuous-{time.strftime('%H%M%S')}.log").write_text(text)
    return out


def _latency(seconds: list[float]) -> str:
    """Median, 90th percentile and max of the probes (NaN when a probe never arrived)."""
    if not seconds:
        return ""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
    return (
        f"{_f(statistics.median(ordered), 1)}, {_f(p90, 1)}, {_f(ordered[-1], 1)} of {len(ordered)}"
    )


def new_point_latency(mlflow: servers.Server, gateway: servers.Server, job: str) -> float:
    """Seconds from logging a point on a new run to its series on the Pushgateway."""
    api = f"{mlflow.url}/api/2.0/mlflow"
    run = requests.post(
        f"{api}/runs/create",
        json={"experiment_id": "1", "start_time": int(time.time() * 1000)},
        timeout=30,
    ).json()["run"]["info"]["run_id"]
    now = int(time.time() * 1000)
    requests.post(
        f"{api}/runs/log-metric",
        json={"run_id": run, "key": "latency_probe", "value": 1.0, "timestamp": now, "step": 0},
        timeout=30,
    ).raise_for_status()
    logged = time.monotonic()
    pattern = re.compile(rf'^mlflow_latency_probe\{{[^}}]*run_id="{run[:12]}"', re.MULTILINE)
    while time.monotonic() - logged < 120:
        if pattern.search(_gateway_series(gateway, job)[2]):
            return time.monotonic() - logged
        time.sleep(0.1)
    return float("nan")


# ---------------------------------------------------------------------------- one N


def measure(
    n: int, workdir: Path, boots: list[str], idle_s: float, direct: bool = True
) -> dict[str, Any]:
    def say(what: str) -> None:
        print(f"[N={n}] {what}", file=sys.stderr, flush=True)

    experiments = max(1, n // 2000)
    out: dict[str, Any] = {"n": n, "experiments": experiments}
    out["store"] = build_store(workdir, n, experiments)
    say(f"store built in {out['store']['seconds']:.1f}s: {out['store']}")
    exp_ids = [str(i) for i in range(1, experiments + 1)]
    if direct:
        out["direct_read"] = direct_read(workdir / "mlflow.db", exp_ids)
        say(f"direct store read: {out['direct_read']}")
    gateway = servers.start_pushgateway(workdir)
    out["boots"] = []
    try:
        for workers in ("4", "1"):
            wanted = [b for b in boots if b[1] == workers]
            if not wanted and workers == "4":
                continue
            mlflow = servers.start_mlflow(workdir, workers=int(workers))
            try:
                if workers == "1":
                    scan = cheapest_reads(mlflow.url, exp_ids, histories_too=False)["full_read"]
                    out["scan"] = scan
                    say(f"one-read scan: {scan}")
                for label in wanted:
                    result = boot(workdir, mlflow, gateway, int(label[3:]), label)
                    out["boots"].append(result)
                    say(f"boot {label}: {result}")
                if workers == "1" and idle_s > 0:
                    default = next(
                        (b for b in out["boots"] if b["workers"] == "1" and b["concurrency"] == 4),
                        None,
                    )
                    if default is not None:
                        out["continuous"] = continuous(
                            workdir, mlflow, default["state_dir"], idle_s
                        )
                        say(f"continuous: {out['continuous']}")
            finally:
                mlflow.stop()
    finally:
        gateway.stop()
    return out


# ---------------------------------------------------------------------------- report


def _f(x: Any, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def report(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cells: list[str]) -> None:
        rows.append((label, cells))

    row("store built (runs, points; seconds)", [
        f"{_f(r['store']['runs'])} runs, {_f(r['store']['points'])} points; "
        f"{_f(r['store']['seconds'])} s" for r in results
    ])  # fmt: skip
    row("direct store read, runs only (wall s, CPU s)", [
        f"{_f(r['direct_read']['scan']['seconds'])} s, {_f(r['direct_read']['scan']['cpu_s'])} "
        "CPU s" if "direct_read" in r else "not run" for r in results
    ])  # fmt: skip
    row("direct store read, every run and point (wall s, CPU s)", [
        f"{_f(r['direct_read']['seconds'])} s, {_f(r['direct_read']['cpu_s'])} CPU s, "
        f"{_f(r['direct_read']['points'])} points" if "direct_read" in r else "not run"
        for r in results
    ])  # fmt: skip
    row("one-read scan, REST `runs/search` (1 worker)", [
        f"{_f(r['scan']['seconds'])} s, {r['scan']['requests']} requests" if "scan" in r else ""
        for r in results
    ])  # fmt: skip
    labels = sorted(
        {(b["workers"], b["concurrency"]) for r in results for b in r["boots"]}, reverse=True
    )
    for workers, conc in labels:
        cells = []
        for r in results:
            b = next(
                (x for x in r["boots"] if (x["workers"], x["concurrency"]) == (workers, conc)), None
            )
            cells.append(
                ""
                if b is None
                else f"{_f(b['seconds'])} s, {b['requests']:,} requests "
                f"({b.get('most_in_flight', '?')} at most in flight), MLflow "
                f"{_f(b['mlflow_cpu_s'])} CPU s, {_f(b['rss_mb'], 0)} MB, "
                f"{_f(b['distinct_points'])}/{_f(r['store']['points'])} points, "
                f"{b['progress_lines']} progress lines"
            )
        row(f"boot `export-once`: MLflow {workers} worker(s), concurrency {conc}", cells)

    def cont(r: dict[str, Any], fmt: Any) -> str:
        return fmt(r["continuous"]) if "continuous" in r else ""

    row("idle `continuous --interval 5` (1 worker): MLflow CPU s per minute", [
        cont(r, lambda c: f"{_f(c['idle']['mlflow_cpu_s_per_minute'], 2)} "
             f"({_f(100 * c['idle']['mlflow_cpu_s_per_minute'] / 60, 1)}% of a core)")
        for r in results
    ])  # fmt: skip
    row("idle: MLflow requests per minute, exporter CPU s per minute", [
        cont(r, lambda c: f"{_f(c['idle']['requests_per_minute'])}, "
             f"{_f(c['idle']['exporter_cpu_s_per_minute'], 2)}")
        for r in results
    ])  # fmt: skip
    row("Pushgateway: the exporter's series, page size", [
        cont(r, lambda c: f"{_f(c['series']['pushgateway_series'])} series, "
             f"{_f(c['series']['page_bytes'] / 1e6, 2)} MB")
        for r in results
    ])  # fmt: skip
    row("new point on a new run -> on the Pushgateway (s): median, 90th pct, max of n", [
        cont(r, lambda c: _latency(c["latency_s"])) for r in results
    ])  # fmt: skip
    head = "| what | " + " | ".join(f"N={r['n']:,} ({r['experiments']} exp.)" for r in results)
    lines = [head + " |", "|---|" + "---|" * len(results)]
    lines += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[10_000])
    parser.add_argument(
        "--boots",
        default="w4c1,w4c4,w1c1,w1c4",
        help="boots to run: w<MLflow workers>c<exporter concurrency>, comma-separated",
    )
    parser.add_argument("--idle-seconds", type=float, default=120.0)
    parser.add_argument(
        "--skip-direct", action="store_true", help="skip the direct store read (linear in N)"
    )
    parser.add_argument("--report", action="store_true", help="print the table from results")
    args = parser.parse_args()
    if args.report:
        print(report([json.loads((RESULTS / f"scale-{n}.json").read_text()) for n in args.sizes]))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-scale-{n}-") as tmp:
            result = measure(
                n, Path(tmp), args.boots.split(","), args.idle_seconds, not args.skip_direct
            )
        (RESULTS / f"scale-{n}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
    print(report(results))


if __name__ == "__main__":
    main()
