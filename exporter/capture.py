"""The queues' half of a capture step: histories of due runs into every sink's queue.

This module executes; `planners/capture.py` decides (which histories, from which step,
which points are new, how read windows move). After `refresh.py` brought the mirror up to
date, it reads the histories of the runs that changed or are settling, from each series'
read window on, and the whole history of series a sink registered later still needs (its
backfill, a bounded number of series per cycle).

New points go to every registered sink's queue in the same transaction that records them
as captured, planned into batches by the sink and stored as captured (`CapturedBatch`):
each sink encodes them only when it delivers them. A sink's last batch of the cycle, not
full, stays open (`_Tail`): points read later join it. A queue at its bound either waits
(its points are owed and read again once it drains) or drops, as the sink's policy says.
Reads of MLflow happen outside transactions; each batch of writes commits on its own, so a
failure part-way keeps what was done and the rest is redone next cycle.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import structlog

from exporter.config import Settings
from exporter.mlflow_source import BULK_MAX_RUNS, MlflowSource
from exporter.model import CapturedBatch, HistoryRequest, MetricPoint, RunContext, Series
from exporter.planners import capture as plan
from exporter.planners.scope import metric_filter
from exporter.progress import CaptureProgress
from exporter.refresh import stop_if
from exporter.sinks.delivery import DeliverySink, queue_entries
from exporter.state import StateStore

log = structlog.get_logger("exporter.capture")

# Series a new sink's backfill reads per cycle (its first cycles: the whole history).
BACKFILL_SERIES_PER_CYCLE = 2000
# Runs planned together: their latest metrics and series read in one go.
_RUNS_PER_SLICE = BULK_MAX_RUNS * 10


@dataclass
class Captured:
    """What a capture queued, filled as it goes (a stop part-way keeps what was done)."""

    points_captured: int = 0
    backfill_remaining: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # sink -> points dropped by bounds
    waiting: dict[str, int] = field(default_factory=dict)  # sink -> points owed while full
    # Capture stopped reading because every sink's queue was at its bound: runs stay due
    # and are read once delivery drains (the next cycle, or export-once's next round).
    held_back: bool = False


@dataclass(frozen=True)
class _Tail:
    """A sink's last batch queued this cycle, not full: never sent yet, so points captured
    later in the cycle join it (it is planned again with them and queued under a new key)."""

    batch_id: int
    batch: CapturedBatch


# The open tails by sink name; whoever runs captures one after another may keep them.
OpenTails = dict[str, _Tail]


@dataclass
class Capture:
    """Histories into the sinks' queues for one cycle. Collaborators are injected; fakes
    replace any of them. `result` is what was queued, also after a `StoppedError`."""

    source: MlflowSource
    state: StateStore
    settings: Settings
    sinks: Sequence[DeliverySink]
    clock: Callable[[], float] = time.time
    should_stop: Callable[[], bool] = lambda: False
    progress: CaptureProgress = field(default_factory=CaptureProgress)
    tails: OpenTails = field(default_factory=dict)
    result: Captured = field(default_factory=Captured)

    @property
    def _settle_ms(self) -> int:
        return int(self.settings.export.settle_seconds * 1000)

    # ------------------------------------------------------------------ sinks

    def register_sinks(self, now_ms: int) -> None:
        """Register the enabled sinks the ledger does not know (their backfill starts) and
        unregister the others (their queues are dropped, with a warning)."""
        ledger = self.state.ledger
        registered = ledger.sinks()
        enabled = {s.name for s in self.sinks}
        with self.state.transaction():
            for name in sorted(enabled - registered.keys()):
                covered = ledger.register_sink(name, now_ms)
                log.info("sink.registered", sink=name, backfill_series=covered)
            for name in sorted(registered.keys() - enabled):
                ledger.unregister_sink(name)
                dropped = self.state.outbox(name).clear()
                log.warning(
                    "sink.unregistered",
                    sink=name,
                    dropped_batches=dropped.batches,
                    dropped_points=dropped.points,
                )

    # ------------------------------------------------------------------ points

    def capture(self, now_ms: int, due: dict[str, bool]) -> Captured:
        """Read the histories of the due runs (changed or settling, whole when True;
        `CaptureSchedule.capture_due`); queue the new points. Raises `MlflowError` or
        `StoppedError` (what was queued so far stays)."""
        if not self.sinks:
            return self.result  # nothing to deliver to: runs stay pending until a sink is on
        allowed = metric_filter(self.settings.export)
        ordered = list(due)
        self.progress.begin(len(ordered))
        try:
            for start in range(0, len(ordered), _RUNS_PER_SLICE):
                run_ids = ordered[start : start + _RUNS_PER_SLICE]
                self._capture_slice(run_ids, due, allowed, now_ms)
                if self._all_full() and (runs_due := self.state.schedule.pending_count()) > 0:
                    self.result.held_back = True
                    log.info(
                        "capture.held_back",
                        runs_due=runs_due,
                        detail="every sink's queue is at its bound: the rest is read from "
                        "MLflow as delivery drains",
                    )
                    break
        finally:
            self.progress.end()
        return self.result

    def _capture_slice(
        self,
        run_ids: Sequence[str],
        due: dict[str, bool],
        allowed: Callable[[str], bool],
        now_ms: int,
    ) -> None:
        """Plan the history reads of these runs, then read and queue them."""
        mirror, ledger = self.state.mirror, self.state.ledger
        latest = mirror.latest(run_ids)
        with self.state.transaction():
            series = ledger.series((r, m.key) for r, ms in latest.items() for m in ms)
        whole = [r for r in run_ids if due[r]]
        wanted = plan.history_requests(latest, series, allowed, whole)
        remaining: dict[str, int] = dict.fromkeys(run_ids, 0)
        for w in wanted:
            remaining[w.run_id] += 1
        idle = [r for r, n in remaining.items() if n == 0]
        with self.state.transaction():
            self.state.schedule.captured(idle)
        self.progress.planned(len(run_ids), plan.points_bound(wanted))
        self.progress.advance(len(idle), 0)
        chunks = plan.group_by_key(wanted, BULK_MAX_RUNS)
        # Every queue full: reading more would only be read again later; the
        # runs stay due and capture resumes as delivery drains.
        for chunk, read in self._read_histories(chunks, wait=self._all_full):
            new, done = self._record(chunk, read, series, remaining, now_ms)
            self.result.points_captured += new
            self.progress.advance(done, new)

    def _read_histories(
        self,
        chunks: Sequence[Sequence[HistoryRequest]],
        wait: Callable[[], bool] = lambda: False,
    ) -> Iterator[tuple[Sequence[HistoryRequest], list[MetricPoint]]]:
        """Each chunk with its points, in order, with up to `mlflow.concurrency` reads in
        flight (one at a time when it is 1); a stop or an error cancels what is queued, and
        so does `wait()` (queues full: what is not read stays due)."""
        workers = self.settings.mlflow.concurrency
        if workers <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                stop_if(self.should_stop)
                if wait():
                    return
                yield chunk, self.source.histories(chunk)
            return
        pool = ThreadPoolExecutor(workers, thread_name_prefix="mlflow-read")
        try:
            queued: deque[tuple[Sequence[HistoryRequest], Future[list[MetricPoint]]]] = deque()
            pending = iter(chunks)
            for chunk in itertools.islice(pending, workers):
                queued.append((chunk, pool.submit(self.source.histories, chunk)))
            while queued:
                stop_if(self.should_stop)
                if wait():
                    return
                chunk, future = queued.popleft()
                points = future.result()
                following = next(pending, None)
                if following is not None:
                    queued.append((following, pool.submit(self.source.histories, following)))
                yield chunk, points
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _record(
        self,
        chunk: Sequence[HistoryRequest],
        read: Sequence[MetricPoint],
        series: dict[tuple[str, str], Series],
        remaining: dict[str, int],
        now_ms: int,
    ) -> tuple[int, int]:
        """Queue the new points of one read for every sink, record them, move windows;
        (new points, runs whose every series is now read)."""
        ledger, schedule = self.state.ledger, self.state.schedule
        by_series = _by_series(read)
        horizon = now_ms - self._settle_ms
        new: list[MetricPoint] = []
        done_runs = []
        with self.state.transaction():
            for w in chunk:
                s = series[(w.run_id, w.key)]
                known = ledger.identities(s.series_id, w.start_step)
                points = by_series.get((w.run_id, w.key), [])
                fresh = plan.new_points(points, w.start_step, known)
                ledger.record(s.series_id, (p.identity for p in fresh), now_ms)
                stats = ledger.window_stats(s.series_id, horizon)
                ledger.set_window(s.series_id, plan.next_window(s.window_start, stats))
                new.extend(fresh)
                remaining[w.run_id] -= 1
                if remaining[w.run_id] == 0:
                    done_runs.append(w.run_id)
            full = [sink for sink in self.sinks if self._full(sink)]
            if full and new:
                owed = [(series[(p.run_id, p.key)].series_id, p.identity) for p in new]
                waiting = self.result.waiting
                for sink in full:
                    ledger.owe(sink.name, owed)
                    waiting[sink.name] = waiting.get(sink.name, 0) + len(new)
            open_sinks = [sink for sink in self.sinks if sink not in full]
            tails = self._enqueue(open_sinks, new, now_ms)
            schedule.captured(done_runs)
        self._keep_tails(tails)
        return len(new), len(done_runs)

    def _full(self, sink: DeliverySink) -> bool:
        """True when capture for this sink must wait: its queue is at its bound and its
        policy is to wait rather than drop."""
        if sink.overflow != "wait":
            return False
        return self.state.outbox(sink.name).totals().points >= sink.queue_max_points

    def _all_full(self) -> bool:
        return all(self._full(sink) for sink in self.sinks)

    # ------------------------------------------------------------------ queues

    def _keep_tails(self, tails: dict[str, _Tail | None]) -> None:
        """Adopt the open tails of a committed transaction (a rolled back one keeps the
        tails as they were, as the queue does)."""
        for name, tail in tails.items():
            if tail is None:
                self.tails.pop(name, None)
            else:
                self.tails[name] = tail

    def _enqueue(
        self, sinks: Iterable[DeliverySink], points: Sequence[MetricPoint], now_ms: int
    ) -> dict[str, _Tail | None]:
        """Queue points for each sink, joining them to the sink's open tail; returns the
        new tails (to keep once the transaction commits)."""
        tails: dict[str, _Tail | None] = {}
        if not points:
            return tails
        contexts = self.state.mirror.contexts(sorted({p.run_id for p in points}))
        ordered = sorted(points, key=lambda p: (p.run_id, p.key, p.step, p.timestamp_ms))
        for sink in sinks:
            outbox = self.state.outbox(sink.name)
            pending: Sequence[MetricPoint] = ordered
            known: Mapping[str, RunContext] = contexts
            tail = self.tails.get(sink.name)
            if tail is not None and outbox.remove(tail.batch_id):
                pending = [*tail.batch.points, *ordered]
                known = {**tail.batch.contexts, **contexts}
            planned = sink.plan(pending, known, now_ms)
            entries = queue_entries(sink, planned.batches, known, now_ms)
            ids = outbox.add(entries)
            tails[sink.name] = None
            if planned.open_tail and ids:
                tails[sink.name] = _Tail(ids[-1], entries[-1].batch)
            for reason, groups in planned.refused.items():
                for entry in queue_entries(sink, groups, known, now_ms):
                    outbox.set_aside_new(entry, now_ms, reason, f"{sink.name} cannot take these")
            if sink.overflow == "wait":
                continue
            dropped = outbox.trim(sink.queue_max_points, sink.overflow == "drop_oldest")
            if dropped:
                # An opt-in policy: these points are lost for this sink, say so.
                log.warning(
                    "queue.overflow_lost", sink=sink.name, policy=sink.overflow, lost_points=dropped
                )
                self.result.dropped[sink.name] = self.result.dropped.get(sink.name, 0) + dropped
        return tails

    # ------------------------------------------------------------------ backfill

    def backfill(self) -> Captured:
        """Send each later-registered sink what was captured before it registered, up to
        `BACKFILL_SERIES_PER_CYCLE` series a cycle; records what is left per sink."""
        ledger = self.state.ledger
        for sink in self.sinks:
            # A sink with nothing left to backfill is not reported at all.
            if self._full(sink) or self._backfill_sink(sink):
                self.result.backfill_remaining[sink.name] = ledger.backfill_remaining(sink.name)
        return self.result

    def _backfill_sink(self, sink: DeliverySink) -> bool:
        """One cycle's share of a sink's backfill; False when it had none left."""
        ledger, mirror = self.state.ledger, self.state.mirror
        items = {
            (i.series.run_id, i.series.key): i
            for i in ledger.backfill_pending(sink.name, BACKFILL_SERIES_PER_CYCLE)
        }
        if not items:
            return False
        latest = mirror.latest(sorted({run_id for run_id, _ in items}))
        tops = {(r, m.key): m.step for r, ms in latest.items() for m in ms}
        # Series of runs no longer in MLflow's active view have nothing left to read.
        with self.state.transaction():
            ledger.backfill_done(
                sink.name, [i.series.series_id for k, i in items.items() if k not in tops]
            )
        wanted = sorted(
            (HistoryRequest(r, k, None, tops[(r, k)]) for r, k in items if (r, k) in tops),
            key=lambda w: (w.key, w.run_id),
        )
        chunks = plan.group_by_key(wanted, BULK_MAX_RUNS)
        # Past the queue's bound the rest of its backfill waits for it to drain.
        for chunk, read in self._read_histories(chunks, wait=functools.partial(self._full, sink)):
            by_series = _by_series(read)
            needed = [
                p
                for w in chunk
                for p in plan.needed_by_backfill(
                    by_series.get((w.run_id, w.key), []),
                    items[(w.run_id, w.key)].window_start,
                    items[(w.run_id, w.key)].identities,
                )
            ]
            with self.state.transaction():
                tails = self._enqueue([sink], needed, int(self.clock() * 1000))
                ledger.backfill_done(
                    sink.name, [items[(w.run_id, w.key)].series.series_id for w in chunk]
                )
            self._keep_tails(tails)
        return True


def _by_series(points: Iterable[MetricPoint]) -> dict[tuple[str, str], list[MetricPoint]]:
    by_series: dict[tuple[str, str], list[MetricPoint]] = {}
    for p in points:
        by_series.setdefault((p.run_id, p.key), []).append(p)
    return by_series
