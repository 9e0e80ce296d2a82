"""Snapshot -> Prometheus metric families, one Pushgateway group per experiment.

Each group is built in a fresh `CollectorRegistry` and PUT, so a push replaces exactly the
series the group owns; groups of experiments that are gone are deleted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import (
    basic_auth_handler,
    default_handler,
    delete_from_gateway,
    push_to_gateway,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from exporter.config import PrometheusSettings
from exporter.model import RUN_STATUSES, Experiment, Run, Snapshot
from exporter.naming import label_value, metric_family_name, short_id_length

REGISTRY_GROUP = {"group": "registry"}

# Every experiment-level family carries these first, so dashboards can join on them.
EXP_LABELS = ("experiment_id", "experiment_name")
RUN_LABELS = (*EXP_LABELS, "run_id")


class PushError(Exception):
    """The Pushgateway refused or could not be reached; message safe to show."""


def _seconds(ms: int | None) -> float | None:
    return None if ms is None else ms / 1000.0


class _Families:
    """Builds gauge families lazily, by name, keeping the first help text given."""

    def __init__(self) -> None:
        self._by_name: dict[str, GaugeMetricFamily] = {}

    def add(self, name: str, doc: str, labels: dict[str, str], value: float | None) -> None:
        if value is None:
            return
        family = self._by_name.get(name)
        if family is None:
            family = self._by_name[name] = GaugeMetricFamily(name, doc, labels=list(labels))
        family.add_metric(list(labels.values()), value)

    def families(self) -> list[Metric]:
        return list(self._by_name.values())


@dataclass(eq=False)  # registries key collectors by identity
class ExperimentGroup(Collector):
    """The series of one experiment: its runs, their latest metrics, run counts by status."""

    experiment: Experiment
    runs: list[Run]
    stage_by_run: dict[str, str]
    run_id_length: int
    # Counted over all the experiment's runs when only some are exported as per-run series.
    status_counts: Mapping[str, int] | None = None
    last_run_start_ms: int | None = None
    metric_allowed: Callable[[str], bool] = field(default=lambda key: True)

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        exp = {
            "experiment_id": self.experiment.experiment_id,
            "experiment_name": self.experiment.name,
        }
        f.add(
            "mlflow_experiment_info",
            "MLflow experiment metadata (always 1).",
            {**exp, "lifecycle_stage": self.experiment.lifecycle_stage},
            1,
        )
        f.add(
            "mlflow_experiment_last_update_time_seconds",
            "When MLflow last recorded a change to the experiment (Unix time).",
            exp,
            _seconds(self.experiment.last_update_time_ms),
        )
        by_status = self.status_counts
        if by_status is None:
            by_status = Counter(run.status for run in self.runs)
        for status in RUN_STATUSES:
            f.add(
                "mlflow_experiment_runs",
                "Runs of the experiment, by status.",
                {**exp, "status": status},
                by_status.get(status, 0),
            )
        starts = [r.start_time_ms for r in self.runs if r.start_time_ms is not None]
        newest = max(
            [*starts, *([self.last_run_start_ms] if self.last_run_start_ms else [])], default=None
        )
        f.add(
            "mlflow_experiment_last_run_start_time_seconds",
            "Start time of the experiment's newest run (Unix time).",
            exp,
            _seconds(newest),
        )
        for run in self.runs:
            self._run_series(f, exp, run)
        yield from f.families()

    def _run_series(self, f: _Families, exp: dict[str, str], run: Run) -> None:
        stage = self.stage_by_run.get(run.run_id, "none")
        rl = {**exp, "run_id": run.run_id[: self.run_id_length]}
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
            if not self.metric_allowed(m.key):
                continue
            ml = {**rl, "metric_key": m.key}
            # NaN and infinities are pushed as they are: the text format carries them.
            f.add(
                metric_family_name(m.key),
                "Latest value of an MLflow run metric.",
                {**ml, "model_stage": stage},
                m.value,
            )
            f.add(
                "mlflow_metric_step",
                "Step of the latest value of an MLflow run metric.",
                ml,
                m.step,
            )
            f.add(
                "mlflow_metric_timestamp_seconds",
                "When the latest value of an MLflow run metric was logged (Unix time).",
                ml,
                m.timestamp_ms / 1000.0,
            )


@dataclass(eq=False)
class RegistryGroup(Collector):
    """Registered models, their versions (stage, aliases) and aliases."""

    snapshot: Snapshot
    run_id_length: int

    def collect(self) -> Iterator[Metric]:
        f = _Families()
        for name in self.snapshot.registered_models:
            f.add(
                "mlflow_registered_model_info",
                "Registered model (always 1).",
                {"model_name": name},
                1,
            )
        per_stage = Counter((mv.model_name, mv.stage) for mv in self.snapshot.model_versions)
        for (name, stage), count in sorted(per_stage.items()):
            f.add(
                "mlflow_registered_model_versions",
                "Model versions by registry stage.",
                {"model_name": name, "stage": stage},
                count,
            )
        for mv in self.snapshot.model_versions:
            run_id = (mv.run_id or "")[: self.run_id_length]
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
            for alias in mv.aliases:
                f.add(
                    "mlflow_model_alias_info",
                    "Model alias pointing at a version (always 1).",
                    {
                        "model_name": mv.model_name,
                        "alias": alias,
                        "version": mv.version,
                        "run_id": run_id,
                    },
                    1,
                )
        yield from f.families()


def build_groups(
    snapshot: Snapshot, run_id_length: int, with_registry: bool = True
) -> dict[tuple[tuple[str, str], ...], Collector]:
    """Grouping key (sorted label pairs, without job) -> collector for that group."""
    stages = snapshot.stage_by_run()
    groups: dict[tuple[tuple[str, str], ...], Collector] = {
        (("experiment_id", e.experiment_id),): ExperimentGroup(
            e, snapshot.runs.get(e.experiment_id, []), stages, run_id_length
        )
        for e in snapshot.experiments
    }
    if with_registry:
        groups[tuple(REGISTRY_GROUP.items())] = RegistryGroup(snapshot, run_id_length)
    return groups


def run_id_length_for(snapshot: Snapshot, minimum: int) -> int:
    """A run_id prefix length that cannot collide among the runs and versions exported."""
    ids: Iterable[str] = [r.run_id for r in snapshot.all_runs()] + [
        mv.run_id for mv in snapshot.model_versions if mv.run_id
    ]
    return short_id_length(ids, minimum)


GroupKey = tuple[tuple[str, str], ...]
# Families that carry user metric values (the rest are the exporter's own, always finite).
USER_FAMILY_PREFIXES = ("mlflow_",)


class _Fixed(Collector):
    """Already-collected families, so a group is rendered from one collection."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


@dataclass
class PushResult:
    pushed: list[dict[str, str]] = field(default_factory=list)
    groups: int = 0
    series: int = 0
    deleted: int = 0
    nonfinite: int = 0


@dataclass
class Pushgateway:
    """Pushes groups for one job and deletes the job's groups it no longer owns."""

    settings: PrometheusSettings
    http_get: Callable[..., Any] = requests.get

    def _handler(self) -> Callable[..., Callable[[], None]]:
        s = self.settings
        if s.username is None or s.password is None:
            return default_handler
        user, password = s.username.get_secret_value(), s.password.get_secret_value()

        def handler(
            url: str, method: str, timeout: float | None, headers: Any, data: bytes
        ) -> Callable[[], None]:
            return basic_auth_handler(url, method, timeout, headers, data, user, password)

        return handler

    def push(
        self,
        groups: Mapping[GroupKey, Collector] | Iterable[tuple[GroupKey, Collector]],
        owns: Callable[[dict[str, str]], bool],
        known: Iterable[dict[str, str]] | None = None,
        keep: set[GroupKey] | None = None,
    ) -> PushResult:
        """PUT every group, then delete groups of this job that `owns` but are not kept
        (`keep`: the current groups, unchanged ones included; default: those pushed now).

        `groups` may be a lazy iterable, so only one group's series are in memory at a time.
        `known` are the groups a previous push left; without it the Pushgateway is asked
        (its listing carries every series, so it is worth skipping on most cycles).
        """
        result = PushResult()
        pushed: set[GroupKey] = set()
        for key, collector in groups.items() if isinstance(groups, Mapping) else groups:
            families = list(collector.collect())  # collected once: pushed and counted
            registry = CollectorRegistry(auto_describe=False)
            registry.register(_Fixed(families))
            self._call(push_to_gateway, registry=registry, grouping_key=dict(key))
            pushed.add(key)
            result.groups += 1
            for family in families:
                result.series += len(family.samples)
                if family.name.startswith(USER_FAMILY_PREFIXES):
                    result.nonfinite += sum(not math.isfinite(x.value) for x in family.samples)
        kept = pushed if keep is None else keep | pushed
        result.pushed = [dict(key) for key in kept]
        present = self.existing_groups() if known is None else list(known)
        for stale in present:
            if owns(stale) and tuple(sorted(stale.items())) not in kept:
                self._call(delete_from_gateway, grouping_key=stale)
                result.deleted += 1
        return result

    def start_time(self) -> str:
        """When the Pushgateway process started: a change means it may have lost groups."""
        try:
            response = self.http_get(
                f"{self.settings.gateway}/api/v1/status",
                timeout=self.settings.timeout_seconds,
                auth=self._auth(),
            )
            response.raise_for_status()
            return str(response.json()["data"]["start_time"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            raise PushError(
                f"Pushgateway {self.settings.gateway} status failed: {type(exc).__name__}"
            ) from None

    def _auth(self) -> tuple[str, str] | None:
        s = self.settings
        if s.username is None or s.password is None:
            return None
        return (s.username.get_secret_value(), s.password.get_secret_value())

    def existing_groups(self) -> list[dict[str, str]]:
        """Grouping keys (without job) of this job's groups currently on the Pushgateway.

        Read from the `push_time_seconds` lines of its text exposition, streamed line by
        line: the JSON API returns every series of every group at once, which for a large
        Pushgateway costs more memory than the whole exporter.
        """
        s = self.settings
        groups = []
        try:
            response = self.http_get(
                f"{s.gateway}/metrics", timeout=s.timeout_seconds, auth=self._auth(), stream=True
            )
            response.raise_for_status()
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("push_time_seconds{"):
                    labels = _group_labels(line)
                    if labels.pop("job", None) == s.job_name:
                        groups.append(labels)
        except (requests.RequestException, ValueError) as exc:
            raise PushError(f"cannot list Pushgateway groups at {s.gateway}: {exc}") from None
        return groups

    def _call(self, fn: Callable[..., None], **kwargs: Any) -> None:
        s = self.settings
        try:
            fn(
                s.gateway,
                job=s.job_name,
                timeout=s.timeout_seconds,
                handler=self._handler(),
                **kwargs,
            )
        except OSError as exc:  # urllib's URLError/HTTPError are OSErrors
            raise PushError(f"Pushgateway {s.gateway} failed: {exc}") from None


def _group_labels(line: str) -> dict[str, str]:
    """Grouping labels of one `push_time_seconds{...} value` exposition line."""
    family = next(iter(text_string_to_metric_families(line + "\n")))
    labels = dict(family.samples[0].labels)
    if labels.get("instance") == "":  # added by the Pushgateway, not part of our keys
        del labels["instance"]
    return labels
