"""Bounded waiting and stopping, shared by the integration tests.

Tests wait on what they measure: `poll_until` calls a probe until it answers something truthy
or a bound passes, then fails naming what it waited for and the last answer. `stop_process`
ends a child the way a supervisor would: SIGTERM, then SIGKILL to its process group after a
grace period, every wait bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 30,
    interval: float = 0.2,
    explain: Callable[[], str] | None = None,
) -> T:
    """Call `probe` until it returns something truthy and return that; past `timeout`
    seconds fail with `what`, the last answer and `explain()` (a log tail, say)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f"\n{explain()}" if explain is not None else ""
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r}){detail}")


def stop_process(proc: subprocess.Popen[bytes] | subprocess.Popen[str], grace: float = 15) -> None:
    """SIGTERM to `proc`, then SIGKILL to its process group (or to it alone when it has none
    of its own) if it is still running after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    proc.wait(5)
