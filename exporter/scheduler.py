"""`continuous`: run cycles on an interval until SIGTERM/SIGINT.

APScheduler runs one cycle at a time (`max_instances=1`) and folds missed ticks into one
(`coalesce=True`), so a slow cycle delays the next instead of stacking them up.
"""

from __future__ import annotations

import logging
import signal
import threading
from datetime import UTC, datetime
from typing import Any

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from exporter.runner import Runner

log = structlog.get_logger("exporter.scheduler")

# How long a stop waits for a running cycle before abandoning it. State writes are atomic,
# so abandoning loses nothing; the bound keeps `docker stop` (10 s) from killing us first.
STOP_GRACE_SECONDS = 8.0


def run_forever(
    runner: Runner, interval_seconds: float, stop: threading.Event, address: str | None = None
) -> bool:
    """Run cycles until `stop` is set (the signal handlers set it).

    Logs `exporter.ready` with where to look after the first successful cycle. Returns True
    when the last running cycle finished, False when it had to be abandoned.
    """
    idle = threading.Event()
    idle.set()
    ready = threading.Event()

    def cycle() -> None:
        idle.clear()
        try:
            # The runner records every outcome itself; this guard only keeps a bug in the
            # recording from killing the schedule.
            if runner.run_cycle().ok and not ready.is_set():
                ready.set()
                log.info(
                    "exporter.ready",
                    metrics=address and f"{address}/metrics",
                    readyz=address and f"{address}/readyz",
                )
        except Exception:
            log.exception("cycle.unrecorded_crash")
        finally:
            idle.set()

    # A tick that finds the previous cycle still running is skipped by design (one cycle at a
    # time, missed ticks coalesced); APScheduler would warn about it on every tick.
    logging.getLogger("apscheduler.scheduler").setLevel(logging.ERROR)
    scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)}, timezone=UTC)
    scheduler.add_job(
        cycle,
        "interval",
        seconds=interval_seconds,
        id="export",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
        next_run_time=datetime.now(UTC),
    )
    _install_signal_handlers(stop)
    scheduler.start()
    log.info("scheduler.started", interval_seconds=interval_seconds)
    stop.wait()
    log.info("scheduler.stopping")
    scheduler.shutdown(wait=False)
    finished = idle.wait(STOP_GRACE_SECONDS)
    log.info("scheduler.stopped", cycle_abandoned=not finished)
    return finished


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: Any) -> None:
        log.info("signal.received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
