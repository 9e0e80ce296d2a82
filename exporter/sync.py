"""One capture step: read what changed in MLflow into the mirror, and new points into queues.

This module executes; `planners/capture.py`, `planners/sweep.py` and `planners/scope.py`
decide. Each cycle it asks MLflow for:

- the experiment list and the registry (three requests);
- experiments seen for the first time: all their runs;
- the others: runs started or ended since the last capture (less a settle window of
  slack), running runs, one page of deleted runs, and, by id, runs still settling or
  unfinished that those searches did not return;
- a few pages of the background reconcile sweep;
- the histories of runs that changed or are settling, from each series' read window on.

New points go to every registered sink's queue in the same transaction that records them
as captured, planned into batches by the sink and stored as captured (`CapturedBatch`):
each sink encodes them only when it delivers them. Reads of MLflow happen outside
transactions; each batch of writes commits on its own, so a failure part-way keeps what
was done and the rest is redone next cycle.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import structlog

from exporter.config import Settings
from exporter.labels import decide_run_id_length
from exporter.mlflow_source import (
    BULK_MAX_RUNS,
    EXPERIMENTS_PER_SEARCH,
    MlflowSource,
    all_runs,
    runs_by_id,
)
from exporter.model import (
    CapturedBatch,
    CaptureRecord,
    HistoryRequest,
    MetricPoint,
    Run,
    RunContext,
    RunFilter,
    Series,
    SweepRecord,
)
from exporter.planners import capture, sweep
from exporter.planners.scope import in_scope, metric_filter
from exporter.progress import CaptureProgress
from exporter.sinks.delivery import DeliverySink, queue_entries
from exporter.state import StateStore
from exporter.state.schedule import PENDING_FULL, PENDING_WINDOW

log = structlog.get_logger("exporter.sync")

# Series a new sink's backfill reads per cycle (its first cycles: the whole history).
BACKFILL_SERIES_PER_CYCLE = 2000


@dataclass
class SyncResult:
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


class _StoppedError(Exception):
    """A stop was requested: what was written stays, the rest waits for the next cycle."""


@dataclass(frozen=True)
class _Tail:
    """A sink's last batch queued this cycle, not full: never sent yet, so points captured
    later in the cycle join it (it is planned again with them and queued under a new key)."""

    batch_id: int
    batch: CapturedBatch


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
    _tails: dict[str, _Tail] = field(default_factory=dict, init=False)

    @property
    def _settle_ms(self) -> int:
        return int(self.settings.export.settle_seconds * 1000)

    def run(self) -> SyncResult:
        """Bring the mirror and the queues up to date; raises `MlflowError` (what was
        written so far stays, and is consistent)."""
        now_ms = int(self.clock() * 1000)
        result = SyncResult()
        try:
            self._register_sinks(now_ms)
            fresh = self._experiments(now_ms, result)
            self._registry()
            for exp_id in fresh:
                self._full_read(exp_id, now_ms, result)
            self._deltas(now_ms, fresh, result)
            result.sweep_completed = self._sweep(now_ms, result)
            self._retention(now_ms)
            with self.state.transaction():
                record = self.state.load(CaptureRecord)
                self.state.save(
                    CaptureRecord(now_ms, record.deleted_experiments, record.active_experiments)
                )
            due = self.state.schedule.capture_due(now_ms)  # newest runs first
            # Before any point is encoded, whatever sinks are on (defect: remote write once
            # encoded a new run's points under the label of another sharing its prefix).
            decide_run_id_length(
                self.state, self.settings.prometheus.run_id_length, [*result.new_run_ids, *due]
            )
            result.labels_decided = True
            self._capture(now_ms, due, result)
            self._backfill(result)
        except _StoppedError:
            result.stopped = True
        mirror, schedule = self.state.mirror, self.state.schedule
        result.runs = mirror.run_count()
        result.pending = schedule.pending_count()
        result.settling = sum(1 for r in schedule.settling(now_ms) if r.deleted_ms is None)
        return result

    def _check_stop(self) -> None:
        if self.should_stop():
            raise _StoppedError

    # ------------------------------------------------------------------ sinks

    def _register_sinks(self, now_ms: int) -> None:
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

    # ------------------------------------------------------------------ runs

    def _experiments(self, now_ms: int, result: SyncResult) -> list[str]:
        scope = in_scope(self.source.experiments(), self.settings.export)
        result.experiments = len(scope.active)
        result.excluded_experiments = scope.excluded
        mirror = self.state.mirror
        with self.state.transaction():
            gone = mirror.set_experiments(scope.active, now_ms)
            record = self.state.load(CaptureRecord)
            self.state.save(
                CaptureRecord(
                    record.last_capture_ms, scope.counts["deleted"], scope.counts["active"]
                )
            )
            counts = (scope.counts["deleted"], scope.counts["active"])
            if gone or (record.deleted_experiments, record.active_experiments) != counts:
                self.state.push_marks.mark_registry_dirty()
        return mirror.unsynced_experiments()

    def _registry(self) -> None:
        registry = self.source.registry()
        mirror = self.state.mirror
        with self.state.transaction():
            change = mirror.set_registry(registry)
            if change.changed:
                known = mirror.known(change.runs)
                self.state.push_marks.mark_dirty(k.experiment_id for k in known.values())
                self.state.push_marks.mark_registry_dirty()

    def _full_read(self, experiment_id: str, now_ms: int, result: SyncResult) -> None:
        """All active runs of an experiment seen for the first time, page by page."""
        where = RunFilter()
        for page in _pages(self.source, [experiment_id], where):
            self._apply(page, now_ms, result)
            self._check_stop()
        with self.state.transaction():
            self.state.mirror.mark_synced([experiment_id])

    def _deltas(self, now_ms: int, fresh: Sequence[str], result: SyncResult) -> None:
        mirror, schedule = self.state.mirror, self.state.schedule
        skip = set(fresh)
        ids = [e.experiment_id for e in mirror.experiments() if e.experiment_id not in skip]
        if not ids:
            return
        last = self.state.load(CaptureRecord).last_capture_ms
        seen: dict[str, Run] = {}
        for where in capture.delta_filters(now_ms, last, self._settle_ms):
            seen.update((r.run_id, r) for r in all_runs(self.source, ids, where))
        deleted = [
            r for page in _pages(self.source, ids, capture.DELETED_PROBE, max_pages=1) for r in page
        ]
        again = capture.recheck_by_id(schedule.settling(now_ms), schedule.unfinished(), seen)
        by_experiment: dict[str, list[str]] = {}
        for k in again:
            by_experiment.setdefault(k.experiment_id, []).append(k.run_id)
        rechecked: list[Run] = []
        for exp_id, run_ids in sorted(by_experiment.items()):
            rechecked.extend(runs_by_id(self.source, [exp_id], run_ids, view="all"))
        # A settling or unfinished run that MLflow does not return at all was purged.
        vanished = {k.run_id for k in again} - {r.run_id for r in rechecked}
        self._apply([*seen.values(), *rechecked], now_ms, result)
        self._remove([r.run_id for r in deleted], now_ms, result)
        self._remove(sorted(vanished), now_ms, result)

    def _apply(self, runs: Sequence[Run], now_ms: int, result: SyncResult) -> dict[str, int]:
        """Decide and store what these runs read from MLflow mean; returns the changes."""
        mirror = self.state.mirror
        counts: dict[str, int] = {}
        with self.state.transaction():
            known = mirror.known(r.run_id for r in runs)
            for run in runs:
                decision = capture.decide(run, known.get(run.run_id), now_ms, self._settle_ms)
                if decision.change is capture.Change.REMOVED:
                    if mirror.tombstone([run.run_id], now_ms, decision.settle_until_ms):
                        counts["removed"] = counts.get("removed", 0) + 1
                    continue
                if decision.write:
                    pending = PENDING_FULL if decision.whole else PENDING_WINDOW
                    mirror.write_run(run, decision.settle_until_ms, pending)
                    kind = decision.change.value
                    counts[kind] = counts.get(kind, 0) + 1
                if decision.change is capture.Change.NEW:
                    result.new_run_ids.append(run.run_id)
        for kind, n in counts.items():
            result.changes[kind] = result.changes.get(kind, 0) + n
        return counts

    def _remove(self, run_ids: Sequence[str], now_ms: int, result: SyncResult) -> int:
        if not run_ids:
            return 0
        with self.state.transaction():
            gone = self.state.mirror.tombstone(run_ids, now_ms, now_ms + self._settle_ms)
        if gone:
            result.changes["removed"] = result.changes.get("removed", 0) + len(gone)
        return len(gone)

    def _sweep(self, now_ms: int, result: SyncResult) -> bool:
        """A few pages of the background reconcile; True when a pass completed."""
        mirror = self.state.mirror
        ids = [e.experiment_id for e in mirror.experiments()]
        if not ids:
            return False
        export, page_size = self.settings.export, self.settings.mlflow.page_size
        runs = mirror.run_count()  # kept by triggers: no scan
        due_at = self.state.load(SweepRecord).next_page_ms
        interval, reconcile = export.interval_seconds, export.reconcile_interval_seconds
        pages = sweep.pages_due(due_at, now_ms, runs, page_size, interval, reconcile)
        chunks = sweep.chunks(ids, EXPERIMENTS_PER_SEARCH)
        completed, read = self._sweep_pages(pages, chunks, now_ms, result)
        spacing = sweep.page_spacing_ms(runs, page_size, reconcile)
        after = sweep.next_page_after(due_at, now_ms, read, spacing, interval)
        if after != due_at:
            with self.state.transaction():
                record = self.state.load(SweepRecord)
                self.state.save(replace(record, next_page_ms=after))
        return completed

    def _sweep_pages(
        self,
        pages: int,
        experiment_chunks: Sequence[Sequence[str]],
        now_ms: int,
        result: SyncResult,
    ) -> tuple[bool, int]:
        """Read up to `pages` pages; (whether a pass completed, pages read)."""
        mirror = self.state.mirror
        for read in range(pages):
            self._check_stop()
            record = self.state.load(SweepRecord)
            step = sweep.next_step(record, experiment_chunks)
            page = self.source.runs_page(step.chunk, step.where, step.page_token)
            keys = [sweep.key_of(r.start_time_ms, r.run_id) for r in page.runs]
            fresh_runs = [page.runs[i] for i in sweep.unseen(keys, record)]
            advance = sweep.advance(record, len(experiment_chunks), page, keys, now_ms)
            counts = self._apply(fresh_runs, now_ms, result)
            returned = {r.run_id for r in page.runs}
            missing = [
                r
                for r in mirror.active_keys_between(
                    step.chunk, advance.covered_after, advance.covered_upto
                )
                if r not in returned
            ]
            removed = self._remove(missing, now_ms, result)
            found = dict(counts)
            if removed:
                found["removed"] = found.get("removed", 0) + removed
            for kind, n in found.items():
                result.reconcile_found[kind] = result.reconcile_found.get(kind, 0) + n
            with self.state.transaction():
                self.state.save(replace(advance.record, next_page_ms=record.next_page_ms))
            if advance.pass_completed:
                return True, read + 1
        return False, pages

    def _retention(self, now_ms: int) -> None:
        before = now_ms - int(self.settings.export.deleted_retention_seconds * 1000)
        with self.state.transaction():
            purged = self.state.mirror.purge_tombstones(before)
            if purged:
                self.state.ledger.forget_runs(purged)

    # ------------------------------------------------------------------ points

    def _capture(self, now_ms: int, due: dict[str, bool], result: SyncResult) -> None:
        """Read the histories of the due runs (changed or settling; `CaptureSchedule.capture_due`);
        queue the new points."""
        if not self.sinks:
            return  # nothing to deliver to: runs stay pending until a sink is enabled
        mirror, ledger = self.state.mirror, self.state.ledger
        allowed = metric_filter(self.settings.export)
        ordered = list(due)
        self.progress.begin(len(ordered))
        try:
            for start in range(0, len(ordered), BULK_MAX_RUNS * 10):
                run_ids = ordered[start : start + BULK_MAX_RUNS * 10]
                latest = mirror.latest(run_ids)
                with self.state.transaction():
                    series = ledger.series((r, m.key) for r, ms in latest.items() for m in ms)
                whole = [r for r in run_ids if due[r]]
                wanted = capture.history_requests(latest, series, allowed, whole)
                remaining: dict[str, int] = dict.fromkeys(run_ids, 0)
                for w in wanted:
                    remaining[w.run_id] += 1
                idle = [r for r, n in remaining.items() if n == 0]
                with self.state.transaction():
                    self.state.schedule.captured(idle)
                self.progress.planned(len(run_ids), capture.points_bound(wanted))
                self.progress.advance(len(idle), 0)
                chunks = capture.group_by_key(wanted, BULK_MAX_RUNS)
                # Every queue full: reading more would only be read again later; the
                # runs stay due and capture resumes as delivery drains.
                for chunk, read in self._read_histories(chunks, wait=self._all_full):
                    new, done = self._record(chunk, read, series, remaining, now_ms, result)
                    result.points_captured += new
                    self.progress.advance(done, new)
                if self._all_full() and (runs_due := self.state.schedule.pending_count()) > 0:
                    result.held_back = True
                    log.info(
                        "capture.held_back",
                        runs_due=runs_due,
                        detail="every sink's queue is at its bound: the rest is read from "
                        "MLflow as delivery drains",
                    )
                    return
        finally:
            self.progress.end()

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
                self._check_stop()
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
                self._check_stop()
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
        result: SyncResult,
    ) -> tuple[int, int]:
        """Queue the new points of one read for every sink, record them, move windows;
        (new points, runs whose every series is now read)."""
        ledger, schedule = self.state.ledger, self.state.schedule
        by_series: dict[tuple[str, str], list[MetricPoint]] = {}
        for p in read:
            by_series.setdefault((p.run_id, p.key), []).append(p)
        horizon = now_ms - self._settle_ms
        new: list[MetricPoint] = []
        done_runs = []
        with self.state.transaction():
            for w in chunk:
                s = series[(w.run_id, w.key)]
                known = ledger.identities(s.series_id, w.start_step)
                points = by_series.get((w.run_id, w.key), [])
                fresh = capture.new_points(points, w.start_step, known)
                ledger.record(s.series_id, (p.identity for p in fresh), now_ms)
                stats = ledger.window_stats(s.series_id, horizon)
                ledger.set_window(s.series_id, capture.next_window(s.window_start, stats))
                new.extend(fresh)
                remaining[w.run_id] -= 1
                if remaining[w.run_id] == 0:
                    done_runs.append(w.run_id)
            full = [sink for sink in self.sinks if self._full(sink)]
            if full and new:
                owed = [(series[(p.run_id, p.key)].series_id, p.identity) for p in new]
                for sink in full:
                    ledger.owe(sink.name, owed)
                    result.waiting[sink.name] = result.waiting.get(sink.name, 0) + len(new)
            open_sinks = [sink for sink in self.sinks if sink not in full]
            tails = self._enqueue(open_sinks, new, now_ms, result)
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

    def _keep_tails(self, tails: dict[str, _Tail | None]) -> None:
        """Adopt the open tails of a committed transaction (a rolled back one keeps the
        tails as they were, as the queue does)."""
        for name, tail in tails.items():
            if tail is None:
                self._tails.pop(name, None)
            else:
                self._tails[name] = tail

    def _enqueue(
        self,
        sinks: Iterable[DeliverySink],
        points: Sequence[MetricPoint],
        now_ms: int,
        result: SyncResult,
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
            tail = self._tails.get(sink.name)
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
                result.dropped[sink.name] = result.dropped.get(sink.name, 0) + dropped
        return tails

    def _backfill(self, result: SyncResult) -> None:
        """Send a later-registered sink what was captured before it registered."""
        ledger, mirror = self.state.ledger, self.state.mirror
        for sink in self.sinks:
            if self._full(sink):
                result.backfill_remaining[sink.name] = ledger.backfill_remaining(sink.name)
                continue
            items = {
                (i.series.run_id, i.series.key): i
                for i in ledger.backfill_pending(sink.name, BACKFILL_SERIES_PER_CYCLE)
            }
            if not items:
                continue
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
            chunks = capture.group_by_key(wanted, BULK_MAX_RUNS)
            # Past the queue's bound the rest of its backfill waits for it to drain.
            for chunk, read in self._read_histories(
                chunks, wait=functools.partial(self._full, sink)
            ):
                by_series: dict[tuple[str, str], list[MetricPoint]] = {}
                for p in read:
                    by_series.setdefault((p.run_id, p.key), []).append(p)
                needed = [
                    p
                    for w in chunk
                    for p in capture.needed_by_backfill(
                        by_series.get((w.run_id, w.key), []),
                        items[(w.run_id, w.key)].window_start,
                        items[(w.run_id, w.key)].identities,
                    )
                ]
                with self.state.transaction():
                    tails = self._enqueue([sink], needed, int(self.clock() * 1000), result)
                    ledger.backfill_done(
                        sink.name, [items[(w.run_id, w.key)].series.series_id for w in chunk]
                    )
                self._keep_tails(tails)
            result.backfill_remaining[sink.name] = ledger.backfill_remaining(sink.name)


def _pages(
    source: MlflowSource,
    experiment_ids: Sequence[str],
    where: RunFilter,
    max_pages: int | None = None,
) -> Iterable[list[Run]]:
    """Pages of runs, experiments in chunks, up to `max_pages` pages per chunk."""
    for start in range(0, len(experiment_ids), EXPERIMENTS_PER_SEARCH):
        chunk = experiment_ids[start : start + EXPERIMENTS_PER_SEARCH]
        token: str | None = None
        pages = 0
        while True:
            page = source.runs_page(chunk, where, token)
            yield page.runs
            pages += 1
            token = page.next_page_token
            if not token or (max_pages is not None and pages >= max_pages):
                break
