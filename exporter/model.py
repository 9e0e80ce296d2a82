"""Plain data the pipeline passes around: what MLflow holds and what a cycle decided.

The MLflow source produces these, the state stores and returns them, planners take and give
them, sinks consume them. Times are kept as MLflow gives them (milliseconds since the epoch)
and converted at the edges.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

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


def _value_bits(value: float) -> int:
    """A float as a signed 64-bit integer, every NaN the same: SQLite keeps NaN as NULL."""
    if math.isnan(value):
        value = math.nan
    return int(struct.unpack("<q", struct.pack("<d", value))[0])


def value_from_bits(bits: int) -> float:
    """Inverse of the identity's value bits."""
    return float(struct.unpack("<d", struct.pack("<q", bits))[0])
