"""One capture step: read what changed in MLflow into the mirror, and new points into queues.

A thin composition of the two halves, in order:

- the sinks registered (or unregistered) with the ledger (`capture.py`);
- the mirror brought up to date from MLflow (`refresh.py`: experiments and scope, the
  registry, first full reads, the deltas, the background sweep, tombstone retention);
- the `run_id` label length decided (`labels.py`), before any point is planned or encoded;
- the histories of due runs queued for every sink, then the backfill of sinks registered
  later (`capture.py`).

Each half executes what the planners decide (`planners/capture.py`, `planners/sweep.py`,
`planners/scope.py`). Reads of MLflow happen outside transactions; each batch of writes
commits on its own, so a failure part-way keeps what was done and the rest is redone next
cycle. A stop requested between reads ends the step with what was done (`stopped`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from exporter.capture import Capture, Captured, OpenTails
from exporter.config import Settings
from exporter.labels import decide_run_id_length
from exporter.mlflow_source import MlflowSource
from exporter.progress import CaptureProgress
from exporter.refresh import Refresh, Refreshed, StoppedError
from exporter.sinks.delivery import DeliverySink
from exporter.state import StateStore


@dataclass
class SyncResult:
    """What one capture step did: the refresh's and the capture's counts, with what the
    mirror and the schedule hold after it (`runs`, `pending`, `settling`)."""

    experiments: int = 0
    excluded_experiments: int = 0
    runs: int = 0
    changes: dict[str, int] = field(default_factory=dict)  # Change.value -> runs
    reconcile_found: dict[str, int] = field(default_factory=dict)  # what only the sweep saw
    points_captured: int = 0
    settling: int = 0
    pending: int = 0
    sweep_completed: bool = False
    backfill_remaining: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # sink -> points dropped by bounds
    waiting: dict[str, int] = field(default_factory=dict)  # sink -> points owed while full
    # Capture stopped reading because every sink's queue was at its bound: runs stay due
    # and are read once delivery drains (the next cycle, or export-once's next round).
    held_back: bool = False
    new_run_ids: list[str] = field(default_factory=list)  # runs the mirror did not know
    labels_decided: bool = False  # the run_id label length was decided before capture
    stopped: bool = False


@dataclass
class Sync:
    """Capture for one cycle. Collaborators are injected; fakes replace any of them."""

    source: MlflowSource
    state: StateStore
    settings: Settings
    sinks: Sequence[DeliverySink]
    clock: Callable[[], float] = time.time
    should_stop: Callable[[], bool] = lambda: False
    progress: CaptureProgress = field(default_factory=CaptureProgress)
    # The sinks' open tails, kept from one `run` of this Sync to the next.
    _tails: OpenTails = field(default_factory=dict, init=False)

    def run(self) -> SyncResult:
        """Bring the mirror and the queues up to date; raises `MlflowError` (what was
        written so far stays, and is consistent)."""
        now_ms = int(self.clock() * 1000)
        refresh = Refresh(self.source, self.state, self.settings, self.should_stop)
        capture = Capture(
            self.source,
            self.state,
            self.settings,
            self.sinks,
            self.clock,
            self.should_stop,
            self.progress,
            self._tails,
        )
        result = SyncResult()
        try:
            capture.register_sinks(now_ms)
            refresh.run(now_ms)
            due = self.state.schedule.capture_due(now_ms)  # newest runs first
            # Before any point is encoded, whatever sinks are on (defect: remote write once
            # encoded a new run's points under the label of another sharing its prefix).
            decide_run_id_length(
                self.state,
                self.settings.prometheus.run_id_length,
                [*refresh.result.new_run_ids, *due],
            )
            result.labels_decided = True
            capture.capture(now_ms, due)
            capture.backfill()
        except StoppedError:
            result.stopped = True
        self._count(result, refresh.result, capture.result, now_ms)
        return result

    def _count(self, result: SyncResult, seen: Refreshed, queued: Captured, now_ms: int) -> None:
        """Fill `result` from what the halves did and what the mirror now holds."""
        result.experiments = seen.experiments
        result.excluded_experiments = seen.excluded_experiments
        result.changes = seen.changes
        result.reconcile_found = seen.reconcile_found
        result.new_run_ids = seen.new_run_ids
        result.sweep_completed = seen.sweep_completed
        result.points_captured = queued.points_captured
        result.backfill_remaining = queued.backfill_remaining
        result.dropped = queued.dropped
        result.waiting = queued.waiting
        result.held_back = queued.held_back
        mirror, schedule = self.state.mirror, self.state.schedule
        result.runs = mirror.run_count()
        result.pending = schedule.pending_count()
        result.settling = sum(1 for r in schedule.settling(now_ms) if r.deleted_ms is None)
