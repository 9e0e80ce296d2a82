"""Run the exporter CLI in this process: report its own peak RSS on exit and, optionally,
log what every cycle cost.

`ru_maxrss` of a child started from a large parent includes the parent's pages (Linux keeps
the high-water mark across fork and exec), so the benchmark measures from inside instead:
VmHWM in /proc/self/status is this process's own peak after exec. (`continuous` may leave
through `os._exit` when a cycle is abandoned at stop, skipping the atexit report, so the
benchmark reads VmHWM of a continuous process from outside before stopping it.)

With `BENCH_CYCLE_LOG=<path>`, each cycle appends one JSON line when it ends: wall and CPU
seconds (the cycle thread's and the whole process's), MLflow requests (in all and per
endpoint, with the time spent waiting for MLflow), what the capture saw (points captured,
runs settling, sweep pass completed) and the same per stage (experiments, registry, deltas,
sweep, capture, push, ...). The exporter is wrapped at run time; nothing in `exporter/`
knows about it. With `BENCH_PROFILE=<path>` as well, the cycle thread runs under cProfile
and the accumulated stats are written to <path> after every cycle (slow: diagnosis only).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# The capture step's stages, on the halves `exporter.sync.Sync` composes.
REFRESH_STAGES = ("_experiments", "_registry", "_full_read", "_deltas", "_sweep", "_retention")
CAPTURE_STAGES = ("capture", "backfill")
RUNNER_STAGES = ("_prepare_series", "_push", "_deliver")
# Nested inside the stages above; reported on their own as well.
NESTED_REFRESH = {"_apply": "apply (decide and store runs)"}
NESTED_CAPTURE = {"_record": "record (store new points)"}

_cycle: dict[str, Any] | None = None


def _report() -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(f"peak_rss_kb {line.split()[1]}", file=sys.stderr, flush=True)


def _process_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _add(bucket: dict[str, float], wall: float, cpu: float, requests: int) -> None:
    bucket["calls"] = bucket.get("calls", 0) + 1
    bucket["wall_s"] = bucket.get("wall_s", 0.0) + wall
    bucket["cpu_s"] = bucket.get("cpu_s", 0.0) + cpu
    bucket["requests"] = bucket.get("requests", 0) + requests


def _wrap_stage(cls: type, name: str, label: str) -> None:
    original = getattr(cls, name)

    @functools.wraps(original)
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        cycle = _cycle
        if cycle is None:
            return original(self, *args, **kwargs)
        source = self.source
        r0, w0, c0 = source.requests_made, time.perf_counter(), time.thread_time()
        try:
            return original(self, *args, **kwargs)
        finally:
            _add(
                cycle["stages"].setdefault(label, {}),
                time.perf_counter() - w0,
                time.thread_time() - c0,
                source.requests_made - r0,
            )

    setattr(cls, name, wrapped)


def _instrument(log_path: Path, profile_path: str | None) -> None:
    from exporter.capture import Capture
    from exporter.mlflow_source import API, RestSource
    from exporter.refresh import Refresh
    from exporter.runner import Runner
    from exporter.sync import Sync

    for cls, stages, nested in (
        (Refresh, REFRESH_STAGES, NESTED_REFRESH),
        (Capture, CAPTURE_STAGES, NESTED_CAPTURE),
    ):
        for name in stages:
            _wrap_stage(cls, name, name.lstrip("_"))
        for name, label in nested.items():
            _wrap_stage(cls, name, label)
    for name in RUNNER_STAGES:
        _wrap_stage(Runner, name, name.lstrip("_").replace("_", " "))

    call = RestSource.call

    @functools.wraps(call)
    def timed_call(
        self: Any, method: str, endpoint: str, payload: dict[str, Any], api: str = API
    ) -> Any:
        cycle = _cycle
        started = time.perf_counter()
        try:
            return call(self, method, endpoint, payload, api)
        finally:
            if cycle is not None:
                bucket = cycle["endpoints"].setdefault(endpoint, {"calls": 0, "wall_s": 0.0})
                bucket["calls"] += 1
                bucket["wall_s"] += time.perf_counter() - started

    RestSource.call = timed_call  # type: ignore[method-assign]

    run = Sync.run

    @functools.wraps(run)
    def sync_run(self: Any) -> Any:
        result = run(self)
        if _cycle is not None:
            _cycle["sync"] = {
                "points_captured": result.points_captured,
                "settling": result.settling,
                "pending": result.pending,
                "runs": result.runs,
                "changes": dict(result.changes),
                "reconcile_found": dict(result.reconcile_found),
                "sweep_completed": result.sweep_completed,
            }
        return result

    Sync.run = sync_run  # type: ignore[method-assign]

    profiler = None
    if profile_path:
        import cProfile

        profiler = cProfile.Profile()

    run_cycle = Runner.run_cycle

    @functools.wraps(run_cycle)
    def logged_cycle(self: Any) -> Any:
        global _cycle
        cycle: dict[str, Any] = {"stages": {}, "endpoints": {}}
        _cycle = cycle
        r0 = self.source.requests_made
        started_at = time.time()
        w0, c0, p0 = time.perf_counter(), time.thread_time(), _process_cpu()
        if profiler is not None:
            profiler.enable()
        try:
            result = run_cycle(self)
        finally:
            if profiler is not None:
                profiler.disable()
            _cycle = None
        cycle.update(
            started=started_at,
            wall_s=time.perf_counter() - w0,
            thread_cpu_s=time.thread_time() - c0,
            process_cpu_s=_process_cpu() - p0,
            requests=self.source.requests_made - r0,
            ok=result.ok,
            sent=dict(result.sent),
            pushed_series=result.pushed_series,
            vm_hwm_kb=_vm_hwm_kb(),
        )
        with log_path.open("a") as f:
            f.write(json.dumps(cycle) + "\n")
        if profiler is not None and profile_path:
            profiler.dump_stats(profile_path)
        return result

    Runner.run_cycle = logged_cycle  # type: ignore[method-assign]


def _vm_hwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


if __name__ == "__main__":
    atexit.register(_report)
    if log := os.environ.get("BENCH_CYCLE_LOG"):
        _instrument(Path(log), os.environ.get("BENCH_PROFILE"))
    from exporter.cli import main

    main(sys.argv[1:])
