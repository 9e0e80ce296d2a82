"""Benchmark: what the exporter costs MLflow and itself, at several N side by side in one run.

For each N (runs; 10 metric keys x 5 steps each, 40 of them RUNNING at every N) it seeds a
fresh SQLite store, starts a real lean `mlflow server`, a real Pushgateway and an HTTP
receiver standing in for Pramathus, all on 127.0.0.1, and measures:

- cheapest full read: one `runs/search` of every run (50,000 per page);
- cheapest complete history read: that, plus `get-history-bulk-interval` for every metric key
  in chunks of 100 runs (the fewest public-API calls that return every point);
- naive (the seed's approach): per-experiment `runs/search` plus one `get-history` per
  (run, key); measured on a random sample of pairs and extrapolated (marked so);
- the exporter's bootstrap: `exporter export-once` on an empty state directory (MLflow
  requests, wall time, the process's peak RSS);
- `exporter continuous --interval 2` on that state directory (settle window 60 s, `--settle`,
  given in a YAML file through EXPORTER_CONFIG), through `bench.rss` so every cycle is logged:
  - idle cycles, from one completed pass of the background sweep to the next (at least 8
    cycles): MLflow requests and cycles from the exporter's /metrics
    (`mlflow_exporter_mlflow_requests_total`, `mlflow_exporter_cycles_total`), CPU seconds of
    the exporter process from /proc/<pid>/stat (utime+stime), cycle wall time from
    `mlflow_exporter_cycle_duration_seconds` sum/count; the sweep's own share per cycle and
    the time a whole pass takes (`mlflow_exporter_sweep_passes_total`,
    `mlflow_exporter_last_sweep_completed_timestamp_seconds`);
  - a delta: DELTA_RUNS running runs (the same number at every N, so only N differs) log
    one new point while the exporter is paused
    (SIGSTOP, so one cycle sees them all); the cycle that captures them, every cycle while
    they are in their settle window, and the cycles after it closes;
  - that for `reconcile_interval_seconds` 3600 (the default) and for each shorter setting
    given with `--reconcile` (idle and sweep only), each in its own process, stopped with
    SIGTERM (exit code and seconds recorded).

Usage: `.venv/bin/python -m bench.bench_incremental [N ...] [--reconcile 3600,60]`
(default 2000 20000; `200 2000` is a quick try). Results go to bench/results/<N>.json, every
cycle's log to bench/results/cycles-<N>-r<seconds>.jsonl, and one Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.receiver import LeanReceiver
from bench.seed import METRICS, seed
from exporter.config import MlflowSettings
from exporter.mlflow_source import RestSource, all_runs
from exporter.model import RunFilter
from tests.support import servers

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
NAIVE_SAMPLE = 300
INTERVAL = 2.0  # seconds between continuous cycles
# export.settle_seconds (`--settle`). Long enough to span several cycles: under load a cycle
# that captures a delta at N=20,000 takes well over 10 s, and a window shorter than the cycle
# closes before the next cycle starts, leaving nothing to measure.
SETTLE = 60.0
IDLE_MIN_CYCLES = 8
AFTER_CYCLES = 4  # idle cycles measured after the delta's settle window closed
DELTA_RUNS = 20  # runs that log a point in the delta, at every N
NEW_STEP = 99  # step of the delta's new points
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _source(url: str, page_size: int = 50000) -> RestSource:
    settings = MlflowSettings(tracking_uri=url, page_size=page_size, timeout_seconds=600)
    return RestSource.from_settings(settings)


def group_cpu(pgid: int) -> float:
    """utime + stime of every live process in a process group (MLflow's launcher and its
    uvicorn worker), in seconds."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp
            total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


# ---------------------------------------------------------------------------- baselines


def cheapest_reads(url: str, exp_ids: list[str], histories_too: bool = True) -> dict[str, Any]:
    source = _source(url)
    seconds, runs = _timed(lambda: list(all_runs(source, exp_ids, RunFilter())))
    full = {"requests": source.requests_made, "seconds": seconds, "runs": len(runs)}
    ids = [r.run_id for r in runs]  # oldest first
    # The latest step of each key bounds the step range, which MLflow answers far faster
    # than an open range (measured: 0.27 s vs 2.9 s for 100 runs at N=20,000).
    last_step = {(r.run_id, m.key): m.step for r in runs for m in r.metrics}

    def histories() -> int:
        points = 0
        for key in METRICS:
            for i in range(0, len(ids), 100):
                chunk = ids[i : i + 100]
                end = max(last_step.get((r, key), 0) for r in chunk)
                data = source.call(
                    "GET",
                    "metrics/get-history-bulk-interval",
                    {
                        "run_ids": chunk,
                        "metric_key": key,
                        "max_results": 2500,
                        "start_step": 0,
                        "end_step": end,
                    },
                )
                points += len(data.get("metrics", []))
        return points

    running = [r.run_id for r in runs if r.status == "RUNNING"]
    if not histories_too:
        return {"full_read": full, "complete_history": None, "run_ids": ids, "running": running}
    hist_seconds, points = _timed(histories)
    history = {
        "requests": source.requests_made,
        "seconds": seconds + hist_seconds,
        "points": points,
    }
    return {"full_read": full, "complete_history": history, "run_ids": ids, "running": running}


def naive(url: str, exp_ids: list[str], run_ids: list[str]) -> dict[str, Any]:
    """Per-experiment run reads, measured; per-(run, key) history reads, sampled."""
    source = _source(url, page_size=1000)
    runs_seconds, _ = _timed(lambda: [list(all_runs(source, [e], RunFilter())) for e in exp_ids])
    run_requests = source.requests_made
    rng = random.Random(1)
    pairs = [(rng.choice(run_ids), rng.choice(METRICS)) for _ in range(NAIVE_SAMPLE)]
    sample_seconds, _ = _timed(
        lambda: [
            source.call(
                "GET", "metrics/get-history", {"run_id": r, "metric_key": k, "max_results": 25000}
            )
            for r, k in pairs
        ]
    )
    total_pairs = len(run_ids) * len(METRICS)
    return {
        "requests": run_requests + total_pairs,
        "seconds": runs_seconds + sample_seconds / NAIVE_SAMPLE * total_pairs,
        "extrapolated_from": NAIVE_SAMPLE,
    }


# ---------------------------------------------------------------------------- exporter


def export_once(env: dict[str, str]) -> dict[str, Any]:
    """One `exporter export-once` process: requests, wall time, its own peak RSS."""
    started = time.perf_counter()
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
    if done.returncode != 0:
        raise RuntimeError(f"export-once failed ({done.returncode}): {done.stderr[-800:]}")
    requests_made = int(done.stdout.split(" MLflow requests")[0].rsplit(" ", 1)[-1])
    rss_kb = int(done.stderr.split("peak_rss_kb ")[-1].split()[0])
    return {"requests": requests_made, "seconds": seconds, "rss_mb": rss_kb / 1024}


@dataclass
class Snapshot:
    """The exporter as seen from outside at one moment, right after a cycle ended."""

    at: float  # time.monotonic()
    cycles_logged: int  # lines in the cycle log
    cpu_s: float  # utime + stime of the exporter process
    mlflow_cpu_s: float  # the same for MLflow's server processes
    cycles: float
    failed_cycles: float
    requests: float
    requests_by_endpoint: dict[str, float]
    duration_sum: float
    duration_count: float
    sweep_passes: float
    last_sweep: float
    settling: float
    points_captured: float


@dataclass
class Continuous:
    """`exporter continuous` through `bench.rss`, every cycle logged to `log`."""

    env: dict[str, str]
    workdir: Path
    label: str
    cycle_timeout: float
    mlflow_pgid: int
    proc: subprocess.Popen[bytes] = field(init=False)
    url: str = field(init=False)
    log: Path = field(init=False)
    stderr: Path = field(init=False)

    def __post_init__(self) -> None:
        port = servers.free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log = self.workdir / f"cycles-{self.label}.jsonl"
        self.stderr = self.workdir / f"exporter-{self.label}.log"
        env = {**self.env, "BENCH_CYCLE_LOG": str(self.log)}
        cmd = [sys.executable, "-m", "bench.rss", "continuous"]
        cmd += ["--interval", str(INTERVAL), "--port", str(port)]
        with self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=err, stderr=err, start_new_session=True
            )
        servers.wait_http(f"{self.url}/livez", 60, self.proc)

    # -------------------------------------------------------------- reading it

    def cycles(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        # A line being written may be incomplete; it counts once it ends with a newline.
        return [json.loads(x) for x in lines if x.endswith("}")]

    def _logged(self) -> int:
        if not self.log.exists():
            return 0
        with self.log.open("rb") as f:
            return f.read().count(b"\n")

    def _cpu(self) -> float:
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def snapshot(self) -> Snapshot:
        logged = self._logged()
        text = requests.get(f"{self.url}/metrics", timeout=10).text
        cpu = self._cpu()  # after the scrape: a window holds exactly one scrape
        values: dict[str, float] = {}
        by_endpoint: dict[str, float] = {}
        failed = 0.0
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "mlflow_exporter_mlflow_requests_total":
                    by_endpoint[s.labels["endpoint"]] = s.value
                elif s.name == "mlflow_exporter_cycles_total":
                    values["cycles"] = values.get("cycles", 0.0) + s.value
                    if s.labels.get("result") != "success":
                        failed += s.value
                else:
                    values[s.name] = s.value
        return Snapshot(
            at=time.monotonic(),
            cycles_logged=logged,
            cpu_s=cpu,
            mlflow_cpu_s=group_cpu(self.mlflow_pgid),
            cycles=values.get("cycles", 0.0),
            failed_cycles=failed,
            requests=sum(by_endpoint.values()),
            requests_by_endpoint=by_endpoint,
            duration_sum=values.get("mlflow_exporter_cycle_duration_seconds_sum", 0.0),
            duration_count=values.get("mlflow_exporter_cycle_duration_seconds_count", 0.0),
            sweep_passes=values.get("mlflow_exporter_sweep_passes_total", 0.0),
            last_sweep=values.get("mlflow_exporter_last_sweep_completed_timestamp_seconds", 0.0),
            settling=values.get("mlflow_exporter_settling_runs", 0.0),
            points_captured=values.get("mlflow_exporter_points_captured_total", 0.0),
        )

    def next_cycle_end(self, after: int | None = None) -> Snapshot:
        """Wait (bounded) until a cycle beyond `after` logged cycles has ended; snapshot then.

        The log is watched from outside (a file's size), so waiting costs the exporter nothing;
        /metrics is read once, right after the cycle ended.
        """
        after = self._logged() if after is None else after
        deadline = time.monotonic() + self.cycle_timeout
        while self._logged() <= after:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exporter exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no cycle ended within {self.cycle_timeout:.0f}s")
            time.sleep(0.05)
        return self.snapshot()

    def until(self, done: Callable[[Snapshot], bool], max_cycles: int) -> Snapshot:
        """Cycle ends until `done` holds for the snapshot (at most `max_cycles` cycles)."""
        for _ in range(max_cycles):
            snap = self.next_cycle_end()
            if done(snap):
                return snap
        raise TimeoutError(f"{self.label}: condition not met within {max_cycles} cycles")

    def tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-1500:] if self.stderr.exists() else ""

    # -------------------------------------------------------------- pausing, stopping

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the exporter must exit 0 within 10 s."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return {"exit_code": None, "seconds": None, "killed": True}
        return {"exit_code": code, "seconds": round(time.monotonic() - started, 2)}


def window(a: Snapshot, b: Snapshot, log: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-cycle costs between two snapshots taken at cycle ends."""
    cycles = b.cycles - a.cycles
    lines = log[a.cycles_logged : b.cycles_logged]
    per = (lambda x: x / cycles) if cycles else (lambda _x: math.nan)
    endpoints = {
        e: per(b.requests_by_endpoint.get(e, 0.0) - a.requests_by_endpoint.get(e, 0.0))
        for e in sorted(set(a.requests_by_endpoint) | set(b.requests_by_endpoint))
    }
    return {
        "cycles": cycles,
        "failed_cycles": b.failed_cycles - a.failed_cycles,
        "seconds": b.at - a.at,
        # From /metrics and /proc (what the brief measures).
        "requests_per_cycle": per(b.requests - a.requests),
        "requests_by_endpoint_per_cycle": {e: v for e, v in endpoints.items() if v},
        "cpu_s_per_cycle": per(b.cpu_s - a.cpu_s),
        "mlflow_cpu_s_per_cycle": per(b.mlflow_cpu_s - a.mlflow_cpu_s),
        "load_average_1m": os.getloadavg()[0],
        "wall_s_per_cycle": (b.duration_sum - a.duration_sum)
        / (b.duration_count - a.duration_count)
        if b.duration_count > a.duration_count
        else math.nan,
        "points_captured": b.points_captured - a.points_captured,
        # From the cycle log (the same cycles): a cross-check and the stages.
        "log": summarize(lines),
    }


def summarize(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """Means per cycle of a list of logged cycles, in all and per stage."""
    if not lines:
        return {}
    n = len(lines)
    stages: dict[str, dict[str, float]] = {}
    for line in lines:
        for name, s in line["stages"].items():
            acc = stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "requests": 0.0})
            for k in acc:
                acc[k] += s[k]
    endpoints: dict[str, dict[str, float]] = {}
    for line in lines:
        for name, e in line["endpoints"].items():
            acc = endpoints.setdefault(name, {"calls": 0.0, "wall_s": 0.0})
            acc["calls"] += e["calls"]
            acc["wall_s"] += e["wall_s"]
    return {
        "cycles": n,
        "requests": sum(x["requests"] for x in lines) / n,
        "wall_s": sum(x["wall_s"] for x in lines) / n,
        "thread_cpu_s": sum(x["thread_cpu_s"] for x in lines) / n,
        "process_cpu_s": sum(x["process_cpu_s"] for x in lines) / n,
        "points_captured": sum(x["sync"]["points_captured"] for x in lines if "sync" in x),
        "settling_max": max((x["sync"]["settling"] for x in lines if "sync" in x), default=0),
        "stages": {k: {m: v / n for m, v in s.items()} for k, s in sorted(stages.items())},
        "endpoints": {k: {m: v / n for m, v in e.items()} for k, e in sorted(endpoints.items())},
    }


def idle_and_sweep(exporter: Continuous, runs: int) -> dict[str, Any]:
    """Idle cycles from one completed sweep pass to the next (at least IDLE_MIN_CYCLES)."""
    exporter.next_cycle_end()  # warm-up: the first cycle of a process
    exporter.next_cycle_end()
    # Runs first seen by the bootstrap (the running ones) settle for SETTLE from then:
    # idle starts once nothing settles.
    exporter.until(lambda s: s.settling == 0, int(SETTLE / INTERVAL) * 3 + 10)
    pass_cycles = math.ceil(runs / 1000) + 2  # at least one page per cycle
    p0 = exporter.snapshot().sweep_passes
    # Start and end at cycles that completed a pass: the window spans whole passes, so it
    # holds the sweep's cost in proportion (every page, one completion per pass).
    start = exporter.until(lambda s: s.sweep_passes > p0, pass_cycles + 2)
    last = [start.sweep_passes]

    def done(s: Snapshot) -> bool:
        completed = s.sweep_passes > last[0]
        last[0] = s.sweep_passes
        return completed and s.cycles - start.cycles >= IDLE_MIN_CYCLES

    end = exporter.until(done, IDLE_MIN_CYCLES + 2 * pass_cycles + 2)
    result = window(start, end, exporter.cycles())
    passes = end.sweep_passes - start.sweep_passes
    result["sweep"] = {
        "passes": passes,
        "seconds_per_pass": (end.last_sweep - start.last_sweep) / passes if passes else None,
        "cycles_per_pass": result["cycles"] / passes if passes else None,
        **result["log"].get("stages", {}).get("sweep", {}),
    }
    result["settling_at_end"] = end.settling
    return result


def log_new_points(url: str, run_ids: list[str]) -> float:
    """One new point (loss at NEW_STEP) on each run; returns the seconds it took."""
    now = int(time.time() * 1000)

    def one(run_id: str) -> None:
        r = requests.post(
            f"{url}/api/2.0/mlflow/runs/log-batch",
            timeout=60,
            json={
                "run_id": run_id,
                "metrics": [{"key": "loss", "value": 0.01, "timestamp": now, "step": NEW_STEP}],
            },
        )
        r.raise_for_status()

    started = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, run_ids))
    return time.perf_counter() - started


def delta(exporter: Continuous, url: str, run_ids: list[str]) -> dict[str, Any]:
    """`run_ids` log a point while the exporter is paused; follow the cycles after."""
    before = exporter.next_cycle_end()
    exporter.pause()
    try:
        log_seconds = log_new_points(url, run_ids)
    finally:
        exporter.resume()
    phases: dict[str, list[dict[str, Any]]] = {"capture": [], "settle": [], "after": []}
    snaps = {"capture": [before], "settle": [], "after": []}
    limit = 6 + int(SETTLE / INTERVAL) * 3 + AFTER_CYCLES
    for _ in range(limit):
        snap = exporter.next_cycle_end()
        line = exporter.cycles()[snap.cycles_logged - 1]
        captured = line["sync"]["points_captured"] if "sync" in line else 0
        if not phases["settle"] and not phases["after"] and (captured or not phases["capture"]):
            phase = "capture"
        elif line.get("sync", {}).get("settling", 0) > 0:
            phase = "settle"
        else:
            phase = "after"
        phases[phase].append(line)
        snaps[phase].append(snap)
        if len(phases["after"]) >= AFTER_CYCLES:
            break
    else:
        raise TimeoutError(f"delta: the settle window did not close within {limit} cycles")
    log = exporter.cycles()

    def metrics_window(first: Snapshot, last: Snapshot) -> dict[str, Any]:
        return window(first, last, log)

    # Windows from /metrics: capture from `before`; settle from the last capture snapshot;
    # after from the last settle snapshot.
    out: dict[str, Any] = {"runs": len(run_ids), "log_seconds": log_seconds}
    out["capture"] = metrics_window(before, snaps["capture"][-1])
    out["capture"]["cycle_requests"] = [x["requests"] for x in phases["capture"]]
    out["settle"] = (
        metrics_window(snaps["capture"][-1], snaps["settle"][-1]) if snaps["settle"] else None
    )
    if out["settle"] is not None:
        out["settle"]["cycle_requests"] = [x["requests"] for x in phases["settle"]]
        out["settle"]["settling"] = [x["sync"]["settling"] for x in phases["settle"]]
    after_from = snaps["settle"][-1] if snaps["settle"] else snaps["capture"][-1]
    out["after"] = metrics_window(after_from, snaps["after"][-1])
    out["after"]["cycle_requests"] = [x["requests"] for x in phases["after"]]
    return out


def continuous_phase(
    env: dict[str, str],
    workdir: Path,
    reconcile: float,
    runs: int,
    running: list[str] | None,
    mlflow_url: str,
    mlflow_pgid: int,
    receiver: LeanReceiver,
) -> dict[str, Any]:
    label = f"r{reconcile:g}"
    cycle_timeout = 60 + runs / 100
    exporter = Continuous(env, workdir, label, cycle_timeout, mlflow_pgid)
    out: dict[str, Any] = {"reconcile_interval_seconds": reconcile}
    try:
        before = receiver.snapshot()
        out["idle"] = idle_and_sweep(exporter, runs)
        out["idle"]["points_received"] = receiver.snapshot()["points"] - before["points"]
        if running is not None:
            receiver.watched.clear()
            before = receiver.snapshot()
            out["delta"] = delta(exporter, mlflow_url, running)
            after = receiver.snapshot()
            out["delta"]["received"] = {
                "points": after["points"] - before["points"],
                "repeats": after["repeats"] - before["repeats"],
                "new_points_at_step": len(receiver.watched),
                "distinct_new": len(set(receiver.watched)),
            }
        out["peak_rss_mb"] = exporter.peak_rss_mb()
    finally:
        out["stop"] = exporter.stop()
        (RESULTS / f"cycles-{runs}-{label}.jsonl").write_text(
            exporter.log.read_text() if exporter.log.exists() else ""
        )
        if out["stop"].get("exit_code") != 0:
            print(exporter.tail(), file=sys.stderr)
    return out


def write_config(path: Path, reconcile: float) -> Path:
    path.write_text(
        "export:\n"
        f"  settle_seconds: {SETTLE:g}\n"
        f"  reconcile_interval_seconds: {reconcile:g}\n"
        f"  interval_seconds: {INTERVAL:g}\n"
    )
    return path


def analyze(db: Path, on: bool) -> None:
    """Give SQLite's planner statistics (`ANALYZE`), or take them away again.

    Without statistics SQLite answers a `get-history-bulk-interval` without a step range
    from the metrics table's covering primary key (`key` first), reading every point of that
    key in the store for each run: O(N) per run. With them it uses
    `index_metrics_run_uuid_key_step`. `--analyze-bootstrap` bootstraps with statistics (to
    get a state at large N in minutes) and measures everything after it without them.
    """
    conn = sqlite3.connect(db)
    with conn:
        if on:
            conn.execute("ANALYZE")
        else:
            conn.execute("DROP TABLE IF EXISTS sqlite_stat1")
    conn.close()


def measure(
    n: int,
    workdir: Path,
    reconciles: list[float],
    baselines: bool = True,
    analyze_bootstrap: bool = False,
) -> dict[str, Any]:
    experiments = max(1, n // 1000)
    seed_seconds, _ = _timed(
        lambda: seed(workdir / "mlflow.db", workdir / "artifacts", n, experiments)
    )

    def log(what: str) -> None:
        print(f"[N={n}] {what}", file=sys.stderr, flush=True)

    log(f"seeded in {seed_seconds:.1f}s")
    if analyze_bootstrap:
        analyze(workdir / "mlflow.db", on=True)
    mlflow = servers.start_mlflow(workdir)
    pushgateway = servers.start_pushgateway(workdir)
    receiver = LeanReceiver(watch_step=NEW_STEP)
    try:
        exp_ids = [str(i) for i in range(1, experiments + 1)]
        load = os.getloadavg()[0]
        cheap = cheapest_reads(mlflow.url, exp_ids, histories_too=baselines)
        assert cheap["full_read"]["runs"] == n, "seeded runs not all visible through the API"
        naive_cost = None
        if baselines:
            cheap["complete_history"]["load_average_1m"] = (load, os.getloadavg()[0])
            log(f"cheapest reads done ({cheap['complete_history']['seconds']:.0f}s)")
            naive_cost = naive(mlflow.url, exp_ids, cheap["run_ids"])
            log("naive sample done")
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": mlflow.url,
            "PROMETHEUS_GATEWAY": pushgateway.url,
            "PRAMATHUS_ENABLED": "true",
            "PRAMATHUS_ENDPOINT": receiver.url,
            "MAX_EXPERIMENTS": "0",
            "EXPORTER_STATE_DIR": str(workdir / "state"),
            "LOG_LEVEL": "WARNING",
        }
        env.pop("EXPORT_INTERVAL", None)
        configs = {r: write_config(workdir / f"config-r{r:g}.yaml", r) for r in reconciles}
        load = os.getloadavg()[0]
        bootstrap = export_once({**env, "EXPORTER_CONFIG": str(configs[reconciles[0]])})
        bootstrap["load_average_1m"] = (load, os.getloadavg()[0])
        bootstrap["analyzed_mlflow_db"] = analyze_bootstrap
        if analyze_bootstrap:
            mlflow.stop()
            analyze(workdir / "mlflow.db", on=False)
            mlflow.restart("/health", 90)
        received = receiver.snapshot()
        log(f"bootstrap done ({bootstrap['seconds']:.0f}s, {received['points']} points)")
        # DELTA_RUNS of the seeded RUNNING runs log one new point, at every N.
        running = cheap["running"][:DELTA_RUNS]
        phases = []
        for i, r in enumerate(reconciles):
            phase_env = {**env, "EXPORTER_CONFIG": str(configs[r])}
            phases.append(
                continuous_phase(
                    phase_env,
                    workdir,
                    r,
                    n,
                    running if i == 0 else None,
                    mlflow.url,
                    mlflow.proc.pid,
                    receiver,
                )
            )
            log(f"continuous, reconcile {r:g}s, done")
    finally:
        receiver.stop()
        pushgateway.stop()
        mlflow.stop()
    return {
        "n": n,
        "experiments": experiments,
        "seed_seconds": seed_seconds,
        "settle_seconds": SETTLE,
        "interval_seconds": INTERVAL,
        "cheapest_full_read": cheap["full_read"],
        "cheapest_complete_history": cheap["complete_history"],
        "naive": naive_cost,
        "bootstrap": bootstrap,
        "bootstrap_received": received,
        "expected_points": n * len(METRICS) * 5,
        "continuous": phases,
        "load_average_1m_at_end": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------- report

Cells = tuple[Any, Any, Any, Any, Any]  # requests, wall s, exporter CPU s, MLflow CPU s, RSS MB
COLUMNS = ("MLflow requests", "wall s", "exporter CPU s", "MLflow CPU s", "RSS MB")
DIGITS = (1, 2, 3, 2, 0)


def _cell(x: Any, digits: int) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, int) or (digits == 1 and float(x).is_integer()):
        return f"{int(x)}"
    return f"{x:.{digits}f}"


def _per_cycle(w: dict[str, Any]) -> Cells:
    return (
        w["requests_per_cycle"],
        w["wall_s_per_cycle"],
        w["cpu_s_per_cycle"],
        w.get("mlflow_cpu_s_per_cycle"),
        None,
    )


def _rows(r: dict[str, Any]) -> list[tuple[str, Cells]]:
    """The table's rows for one N (labels are the same for every N)."""
    boot, cheap, naive_cost = r["bootstrap"], r["cheapest_complete_history"], r["naive"]
    skipped: Cells = ("not run", None, None, None, None)
    analyzed = " on an ANALYZEd MLflow db" if boot.get("analyzed_mlflow_db") else ""
    return [
        (
            "naive full cycle (extrapolated from 300 calls)",
            (naive_cost["requests"], naive_cost["seconds"], None, None, None)
            if naive_cost
            else skipped,
        ),
        (
            "cheapest full read (runs only)",
            (r["cheapest_full_read"]["requests"], r["cheapest_full_read"]["seconds"], *[None] * 3),
        ),
        (
            "cheapest complete history read",
            (cheap["requests"], cheap["seconds"], *[None] * 3) if cheap else skipped,
        ),
        (
            f"exporter bootstrap (`export-once`){analyzed}",
            (boot["requests"], boot["seconds"], None, None, boot["rss_mb"]),
        ),
        (
            "bootstrap / cheapest complete history",
            ("", f"{boot['seconds'] / cheap['seconds']:.2f}x", None, None, None)
            if cheap
            else skipped,
        ),
        *_continuous_rows(r),
    ]


def _continuous_rows(r: dict[str, Any]) -> list[tuple[str, Cells]]:
    rows: list[tuple[str, Cells]] = []
    for phase in r["continuous"]:
        tag = f"reconcile {phase['reconcile_interval_seconds']:g} s"
        idle, sweep = phase["idle"], phase["idle"]["sweep"]
        rows.append((f"idle cycle, sweep included ({tag})", _per_cycle(idle)))
        rows.append(
            (
                f"- of which the sweep ({tag})",
                (sweep.get("requests"), sweep.get("wall_s"), sweep.get("cpu_s"), None, None),
            )
        )
        per_pass = sweep.get("cycles_per_pass")
        rows.append(
            (
                f"- a full sweep pass ({tag}): cycles, s",
                (
                    f"{per_pass:g} cycles" if per_pass else "",
                    sweep.get("seconds_per_pass"),
                    None,
                    None,
                    None,
                ),
            )
        )
        d = phase.get("delta")
        if d:
            label = f"delta: cycle capturing {d['runs']} running runs' new points"
            rows.append((label, _per_cycle(d["capture"])))
            if d["settle"]:
                rows.append(("delta: each cycle in their settle window", _per_cycle(d["settle"])))
            rows.append(("delta: each cycle after the window closed", _per_cycle(d["after"])))
        rows.append((f"continuous exporter peak RSS ({tag})", (*[None] * 4, phase["peak_rss_mb"])))
    return rows


def table(results: list[dict[str, Any]]) -> str:
    head = "| what |" + "".join(
        "".join(f" N={r['n']}: {c} |" if i == 0 else f" {c} |" for i, c in enumerate(COLUMNS))
        for r in results
    )
    lines = [head, "|---|" + "---|" * len(COLUMNS) * len(results)]
    per_n = [_rows(r) for r in results]
    for i, (label, _) in enumerate(per_n[0]):
        cells = "".join(
            "".join(f" {_cell(x, d)} |" for x, d in zip(rows[i][1], DIGITS, strict=True))
            if i < len(rows)
            else " |" * len(COLUMNS)
            for rows in per_n
        )
        lines.append(f"| {label} |{cells}")
    return "\n".join(lines)


def notes(results: list[dict[str, Any]]) -> list[str]:
    """Ratios between the smallest and largest N, the delta per cycle, correctness checks."""
    out = []
    lo, hi = results[0], results[-1]
    for a_phase, b_phase in zip(lo["continuous"], hi["continuous"], strict=False):
        a, b = a_phase["idle"], b_phase["idle"]
        out.append(
            f"reconcile {a_phase['reconcile_interval_seconds']:g} s, idle cycle "
            f"N={hi['n']} / N={lo['n']}: exporter CPU "
            f"{b['cpu_s_per_cycle'] / a['cpu_s_per_cycle']:.2f}x "
            f"({b['cpu_s_per_cycle']:.3f} / {a['cpu_s_per_cycle']:.3f} s), MLflow requests "
            f"{b['requests_per_cycle']:g} / {a['requests_per_cycle']:g}, wall "
            f"{b['wall_s_per_cycle'] / a['wall_s_per_cycle']:.2f}x, MLflow CPU "
            f"{b['mlflow_cpu_s_per_cycle'] / max(a['mlflow_cpu_s_per_cycle'], 1e-9):.2f}x"
        )
    for r in results:
        d = r["continuous"][0].get("delta")
        if d:
            settle = d["settle"] or {"cycle_requests": [], "settling": []}
            got = d["received"]
            out.append(
                f"N={r['n']}, delta of {d['runs']} runs: requests per cycle: capture "
                f"{d['capture']['cycle_requests']}, settle window {settle['cycle_requests']} "
                f"(runs settling {settle['settling']}), after {d['after']['cycle_requests']}; "
                f"received {got['new_points_at_step']} new points "
                f"({got['distinct_new']} distinct), {got['repeats']} repeats"
            )
        boot = r["bootstrap_received"]
        stops = ", ".join(
            f"{p['reconcile_interval_seconds']:g} s: exit {p['stop'].get('exit_code')} "
            f"in {p['stop'].get('seconds')} s"
            for p in r["continuous"]
        )
        out.append(
            f"N={r['n']}: bootstrap delivered {boot['points']} points ({boot['distinct_points']} "
            f"distinct, MLflow holds {r['expected_points']}); idle cycles delivered "
            f"{sum(p['idle']['points_received'] for p in r['continuous'])}; SIGTERM: {stops}"
        )
        out.append(
            f"N={r['n']}: 1-minute load average: complete history read "
            f"{(r['cheapest_complete_history'] or {}).get('load_average_1m')}, bootstrap "
            f"{r['bootstrap'].get('load_average_1m')}, idle "
            + ", ".join(f"{p['idle'].get('load_average_1m')}" for p in r["continuous"])
        )
    return out


def report(results: list[dict[str, Any]]) -> str:
    return table(results) + "\n\n" + "\n".join(f"- {x}" for x in notes(results)) + "\n"


def main() -> None:
    global SETTLE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[2000, 20000])
    parser.add_argument(
        "--reconcile",
        default="3600,60",
        help="reconcile_interval_seconds settings, comma-separated; the first gets the delta",
    )
    parser.add_argument(
        "--skip-baselines",
        action="store_true",
        help="skip the cheapest complete history read and the naive sample",
    )
    parser.add_argument(
        "--analyze-bootstrap",
        action="store_true",
        help="bootstrap on an ANALYZEd MLflow database (see `analyze`), measure the rest without",
    )
    parser.add_argument("--settle", type=float, default=SETTLE, help="export.settle_seconds")
    parser.add_argument(
        "--report", action="store_true", help="print the table from bench/results/<N>.json"
    )
    args = parser.parse_args()
    if args.report:
        print(report([json.loads((RESULTS / f"{n}.json").read_text()) for n in args.sizes]))
        return
    # A SIGTERM unwinds like an exception, so every server and exporter started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    reconciles = [float(x) for x in args.reconcile.split(",")]
    SETTLE = args.settle
    RESULTS.mkdir(parents=True, exist_ok=True)
    results = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix=f"bench-{n}-") as tmp:
            result = measure(
                n, Path(tmp), reconciles, not args.skip_baselines, args.analyze_bootstrap
            )
        (RESULTS / f"{n}.json").write_text(json.dumps(result, indent=2))
        results.append(result)
    text = report(results)
    (RESULTS / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
