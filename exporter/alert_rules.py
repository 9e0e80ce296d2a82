"""Model alerting from configuration: the `alerts:` section, rendered as a Prometheus rule file.

Two kinds of rule, both evaluated by Prometheus over the series the exporter pushes:

- **thresholds**: an MLflow metric above or below a fixed value, either for the model version
  an alias points at (`model` + `alias`, over `mlflow_model_alias_metric`) or for the runs of
  selected experiments (over `mlflow_<family>{metric_key=...}`).
- **regressions**: a candidate version of a registered model worse than the champion by more
  than a margin; the candidate is another alias (`candidate_alias: challenger`) or every
  version created after the champion's (`newer_versions: true`).

`render` turns validated settings into the rule-file structure and `render_yaml` into its
text; `exporter alert-rules` writes that text.

One MLflow value can reach Prometheus as several series: pushed through the Pushgateway
(with its group's key, `experiment_id` or `group="registry"`, and `instance=""`), scraped from
the exporter's /mlflow/metrics in pull mode (with `instance`, without the key), both at once
in `prometheus.mode: both`, or as a remote-write copy of a run metric (no `job`). Every rule
therefore first takes `max by` the labels that identify what it judges (model, alias or
version, metric key; or experiment, run, metric key), so each fires once whatever the mode,
and joins match `on` those labels only. Rules never match on `job` (its name is a setting).
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, field_validator, model_validator

from exporter.naming import metric_family_name
from exporter.sections import Section
from exporter.trace_alerts import TraceAlertsSettings, genai_group

GROUP_NAME = "mlflow-model-alerts"
ALERT_SOURCE = "config"

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

# Prometheus' duration grammar (model.ParseDuration): units largest first, each at most once.
_DURATION = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
)
_DURATION_UNITS = (31_536_000, 604_800, 86_400, 3_600, 60, 1, 0.001)

# Constructs Python's `re` accepts but Prometheus' RE2 rejects; caught here so a bad pattern
# fails at config time with its key, not later as a rule Prometheus refuses to load.
_NOT_RE2 = re.compile(r"\(\?<?[=!]|\(\?P=|(?<!\\)(?:\\\\)*\\[1-9]")


def duration_seconds(text: str) -> float:
    """Seconds in a Prometheus duration such as `90s`, `15m` or `1h30m` (already validated)."""
    if text == "0":
        return 0.0
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * unit for n, unit in zip(match.groups(), _DURATION_UNITS, strict=True) if n)


def _prometheus_duration(value: Any) -> Any:
    """A Prometheus duration string, unchanged; anything else is an error naming the form."""
    if not isinstance(value, str):
        # A bare number is ambiguous (seconds? minutes?) and Prometheus rejects it.
        # pydantic reports a ValueError raised in a validator with its key path.
        raise ValueError("must be a Prometheus duration string such as 30s, 15m, 1h30m or 1d")  # noqa: TRY004
    text = value.strip()
    if text != "0" and (not text or _DURATION.fullmatch(text) is None):
        raise ValueError(
            f"{text!r} is not a Prometheus duration (like 30s, 15m, 1h30m or 1d: "
            "whole numbers, units y w d h m s ms, largest first)"
        )
    return text


def _regex_list(value: Any) -> Any:
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


class _Rule(Section):
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

    _for = field_validator("for_", mode="before")(_prometheus_duration)

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


class ThresholdRule(_Rule):
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

    _patterns = field_validator("experiments", "exclude_experiments", mode="before")(_regex_list)
    _window = field_validator("ended_within", mode="before")(
        lambda v: None if v is None else _prometheus_duration(v)
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
            if duration_seconds(self.ended_within) <= duration_seconds(self.for_):
                raise ValueError(
                    f"ended_within ({self.ended_within}) must be longer than for "
                    f"({self.for_}), or the alert could never fire"
                )
        return self


class RegressionRule(_Rule):
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


# --------------------------------------------------------------------------- PromQL pieces


def promql_string(value: str) -> str:
    """`value` as a double-quoted PromQL string literal (Go escaping; unicode kept as is)."""
    out = []
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # A raw control character would end or corrupt the literal.
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _number(value: float) -> str:
    """A float as PromQL and people write it: 0.7, 2, 1e-05."""
    text = repr(float(value))
    return text.removesuffix(".0")


def _selector(metric: str, *matchers: tuple[str, str, str]) -> str:
    """`metric{label op "value", ...}` with every value quoted safely."""
    inner = ", ".join(f"{label}{op}{promql_string(value)}" for label, op, value in matchers)
    return f"{metric}{{{inner}}}"


def _any_of(patterns: list[str]) -> str:
    """One RE2 alternation of whole-name patterns; Prometheus anchors it as ^(?:...)$."""
    if len(patterns) == 1:
        return patterns[0]
    return "|".join(f"(?:{p})" for p in patterns)


def _template_text(text: str) -> str:
    """Literal text (a model or alias name) safe inside an annotation template."""
    if "{{" not in text and "}}" not in text:
        return text
    # Go template string constant: JSON's escaping is valid Go string syntax.
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"


def _indent(text: str, spaces: int) -> str:
    """Every line of a PromQL fragment indented: operands sit deeper than their operator."""
    return "\n".join(" " * spaces + line for line in text.split("\n"))


# What an alert is about, and so the labels each rule keeps of its series: anything else
# (`instance`, the Pushgateway group's `experiment_id` or `group`, `job`, labels a scrape adds)
# only says which copy a series is, and would make one alert per copy.
_ALIAS_LABELS = ("model_name", "alias", "version", "metric_key")
_VERSION_LABELS = ("model_name", "version", "run_id", "metric_key")
# experiment_name and run_name come from mlflow_run_info, one copy of it.
_RUN_LABELS = ("experiment_id", "run_id", "metric_key")


def _collapse(labels: tuple[str, ...], expr: str) -> str:
    """`max by (labels) (expr)`: every copy of a series (pushed, pulled) counted once."""
    return f"max by ({', '.join(labels)}) (\n{_indent(expr, 2)}\n)"


def _champion_bar(rule: RegressionRule) -> str:
    """The champion's value moved by the tolerated margin, its version as `champion_version`."""
    champion = "max by (model_name, metric_key, version) ({})".format(
        _selector(
            "mlflow_model_alias_metric",
            ("model_name", "=", rule.model),
            ("alias", "=", rule.champion),
            ("metric_key", "=", rule.metric),
        )
    )
    # Worse means lower when higher is better, so the bar sits below the champion's value.
    sign = "-" if rule.direction == "higher_is_better" else "+"
    margin = _number(rule.margin)
    if rule.relative_margin:
        # clamp_min(x, m) is max(x, m): the larger of the relative and absolute tolerances.
        relative = _number(rule.relative_margin)
        bar = f"{champion}\n  {sign} clamp_min(abs({champion}) * {relative}, {margin})"
    elif rule.margin:
        bar = f"{champion}\n  {sign} {margin}"
    else:
        bar = champion
    # The candidate keeps its own `version` label; the champion's travels as another label.
    return f'label_replace(\n{_indent(bar, 2)},\n  "champion_version", "$1", "version", "(.*)"\n)'


def threshold_expr(rule: ThresholdRule) -> str:
    """The PromQL of a threshold rule (see `ThresholdRule`)."""
    _, op, value = rule.bound
    if rule.model is not None and rule.alias is not None:
        series = _selector(
            "mlflow_model_alias_metric",
            ("model_name", "=", rule.model),
            ("alias", "=", rule.alias),
            ("metric_key", "=", rule.metric),
        )
        # One alert per alias, version and key, however many copies (pushed, pulled) exist.
        return f"{_collapse(_ALIAS_LABELS, f'{series} {op} {_number(value)}')}\n"

    # Several keys can share one family (`val/loss`, `val.loss`): metric_key tells them apart.
    matchers = [("metric_key", "=", rule.metric)]
    if rule.experiments:
        matchers.append(("experiment_name", "=~", _any_of(rule.experiments)))
    if rule.exclude_experiments:
        matchers.append(("experiment_name", "!~", _any_of(rule.exclude_experiments)))
    series = _selector(metric_family_name(rule.metric), *matchers)
    statuses = sorted(set(rule.run_status))
    if not statuses:
        run_info = "mlflow_run_info"
    elif len(statuses) == 1:
        run_info = _selector("mlflow_run_info", ("status", "=", statuses[0]))
    else:
        run_info = _selector("mlflow_run_info", ("status", "=~", "|".join(statuses)))
    # Joining run_info (always 1) filters by status and adds the names without changing the
    # value; topk picks one of its copies, so the join stays one-to-one whatever the mode.
    expr = (
        f"{_collapse(_RUN_LABELS, f'{series} {op} {_number(value)}')}\n"
        f"* on (experiment_id, run_id) group_left (experiment_name, run_name)\n"
        f"  topk by (experiment_id, run_id) (1, {run_info})"
    )
    if rule.ended_within is not None:
        window = _number(duration_seconds(rule.ended_within))
        expr += (
            f"\nand on (experiment_id, run_id)\n  (time() - mlflow_run_end_time_seconds < {window})"
        )
    return expr + "\n"


def regression_expr(rule: RegressionRule) -> str:
    """The PromQL of a regression rule (see `RegressionRule`)."""
    op = "<" if rule.direction == "higher_is_better" else ">"
    if rule.candidate_alias is not None:
        candidates = _collapse(
            _ALIAS_LABELS,
            _selector(
                "mlflow_model_alias_metric",
                ("model_name", "=", rule.model),
                ("alias", "=", rule.candidate_alias),
                ("metric_key", "=", rule.metric),
            ),
        )
    else:
        model = ("model_name", "=", rule.model)
        created = _selector("mlflow_model_version_created_timestamp_seconds", model)
        versions = _selector("mlflow_model_version_metric", model, ("metric_key", "=", rule.metric))
        champion = _selector("mlflow_model_alias_info", model, ("alias", "=", rule.champion))
        archived = _selector("mlflow_model_version_info", model, ("stage", "=", "Archived"))
        # Archiving a rejected candidate is how a user says "seen, not promoting it"; without
        # this it would stay worse than the champion, and firing, until deleted.
        # Set operators and `on (...)` ignore the copies' extra labels; the outer `max by`
        # leaves one series per version.
        candidates = _collapse(
            _VERSION_LABELS,
            "\n".join(
                [
                    f"  {versions}",
                    "and on (model_name, version)",
                    "  (",
                    f"      {created}",
                    "    > on (model_name) group_left ()",
                    "      max by (model_name) (",
                    f"          {created}",
                    "        and on (model_name, version)",
                    f"          {champion}",
                    "      )",
                    "  )",
                    "unless on (model_name, version)",
                    f"  {archived}",
                ]
            ),
        )
    return (
        f"{candidates}\n"
        f"{op} on (model_name, metric_key) group_left (champion_version)\n"
        f"{_indent(_champion_bar(rule), 2)}\n"
    )


# --------------------------------------------------------------------------- rules


def _threshold_rule(rule: ThresholdRule) -> dict[str, Any]:
    word, _, value = rule.bound
    bound = f"{word} {_number(value)}"
    if rule.model is not None:
        summary = (
            "{{ $labels.metric_key }} of {{ $labels.model_name }}@{{ $labels.alias }} is " + bound
        )
        description = (
            "Version {{ $labels.version }} of model {{ $labels.model_name }} (alias "
            "{{ $labels.alias }}) has {{ $labels.metric_key }} {{ $value }}, "
            f"{bound} (rule {rule.name})."
        )
    else:
        summary = (
            "{{ $labels.metric_key }} " + bound + " in run {{ $labels.run_name }} of "
            "{{ $labels.experiment_name }}"
        )
        description = (
            "Run {{ $labels.run_id }} ({{ $labels.run_name }}) of experiment "
            "{{ $labels.experiment_name }} has {{ $labels.metric_key }} {{ $value }}, "
            f"{bound} (rule {rule.name})."
        )
    return _rule(rule, threshold_expr(rule), summary, description)


def _regression_rule(rule: RegressionRule) -> dict[str, Any]:
    worse = "below" if rule.direction == "higher_is_better" else "above"
    tolerance = _number(rule.margin)
    if rule.relative_margin:
        percent = f"{rule.relative_margin * 100:g}%"
        tolerance = f"the larger of {tolerance} and {percent} of the champion's value"
    champion = _template_text(rule.champion)
    if rule.candidate_alias is not None:
        who = "{{ $labels.model_name }}@{{ $labels.alias }}"
        subject = (
            "Version {{ $labels.version }} of {{ $labels.model_name }} (alias {{ $labels.alias }})"
        )
    else:
        who = "{{ $labels.model_name }} version {{ $labels.version }}"
        subject = (
            "Version {{ $labels.version }} of {{ $labels.model_name }}, newer than the @"
            f"{champion} version,"
        )
    summary = f"{who} has worse {{{{ $labels.metric_key }}}} than @{champion}"
    description = (
        f"{subject} has {{{{ $labels.metric_key }}}} {{{{ $value }}}}, more than {tolerance} "
        f"{worse} that of version {{{{ $labels.champion_version }}}} (alias {champion}); "
        f"{rule.direction.replace('_', ' ')} (rule {rule.name})."
    )
    return _rule(rule, regression_expr(rule), summary, description)


def _rule(rule: _Rule, expr: str, summary: str, description: str) -> dict[str, Any]:
    return {
        "alert": rule.name,
        "expr": expr,
        "for": rule.for_,
        "labels": {"severity": rule.severity, "alert_source": ALERT_SOURCE, **rule.labels},
        "annotations": {
            "summary": rule.summary or summary,
            "description": rule.description or description,
        },
    }


def render(alerts: AlertsSettings) -> dict[str, Any]:
    """The Prometheus rule file for `alerts`: one group, `mlflow-model-alerts`, thresholds
    first then regressions, each in configuration order. Pure: same settings, same dict."""
    rules = [_threshold_rule(r) for r in alerts.thresholds]
    rules += [_regression_rule(r) for r in alerts.regressions]
    groups = [{"name": GROUP_NAME, "rules": rules}]
    if not alerts.traces.empty:
        # A file of GenAI rules alone holds only their group.
        groups = [*(groups if rules else []), genai_group(alerts.traces)]
    return {"groups": groups}


HEADER = """\
# GENERATED FILE - DO NOT EDIT BY HAND.
# Rendered by `exporter alert-rules` from the `alerts:` section of the exporter's config;
# change the config and regenerate instead:
#   exporter --config CONFIG alert-rules -o FILE
# `exporter --config CONFIG alert-rules --check -o FILE` exits 1 while FILE is out of date.
"""


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line PromQL and indented lists, like the hand-written rules."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:  # noqa: ARG002 - PyYAML's signature
        super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def render_yaml(alerts: AlertsSettings) -> str:
    """`render(alerts)` as the text of a rule file, under a do-not-edit header."""
    body = yaml.dump(
        render(alerts),
        Dumper=_Dumper,
        sort_keys=False,
        allow_unicode=True,
        default_flow_style=False,
        width=1_000_000,  # long descriptions stay on one line
    )
    return HEADER + "\n" + body
