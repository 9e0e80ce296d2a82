"""The `alerts:` section of the configuration: what each alert rule may say, validated.

Model alerts (thresholds, regressions; rendered by `alert_rules.py`) and GenAI alerts (SLOs,
assessments, silences; rendered by `trace_alerts.py`). Everything a renderer needs is checked
here, at config time, with the key that is wrong: names, labels, Prometheus durations and
RE2-compatible patterns.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from exporter.durations import prometheus_duration, prometheus_seconds
from exporter.sections import Section

Severity = Literal["critical", "warning", "info"]
RunStatus = Literal["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"]
Direction = Literal["higher_is_better", "lower_is_better"]
_FINISHED_ONLY: tuple[RunStatus, ...] = ("FINISHED",)
_DEFAULT_WINDOW = "1d"

# Alert names: metric-name characters without the colon, which Prometheus reserves for
# recording rules. Alertmanager routes and silences match on them, so keep them plain.
_ALERT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Labels the renderer sets itself (or Prometheus does): a rule may not override them.
_RESERVED_LABELS = frozenset({"alertname", "severity", "alert_source"})

# Constructs Python's `re` accepts but Prometheus' RE2 rejects; caught here so a bad pattern
# fails at config time with its key, not later as a rule Prometheus refuses to load.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\(\?P=|(?<!\\)(?:\\\\)*\\[1-9]")


def regex_list(value: Any) -> Any:
    """One regex or a list of them, as a list; each must compile and be valid RE2."""
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list):
        return value  # pydantic reports the type error
    for pattern in patterns:
        if not isinstance(pattern, str):
            continue
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        if _NOT_RE2.search(pattern):
            raise ValueError(
                f"regular expression {pattern!r} uses lookaround or a backreference, "
                "which Prometheus (RE2) does not support"
            )
    return patterns


class Rule(Section):
    """What every alert rule has: a name, how long it must hold, severity and texts."""

    # Dumps (check-config) show `for`, the key a user writes, not the Python name `for_`.
    model_config = ConfigDict(serialize_by_alias=True)

    name: str
    metric: str = Field(min_length=1)
    # `for` is a Python keyword; the YAML key stays `for`, as in a Prometheus rule file.
    for_: str = Field("15m", alias="for")
    severity: Severity = "warning"
    summary: str | None = Field(None, min_length=1)
    description: str | None = Field(None, min_length=1)
    # Extra alert labels, e.g. `team: growth` for Alertmanager routing.
    labels: dict[str, str] = Field(default_factory=dict)

    _for = field_validator("for_", mode="before")(prometheus_duration)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not _ALERT_NAME.fullmatch(v):
            raise ValueError(
                f"{v!r} is not a valid alert name (letters, digits and _, not starting with "
                "a digit, e.g. ChurnAccuracyLow)"
            )
        return v

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL_NAME.fullmatch(key) or key.startswith("__"):
                raise ValueError(f"{key!r} is not a valid label name")
            if key in _RESERVED_LABELS:
                raise ValueError(f"label {key!r} is set by the renderer and cannot be overridden")
        return labels


class ThresholdRule(Rule):
    """An MLflow metric above or below a fixed value.

    With `model` and `alias`: the version the alias points at. Otherwise: runs of the
    experiments matching `experiments` (all when omitted) and not `exclude_experiments`,
    by default only FINISHED runs that ended within the last day (see `run_status` and
    `ended_within`).
    """

    above: float | None = Field(None, allow_inf_nan=False)
    below: float | None = Field(None, allow_inf_nan=False)
    model: str | None = Field(None, min_length=1)
    alias: str | None = Field(None, min_length=1)
    experiments: list[str] = Field(default_factory=list)
    exclude_experiments: list[str] = Field(default_factory=list)
    # Training curves pass through bad values on the way down: a RUNNING run's latest value is
    # not its result, so only finished runs are judged unless asked otherwise.
    run_status: list[RunStatus] = Field(default_factory=lambda: list(_FINISHED_ONLY))
    # A finished run's metrics never change: without a window, every bad run of the past would
    # fire forever. The alert is an event ("this run ended badly") and resolves itself after it.
    ended_within: str | None = _DEFAULT_WINDOW

    _patterns = field_validator("experiments", "exclude_experiments", mode="before")(regex_list)
    _window = field_validator("ended_within", mode="before")(
        lambda v: None if v is None else prometheus_duration(v)
    )

    @property
    def bound(self) -> tuple[str, str, float]:
        """(word, PromQL operator, value): ("above", ">", 0.5) or ("below", "<", 0.7)."""
        if self.above is not None:
            return "above", ">", self.above
        assert self.below is not None  # exactly one is set, by validation
        return "below", "<", self.below

    @model_validator(mode="after")
    def _consistent(self) -> ThresholdRule:
        if (self.above is None) == (self.below is None):
            raise ValueError(
                "set exactly one of above or below (the value the metric must not cross)"
            )
        if self.model is not None and self.alias is None:
            raise ValueError(
                f"model {self.model!r} needs an alias (e.g. alias: champion): the rule watches "
                "the version that alias points at"
            )
        if self.alias is not None and self.model is None:
            raise ValueError(f"alias {self.alias!r} needs the model it belongs to (model: ...)")
        # Compared with the defaults rather than "was the key given", so a dumped config (as
        # check-config prints it, defaults included) loads back.
        run_filters = {
            "experiments": bool(self.experiments),
            "exclude_experiments": bool(self.exclude_experiments),
            "run_status": list(self.run_status) != list(_FINISHED_ONLY),
            "ended_within": self.ended_within != _DEFAULT_WINDOW,
        }
        if self.model is not None and (given := [k for k, on in run_filters.items() if on]):
            raise ValueError(
                f"{', '.join(given)} select runs and do not apply to a model/alias rule; "
                "remove them or remove model and alias"
            )
        if self.model is None and self.ended_within is not None:
            unended = [s for s in self.run_status if s in ("RUNNING", "SCHEDULED")]
            if unended:
                raise ValueError(
                    f"run_status {', '.join(unended)} never matches with ended_within set "
                    "(such runs have not ended); remove them or set ended_within: null"
                )
            if prometheus_seconds(self.ended_within) <= prometheus_seconds(self.for_):
                raise ValueError(
                    f"ended_within ({self.ended_within}) must be longer than for "
                    f"({self.for_}), or the alert could never fire"
                )
        return self


class RegressionRule(Rule):
    """A candidate version of `model` worse than the champion by more than the margin.

    The candidate is the version `candidate_alias` points at, or (`newer_versions: true`)
    every version created after the champion's version that is not Archived. Worse means
    more than max(`margin`, `relative_margin` x |champion's value|) below the champion's
    value when higher is better, above it when lower is better.
    """

    model: str = Field(min_length=1)
    direction: Direction
    champion: str = Field("champion", min_length=1)
    candidate_alias: str | None = Field(None, min_length=1)
    newer_versions: bool = False
    margin: float = Field(0.0, ge=0, allow_inf_nan=False)
    relative_margin: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _consistent(self) -> RegressionRule:
        if (self.candidate_alias is None) == (not self.newer_versions):
            raise ValueError(
                "set exactly one of candidate_alias (an alias such as challenger) or "
                "newer_versions: true (every version created after the champion's)"
            )
        if self.candidate_alias == self.champion:
            raise ValueError(
                f"candidate_alias and champion are both {self.champion!r}: a version cannot "
                "regress against itself"
            )
        return self


def _name(value: str) -> str:
    if not _ALERT_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a valid alert name (letters, digits and _)")
    return value


class TraceRule(Section):
    """What every GenAI alert has: a name, the experiments it watches and extra labels."""

    name: str
    experiments: list[str] = Field(default_factory=list)
    exclude_experiments: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)

    _check_name = field_validator("name")(_name)
    _check_patterns = field_validator("experiments", "exclude_experiments", mode="before")(
        regex_list
    )


class TraceSlo(TraceRule):
    """Error-rate and/or latency objectives of the experiments' traces."""

    # Share of finished traces that must not end in ERROR, e.g. 0.99.
    error_objective: float | None = Field(None, gt=0, lt=1)
    # Latency bound (seconds) for the quantile, and the share of time it must hold.
    latency_seconds: float | None = Field(None, gt=0, allow_inf_nan=False)
    latency_quantile: Literal["0.5", "0.95", "0.99"] = "0.95"
    latency_objective: float = Field(0.99, gt=0, lt=1)

    @model_validator(mode="after")
    def _something(self) -> TraceSlo:
        if self.error_objective is None and self.latency_seconds is None:
            raise ValueError("set error_objective, latency_seconds or both")
        return self


class AssessmentAlert(TraceRule):
    """An assessment's mean over the window below a bound for `for`."""

    assessment: str = Field(min_length=1)
    below: float = Field(allow_inf_nan=False)
    for_: str = Field("30m", alias="for")
    severity: Literal["critical", "warning", "info"] = "warning"

    _for = field_validator("for_", mode="before")(prometheus_duration)


class SilenceAlert(TraceRule):
    """Experiments that received traces and have had none for `after` (until `within`)."""

    after: str = "1h"
    within: str = "1d"
    severity: Literal["critical", "warning", "info"] = "warning"

    _durations = field_validator("after", "within", mode="before")(prometheus_duration)


class TraceAlertsSettings(Section):
    slos: list[TraceSlo] = Field(default_factory=list)
    assessments: list[AssessmentAlert] = Field(default_factory=list)
    silences: list[SilenceAlert] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> TraceAlertsSettings:
        names = [r.name for r in (*self.slos, *self.assessments, *self.silences)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"alert names used twice: {', '.join(twice)}; names must be unique")
        return self

    @property
    def empty(self) -> bool:
        return not (self.slos or self.assessments or self.silences)


class AlertsSettings(Section):
    """The `alerts:` section: rules rendered by `exporter alert-rules`."""

    thresholds: list[ThresholdRule] = Field(default_factory=list)
    regressions: list[RegressionRule] = Field(default_factory=list)
    # GenAI traces: SLO burns, assessment means, silent experiments (trace_alerts.py).
    traces: TraceAlertsSettings = Field(default_factory=TraceAlertsSettings)

    @model_validator(mode="after")
    def _unique_names(self) -> AlertsSettings:
        # Two rules with one name would be two alerts Alertmanager cannot tell apart.
        seen: dict[str, str] = {}
        for kind, rules in (("thresholds", self.thresholds), ("regressions", self.regressions)):
            for index, rule in enumerate(rules):
                where = f"alerts.{kind}.{index}.name"
                if rule.name in seen:
                    raise ValueError(
                        f"alert name {rule.name!r} is used twice, at {seen[rule.name]} and "
                        f"{where}; names must be unique"
                    )
                seen[rule.name] = where
        return self
