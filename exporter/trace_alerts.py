"""GenAI alerting from configuration: the `alerts.traces` section, rendered next to the model
alerts (group `mlflow-genai-alerts`) by `exporter alert-rules`.

- **slos**: an error-rate SLO (finished traces that end in ERROR) and a latency SLO (the
  share of time a latency quantile stays above a bound: a time-slice SLO, as only quantiles
  reach Prometheus), each alerted with the SRE workbook's multi-window, multi-burn-rate pairs:
  14.4x the budget over 1h and 5m (fast, critical), 6x over 6h and 30m (slow, warning);
- **assessments**: a judge's or humans' mean score below a bound for a while;
- **silences**: an experiment that received traces and stopped (no new bucket for `after`;
  quiet after `within`, so an abandoned experiment does not fire forever).

Rules read the live series of any copy (pushed, pulled or both): each first takes `max by`
the experiment (and what it judges), so it fires once whatever the mode.
"""

from __future__ import annotations

from typing import Any

from exporter.alert_settings import (
    AssessmentAlert,
    SilenceAlert,
    TraceAlertsSettings,
    TraceRule,
    TraceSlo,
)
from exporter.durations import prometheus_seconds
from exporter.promql import ALERT_SOURCE, any_of, number, selector

GROUP_NAME = "mlflow-genai-alerts"
# The SRE workbook's page-worthy pairs: (long window, short window, burn rate, suffix, severity).
BURN_PAIRS = (
    ("1h", "5m", 14.4, "FastBurn", "critical"),
    ("6h", "30m", 6.0, "SlowBurn", "warning"),
)
_EXP = "experiment_id, experiment_name"


# --------------------------------------------------------------------------- PromQL


def _selector(metric: str, rule: TraceRule, *extra: tuple[str, str, str]) -> str:
    matchers = list(extra)
    if rule.experiments:
        matchers.append(("experiment_name", "=~", any_of(rule.experiments)))
    if rule.exclude_experiments:
        matchers.append(("experiment_name", "!~", any_of(rule.exclude_experiments)))
    return selector(metric, *matchers)


def error_ratio(rule: TraceSlo, window: str) -> str:
    """Share of the traces finished within `window` that ended in ERROR, per experiment
    (copies of a series counted once: summed per copy, then the largest copy)."""
    finished = _selector("mlflow_traces", rule, ("status", "=~", "OK|ERROR"))
    errors = _selector("mlflow_traces", rule, ("status", "=", "ERROR"))
    return (
        f"max by ({_EXP}) (increase({errors}[{window}]))\n"
        f"  / on ({_EXP})\n"
        f"max by ({_EXP}) (sum by ({_EXP}, instance) (increase({finished}[{window}])))"
    )


def slow_share(rule: TraceSlo, window: str) -> str:
    """Share of `window` during which the latency quantile was above the bound."""
    series = _selector(
        "mlflow_trace_latency_seconds", rule, ("quantile", "=", rule.latency_quantile)
    )
    bound = number(rule.latency_seconds or 0)
    return f"avg_over_time((max by ({_EXP}) ({series}) > bool {bound})[{window}:1m])"


def _burn(ratio: Any, budget: float, long: str, short: str, rate: float) -> str:
    limit = number(round(rate * budget, 10))
    return f"(\n  {ratio(long)}\n) > {limit}\nand on ({_EXP})\n(\n  {ratio(short)}\n) > {limit}\n"


def _indented(text: str) -> str:
    return text.replace("\n", "\n  ")


def _slo_rules(rule: TraceSlo) -> list[dict[str, Any]]:
    out = []
    for long, short, rate, suffix, severity in BURN_PAIRS:
        if rule.error_objective is not None:
            budget = 1 - rule.error_objective
            expr = _burn(lambda w: _indented(error_ratio(rule, w)), budget, long, short, rate)
            out.append(
                _rule(
                    f"{rule.name}ErrorBudget{suffix}",
                    expr,
                    "2m",
                    severity,
                    rule.labels,
                    "{{ $labels.experiment_name }} burns its error budget " + f"{rate:g}x fast",
                    f"Over {long} and {short}, more than {rate:g}x the error budget of "
                    f"{budget:.4g} of finished traces ended in ERROR (now "
                    "{{ $value | humanizePercentage }} over " + long + f"; rule {rule.name}).",
                )
            )
        if rule.latency_seconds is not None:
            budget = 1 - rule.latency_objective
            expr = _burn(lambda w: slow_share(rule, w), budget, long, short, rate)
            out.append(
                _rule(
                    f"{rule.name}LatencyBudget{suffix}",
                    expr,
                    "2m",
                    severity,
                    rule.labels,
                    "{{ $labels.experiment_name }} burns its latency budget " + f"{rate:g}x fast",
                    f"Over {long} and {short}, p{float(rule.latency_quantile) * 100:g} latency "
                    f"was above {rule.latency_seconds:g}s more than {rate:g}x the "
                    f"{budget:.4g} of the time allowed (rule {rule.name}).",
                )
            )
    return out


def _assessment_rule(rule: AssessmentAlert) -> dict[str, Any]:
    series = _selector(
        "mlflow_trace_assessment_value", rule, ("assessment_name", "=", rule.assessment)
    )
    expr = f"max by ({_EXP}, assessment_name) ({series}) < {number(rule.below)}\n"
    return _rule(
        rule.name,
        expr,
        rule.for_,
        rule.severity,
        rule.labels,
        "{{ $labels.assessment_name }} of {{ $labels.experiment_name }} is below "
        + number(rule.below),
        "The mean {{ $labels.assessment_name }} of the traces of the last window is "
        "{{ $value }} in {{ $labels.experiment_name }}, below " + number(rule.below) + " "
        f"(rule {rule.name}).",
    )


def _silence_rule(rule: SilenceAlert) -> dict[str, Any]:
    after = number(prometheus_seconds(rule.after))
    until = number(prometheus_seconds(rule.after) + prometheus_seconds(rule.within))
    quiet = f"time() - max by ({_EXP}) ({_selector('mlflow_trace_last_bucket_end_seconds', rule)})"
    expr = f"{quiet} > {after}\nand\n{quiet} < {until}\n"
    return _rule(
        rule.name,
        expr,
        "0s",
        rule.severity,
        rule.labels,
        "{{ $labels.experiment_name }} stopped receiving traces",
        "No trace reached {{ $labels.experiment_name }} for {{ $value | humanizeDuration }} "
        f"(rule {rule.name}).",
    )


def _rule(
    name: str,
    expr: str,
    for_: str,
    severity: str,
    labels: dict[str, str],
    summary: str,
    description: str,
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, "alert_source": ALERT_SOURCE, **labels},
        "annotations": {"summary": summary, "description": description},
    }


def genai_group(alerts: TraceAlertsSettings) -> dict[str, Any]:
    """The `mlflow-genai-alerts` rule group: SLO burns, then assessments, then silences."""
    rules = [r for slo in alerts.slos for r in _slo_rules(slo)]
    rules += [_assessment_rule(r) for r in alerts.assessments]
    rules += [_silence_rule(r) for r in alerts.silences]
    return {"name": GROUP_NAME, "rules": rules}
