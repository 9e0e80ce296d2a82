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
from typing import Any

import yaml

from exporter.alert_settings import AlertsSettings, RegressionRule, Rule, ThresholdRule
from exporter.durations import prometheus_seconds
from exporter.naming import metric_family_name
from exporter.promql import ALERT_SOURCE, any_of, number, selector
from exporter.trace_alerts import genai_group

GROUP_NAME = "mlflow-model-alerts"


# --------------------------------------------------------------------------- PromQL pieces


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
        selector(
            "mlflow_model_alias_metric",
            ("model_name", "=", rule.model),
            ("alias", "=", rule.champion),
            ("metric_key", "=", rule.metric),
        )
    )
    # Worse means lower when higher is better, so the bar sits below the champion's value.
    sign = "-" if rule.direction == "higher_is_better" else "+"
    margin = number(rule.margin)
    if rule.relative_margin:
        # clamp_min(x, m) is max(x, m): the larger of the relative and absolute tolerances.
        relative = number(rule.relative_margin)
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
        series = selector(
            "mlflow_model_alias_metric",
            ("model_name", "=", rule.model),
            ("alias", "=", rule.alias),
            ("metric_key", "=", rule.metric),
        )
        # One alert per alias, version and key, however many copies (pushed, pulled) exist.
        return f"{_collapse(_ALIAS_LABELS, f'{series} {op} {number(value)}')}\n"

    # Several keys can share one family (`val/loss`, `val.loss`): metric_key tells them apart.
    matchers = [("metric_key", "=", rule.metric)]
    if rule.experiments:
        matchers.append(("experiment_name", "=~", any_of(rule.experiments)))
    if rule.exclude_experiments:
        matchers.append(("experiment_name", "!~", any_of(rule.exclude_experiments)))
    series = selector(metric_family_name(rule.metric), *matchers)
    statuses = sorted(set(rule.run_status))
    if not statuses:
        run_info = "mlflow_run_info"
    elif len(statuses) == 1:
        run_info = selector("mlflow_run_info", ("status", "=", statuses[0]))
    else:
        run_info = selector("mlflow_run_info", ("status", "=~", "|".join(statuses)))
    # Joining run_info (always 1) filters by status and adds the names without changing the
    # value; topk picks one of its copies, so the join stays one-to-one whatever the mode.
    expr = (
        f"{_collapse(_RUN_LABELS, f'{series} {op} {number(value)}')}\n"
        f"* on (experiment_id, run_id) group_left (experiment_name, run_name)\n"
        f"  topk by (experiment_id, run_id) (1, {run_info})"
    )
    if rule.ended_within is not None:
        window = number(prometheus_seconds(rule.ended_within))
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
            selector(
                "mlflow_model_alias_metric",
                ("model_name", "=", rule.model),
                ("alias", "=", rule.candidate_alias),
                ("metric_key", "=", rule.metric),
            ),
        )
    else:
        model = ("model_name", "=", rule.model)
        created = selector("mlflow_model_version_created_timestamp_seconds", model)
        versions = selector("mlflow_model_version_metric", model, ("metric_key", "=", rule.metric))
        champion = selector("mlflow_model_alias_info", model, ("alias", "=", rule.champion))
        archived = selector("mlflow_model_version_info", model, ("stage", "=", "Archived"))
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
    bound = f"{word} {number(value)}"
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
    tolerance = number(rule.margin)
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


def _rule(rule: Rule, expr: str, summary: str, description: str) -> dict[str, Any]:
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
