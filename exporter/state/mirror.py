"""The mirror: what MLflow holds of the experiments in scope, as of the last cycle.

Experiments, runs with the latest value of each metric key, and the registry. Pushes and
pull scrapes are built from it, never from extra MLflow reads. A run that leaves MLflow's
active view keeps a tombstone (`deleted_ms`) so a restore is recognised; its latest values
go. Writes happen inside the caller's transaction.

Two concerns share its tables and live beside it: when runs are read again
(`schedule.py`: the runs' `pending` and `settle_until_ms`) and which Pushgateway groups must
be pushed again (`push_marks.py`: the experiments' `dirty` and `cut_runs`). The mirror's
writes initialise them where one statement does both: `write_run` sets a run's `pending`
and settle deadline with its data (one write per run on the capture path, hot at 100,000
runs), `tombstone` its settle deadline, and `set_experiments`' upsert marks an experiment
dirty when what its group shows changed; a written or tombstoned run marks its
experiment dirty through `PushMarks`.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from exporter.model import (
    UNFINISHED_STATUSES,
    Experiment,
    KnownRun,
    LatestMetric,
    ModelVersion,
    Registry,
    Run,
    RunContext,
)
from exporter.state.db import CHUNK, qmarks
from exporter.state.push_marks import PushMarks


@dataclass(frozen=True, slots=True)
class RegistryChange:
    changed: bool
    # Runs whose versions (stage, aliases, status) differ now: their series change too.
    runs: frozenset[str] = frozenset()


def _value_in(value: float) -> float | None:
    return None if math.isnan(value) else value  # SQLite keeps NaN as NULL anyway


def _value_out(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]


# The columns of `KnownRun` (the capture schedule reads runs the same way).
KNOWN = (
    "SELECT run_id, experiment_id, fingerprint, status, start_time_ms, settle_until_ms, "
    "deleted_ms FROM run"
)
_RUN = (
    "SELECT run_id, experiment_id, run_name, status, user_id, start_time_ms, end_time_ms, tags "
    "FROM run"
)


class Mirror:
    """Reads and writes of the mirror tables over one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._marks = PushMarks(conn)  # a run written or tombstoned changes its group

    # ------------------------------------------------------------------ experiments

    def set_experiments(self, experiments: Iterable[Experiment], now_ms: int) -> list[str]:
        """Keep exactly these experiments; tombstone the runs of those that went.

        Returns the ids of experiments that left the mirror. A changed name or stage marks
        the experiment's group dirty.
        """
        rows = [
            (e.experiment_id, e.name, e.lifecycle_stage, e.creation_time_ms, e.last_update_time_ms)
            for e in experiments
        ]
        keep = {r[0] for r in rows}
        gone = [i for (i,) in self.conn.execute("SELECT experiment_id FROM experiment")]
        gone = [i for i in gone if i not in keep]
        for exp_id in gone:
            run_ids = [
                r
                for (r,) in self.conn.execute(
                    "SELECT run_id FROM run WHERE experiment_id = ? AND deleted_ms IS NULL",
                    (exp_id,),
                )
            ]
            self.tombstone(run_ids, now_ms, settle_until_ms=0)
            self.conn.execute("DELETE FROM experiment WHERE experiment_id = ?", (exp_id,))
        # The push mark `dirty` (`push_marks.py`) is set in the upsert itself: it compares
        # the old row with the new, which a second statement would have to read again.
        self.conn.executemany(
            "INSERT INTO experiment (experiment_id, name, lifecycle_stage, creation_time_ms, "
            "last_update_time_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (experiment_id) DO UPDATE "
            "SET dirty = dirty OR name IS NOT excluded.name "
            "OR lifecycle_stage IS NOT excluded.lifecycle_stage "
            "OR last_update_time_ms IS NOT excluded.last_update_time_ms, "
            "name = excluded.name, lifecycle_stage = excluded.lifecycle_stage, "
            "last_update_time_ms = excluded.last_update_time_ms",
            rows,
        )
        return gone

    def experiments(self) -> list[Experiment]:
        rows = self.conn.execute(
            "SELECT experiment_id, name, lifecycle_stage, creation_time_ms, last_update_time_ms "
            "FROM experiment ORDER BY experiment_id"
        )
        return [Experiment(*row) for row in rows]

    def unsynced_experiments(self) -> list[str]:
        """Experiments whose runs were never read in full."""
        return [
            i
            for (i,) in self.conn.execute(
                "SELECT experiment_id FROM experiment WHERE synced = 0 ORDER BY experiment_id"
            )
        ]

    def mark_synced(self, experiment_ids: Iterable[str]) -> None:
        self.conn.executemany(
            "UPDATE experiment SET synced = 1 WHERE experiment_id = ?",
            [(i,) for i in experiment_ids],
        )

    # ------------------------------------------------------------------ runs

    def known(self, run_ids: Iterable[str]) -> dict[str, KnownRun]:
        """What the mirror holds of these runs (tombstones included)."""
        ids = sorted(set(run_ids))
        out: dict[str, KnownRun] = {}
        for chunk in _chunks(ids):
            for row in self.conn.execute(f"{KNOWN} WHERE run_id IN ({qmarks(chunk)})", chunk):
                out[row[0]] = KnownRun(*row)
        return out

    def write_run(self, run: Run, settle_until_ms: int, pending: int) -> None:
        """Store a run as read from MLflow (restoring it if it was a tombstone) and mark its
        experiment's group dirty. `pending` and `settle_until_ms` initialise the capture
        schedule's columns in the same statement (`schedule.py`): `pending` says the run's
        histories are due, PENDING_WINDOW from their windows, PENDING_FULL whole."""
        # An upsert, not a REPLACE: the run counts' triggers see an update, not a silent delete.
        self.conn.execute(
            "INSERT INTO run (run_id, experiment_id, run_name, status, user_id, "
            "start_time_ms, end_time_ms, tags, fingerprint, settle_until_ms, deleted_ms, pending) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, ?) ON CONFLICT (run_id) DO UPDATE SET "
            "experiment_id = excluded.experiment_id, run_name = excluded.run_name, "
            "status = excluded.status, user_id = excluded.user_id, "
            "start_time_ms = excluded.start_time_ms, end_time_ms = excluded.end_time_ms, "
            "tags = excluded.tags, fingerprint = excluded.fingerprint, "
            "settle_until_ms = excluded.settle_until_ms, deleted_ms = NULL, "
            "pending = excluded.pending",
            (
                run.run_id,
                run.experiment_id,
                run.run_name,
                run.status,
                run.user_id,
                run.start_time_ms,
                run.end_time_ms,
                json.dumps(dict(run.tags), sort_keys=True),
                run.fingerprint(),
                settle_until_ms,
                pending,
            ),
        )
        self.conn.execute("DELETE FROM latest WHERE run_id = ?", (run.run_id,))
        self.conn.executemany(
            "INSERT OR REPLACE INTO latest (run_id, metric_key, value, step, timestamp_ms) "
            "VALUES (?, ?, ?, ?, ?)",
            [(run.run_id, m.key, _value_in(m.value), m.step, m.timestamp_ms) for m in run.metrics],
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO metric_key (key) VALUES (?)", [(m.key,) for m in run.metrics]
        )
        self._marks.mark_dirty([run.experiment_id])

    def tombstone(self, run_ids: Iterable[str], now_ms: int, settle_until_ms: int) -> list[str]:
        """Mark active runs as gone from MLflow's active view (settling until
        `settle_until_ms`, their groups dirty); returns those that were."""
        gone = []
        for run_id in run_ids:
            row = self.conn.execute(
                "SELECT experiment_id FROM run WHERE run_id = ? AND deleted_ms IS NULL", (run_id,)
            ).fetchone()
            if row is None:
                continue
            self.conn.execute(
                "UPDATE run SET deleted_ms = ?, settle_until_ms = ? WHERE run_id = ?",
                (now_ms, settle_until_ms, run_id),
            )
            self.conn.execute("DELETE FROM latest WHERE run_id = ?", (run_id,))
            self._marks.mark_dirty([row[0]])
            gone.append(run_id)
        return gone

    def active_keys_between(
        self,
        experiment_ids: Sequence[str],
        after: tuple[int, str] | None,
        upto: tuple[int, str] | None,
    ) -> list[str]:
        """Active run ids of these experiments whose (start time, run id) key lies in
        (after, upto]; a missing start time sorts as -1, as MLflow sorts nulls first."""
        key = "(coalesce(start_time_ms, -1), run_id)"
        sql = (
            "SELECT run_id FROM run WHERE deleted_ms IS NULL "  # noqa: S608
            f"AND experiment_id IN ({qmarks(experiment_ids)})"
        )
        args: list[object] = list(experiment_ids)
        if after is not None:
            sql += f" AND {key} > (?, ?)"
            args += list(after)
        if upto is not None:
            sql += f" AND {key} <= (?, ?)"
            args += list(upto)
        return [r for (r,) in self.conn.execute(sql, args)]

    def purge_tombstones(self, before_ms: int) -> list[str]:
        """Forget runs gone from MLflow before `before_ms`; returns their ids."""
        ids = [
            r
            for (r,) in self.conn.execute(
                "SELECT run_id FROM run WHERE deleted_ms IS NOT NULL AND deleted_ms < ?",
                (before_ms,),
            )
        ]
        self.conn.executemany("DELETE FROM run WHERE run_id = ?", [(r,) for r in ids])
        return ids

    def run_count(self) -> int:
        """Active runs (kept by triggers as runs change: no scan)."""
        return int(self.conn.execute("SELECT coalesce(sum(n), 0) FROM run_count").fetchone()[0])

    def run_ids(self) -> Iterator[str]:
        for (run_id,) in self.conn.execute("SELECT run_id FROM run WHERE deleted_ms IS NULL"):
            yield run_id

    def has_prefix_clash(self, run_id: str, length: int) -> bool:
        """Whether another mirrored run shares the first `length` characters of `run_id`."""
        prefix = run_id[:length]
        row = self.conn.execute(
            "SELECT 1 FROM run WHERE run_id >= ? AND run_id < ? AND run_id != ? LIMIT 1",
            (prefix, prefix + "\U0010ffff", run_id),
        ).fetchone()
        return row is not None

    def status_counts(self, experiment_id: str) -> dict[str, int]:
        """Active runs of an experiment by status (kept by triggers: no scan)."""
        rows = self.conn.execute(
            "SELECT status, n FROM run_count WHERE experiment_id = ? AND n != 0", (experiment_id,)
        )
        return {status: int(n) for status, n in rows}

    def last_run_start(self, experiment_id: str) -> int | None:
        row = self.conn.execute(
            "SELECT max(start_time_ms) FROM run WHERE experiment_id = ? AND deleted_ms IS NULL",
            (experiment_id,),
        ).fetchone()
        return None if row[0] is None else int(row[0])

    def runs_for_push(
        self,
        experiment_id: str,
        limit: int,
        ended_since_ms: int | None = None,
        min_runs: int = 0,
    ) -> tuple[list[Run], int]:
        """The runs of an experiment that get per-run series, with their latest metrics, and
        how many active runs are left out (for the groups of the push and the pull view
        alike, `sinks/groups.py`).

        Every unfinished run; of the newest `limit` (0 = all), those among the newest
        `min_runs` or, when `ended_since_ms` is given, ended (or, without an end time,
        started) at or after it; without `ended_since_ms`, all of the newest `limit`.
        """
        sql = (
            f"{_RUN} WHERE experiment_id = ? AND deleted_ms IS NULL "
            "ORDER BY start_time_ms DESC, run_id"
        )
        args: tuple[object, ...] = (experiment_id,)
        if limit:
            sql, args = f"{sql} LIMIT ?", (experiment_id, limit)
        newest = self.conn.execute(sql, args).fetchall()

        def kept(index: int, row: Sequence[object]) -> bool:
            if ended_since_ms is None or index < min_runs or row[3] in UNFINISHED_STATUSES:
                return True
            ended = row[6] if row[6] is not None else row[5]
            return ended is not None and int(str(ended)) >= ended_since_ms

        rows = [r for i, r in enumerate(newest) if kept(i, r)]
        if limit and len(newest) == limit:  # unfinished runs older than the newest `limit`
            seen = {r[0] for r in newest}
            rows += [
                r
                for r in self.conn.execute(
                    f"{_RUN} WHERE experiment_id = ? AND status IN {UNFINISHED_STATUSES} "
                    "AND deleted_ms IS NULL ORDER BY start_time_ms DESC, run_id",
                    (experiment_id,),
                )
                if r[0] not in seen
            ]
        latest = self.latest([str(r[0]) for r in rows])
        total = sum(self.status_counts(experiment_id).values())
        return [_run(r, latest.get(str(r[0]), ())) for r in rows], total - len(rows)

    def latest(self, run_ids: Sequence[str]) -> dict[str, tuple[LatestMetric, ...]]:
        """Latest value of each metric key of these runs, keys in order."""
        out: dict[str, list[LatestMetric]] = {}
        for chunk in _chunks(list(run_ids)):
            rows = self.conn.execute(
                "SELECT run_id, metric_key, value, step, timestamp_ms FROM latest "  # noqa: S608
                f"WHERE run_id IN ({qmarks(chunk)}) ORDER BY run_id, metric_key",
                chunk,
            )
            for run_id, key, value, step, ts in rows:
                out.setdefault(run_id, []).append(LatestMetric(key, _value_out(value), step, ts))
        return {k: tuple(v) for k, v in out.items()}

    def contexts(self, run_ids: Sequence[str]) -> dict[str, RunContext]:
        """Experiment and run metadata of these runs, for sinks' labels and payloads."""
        out: dict[str, RunContext] = {}
        for chunk in _chunks(list(run_ids)):
            rows = self.conn.execute(
                "SELECT r.run_id, r.experiment_id, coalesce(e.name, ''), r.run_name, r.tags "  # noqa: S608
                "FROM run r LEFT JOIN experiment e USING (experiment_id) "
                f"WHERE r.run_id IN ({qmarks(chunk)})",
                chunk,
            )
            for run_id, exp_id, exp_name, run_name, tags in rows:
                out[run_id] = RunContext(exp_id, exp_name, run_name, json.loads(tags))
        return out

    def metric_keys(self) -> list[str]:
        return [k for (k,) in self.conn.execute("SELECT key FROM metric_key ORDER BY key")]

    # ------------------------------------------------------------------ registry

    def registry(self) -> Registry:
        models = tuple(
            n for (n,) in self.conn.execute("SELECT name FROM registered_model ORDER BY name")
        )
        versions = tuple(
            ModelVersion(name, version, run_id, stage, status, tuple(json.loads(aliases)), created)
            for name, version, run_id, stage, status, aliases, created in self.conn.execute(
                "SELECT model_name, version, run_id, stage, status, aliases, creation_time_ms "
                "FROM model_version ORDER BY model_name, CAST(version AS INTEGER), version"
            )
        )
        return Registry(models, versions)

    def set_registry(self, registry: Registry) -> RegistryChange:
        """Store the registry and say what changed: a run's stage labels its series, so the
        groups of runs whose stage moved must be pushed again."""
        old = self.registry()
        if _registry_key(old) == _registry_key(registry):
            return RegistryChange(changed=False)
        self.conn.execute("DELETE FROM registered_model")
        self.conn.executemany(
            "INSERT INTO registered_model (name) VALUES (?)", [(n,) for n in registry.models]
        )
        self.conn.execute("DELETE FROM model_version")
        self.conn.executemany(
            "INSERT OR REPLACE INTO model_version (model_name, version, run_id, stage, status, "
            "aliases, creation_time_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    v.model_name,
                    v.version,
                    v.run_id,
                    v.stage,
                    v.status,
                    json.dumps(list(v.aliases)),
                    v.creation_time_ms,
                )
                for v in registry.versions
            ],
        )
        before, after = _versions_by_run(old), _versions_by_run(registry)
        moved = {r for r in before.keys() | after.keys() if before.get(r) != after.get(r)}
        return RegistryChange(changed=True, runs=frozenset(moved))


def _versions_by_run(registry: Registry) -> dict[str, list[ModelVersion]]:
    out: dict[str, list[ModelVersion]] = {}
    for v in registry.versions:
        if v.run_id:
            out.setdefault(v.run_id, []).append(v)
    return {k: sorted(vs, key=lambda v: (v.model_name, v.version)) for k, vs in out.items()}


def _registry_key(registry: Registry) -> tuple[object, ...]:
    return (
        sorted(registry.models),
        sorted(registry.versions, key=lambda v: (v.model_name, v.version)),
    )


def _run(row: Sequence[object], metrics: tuple[LatestMetric, ...]) -> Run:
    run_id, exp_id, name, status, user, start, end, tags = row
    return Run(
        run_id=str(run_id),
        experiment_id=str(exp_id),
        run_name=str(name),
        status=str(status),
        user_id=str(user),
        start_time_ms=None if start is None else int(str(start)),
        end_time_ms=None if end is None else int(str(end)),
        metrics=metrics,
        tags=json.loads(str(tags)),
    )
