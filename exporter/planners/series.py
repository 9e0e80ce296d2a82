"""The Prometheus series of the mirror, as metric families (pure).

Built the same way for a Pushgateway push (one group at a time) and for a pull scrape.
Groups: one per experiment (its runs, their latest metrics, run counts, and the latest
metrics of model versions built from its runs), and one `registry` group with the model
registry and server-wide counts (experiments by lifecycle stage, models, versions by
stage with every stage present, aliases).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter.model import (
    LIFECYCLE_STAGES,
    MODEL_STAGES,
    RUN_STATUSES,
    UNFINISHED_STATUSES,
    Experiment,
    LatestMetric,
    ModelVersion,
    Registry,
    Run,
)
from exporter.naming import label_value, metric_family_name


@dataclass(frozen=True, slots=True, order=True)
class GroupKey:
    """The grouping key of one Pushgateway group: its labels without `job`, sorted by name
    (a group found on the Pushgateway may have any labels, not only the two shapes below)."""

    labels: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, labels: Mapping[str, str]) -> GroupKey:
        """The key of a group with these labels (in any order)."""
        return cls(tuple(sorted(labels.items())))

    def as_dict(self) -> dict[str, str]:
        """The labels as the Pushgateway client's `grouping_key`."""
        return dict(self.labels)


REGISTRY_KEY = GroupKey((("group", "registry"),))


def experiment_key(experiment_id: str) -> GroupKey:
    """The grouping key of an experiment's Pushgateway group."""
    return GroupKey((("experiment_id", experiment_id),))


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


class Families:
    """Builds gauge families by name, keeping the first help text given."""

    def __init__(self) -> None:
        self._by_name: dict[str, GaugeMetricFamily] = {}

    def add(self, name: str, doc: str, labels: Mapping[str, str], value: float | None) -> None:
        if value is None:
            return
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)

    def families(self) -> list[Metric]:
        return list(self._by_name.values())


@dataclass(frozen=True, slots=True)
class ExperimentView:
    """Everything one experiment group shows."""

    experiment: Experiment
    runs: Sequence[Run]  # runs with per-run series (empty when the experiment is cut)
    status_counts: Mapping[str, int]  # over all its runs, whatever the bounds
    last_run_start_ms: int | None
    versions: Sequence[ModelVersion] = ()  # versions built from runs of this experiment
    version_metrics: Mapping[str, Sequence[LatestMetric]] = field(default_factory=dict)
    # Where the run window starts (`series.run_window`; None: no window). Runs that ended
    # before it are shown only as one of the experiment's newest runs: their series say
    # what they reached, without the per-key logging time (their end time says when).
    window_since_ms: int | None = None

    def in_window(self, run: Run) -> bool:
        """Whether the run is running or ended (without an end time: started) in the window."""
        if self.window_since_ms is None or run.status in UNFINISHED_STATUSES:
            return True
        ended = run.end_time_ms if run.end_time_ms is not None else run.start_time_ms
        return ended is not None and ended >= self.window_since_ms


def experiment_families(
    view: ExperimentView,
    stages: Mapping[str, str],
    run_id_length: int,
    metric_allowed: Callable[[str], bool],
) -> list[Metric]:
    """Series of one experiment group."""
    f = Families()
    exp = {"experiment_id": view.experiment.experiment_id, "experiment_name": view.experiment.name}
    f.add(
        "mlflow_experiment_info",
        "MLflow experiment metadata (always 1).",
        {**exp, "lifecycle_stage": view.experiment.lifecycle_stage},
        1,
    )
    f.add(
        "mlflow_experiment_last_update_time_seconds",
        "When MLflow last recorded a change to the experiment (Unix time).",
        exp,
        _seconds(view.experiment.last_update_time_ms),
    )
    for status in RUN_STATUSES:
        f.add(
            "mlflow_experiment_runs",
            "Runs of the experiment, by status (every run, whatever the export bounds).",
            {**exp, "status": status},
            view.status_counts.get(status, 0),
        )
    f.add(
        "mlflow_experiment_last_run_start_time_seconds",
        "Start time of the experiment's newest run (Unix time).",
        exp,
        _seconds(view.last_run_start_ms),
    )
    for run in view.runs:
        stage = stages.get(run.run_id, "none")
        _run_series(f, exp, run, stage, run_id_length, metric_allowed, view.in_window(run))
    _version_metrics(f, view, run_id_length, metric_allowed)
    return f.families()


def _run_series(
    f: Families,
    exp: dict[str, str],
    run: Run,
    stage: str,
    length: int,
    allowed: Callable[[str], bool],
    logged_times: bool,
) -> None:
    rl = {**exp, "run_id": run.run_id[:length]}
    f.add(
        "mlflow_run_info",
        "MLflow run metadata (always 1).",
        {
            **rl,
            "run_name": label_value(run.run_name),
            "status": run.status,
            "user_id": label_value(run.user_id),
            "model_stage": stage,
        },
        1,
    )
    f.add(
        "mlflow_run_start_time_seconds",
        "Run start time (Unix time).",
        rl,
        _seconds(run.start_time_ms),
    )
    f.add(
        "mlflow_run_end_time_seconds",
        "Run end time (Unix time), for ended runs.",
        rl,
        _seconds(run.end_time_ms),
    )
    for m in run.metrics:
        if not allowed(m.key):
            continue
        ml = {**rl, "metric_key": m.key}
        # NaN and infinities are pushed as they are: the text format carries them.
        f.add(
            metric_family_name(m.key),
            "Latest value of an MLflow run metric.",
            {**ml, "model_stage": stage},
            m.value,
        )
        f.add("mlflow_metric_step", "Step of the latest value of an MLflow run metric.", ml, m.step)
        if not logged_times:
            continue
        f.add(
            "mlflow_metric_timestamp_seconds",
            "When the latest value of an MLflow run metric was logged (Unix time).",
            ml,
            m.timestamp_ms / 1000.0,
        )


def _version_metrics(
    f: Families, view: ExperimentView, length: int, allowed: Callable[[str], bool]
) -> None:
    for mv in view.versions:
        for m in view.version_metrics.get(mv.run_id or "", ()):
            if not allowed(m.key):
                continue
            f.add(
                "mlflow_model_version_metric",
                "Latest value of a metric of the run a model version was built from.",
                {
                    "model_name": mv.model_name,
                    "version": mv.version,
                    "run_id": (mv.run_id or "")[:length],
                    "metric_key": m.key,
                },
                m.value,
            )
            for alias in mv.aliases:
                f.add(
                    "mlflow_model_alias_metric",
                    "Latest value of a metric of the run behind the version an alias names.",
                    {
                        "model_name": mv.model_name,
                        "alias": alias,
                        "version": mv.version,
                        "metric_key": m.key,
                    },
                    m.value,
                )


@dataclass(frozen=True, slots=True)
class ServerCounts:
    experiments: Mapping[str, int]  # lifecycle stage -> experiments in scope (all shards)


def registry_families(registry: Registry, counts: ServerCounts, run_id_length: int) -> list[Metric]:
    """Series of the registry group: the registry and server-wide counts."""
    f = Families()
    for stage in LIFECYCLE_STAGES:
        f.add(
            "mlflow_experiments",
            "Experiments by lifecycle stage (every experiment in scope, whatever the bounds).",
            {"lifecycle_stage": stage},
            counts.experiments.get(stage, 0),
        )
    f.add("mlflow_registered_models", "Registered models.", {}, len(registry.models))
    by_stage = Counter(mv.stage for mv in registry.versions)
    for stage in MODEL_STAGES:
        f.add(
            "mlflow_model_versions",
            "Model versions by registry stage, over all models.",
            {"stage": stage},
            by_stage.get(stage, 0),
        )
    f.add(
        "mlflow_model_aliases",
        "Model aliases, over all models.",
        {},
        sum(len(mv.aliases) for mv in registry.versions),
    )
    per_model = Counter((mv.model_name, mv.stage) for mv in registry.versions)
    for name in registry.models:
        f.add(
            "mlflow_registered_model_info", "Registered model (always 1).", {"model_name": name}, 1
        )
        for stage in MODEL_STAGES:
            f.add(
                "mlflow_registered_model_versions",
                "Model versions by registry stage, every stage present.",
                {"model_name": name, "stage": stage},
                per_model.get((name, stage), 0),
            )
    for mv in registry.versions:
        _version_series(f, mv, run_id_length)
    return f.families()


def _version_series(f: Families, mv: ModelVersion, length: int) -> None:
    run_id = (mv.run_id or "")[:length]
    f.add(
        "mlflow_model_version_info",
        "Model version metadata (always 1); stage is MLflow's deprecated stage.",
        {
            "model_name": mv.model_name,
            "version": mv.version,
            "run_id": run_id,
            "stage": mv.stage,
            "status": mv.status,
            "aliases": ",".join(mv.aliases),
        },
        1,
    )
    f.add(
        "mlflow_model_version_created_timestamp_seconds",
        "When the model version was created (Unix time).",
        {"model_name": mv.model_name, "version": mv.version},
        _seconds(mv.creation_time_ms),
    )
    for alias in mv.aliases:
        f.add(
            "mlflow_model_alias_info",
            "Model alias pointing at a version (always 1).",
            {"model_name": mv.model_name, "alias": alias, "version": mv.version, "run_id": run_id},
            1,
        )


class FixedCollector(Collector):
    """Already-built families, so a group is rendered from one collection."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)
