"""The last cycle's outcome, shared between the cycle thread and the HTTP thread.

`/healthz` shows it (200 while cycles succeed, 503 with the reason when one failed or
crashed), `/readyz` says whether a cycle has succeeded since start, `/livez` whether the
process serves HTTP at all.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from exporter.logs import redact

# degraded: cycles succeed, but something waits for an operator (points set aside).
Status = Literal["starting", "ok", "degraded", "failing", "crashed"]


@dataclass(frozen=True, slots=True)
class HealthView:
    status: Status
    reason: str
    ready: bool

    @property
    def healthy(self) -> bool:
        return self.status in ("starting", "ok", "degraded")


@dataclass
class Health:
    """Thread-safe holder of the last outcome; secrets are masked out of reasons."""

    secrets: list[str] = field(default_factory=list)
    _view: HealthView = HealthView("starting", "starting", ready=False)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _progress: dict[str, Any] | None = None

    def set_progress(self, progress: dict[str, Any]) -> None:
        """The running (or last) capture's progress, shown in `/readyz`'s body."""
        with self._lock:
            self._progress = dict(progress)

    def progress(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._progress is None else dict(self._progress)

    def set(self, status: Status, reason: str) -> None:
        reason = redact(reason, self.secrets)
        with self._lock:
            ready = self._view.ready or status in ("ok", "degraded")
            self._view = HealthView(status, reason, ready)

    def view(self) -> HealthView:
        with self._lock:
            return self._view
