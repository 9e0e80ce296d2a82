"""The mirror's half of a capture step: bring it up to date with what MLflow holds.

This module executes; `planners/capture.py`, `planners/sweep.py` and `planners/scope.py`
decide. Each cycle it asks MLflow for:

- the experiment list and the registry (three requests);
- experiments seen for the first time: all their runs;
- the others: runs started or ended since the last capture (less a settle window of
  slack), running runs, one page of deleted runs, and, by id, runs still settling or
  unfinished that those searches did not return;
- a few pages of the background reconcile sweep.

What it decides about each run goes to the mirror (written, tombstoned, purged after the
retention), with the run's history due for `capture.py` to read. Reads of MLflow happen
outside transactions; each batch of writes commits on its own, so a failure part-way keeps
what was done and the rest is redone next cycle. A stop (`StoppedError`) lands between reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from exporter.config import Settings
from exporter.mlflow_source import EXPERIMENTS_PER_SEARCH, MlflowSource, all_runs, runs_by_id
from exporter.model import CaptureRecord, Run, RunFilter, SweepRecord
from exporter.planners import capture as plan
from exporter.planners import sweep
from exporter.planners.scope import in_scope
from exporter.state import StateStore
from exporter.state.schedule import PENDING_FULL, PENDING_WINDOW


class StoppedError(Exception):
    """A stop was requested: what was written stays, the rest waits for the next cycle."""


def stop_if(should_stop: Callable[[], bool]) -> None:
    """Raise `StoppedError` when `should_stop()` says so; called between reads of MLflow."""
    if should_stop():
        raise StoppedError


@dataclass
class Refreshed:
    """What a refresh saw, filled as it goes (a stop part-way keeps what was seen)."""

    experiments: int = 0
    excluded_experiments: int = 0
    changes: dict[str, int] = field(default_factory=dict)  # Change.value -> runs
    reconcile_found: dict[str, int] = field(default_factory=dict)  # what only the sweep saw
    new_run_ids: list[str] = field(default_factory=list)  # runs the mirror did not know
    sweep_completed: bool = False


@dataclass
class Refresh:
    """The mirror brought up to date for one cycle. Collaborators are injected; fakes
    replace any of them. `result` is what `run` saw, also after a `StoppedError`."""

    source: MlflowSource
    state: StateStore
    settings: Settings
    should_stop: Callable[[], bool] = lambda: False
    result: Refreshed = field(default_factory=Refreshed)

    @property
    def _settle_ms(self) -> int:
        return int(self.settings.export.settle_seconds * 1000)

    def run(self, now_ms: int) -> Refreshed:
        """Experiments and scope, the registry, first full reads, the deltas, some sweep
        pages, tombstone retention, then the capture time recorded; raises `MlflowError`
        (what was written so far stays, and is consistent) or `StoppedError`."""
        fresh = self._experiments(now_ms)
        self._registry()
        for exp_id in fresh:
            self._full_read(exp_id, now_ms)
        self._deltas(now_ms, fresh)
        self.result.sweep_completed = self._sweep(now_ms)
        self._retention(now_ms)
        with self.state.transaction():
            record = self.state.load(CaptureRecord)
            self.state.save(
                CaptureRecord(now_ms, record.deleted_experiments, record.active_experiments)
            )
        return self.result

    # ------------------------------------------------------------------ experiments

    def _experiments(self, now_ms: int) -> list[str]:
        scope = in_scope(self.source.experiments(), self.settings.export)
        self.result.experiments = len(scope.active)
        self.result.excluded_experiments = scope.excluded
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

    # ------------------------------------------------------------------ runs

    def _full_read(self, experiment_id: str, now_ms: int) -> None:
        """All active runs of an experiment seen for the first time, page by page."""
        where = RunFilter()
        for page in _pages(self.source, [experiment_id], where):
            self._apply(page, now_ms)
            stop_if(self.should_stop)
        with self.state.transaction():
            self.state.mirror.mark_synced([experiment_id])

    def _deltas(self, now_ms: int, fresh: Sequence[str]) -> None:
        mirror, schedule = self.state.mirror, self.state.schedule
        skip = set(fresh)
        ids = [e.experiment_id for e in mirror.experiments() if e.experiment_id not in skip]
        if not ids:
            return
        last = self.state.load(CaptureRecord).last_capture_ms
        seen: dict[str, Run] = {}
        for where in plan.delta_filters(now_ms, last, self._settle_ms):
            seen.update((r.run_id, r) for r in all_runs(self.source, ids, where))
        deleted = [
            r for page in _pages(self.source, ids, plan.DELETED_PROBE, max_pages=1) for r in page
        ]
        again = plan.recheck_by_id(schedule.settling(now_ms), schedule.unfinished(), seen)
        by_experiment: dict[str, list[str]] = {}
        for k in again:
            by_experiment.setdefault(k.experiment_id, []).append(k.run_id)
        rechecked: list[Run] = []
        for exp_id, run_ids in sorted(by_experiment.items()):
            rechecked.extend(runs_by_id(self.source, [exp_id], run_ids, view="all"))
        # A settling or unfinished run that MLflow does not return at all was purged.
        vanished = {k.run_id for k in again} - {r.run_id for r in rechecked}
        self._apply([*seen.values(), *rechecked], now_ms)
        self._remove([r.run_id for r in deleted], now_ms)
        self._remove(sorted(vanished), now_ms)

    def _apply(self, runs: Sequence[Run], now_ms: int) -> dict[str, int]:
        """Decide and store what these runs read from MLflow mean; returns the changes."""
        mirror = self.state.mirror
        counts: dict[str, int] = {}
        with self.state.transaction():
            known = mirror.known(r.run_id for r in runs)
            for run in runs:
                decision = plan.decide(run, known.get(run.run_id), now_ms, self._settle_ms)
                if decision.change is plan.Change.REMOVED:
                    if mirror.tombstone([run.run_id], now_ms, decision.settle_until_ms):
                        counts["removed"] = counts.get("removed", 0) + 1
                    continue
                if decision.write:
                    pending = PENDING_FULL if decision.whole else PENDING_WINDOW
                    mirror.write_run(run, decision.settle_until_ms, pending)
                    kind = decision.change.value
                    counts[kind] = counts.get(kind, 0) + 1
                if decision.change is plan.Change.NEW:
                    self.result.new_run_ids.append(run.run_id)
        _add(self.result.changes, counts)
        return counts

    def _remove(self, run_ids: Sequence[str], now_ms: int) -> int:
        if not run_ids:
            return 0
        with self.state.transaction():
            gone = self.state.mirror.tombstone(run_ids, now_ms, now_ms + self._settle_ms)
        if gone:
            _add(self.result.changes, {"removed": len(gone)})
        return len(gone)

    # ------------------------------------------------------------------ sweep

    def _sweep(self, now_ms: int) -> bool:
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
        completed, read = self._sweep_pages(pages, chunks, now_ms)
        spacing = sweep.page_spacing_ms(runs, page_size, reconcile)
        after = sweep.next_page_after(due_at, now_ms, read, spacing, interval)
        if after != due_at:
            with self.state.transaction():
                record = self.state.load(SweepRecord)
                self.state.save(replace(record, next_page_ms=after))
        return completed

    def _sweep_pages(
        self, pages: int, experiment_chunks: Sequence[Sequence[str]], now_ms: int
    ) -> tuple[bool, int]:
        """Read up to `pages` pages; (whether a pass completed, pages read)."""
        mirror = self.state.mirror
        for read in range(pages):
            stop_if(self.should_stop)
            record = self.state.load(SweepRecord)
            step = sweep.next_step(record, experiment_chunks)
            page = self.source.runs_page(step.chunk, step.where, step.page_token)
            keys = [sweep.key_of(r.start_time_ms, r.run_id) for r in page.runs]
            fresh_runs = [page.runs[i] for i in sweep.unseen(keys, record)]
            advance = sweep.advance(record, len(experiment_chunks), page, keys, now_ms)
            counts = self._apply(fresh_runs, now_ms)
            returned = {r.run_id for r in page.runs}
            missing = [
                r
                for r in mirror.active_keys_between(
                    step.chunk, advance.covered_after, advance.covered_upto
                )
                if r not in returned
            ]
            removed = self._remove(missing, now_ms)
            found = dict(counts)
            if removed:
                found["removed"] = found.get("removed", 0) + removed
            _add(self.result.reconcile_found, found)
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


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for kind, n in counts.items():
        total[kind] = total.get(kind, 0) + n


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
