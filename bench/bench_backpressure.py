"""Benchmark: a queue bound is backpressure, not loss, at 10,000 runs.

It builds the store of `bench.bench_scale` (10,000 finished runs x 10 keys x 5 steps =
500,000 points, copied by SQL from 1,000 seeded runs in seconds), starts a real lean
`mlflow server --workers 1` and a real HTTP receiver standing in for Pramathus
(`bench.receiver.LeanReceiver`, which counts every point by identity and by the
idempotency key it first came under), all on 127.0.0.1. Then it runs `exporter
export-once` on one state directory with `pramathus.spool_max_points: 100000` (a fifth of
what MLflow holds) again and again, until the receiver holds every point, plus one run
after that which must send nothing. For each run: exit code, wall time, points and
batches received, points still queued in the state, the capture's backpressure lines
(`capture.held_back`: one export-once runs rounds, capture to the bound then delivery,
until MLflow's points are all delivered) and any loss line (`queue.overflow_lost`, which must never
appear under the default `wait` policy).

It passes when every one of the store's points arrived exactly once (no repeat, no point
under two idempotency keys), nothing is left queued, no run logged a loss, and the last
run sent nothing.

Usage: `.venv/bin/python -m bench.bench_backpressure [--runs 10000] [--spool 100000]`
(`--runs 1000 --spool 10000` is a quick try). Results go to
bench/results/backpressure-<runs>.json; one Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path
from typing import Any

from bench.bench_incremental import ROOT, group_cpu
from bench.bench_scale import build_store
from bench.receiver import LeanReceiver
from tests.support import servers

RESULTS = ROOT / "bench" / "results"
MAX_EXPORTS = 30  # bounded: each export-once delivers up to a queue's worth at least


def _queued(state_dir: Path) -> int:
    db = state_dir / "state.db"
    if not db.exists():
        return 0
    with closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT coalesce(sum(points), 0) FROM spool").fetchone()[0])


def _env(mlflow_url: str, receiver_url: str, state_dir: Path, spool: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EXPORT", "MLFLOW_"))}
    config = state_dir.parent / "exporter.yaml"
    # An hour of delivery budget: the point is what the bound does, not the 30 s default.
    config.write_text(f"pramathus:\n  spool_max_points: {spool}\n  delivery_budget_seconds: 3600\n")
    return {
        **env,
        "EXPORTER_CONFIG": str(config),
        "EXPORTER_STATE_DIR": str(state_dir),
        "MLFLOW_TRACKING_URI": mlflow_url,
        "PROMETHEUS_ENABLED": "false",
        "PRAMATHUS_ENABLED": "true",
        "PRAMATHUS_ENDPOINT": receiver_url,
        "PRAMATHUS_API_KEY": "bench-key",
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
    }


def _lines(stderr: str, event: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in stderr.splitlines() if f'"{event}"' in x]


def export_once(env: dict[str, str], receiver: LeanReceiver, mlflow_pid: int) -> dict[str, Any]:
    """One `export-once`: what it sent, what it left queued, what it logged."""
    before = receiver.snapshot()
    cpu0, started = group_cpu(mlflow_pid), time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "export-once"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        timeout=3600,
    )
    after = receiver.snapshot()
    waits = _lines(done.stderr, "queue.full_capture_waits")
    held = _lines(done.stderr, "capture.held_back")
    return {
        "exit": done.returncode,
        "seconds": time.perf_counter() - started,
        "mlflow_cpu_s": group_cpu(mlflow_pid) - cpu0,
        "points": after["points"] - before["points"],
        "new_distinct": after["distinct_points"] - before["distinct_points"],
        "batches": after["batches"] - before["batches"],
        "queued_after": _queued(Path(env["EXPORTER_STATE_DIR"])),
        "capture_waits": len(waits),
        "rounds": len(_lines(done.stderr, "export.next_round")) + 1,
        "held_back_lines": len(held),
        "points_owed": sum(int(w.get("points_owed", 0)) for w in waits),
        "lost_lines": len(_lines(done.stderr, "queue.overflow_lost")),
        "stderr_tail": done.stderr[-600:] if done.returncode != 0 else "",
    }


def measure(n: int, spool: int, workdir: Path) -> dict[str, Any]:
    def say(what: str) -> None:
        print(f"[N={n}] {what}", file=sys.stderr, flush=True)

    experiments = max(1, n // 2000)
    out: dict[str, Any] = {"n": n, "spool_max_points": spool, "experiments": experiments}
    out["store"] = build_store(workdir, n, experiments)
    say(f"store built: {out['store']}")
    expected = out["store"]["points"]
    mlflow = servers.start_mlflow(workdir, workers=1)
    receiver = LeanReceiver(watch_step=-1)
    state_dir = workdir / "state"
    env = _env(mlflow.url, receiver.url, state_dir, spool)
    out["exports"] = []
    started = time.perf_counter()
    try:
        for _ in range(MAX_EXPORTS):
            result = export_once(env, receiver, mlflow.proc.pid)
            out["exports"].append(result)
            say(f"export-once {len(out['exports'])}: {result}")
            if receiver.snapshot()["distinct_points"] >= expected and not result["queued_after"]:
                break
        # One more: everything is delivered, so it must send nothing.
        out["after"] = export_once(env, receiver, mlflow.proc.pid)
        say(f"export-once after the last: {out['after']}")
    finally:
        receiver.stop()
        mlflow.stop()
    out["seconds"] = time.perf_counter() - started
    out["received"] = receiver.snapshot()
    got = out["received"]
    out["passed"] = (
        got["distinct_points"] == expected
        and got["points"] == expected
        and got["repeats_under_new_key"] == 0
        and out["after"]["points"] == 0
        and out["after"]["queued_after"] == 0
        and all(e["lost_lines"] == 0 for e in [*out["exports"], out["after"]])
    )
    return out


def report(r: dict[str, Any]) -> str:
    head = (
        f"{r['n']:,} runs, {r['store']['points']:,} points in MLflow, "
        f"`spool_max_points: {r['spool_max_points']:,}`: "
        f"{'PASSED' if r['passed'] else 'FAILED'} in {r['seconds']:,.0f} s"
    )
    lines = [
        head,
        "",
        (
            "| export-once | exit | seconds | MLflow CPU s | points received | batches | queued "
            "after | left in MLflow only | rounds | capture held back | loss lines |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    received = 0
    for i, e in enumerate([*r["exports"], r["after"]], 1):
        label = str(i) if i <= len(r["exports"]) else f"{i} (after)"
        received += e["new_distinct"]
        left = r["store"]["points"] - received - e["queued_after"]  # not read from MLflow yet
        lines.append(
            f"| {label} | {e['exit']} | {e['seconds']:,.0f} | {e['mlflow_cpu_s']:,.0f} "
            f"| {e['points']:,} | {e['batches']:,} | {e['queued_after']:,} | {left:,} "
            f"| {e.get('rounds', 1)} | {e.get('held_back_lines', e['capture_waits'])} "
            f"| {e['lost_lines']} |"
        )
    got = r["received"]
    tail = (
        f"Received: {got['points']:,} points, {got['distinct_points']:,} distinct, "
        f"{got['repeats']:,} repeats ({got['repeats_under_new_key']:,} under a new "
        f"idempotency key), {got['batches']:,} batches under "
        f"{got['idempotency_keys']:,} idempotency keys."
    )
    return "\n".join([*lines, "", tail])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--spool", type=int, default=100_000)
    parser.add_argument("--report", action="store_true", help="print the table from results")
    args = parser.parse_args()
    path = RESULTS / f"backpressure-{args.runs}.json"
    if args.report:
        print(report(json.loads(path.read_text())))
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"bench-backpressure-{args.runs}-") as tmp:
        result = measure(args.runs, args.spool, Path(tmp))
    path.write_text(json.dumps(result, indent=2))
    print(report(result))
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
