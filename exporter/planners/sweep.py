"""The reconcile sweep, decided: a few pages of runs every cycle instead of an hourly spike.

Deltas see new, running, recently ended and settling runs. The sweep walks every run of the
mirrored experiments, oldest first, with a keyset cursor (start time, run id), and catches
what deltas cannot: metrics or tags added to a run that settled long ago, a run imported
with old start and end times, a deletion beyond the deleted-runs probe, a restore after the
settle window. Anything it finds is counted (`mlflow_exporter_reconcile_found_total`).

Pages are spaced in time so that a whole pass takes about `reconcile_interval_seconds`:
one page every reconcile / pages-per-pass, so with many runs and a short interval most
cycles read no page at all (100,000 runs, a 5 s interval, 1 h: a page every 36 s), and a
small store is swept once an interval, not once a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from exporter.model import RunFilter, RunPage, SweepRecord

Key = tuple[int, str]  # (start time or -1, run id): MLflow's order for the sweep


@dataclass(frozen=True, slots=True)
class SweepStep:
    """Where the next page comes from."""

    chunk: Sequence[str]  # experiment ids searched
    where: RunFilter
    page_token: str | None


@dataclass(frozen=True, slots=True)
class SweepAdvance:
    """What one page means: the new cursor, and the key range the page covered (for
    runs the mirror holds in that range but MLflow no longer returned)."""

    record: SweepRecord
    covered_after: Key | None
    covered_upto: Key | None  # None: to the end of the chunk
    pass_completed: bool


def pages_per_cycle(runs: int, page_size: int, interval_s: float, reconcile_s: float) -> int:
    """Pages to read each cycle so a pass over `runs` takes about `reconcile_s` (a whole
    pass every cycle when that is shorter than a cycle, 0 included)."""
    cycles = max(1.0, reconcile_s / max(interval_s, 1.0))
    return max(1, math.ceil(runs / page_size / cycles))


def page_spacing_ms(runs: int, page_size: int, reconcile_s: float) -> float:
    """Time between two pages so that a pass over `runs` takes `reconcile_s`."""
    return reconcile_s * 1000.0 / max(1, math.ceil(runs / page_size))


def pages_due(
    next_page_ms: int | None,
    now_ms: int,
    runs: int,
    page_size: int,
    interval_s: float,
    reconcile_s: float,
) -> int:
    """Pages to read this cycle: those whose time has come, at most a cycle's share past
    the one due (a long pause is not made up in one burst); a whole pass every cycle when
    the reconcile interval is no longer than a cycle."""
    if reconcile_s <= interval_s:
        return pages_per_cycle(runs, page_size, interval_s, reconcile_s)
    if next_page_ms is not None and now_ms < next_page_ms:
        return 0
    spacing = page_spacing_ms(runs, page_size, reconcile_s)
    late = 0.0 if next_page_ms is None else min(now_ms - next_page_ms, interval_s * 1000.0)
    return 1 + int(late // spacing)


def next_page_after(
    next_page_ms: int | None, now_ms: int, pages: int, spacing_ms: float, interval_s: float
) -> int | None:
    """When the page after `pages` read this cycle is due (unchanged when none was read)."""
    if pages == 0:
        return next_page_ms
    base = now_ms if next_page_ms is None else max(next_page_ms, now_ms - interval_s * 1000.0)
    return int(base + pages * spacing_ms)


def chunks(experiment_ids: Sequence[str], size: int) -> list[list[str]]:
    """Experiment ids in sorted chunks of `size` (one empty chunk when there are none)."""
    ids = sorted(experiment_ids)
    return [ids[i : i + size] for i in range(0, len(ids), size)] or [[]]


def next_step(record: SweepRecord, experiment_chunks: Sequence[Sequence[str]]) -> SweepStep:
    """The page the sweep reads next."""
    index = record.chunk if record.chunk < len(experiment_chunks) else 0
    where = RunFilter(started_since_ms=record.after_start_ms)
    return SweepStep(experiment_chunks[index], where, record.page_token)


def key_of(start_time_ms: int | None, run_id: str) -> Key:
    """A run's place in the sweep's order."""
    return (-1 if start_time_ms is None else start_time_ms, run_id)


def advance(
    record: SweepRecord,
    chunk_count: int,
    page: RunPage,
    page_keys: Sequence[Key],
    now_ms: int,
) -> SweepAdvance:
    """Move the cursor past a page of `page_keys` (in MLflow's order)."""
    after = None if record.after_start_ms is None else (record.after_start_ms, record.after_run_id)
    index = record.chunk if record.chunk < chunk_count else 0
    started = record.started_ms if record.started_ms is not None else now_ms
    if page.next_page_token is None:
        # The chunk is done: everything after the cursor was covered.
        last_chunk = index + 1 >= chunk_count
        done = SweepRecord(
            chunk=0 if last_chunk else index + 1,
            started_ms=None if last_chunk else started,
            last_completed_ms=now_ms if last_chunk else record.last_completed_ms,
            passes=record.passes + (1 if last_chunk else 0),
        )
        return SweepAdvance(done, after, None, last_chunk)
    last = page_keys[-1] if page_keys else None
    if last is None:  # an empty page with a token: keep paging the same search
        return SweepAdvance(replace(record, page_token=page.next_page_token), after, after, False)
    if record.after_start_ms is None or last[0] > record.after_start_ms:
        # A keyset step: the next search starts at the last start time seen, and runs at
        # that very millisecond already read are skipped by their run id.
        moved = replace(
            record,
            chunk=index,
            after_start_ms=last[0],
            after_run_id=last[1],
            page_token=None,
            started_ms=started,
        )
    else:
        # A page full of one start time: keyset cannot move, MLflow's offset token can.
        moved = replace(
            record,
            chunk=index,
            after_run_id=last[1],
            page_token=page.next_page_token,
            started_ms=started,
        )
    return SweepAdvance(moved, after, last, False)


def unseen(page_keys: Sequence[Key], record: SweepRecord) -> list[int]:
    """Indexes of the page's runs that lie after the cursor (earlier ones were read)."""
    if record.after_start_ms is None:
        return list(range(len(page_keys)))
    after = (record.after_start_ms, record.after_run_id)
    return [i for i, k in enumerate(page_keys) if k > after]
