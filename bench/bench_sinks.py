"""Benchmark: the history sinks at 1,000,000 points, beside the MLflow read of those points.

The points are shaped like `bench.seed`'s (20,000 runs x 10 keys x 5 steps by default) and
go through the exporter's own code, in the chunks its capture uses (one metric key, 100 runs
per `get-history-bulk-interval` answer, points sorted as `Sync` sorts them):

(a) encoding: each sink's `plan` and then `encode` of every planned batch
    (`RemoteWriteSink`: protobuf + snappy, value and step series; `PramathusSink`: JSON),
    timed apart; the exporter encodes at delivery, so (c) pays for this once more;
(b) queueing: each chunk's batches added to a `StateStore` outbox in a transaction in the
    captured form, then trimmed to the queue bound, as `Sync._enqueue` does (one
    transaction per sink here; the exporter shares one with the capture ledger, which is
    not measured);
(c) delivering: the exporter's `Drainer` decodes, encodes and sends each queue to a real
    receiver on loopback:
    a VictoriaMetrics (Debian binary) for remote write, and `tests.support.receiver.Receiver`
    (a real HTTP server parsing every JSON body, in its own process) for Pramathus.

Against that stands what reading the same points from MLflow costs: `runs/search` plus
`get-history-bulk-interval` per key and 100 runs, measured live on a smaller seeded MLflow
(`--mlflow-runs`, default 2,000; same seed, lean server) and extrapolated linearly to the
benchmark's points, next to the 20,000-run figure `bench.bench_incremental` measured
(bench/results/20000.json if present, else the number the README records).

Peak RSS is this process's own high-water mark per phase (reset through
/proc/self/clear_refs before each); receivers run in their own processes and are not in it.

Usage: `.venv/bin/python -m bench.bench_sinks [--points N] [--mlflow-runs N]`. Prints a
Markdown table and writes bench/results/sinks-<points>.json.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from bench.seed import METRICS
from exporter.config import PramathusSettings, RemoteWriteSettings
from exporter.mlflow_source import BULK_MAX_RUNS
from exporter.model import MetricPoint, RunContext
from exporter.sinks.delivery import DeliverySink, Drainer, queue_entries
from exporter.sinks.history import SAMPLES_PER_POINT, RemoteWriteSink
from exporter.sinks.pramathus import PramathusSink
from exporter.state import StateStore
from tests.support import history_servers, servers

ROOT = Path(__file__).resolve().parent.parent
STEPS = 5
# bench.bench_incremental at N=20,000 (1,000,000 points), as the README's Benchmarks table
# records it: used only when bench/results/20000.json is absent.
README_20000 = {"requests": 2001, "seconds": 286.5, "points": 1_000_000, "source": "README.md"}


# --------------------------------------------------------------------------- measuring


def peak_rss_mb() -> float:
    """This process's peak RSS since the last `reset_peak_rss` (VmHWM), in MB."""
    status = Path("/proc/self/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


def reset_peak_rss() -> None:
    # "5" resets the high-water mark to the current RSS (Linux >= 4.0), so each phase
    # reports its own peak rather than the largest so far.
    Path("/proc/self/clear_refs").write_text("5")


@dataclass
class Phase:
    points: int = 0
    seconds: float = 0.0
    rss_mb: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        rate = self.points / self.seconds if self.seconds else float("inf")
        return {
            "points": self.points,
            "seconds": round(self.seconds, 3),
            "points_per_second": round(rate),
            "peak_rss_mb": round(self.rss_mb),
            **self.extra,
        }


# --------------------------------------------------------------------------- the points


def runs(n: int, seed: int = 7) -> tuple[list[str], dict[str, RunContext], int]:
    """Run ids, their contexts, and the first run's start time (ms), as bench.seed makes them."""
    rng = random.Random(seed)
    ids = [uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(n)]
    experiments = max(1, n // 1000)
    contexts = {
        run_id: RunContext(
            str(i % experiments + 1), f"bench-{i % experiments}", f"run-{i}", {"team": "bench"}
        )
        for i, run_id in enumerate(ids)
    }
    return ids, contexts, int(time.time() * 1000) - n * 1000


def chunks(run_ids: list[str], start_ms: int, seed: int = 7) -> Iterator[list[MetricPoint]]:
    """The points, one capture chunk at a time: one key, up to 100 runs, 5 steps each, in
    the order `Sync` hands them to the sinks (run, key, step, timestamp)."""
    rng = random.Random(seed)
    index = {run_id: i for i, run_id in enumerate(run_ids)}
    for key in METRICS:
        for first in range(0, len(run_ids), BULK_MAX_RUNS):
            chunk = run_ids[first : first + BULK_MAX_RUNS]
            points = [
                MetricPoint(r, key, rng.random(), step, start_ms + index[r] * 1000 + step)
                for r in chunk
                for step in range(STEPS)
            ]
            points.sort(key=lambda p: (p.run_id, p.key, p.step, p.timestamp_ms))
            yield points


# --------------------------------------------------------------------------- phases


def encode_and_queue(
    sinks: list[DeliverySink], state: StateStore, run_ids: list[str], contexts: Any, start: int
) -> tuple[dict[str, Phase], dict[str, Phase], float]:
    """(a) and (b), chunk by chunk as the exporter interleaves them; generating the points
    is not timed. Returns per-sink encode and queue phases and the loop's peak RSS."""
    encode = {s.name: Phase() for s in sinks}
    queue = {s.name: Phase() for s in sinks}
    now_ms = int(time.time() * 1000)
    reset_peak_rss()
    for points in chunks(run_ids, start):
        for sink in sinks:
            started = time.perf_counter()
            planned = sink.plan(points, contexts, now_ms)
            entries = queue_entries(sink, planned.batches, contexts, now_ms)
            for entry in entries:
                sink.encode(entry.batch)
            encode[sink.name].seconds += time.perf_counter() - started
            encode[sink.name].points += len(points)
            started = time.perf_counter()
            outbox = state.outbox(sink.name)
            with state.transaction():
                outbox.add(entries)
                dropped = outbox.trim(sink.queue_max_points, sink.overflow == "drop_oldest")
            queue[sink.name].seconds += time.perf_counter() - started
            queue[sink.name].points += len(points)
            if dropped or planned.refused:
                raise RuntimeError(f"{sink.name}: points dropped or refused while queueing")
    rss = peak_rss_mb()
    for sink in sinks:
        totals = state.outbox(sink.name).totals()
        queue[sink.name].extra = {"batches": totals.batches, "queued": totals.points}
    return encode, queue, rss


def deliver(sink: DeliverySink, state: StateStore) -> Phase:
    """(c): one `Drainer.drain()` of the whole queue (the budget set far above its need)."""
    queued = state.outbox(sink.name).totals()
    reset_peak_rss()
    started = time.perf_counter()
    result = Drainer(sink, state.outbox(sink.name)).drain()
    seconds = time.perf_counter() - started
    if result.error or state.outbox(sink.name).totals().batches:
        raise RuntimeError(f"{sink.name}: delivery incomplete: {result.error}")
    per_point = SAMPLES_PER_POINT if sink.name == "remote_write" else 1
    return Phase(
        result.points // per_point,
        seconds,
        peak_rss_mb(),
        {"batches": result.batches, "sent": result.points, "queued_before": queued.points},
    )


# --------------------------------------------------------------------------- receivers


def serve_receiver() -> None:
    """`--serve-receiver`: a Pramathus stand-in in its own process. Prints its URL, counts
    accepted points (dropping the recorded bodies as it goes, so memory stays flat), and
    prints the count as JSON when stdin closes."""
    from tests.support.receiver import Receiver

    receiver = Receiver()
    counted = {"points": 0, "requests": 0}
    stop = threading.Event()

    def take() -> None:
        with receiver._lock:  # noqa: SLF001 - the receiver keeps every body otherwise
            taken, receiver.requests = receiver.requests, []
            receiver.arrivals.clear()
        counted["requests"] += len(taken)
        counted["points"] += sum(len(r.body["metrics"]) for r in taken if r.status == 200)

    def count() -> None:
        while not stop.wait(0.2):
            take()

    worker = threading.Thread(target=count, daemon=True)
    worker.start()
    print(receiver.url, flush=True)
    sys.stdin.read()
    stop.set()
    worker.join()
    take()  # what arrived since the worker's last look
    receiver.stop()
    print(json.dumps(counted), flush=True)


@dataclass
class ReceiverProcess:
    proc: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls) -> ReceiverProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_sinks", "--serve-receiver"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert proc.stdout is not None
        return cls(proc, proc.stdout.readline().strip())

    def stop(self) -> dict[str, int]:
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def vm_rows_inserted(vm: servers.Server) -> int:
    text = requests.get(f"{vm.url}/metrics", timeout=10).text
    match = re.search(
        r'^vm_rows_inserted_total\{type="promremotewrite"\} (\d+)', text, re.MULTILINE
    )
    return int(match.group(1)) if match else 0


# --------------------------------------------------------------------------- MLflow


def mlflow_read(runs_sampled: int, workdir: Path) -> dict[str, Any]:
    """The cheapest complete history read of `runs_sampled` seeded runs, measured live
    (bench.bench_incremental's code: one `runs/search`, then bulk-interval per key and 100
    runs)."""
    from bench.bench_incremental import cheapest_reads
    from bench.seed import seed

    experiments = max(1, runs_sampled // 1000)
    seed(workdir / "mlflow.db", workdir / "artifacts", runs_sampled, experiments, steps=STEPS)
    mlflow = servers.start_mlflow(workdir)
    try:
        read = cheapest_reads(mlflow.url, [str(i) for i in range(1, experiments + 1)])
    finally:
        mlflow.stop()
    history = read["complete_history"]
    return {"runs": runs_sampled, **history}


def bench_incremental_20000() -> dict[str, Any]:
    saved = ROOT / "bench" / "results" / "20000.json"
    data = (
        json.loads(saved.read_text()).get("cheapest_complete_history") if saved.exists() else None
    )
    if data:
        return {**data, "source": str(saved.relative_to(ROOT))}
    return dict(README_20000)


# --------------------------------------------------------------------------- main


def measure(points: int, mlflow_runs: int, workdir: Path) -> dict[str, Any]:
    n_runs = max(1, points // (len(METRICS) * STEPS))
    total = n_runs * len(METRICS) * STEPS
    run_ids, contexts, start = runs(n_runs)

    (workdir / "vm").mkdir()
    vm = history_servers.start_victoria_metrics(workdir / "vm")
    receiver = ReceiverProcess.start()
    state = StateStore(workdir / "state")
    try:
        # model_validate: mypy's pydantic plugin does not see these sections' fields as
        # keyword arguments through config.py's `_Section` alias.
        remote_write = RemoteWriteSink(
            RemoteWriteSettings.model_validate(
                {
                    "enabled": True,
                    "url": f"{vm.url}{history_servers.REMOTE_WRITE_PATH}",
                    "delivery_budget_seconds": 3600,
                    "queue_max_samples": max(5_000_000, 2 * total),
                }
            )
        )
        pramathus = PramathusSink(
            PramathusSettings.model_validate(
                {
                    "enabled": True,
                    "endpoint": receiver.url,
                    "api_key": "bench",
                    "delivery_budget_seconds": 3600,
                    "spool_max_points": max(1_000_000, total),
                }
            )
        )
        sinks: list[DeliverySink] = [remote_write, pramathus]
        encode, queue, loop_rss = encode_and_queue(sinks, state, run_ids, contexts, start)
        for phase in (*encode.values(), *queue.values()):
            phase.rss_mb = loop_rss
        state_mb = sum(f.stat().st_size for f in (workdir / "state").iterdir()) / 2**20
        delivered = {sink.name: deliver(sink, state) for sink in sinks}
        history_servers.vm_force_flush(vm)
        vm_rows = vm_rows_inserted(vm)
    finally:
        state.close()
        got = receiver.stop()
        vm.stop()
    if vm_rows != SAMPLES_PER_POINT * total or got["points"] != total:
        raise RuntimeError(f"receivers got {vm_rows} samples and {got['points']} points")

    mlflow: dict[str, Any] | None = None
    if mlflow_runs:
        (workdir / "mlflow").mkdir()
        mlflow = mlflow_read(mlflow_runs, workdir / "mlflow")
        mlflow["extrapolated_seconds"] = mlflow["seconds"] / mlflow["points"] * total
    reference = bench_incremental_20000()

    phases = {
        "remote_write": {
            "encode": encode["remote_write"].row(),
            "queue": queue["remote_write"].row(),
            "deliver": delivered["remote_write"].row(),
        },
        "pramathus": {
            "encode": encode["pramathus"].row(),
            "queue": queue["pramathus"].row(),
            "deliver": delivered["pramathus"].row(),
        },
    }
    return {
        "points": total,
        "runs": n_runs,
        "keys": len(METRICS),
        "steps": STEPS,
        "state_db_mb": round(state_mb, 1),
        "vm_samples_inserted": vm_rows,
        "pramathus_points_received": got["points"],
        "sinks": phases,
        "mlflow_sample": mlflow,
        "mlflow_20000_runs": reference,
    }


def table(r: dict[str, Any]) -> str:
    rows = ["| what | points | seconds | points/s | peak RSS MB |", "|---|---|---|---|---|"]
    for sink, phases in r["sinks"].items():
        for phase, m in phases.items():
            rows.append(
                f"| {sink} {phase} | {m['points']:,} | {m['seconds']:.1f} | "
                f"{m['points_per_second']:,} | {m['peak_rss_mb']} |"
            )
        whole = sum(m["seconds"] for m in phases.values())
        rows.append(
            f"| {sink} all three | {r['points']:,} | {whole:.1f} | "
            f"{round(r['points'] / whole):,} | |"
        )
    sample = r["mlflow_sample"]
    if sample:
        rate = sample["points"] / sample["seconds"]
        rows.append(
            f"| MLflow read, measured on {sample['runs']:,} runs | {sample['points']:,} | "
            f"{sample['seconds']:.1f} | {round(rate):,} | |"
        )
        rows.append(
            f"| MLflow read of {r['points']:,} points, extrapolated | {r['points']:,} | "
            f"{sample['extrapolated_seconds']:.1f} | {round(rate):,} | |"
        )
    ref = r["mlflow_20000_runs"]
    rows.append(
        f"| MLflow read at 20,000 runs ({ref['source']}) | {ref['points']:,} | "
        f"{ref['seconds']:.1f} | {round(ref['points'] / ref['seconds']):,} | |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="points (multiple of 50)")
    parser.add_argument(
        "--mlflow-runs",
        type=int,
        default=2000,
        help="runs of the live MLflow read sample (0: only the recorded 20,000-run figure)",
    )
    parser.add_argument("--serve-receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_receiver:
        serve_receiver()
        return
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-sinks-") as tmp:
        result = measure(args.points, args.mlflow_runs, Path(tmp))
    (out / f"sinks-{result['points']}.json").write_text(json.dumps(result, indent=2))
    print(table(result))


if __name__ == "__main__":
    main()
