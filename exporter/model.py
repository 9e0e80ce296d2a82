"""Plain data the pipeline passes around: what MLflow holds, as read in one cycle.

Collectors produce these; sinks only consume them. Times are kept as MLflow gives them
(milliseconds since the epoch) and converted at the edges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

RUN_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


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


@dataclass(frozen=True, slots=True)
class ModelVersion:
    model_name: str
    version: str
    run_id: str | None
    stage: str
    status: str
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class MetricPoint:
    """One logged value of one metric key of a run: the unit delivered to Pramathus."""

    run_id: str
    key: str
    value: float
    step: int
    timestamp_ms: int


@dataclass(slots=True)
class Snapshot:
    """Everything one cycle read from MLflow, already filtered by the config's bounds."""

    experiments: list[Experiment]
    runs: dict[str, list[Run]]  # experiment_id -> runs
    registered_models: list[str]
    model_versions: list[ModelVersion]
    excluded: dict[str, int] = field(default_factory=dict)  # kind -> how many were cut

    def all_runs(self) -> list[Run]:
        return [run for runs in self.runs.values() for run in runs]

    def stage_by_run(self) -> dict[str, str]:
        """Registry stage of the model version built from each run ("none" when absent).

        When several versions point at one run, the most promoted stage wins.
        """
        rank = {"Production": 3, "Staging": 2, "Archived": 1}
        best: dict[str, str] = {}
        for mv in self.model_versions:
            if not mv.run_id or mv.stage in ("", "None"):
                continue
            if rank.get(mv.stage, 0) >= rank.get(best.get(mv.run_id, ""), -1):
                best[mv.run_id] = mv.stage
        return best
