"""Keep the state's mirror of MLflow current, reading only what changed.

A cycle lists experiments (one request), then for experiments already mirrored asks MLflow
only for: runs started since the newest one known, runs now RUNNING, runs that were unfinished
last cycle (by id: they may have ended), and recently deleted runs; plus the registry. An idle
cycle is therefore a handful of requests whatever the number of runs. Experiments seen for the
first time, and every experiment once per `reconcile_interval_seconds`, are read in full, which
catches what deltas cannot see (metrics logged to a finished run, a backdated or restored run).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from exporter.config import ExportSettings
from exporter.mlflow_source import (
    MlflowClient,
    list_experiments,
    read_registry,
    runs_by_id,
    search_runs,
    select_experiments,
)
from exporter.model import ModelVersion
from exporter.state import StateStore

log = structlog.get_logger("exporter.sync")

# The deleted-runs probe reads one page of deleted runs, newest first (MLflow cannot order
# by deletion time; recent runs are the ones usually deleted). Deletions beyond that page
# are caught by the next full reconcile.
DELETED_PROBE_PAGES = 1


@dataclass
class SyncResult:
    experiments: int = 0
    experiments_cut: int = 0
    full_read: int = 0  # experiments read in full this cycle
    runs_changed: int = 0
    runs_removed: int = 0


def sync(
    client: MlflowClient, state: StateStore, export: ExportSettings, now: Callable[[], float]
) -> SyncResult:
    """Bring the mirror up to date; raises `MlflowError` (the mirror is left as it was)."""
    result = SyncResult()
    selected, result.experiments_cut = select_experiments(list_experiments(client), export)
    ids = [e.experiment_id for e in selected]
    result.experiments = len(ids)
    names, versions = read_registry(client)
    last_full = state.get_meta("last_full_sync", 0.0)
    full_due = now() - last_full >= export.reconcile_interval_seconds
    with state.transaction():
        mirror = state.mirror
        mirror.set_experiments(selected)
        known = mirror.synced_experiments()
        fresh = ids if full_due else [i for i in ids if i not in known]
        for exp_id in fresh:
            mirror.drop_runs_of(exp_id)
        result.runs_changed += mirror.upsert_runs(search_runs(client, fresh)) if fresh else 0
        mirror.mark_synced(fresh)
        result.full_read = len(fresh)
        delta = [i for i in ids if i not in fresh]
        if delta:
            _apply_delta(client, state, delta, result)
        if full_due:
            mirror.prune_watermarks()
            state.set_meta("last_full_sync", now())
        registry = _registry_data(names, versions)
        if registry != state.get_meta("registry"):
            # Stages label every run's series: all groups change with the registry.
            mirror.mark_dirty()
            state.set_meta("registry", registry)
            state.set_meta("registry_dirty", True)
    return result


def _apply_delta(
    client: MlflowClient, state: StateStore, ids: Sequence[str], result: SyncResult
) -> None:
    mirror = state.mirror
    newest = mirror.max_start_time(ids)
    # >= rather than >: runs sharing the newest known start millisecond are read again.
    started = list(search_runs(client, ids, f"attributes.start_time >= {newest or 0}"))
    running = list(search_runs(client, ids, "attributes.status = 'RUNNING'"))
    seen = {r.run_id for r in started} | {r.run_id for r in running}
    unfinished = sorted(mirror.unfinished_run_ids(ids) - seen)
    ended = list(runs_by_id(client, ids, unfinished)) if unfinished else []
    deleted = {
        r.run_id
        for r in search_runs(
            client, ids, view="DELETED_ONLY", max_pages=DELETED_PROBE_PAGES, newest_first=True
        )
    }
    vanished = set(unfinished) - {r.run_id for r in ended}  # deleted while running
    result.runs_changed += mirror.upsert_runs(
        r for r in (*started, *running, *ended) if r.run_id not in deleted
    )
    result.runs_removed += mirror.remove_runs(sorted(deleted | vanished))


def _registry_data(names: list[str], versions: list[ModelVersion]) -> dict[str, Any]:
    return {
        "names": names,
        "versions": [
            [v.model_name, v.version, v.run_id, v.stage, v.status, list(v.aliases)]
            for v in versions
        ],
    }


def registry_from_state(state: StateStore) -> tuple[list[str], list[ModelVersion]]:
    """The registry as last read from MLflow."""
    raw = state.get_meta("registry", {"names": [], "versions": []})
    versions = [
        ModelVersion(name, version, run_id, stage, status, tuple(aliases))
        for name, version, run_id, stage, status, aliases in raw["versions"]
    ]
    return raw["names"], versions
