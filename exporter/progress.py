"""How far a capture has gone: runs and points done of the total, rate, time left.

A first export of a large MLflow reads histories for minutes to hours; this is what the
operator sees meanwhile: a `capture.progress` log line every ~10 s, the `progress` object of
`/readyz`'s body, and the `mlflow_exporter_capture_*` gauges. Updated by the cycle thread,
read by the HTTP thread (the view is an immutable snapshot).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

log = structlog.get_logger("exporter.progress")

LOG_EVERY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ProgressView:
    """One moment of a capture. `points_estimated` extrapolates from the runs begun so far
    (each series' latest step bounds how many points it holds): a guide, not a promise."""

    runs_total: int
    runs_done: int
    points_done: int
    points_estimated: int
    elapsed_seconds: float
    finished: bool = False

    @property
    def runs_per_second(self) -> float:
        return self.runs_done / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0

    @property
    def eta_seconds(self) -> float | None:
        """Seconds left at the rate so far (None until a run is done)."""
        if self.finished:
            return 0.0
        rate = self.runs_per_second
        return (self.runs_total - self.runs_done) / rate if rate > 0 else None

    def as_dict(self) -> dict[str, Any]:
        eta = self.eta_seconds
        return {
            "runs_done": self.runs_done,
            "runs_total": self.runs_total,
            "points_done": self.points_done,
            "points_estimated": self.points_estimated,
            "runs_per_second": round(self.runs_per_second, 2),
            "points_per_second": round(self.points_done / self.elapsed_seconds, 1)
            if self.elapsed_seconds > 0
            else 0.0,
            "elapsed_seconds": round(self.elapsed_seconds, 1),
            "eta_seconds": None if eta is None else round(eta, 1),
            "finished": self.finished,
        }


@dataclass
class CaptureProgress:
    """Tracks one capture at a time; `on_change` hears every new view (gauges, health)."""

    clock: Callable[[], float] = time.monotonic
    on_change: Callable[[ProgressView], None] = lambda _view: None
    log_every_seconds: float = LOG_EVERY_SECONDS
    _total: int = 0
    _done: int = 0
    _points: int = 0
    _begun_runs: int = 0
    _begun_points: int = 0
    _started: float = 0.0
    _logged: float = 0.0
    _view: ProgressView | None = field(default=None, repr=False)

    def begin(self, runs_total: int) -> None:
        """A capture of `runs_total` runs' histories starts. After one that ended short of
        its total (held back by full queues, as `export-once`'s rounds are, or failed
        part-way), it continues that one: what was done counts towards the new total, and
        the rate and time left span both, so a long first export shows one total."""
        if self._view is not None and not self._view.finished and self._done:
            self._total = self._done + runs_total
            self._publish(finished=runs_total == 0)
            return
        self._total, self._done, self._points = runs_total, 0, 0
        self._begun_runs = self._begun_points = 0
        self._started = self._logged = self.clock()
        self._publish(finished=runs_total == 0)

    def planned(self, runs: int, points: int) -> None:
        """A block of `runs` runs whose reads are bounded by about `points` points starts."""
        self._begun_runs += runs
        self._begun_points += points

    def advance(self, runs: int, points: int) -> None:
        """`runs` more runs read whole, `points` more new points captured."""
        self._done += runs
        self._points += points
        view = self._publish(finished=False)
        if self.clock() - self._logged >= self.log_every_seconds:
            self._logged = self.clock()
            log.info("capture.progress", **view.as_dict())

    def end(self) -> None:
        """The capture finished (or stopped): the view says where it got to."""
        view = self._publish(finished=self._done >= self._total)
        if view.elapsed_seconds >= self.log_every_seconds:
            log.info("capture.progress", **view.as_dict())

    @property
    def view(self) -> ProgressView | None:
        return self._view

    def _publish(self, finished: bool) -> ProgressView:
        estimated = self._points
        if self._begun_runs:
            per_run = self._begun_points / self._begun_runs
            estimated = max(self._points, round(per_run * self._total))
        self._view = ProgressView(
            runs_total=self._total,
            runs_done=min(self._done, self._total),
            points_done=self._points,
            points_estimated=estimated,
            elapsed_seconds=self.clock() - self._started,
            finished=finished,
        )
        self.on_change(self._view)
        return self._view
