"""Plain data the pipeline passes around: what MLflow holds and what a cycle decided.

The MLflow source produces these, the state stores and returns them, planners take and give
them, sinks consume them. Times are kept as MLflow gives them (milliseconds since the epoch)
and converted at the edges. Everything here is a value without I/O, so planners import only
this module (and `trace_model`, `naming`); `tests/planners/test_imports.py` holds them to it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from exporter.trace_model import BucketSample

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
UNFINISHED_STATUSES = ("RUNNING", "SCHEDULED")
# MLflow's registry stages (deprecated since MLflow 2.9, still widely used); "None" is a stage.
MODEL_STAGES = ("None", "Staging", "Production", "Archived")
LIFECYCLE_STAGES = ("active", "deleted")


@dataclass(frozen=True, slots=True)
class Experiment:
    experiment_id: str
    name: str
    lifecycle_stage: str = "active"
    creation_time_ms: int | None = None
    last_update_time_ms: int | None = None


@dataclass(frozen=True, slots=True)
class LatestMetric:
    """The latest value of one metric key of a run (what `runs/search` returns)."""

    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(frozen=True, slots=True)
class Run:
    run_id: str
    experiment_id: str
    run_name: str
    status: str
    user_id: str
    start_time_ms: int | None
    end_time_ms: int | None
    metrics: tuple[LatestMetric, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    lifecycle_stage: str = "active"

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED_STATUSES

    def fingerprint(self) -> str:
        """A digest of everything exported about the run: equal digests, nothing changed."""
        metrics = sorted(
            (m.key, _value_bits(m.value), m.step, m.timestamp_ms) for m in self.metrics
        )
        body = [
            self.experiment_id,
            self.run_name,
            self.status,
            self.user_id,
            self.start_time_ms,
            self.end_time_ms,
            sorted(self.tags.items()),
            metrics,
        ]
        digest = hashlib.blake2b(json.dumps(body).encode(), digest_size=16)
        return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class ModelVersion:
    model_name: str
    version: str
    run_id: str | None
    stage: str
    status: str
    aliases: tuple[str, ...] = ()
    creation_time_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Registry:
    """Registered model names and every version, as read from MLflow in one cycle."""

    models: tuple[str, ...] = ()
    versions: tuple[ModelVersion, ...] = ()

    def stage_by_run(self) -> dict[str, str]:
        """Registry stage of the model version built from each run (absent: none).

        When several versions point at one run, the most promoted stage wins.
        """
        rank = {"Production": 3, "Staging": 2, "Archived": 1}
        best: dict[str, str] = {}
        for mv in self.versions:
            if not mv.run_id or mv.stage in ("", "None"):
                continue
            if rank.get(mv.stage, 0) >= rank.get(best.get(mv.run_id, ""), -1):
                best[mv.run_id] = mv.stage
        return best

    def run_ids(self) -> set[str]:
        return {mv.run_id for mv in self.versions if mv.run_id}


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One logged value of one metric key of a run.

    Its identity is (run, key, step, timestamp, value): MLflow itself stores a point once per
    identity, and the exporter delivers each identity once to each sink.
    """

    run_id: str
    key: str
    value: float
    step: int
    timestamp_ms: int

    @property
    def identity(self) -> tuple[int, int, int]:
        """(step, timestamp, value bits) within its (run, key) series."""
        return (self.step, self.timestamp_ms, _value_bits(self.value))


@dataclass(frozen=True, slots=True)
class RunContext:
    """What sinks say about a point's run besides the point itself."""

    experiment_id: str
    experiment_name: str
    run_name: str
    tags: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class CapturedBatch:
    """What a sink's queue holds: points (or trace buckets) as captured, in no sink's format.

    Each sink encodes it into a request body when it delivers it (`DeliverySink.encode`),
    so labels decided per cycle (the `run_id` length) are those of the delivering cycle.
    `contexts` holds the runs of its points only; `created_ms` is when it was captured
    (Pramathus' payload timestamp: the same body on every retry). A batch holds points or
    buckets; splitting halves it by time (`delivery.halves`).
    """

    points: tuple[MetricPoint, ...] = ()
    contexts: Mapping[str, RunContext] = field(default_factory=dict)
    buckets: tuple[BucketSample, ...] = ()
    created_ms: int = 0

    @property
    def size(self) -> int:
        """Points and buckets held (what a split can halve)."""
        return len(self.points) + len(self.buckets)


# ------------------------------------------------------------- what a cycle asks of MLflow

RunView = Literal["active", "deleted", "all"]


@dataclass(frozen=True, slots=True)
class RunFilter:
    """Which runs a search returns; the source renders it into MLflow's filter language.

    Conditions combine with AND (MLflow has no OR). Results are ordered by start time and run
    id, oldest first unless `newest_first`.
    """

    started_since_ms: int | None = None
    ended_since_ms: int | None = None
    status: str | None = None
    run_ids: tuple[str, ...] = ()
    view: RunView = "active"
    newest_first: bool = False
    max_results: int | None = None  # runs per page at most (None: `mlflow.page_size`)


@dataclass(frozen=True, slots=True)
class RunPage:
    runs: list[Run]
    next_page_token: str | None


@dataclass(frozen=True, slots=True)
class HistoryRequest:
    """Points of (run, key) with step in [start_step, end_step]; None start: every step."""

    run_id: str
    key: str
    start_step: int | None
    end_step: int


# ------------------------------------------------- what the state remembers between cycles


@dataclass(frozen=True, slots=True)
class KnownRun:
    """What the mirror remembers of a run, to tell what changed."""

    run_id: str
    experiment_id: str
    fingerprint: str
    status: str
    start_time_ms: int | None
    settle_until_ms: int
    deleted_ms: int | None


Identity = tuple[int, int, int]  # step, timestamp ms, value bits


@dataclass(frozen=True, slots=True)
class Series:
    series_id: int
    run_id: str
    key: str
    window_start: int | None  # None: nothing is settled yet, read every step
    floor: int | None = None  # steps below were delivered before this ledger existed

    def read_from(self, whole: bool) -> int | None:
        """First step a read starts at: the floor for a whole read, else the window."""
        if whole or self.window_start is None:
            return self.floor
        return self.window_start if self.floor is None else max(self.window_start, self.floor)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Facts about a series' captured identities that decide where its window goes."""

    settled_top: int | None  # highest step captured before the settle horizon
    recent_low: int | None  # lowest step captured after it
    top: int | None  # highest step captured at all


# --------------------------------------------------------------------------------- records
# Small typed facts, each stored by `state/records.py` as one JSON row named after its
# class: a misspelt field is a type error, not a silent default, and a record that was
# never saved loads as its defaults.


@dataclass(frozen=True, slots=True)
class PushRecord:
    """What the Pushgateway was last left holding, as far as this exporter knows."""

    gateway_start: str | None = None  # the Pushgateway's start time when we last pushed
    # Grouping keys (`GroupKey.labels`, without job) left on the Pushgateway by the last
    # push; None: unknown.
    groups: tuple[tuple[tuple[str, str], ...], ...] | None = None
    last_success_ms: int | None = None
    # Experiments whose runs got per-run series at the last push (`MAX_EXPERIMENTS`).
    selected: tuple[str, ...] | None = None
    # The run window's start at the last push (`series.run_window`): runs ending between it
    # and the next push's start moved across it, and their groups are pushed again.
    window_since_ms: int | None = None
    # Series in each group left on the Pushgateway (experiment id, or "" for the registry).
    series: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True, slots=True)
class RegistryMark:
    """Whether the registry group must be pushed again; kept by the push marks
    (`state/push_marks.py`, `mark_registry_*`) beside the experiments' dirty marks. A fresh
    state starts dirty (nothing pushed yet)."""

    dirty: bool = True


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """The run_id label length in use; it only grows, so a series keeps its identity."""

    run_id_length: int = 0


@dataclass(frozen=True, slots=True)
class CaptureRecord:
    """When MLflow was last read completely enough that deltas can start from it."""

    last_capture_ms: int | None = None
    deleted_experiments: int = 0  # in scope, as of the last read
    active_experiments: int = 0


@dataclass(frozen=True, slots=True)
class SweepRecord:
    """Where the background reconcile sweep is: a keyset cursor over (start time, run id).

    `chunk` indexes the sorted experiment ids in chunks; `page_token` is only used while a
    page is full of runs sharing one start time (MLflow tokens are offsets).
    """

    chunk: int = 0
    after_start_ms: int | None = None
    after_run_id: str = ""
    page_token: str | None = None
    started_ms: int | None = None
    last_completed_ms: int | None = None
    passes: int = 0
    next_page_ms: int | None = None  # when the next page is due (pages are spaced in time)


def _value_bits(value: float) -> int:
    """A float as a signed 64-bit integer, every NaN the same: SQLite keeps NaN as NULL."""
    if math.isnan(value):
        value = math.nan
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def value_from_bits(bits: int) -> float:
    """Inverse of the identity's value bits."""
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])
