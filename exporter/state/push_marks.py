"""Pushgateway bookkeeping: which groups must be pushed again, and what the last push cut.

Kept beside the mirror's data: the `experiment` table's `dirty` and `cut_runs` columns and
the `RegistryMark` record. The marks have two kinds of writers (`tests/test_ownership.py`):

- set dirty by whoever changes what a group holds: the mirror (`state/mirror.py`: a run
  written or tombstoned; an experiment new, renamed, moved to another stage or updated,
  inside `set_experiments`' upsert, one statement per cycle), the refresh (`refresh.py`: the
  registry changed, or the experiment counts the registry group reports), the label length
  (`labels.py`: a longer `run_id` label changes every group), the trace stage (`traces.py`:
  an experiment's live trace series) and the push stage's `prepare` (an experiment entered
  or left the per-run selection, runs crossed the run window's edge);
- set clean, and `cut_runs` set, only by the push stage (`sinks/push_stage.py`), after the
  groups were pushed.

The reads that decide the push stage's own marks live here too (`activity` for the per-run
selection, `experiments_with_runs_ended_between` for the run window). Writes happen inside
the caller's transaction.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from exporter.model import RegistryMark
from exporter.state import records


class PushMarks:
    """Reads and writes of the push marks over one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def mark_dirty(self, experiment_ids: Iterable[str] | None = None) -> None:
        """Flag experiments (None: all) whose Pushgateway group must be pushed again."""
        if experiment_ids is None:
            self.conn.execute("UPDATE experiment SET dirty = 1")
            return
        self.conn.executemany(
            "UPDATE experiment SET dirty = 1 WHERE experiment_id = ?",
            [(i,) for i in set(experiment_ids)],
        )

    def mark_clean(self, experiment_ids: Iterable[str]) -> None:
        """These experiments' groups were pushed as the mirror holds them now."""
        self.conn.executemany(
            "UPDATE experiment SET dirty = 0 WHERE experiment_id = ?",
            [(i,) for i in experiment_ids],
        )

    def dirty_experiments(self) -> set[str]:
        """Experiments whose group must be pushed again (new ones start dirty)."""
        return {
            i for (i,) in self.conn.execute("SELECT experiment_id FROM experiment WHERE dirty = 1")
        }

    def mark_registry_dirty(self) -> None:
        """Flag the registry group to be pushed again (its counts or run_id labels changed)."""
        records.save(self.conn, RegistryMark(dirty=True))

    def mark_registry_clean(self) -> None:
        """The registry group was pushed as the mirror holds it now."""
        records.save(self.conn, RegistryMark(dirty=False))

    def registry_dirty(self) -> bool:
        """Whether the registry group must be pushed again (True until a first push)."""
        return records.load(self.conn, RegistryMark).dirty

    def set_cut_runs(self, experiment_id: str, cut: int) -> None:
        """Runs of this experiment its pushed group left out of per-run series."""
        self.conn.execute(
            "UPDATE experiment SET cut_runs = ? WHERE experiment_id = ?", (cut, experiment_id)
        )

    def cut_runs(self) -> int:
        """Runs left out of per-run series by `max_runs_per_experiment`, as last pushed."""
        return int(
            self.conn.execute("SELECT coalesce(sum(cut_runs), 0) FROM experiment").fetchone()[0]
        )

    def activity(self) -> dict[str, int]:
        """Per experiment, the newest of its last update and its newest run's start (ms):
        what the per-run selection (`MAX_EXPERIMENTS`) ranks by."""
        rows = self.conn.execute(
            "SELECT e.experiment_id, max(coalesce(e.last_update_time_ms, 0), "
            "coalesce((SELECT max(start_time_ms) FROM run r "
            "WHERE r.experiment_id = e.experiment_id), 0)) FROM experiment e"
        )
        return {i: int(t) for i, t in rows}

    def experiments_with_runs_ended_between(self, low_ms: int, high_ms: int) -> set[str]:
        """Experiments holding a finished active run whose end (its start when it has no
        end time) lies in [low_ms, high_ms): their runs entered or left a series window."""
        rows = self.conn.execute(
            "SELECT DISTINCT experiment_id FROM run "
            "WHERE coalesce(end_time_ms, start_time_ms) >= ? "
            "AND coalesce(end_time_ms, start_time_ms) < ? AND deleted_ms IS NULL",
            (low_ms, high_ms),
        )
        return {i for (i,) in rows}
