"""Change capture, decided: what to ask MLflow for, what changed, which points are new.

Pure functions over plain data; `refresh.py` (the mirror) and `capture.py` (the queues)
execute what they decide. The model behind them (see the README, "How a cycle reads
MLflow"):

- A run *settles* for `settle_ms` after every change the exporter sees (it appeared, its
  metrics, tags, name or status moved, it was deleted or restored). MLflow's own clients
  write late: asynchronous logging lands batches out of order, system metrics and
  autologged scores arrive after the run is marked finished. While a run settles it is
  re-read every cycle and its metric histories are compared point by point with what was
  captured, so late points are caught in whatever order they land.
- A series' read window starts at the highest step that was captured before the settle
  horizon (or the lowest step captured after it, if lower: a lagging writer); before
  anything has settled, every step is read. A run that changes again after it settled (a
  score logged days later, a resumed run re-logging from a checkpoint, a restore) is read
  whole once: points landing below its window are caught then.
- Identities of captured points are kept, so any read range delivers only what is new.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from exporter.model import (
    HistoryRequest,
    Identity,
    KnownRun,
    LatestMetric,
    MetricPoint,
    Run,
    RunFilter,
    Series,
    WindowStats,
)

# The deleted-runs probe reads one page of deleted runs, newest first (MLflow cannot order
# by deletion time, and recent runs are the ones usually deleted). Deletions beyond that
# page are found by the background sweep. The page is short: it comes back every cycle, and
# a server holding thousands of deleted runs would otherwise serialise 1,000 of them each
# time (about 1.8 s of MLflow CPU a cycle).
DELETED_PROBE = RunFilter(view="deleted", newest_first=True, max_results=100)


class Change(enum.Enum):
    NEW = "new"  # never seen (or seen before an upgrade that forgot its fingerprint)
    CHANGED = "changed"
    RESTORED = "restored"  # back in MLflow's active view after it was gone
    UNCHANGED = "unchanged"
    REMOVED = "removed"  # deleted in MLflow (seen through the ALL or DELETED view)


@dataclass(frozen=True, slots=True)
class RunDecision:
    change: Change
    settle_until_ms: int
    whole: bool = False  # a written run's histories are read whole, not from their windows

    @property
    def write(self) -> bool:
        """Store the run in the mirror (its histories become due)."""
        return self.change in (Change.NEW, Change.CHANGED, Change.RESTORED)


def delta_filters(now_ms: int, last_capture_ms: int | None, settle_ms: int) -> list[RunFilter]:
    """The searches of a delta cycle: runs started or ended since the last capture (minus
    a settle window of slack for clock skew and downtime), and every running run.

    "Ended since" is what finds runs created with a start time in the past, such as the
    child runs GridSearchCV's autologging creates with its parent's start time.
    """
    since = min(now_ms, last_capture_ms if last_capture_ms is not None else now_ms) - settle_ms
    return [
        RunFilter(started_since_ms=since),
        RunFilter(status="RUNNING"),
        RunFilter(ended_since_ms=since),
    ]


def recheck_by_id(
    settling: Iterable[KnownRun], unfinished: Iterable[KnownRun], seen: Iterable[str]
) -> list[KnownRun]:
    """Runs to read by id (all views): settling or unfinished ones the searches missed, e.g.
    ended long ago but changed since, deleted, restored, or stopped without an end time."""
    done = set(seen)
    out: dict[str, KnownRun] = {}
    for run in (*settling, *unfinished):
        if run.run_id not in done:
            out[run.run_id] = run
    return sorted(out.values(), key=lambda r: r.run_id)


def decide(run: Run, known: KnownRun | None, now_ms: int, settle_ms: int) -> RunDecision:
    """What a run read from MLflow means for the mirror and the capture."""
    if run.lifecycle_stage == "deleted":
        return RunDecision(Change.REMOVED, now_ms + settle_ms)
    if known is None or not known.fingerprint:
        return RunDecision(Change.NEW, first_settle(run, now_ms, settle_ms))
    rewarmed = known.settle_until_ms <= now_ms  # it had settled: read it whole this once
    if known.deleted_ms is not None:
        return RunDecision(Change.RESTORED, now_ms + settle_ms, whole=rewarmed)
    if known.fingerprint != run.fingerprint():
        return RunDecision(Change.CHANGED, now_ms + settle_ms, whole=rewarmed)
    return RunDecision(Change.UNCHANGED, known.settle_until_ms)


def first_settle(run: Run, now_ms: int, settle_ms: int) -> int:
    """Settle deadline of a run seen for the first time: unfinished runs settle from now,
    finished ones from their end (a run that ended long ago is settled already)."""
    if not run.finished:
        return now_ms + settle_ms
    ended = run.end_time_ms or run.start_time_ms or 0
    return min(now_ms, ended) + settle_ms


def history_requests(
    latest: Mapping[str, Sequence[LatestMetric]],
    series: Mapping[tuple[str, str], Series],
    allowed: Callable[[str], bool],
    whole: Iterable[str] = (),
) -> list[HistoryRequest]:
    """The reads that capture new points of these runs (run id -> latest metrics; runs in
    `whole` are read from their floors), sorted by key then start step so that bulk reads
    of one key and step range can share requests.

    A series whose latest step is below the read's start holds nothing unread (the latest
    step is the highest step MLflow has), so it costs no request.
    """
    whole_runs = set(whole)
    wanted = []
    for run_id, metrics in latest.items():
        for m in metrics:
            s = series.get((run_id, m.key))
            if s is None or not allowed(m.key):
                continue
            start = s.read_from(run_id in whole_runs)
            if start is not None and m.step < start:
                continue
            wanted.append(HistoryRequest(run_id, m.key, start, m.step))
    low = -(2**63)
    return sorted(
        wanted,
        key=lambda w: (w.key, low if w.start_step is None else w.start_step, w.run_id),
    )


def points_bound(wanted: Iterable[HistoryRequest]) -> int:
    """About how many points these reads return at most: one per step in each range (a
    whole read from step 0; steps are usually dense from 0), for progress estimates."""
    return sum(max(0, w.end_step - (w.start_step or 0)) + 1 for w in wanted)


def group_by_key(wanted: Sequence[HistoryRequest], per_request: int) -> list[list[HistoryRequest]]:
    """Cut the (sorted) reads into chunks of one key and at most `per_request` runs."""
    chunks: list[list[HistoryRequest]] = []
    for w in wanted:
        if chunks and chunks[-1][0].key == w.key and len(chunks[-1]) < per_request:
            chunks[-1].append(w)
        else:
            chunks.append([w])
    return chunks


def new_points(
    read: Iterable[MetricPoint], window_start: int | None, captured: set[Identity]
) -> list[MetricPoint]:
    """Points of one series read from MLflow that were not captured before."""
    out = []
    seen = set(captured)
    for p in read:
        if window_start is not None and p.step < window_start:
            continue
        if p.identity in seen:
            continue
        seen.add(p.identity)
        out.append(p)
    return out


def next_window(current: int | None, stats: WindowStats) -> int | None:
    """Where a settling series' read window starts from now on.

    Everything captured after the settle horizon stays inside it, and so does the top step
    captured before it: a point still in flight was logged after the horizon, so (steps
    rising as each writer logs) it lands at or above that step, or near a lagging writer's
    recent low. It may move back when a lagging writer shows up; identities keep such a
    wider read from sending anything twice.
    """
    candidate = stats.settled_top
    if candidate is not None and stats.recent_low is not None:
        candidate = min(candidate, stats.recent_low)
    return current if candidate is None else candidate


def needed_by_backfill(
    read: Iterable[MetricPoint], window_start: int | None, identities: frozenset[Identity]
) -> list[MetricPoint]:
    """Points of a series that a sink registered later must still get: those captured
    before it registered (below the frozen window, or among the frozen identities)."""
    return [
        p
        for p in read
        if (window_start is not None and p.step < window_start) or p.identity in identities
    ]
