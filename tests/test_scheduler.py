"""Unit tests for exporter.scheduler.run_forever with a stand-in runner (no servers).

`FakeRunner` imitates `Runner.run_cycle`: each call takes the next item of a script (a
`CycleResult`, an exception to raise, or a delay to block for) and records when it ran.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog

from exporter import scheduler
from exporter.runner import CycleResult


@dataclass
class FakeRunner:
    """Imitates `Runner.run_cycle`: each call plays the next entry of `script` (a result to
    return, an exception to raise, or seconds to sleep first) and sets `ran`."""

    script: list[Any] = field(default_factory=list)
    calls: int = 0
    ran: threading.Event = field(default_factory=threading.Event)

    def run_cycle(self) -> CycleResult:
        self.calls += 1
        step = self.script.pop(0) if self.script else CycleResult()
        self.ran.set()
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, float):
            time.sleep(step)
            return CycleResult()
        return step


@pytest.fixture(autouse=True)
def _restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def run_until(runner: FakeRunner, stop: threading.Event, done: Any) -> bool:
    """`run_forever` in this (the main) thread, as signal handlers require; a helper thread
    sets `stop` once `done()` holds (or after 5 s)."""

    def stopper() -> None:
        deadline = time.monotonic() + 5
        while not done() and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()

    threading.Thread(target=stopper, daemon=True).start()
    return scheduler.run_forever(runner, 0.05, stop, "http://x:1")  # type: ignore[arg-type]


def wait_for(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("not within the timeout")
        time.sleep(0.01)


def test_cycles_repeat_until_stopped_and_a_finished_cycle_is_reported() -> None:
    runner, stop = FakeRunner(), threading.Event()
    with structlog.testing.capture_logs() as logs:
        finished = run_until(runner, stop, lambda: runner.calls >= 3)
    assert finished
    assert runner.calls >= 3
    ready = [e for e in logs if e["event"] == "exporter.ready"]
    assert len(ready) == 1  # once, after the first successful cycle
    assert ready[0]["readyz"] == "http://x:1/readyz"


def test_a_failing_cycle_is_not_ready_and_a_bug_in_a_cycle_does_not_stop_the_schedule() -> None:
    failed = CycleResult(errors={"mlflow": "down"})
    runner, stop = FakeRunner([failed, RuntimeError("bug")]), threading.Event()
    with structlog.testing.capture_logs() as logs:
        run_until(runner, stop, lambda: runner.calls >= 3)
    events = [e["event"] for e in logs]
    assert "cycle.unrecorded_crash" in events
    assert events.index("exporter.ready") > events.index("cycle.unrecorded_crash")


def test_a_stuck_cycle_is_abandoned_after_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scheduler, "STOP_GRACE_SECONDS", 0.1)
    runner, stop = FakeRunner([2.0]), threading.Event()
    assert run_until(runner, stop, runner.ran.is_set) is False


def test_sigterm_sets_the_stop_event() -> None:
    stop = threading.Event()
    scheduler._install_signal_handlers(stop)
    os.kill(os.getpid(), signal.SIGTERM)
    wait_for(stop.is_set)
