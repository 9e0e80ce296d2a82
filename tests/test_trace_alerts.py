"""GenAI alert rules rendered from `alerts.traces`: validation, the committed rule file, and
promtool (a local binary) checking and unit-testing them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from exporter.alert_rules import render, render_yaml
from exporter.alert_settings import AlertsSettings, TraceAlertsSettings
from exporter.config import load_settings
from exporter.trace_alerts import GROUP_NAME

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "prometheus" / "genai-alerts.example.yaml"
COMMITTED = ROOT / "prometheus" / "rules" / "genai-alerts.yml"
PROMTOOL_TESTS = ROOT / "prometheus" / "tests" / "genai_alerts_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")


def example() -> AlertsSettings:
    return load_settings(EXAMPLE, env={}).alerts


def test_the_committed_rule_file_is_a_fresh_render_of_the_example() -> None:
    # If this fails, regenerate it:
    #   exporter --config prometheus/genai-alerts.example.yaml alert-rules \
    #     -o prometheus/rules/genai-alerts.yml
    assert COMMITTED.read_text("utf-8") == render_yaml(example())


def test_each_objective_gets_a_fast_and_a_slow_burn_alert() -> None:
    (group,) = render(example())["groups"]
    assert group["name"] == GROUP_NAME
    assert [r["alert"] for r in group["rules"]] == [
        "ChatbotErrorBudgetFastBurn",
        "ChatbotLatencyBudgetFastBurn",
        "ChatbotErrorBudgetSlowBurn",
        "ChatbotLatencyBudgetSlowBurn",
        "ChatbotJudgedIncorrect",
        "GenAIExperimentSilent",
    ]
    fast = group["rules"][0]["expr"]
    assert "[1h]" in fast
    assert "[5m]" in fast
    assert "0.144" in fast  # 14.4 x a 1% budget


def test_model_and_genai_rules_render_as_two_groups_and_model_rules_alone_as_before() -> None:
    threshold = {"name": "Low", "metric": "accuracy", "below": 0.7}
    both = AlertsSettings.model_validate(
        {"thresholds": [threshold], "traces": {"silences": [{"name": "Quiet"}]}}
    )
    assert [g["name"] for g in render(both)["groups"]] == ["mlflow-model-alerts", GROUP_NAME]
    alone = AlertsSettings.model_validate({"thresholds": [threshold]})
    assert [g["name"] for g in render(alone)["groups"]] == ["mlflow-model-alerts"]


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"slos": [{"name": "A"}]}, "set error_objective, latency_seconds or both"),
        ({"slos": [{"name": "A", "error_objective": 1.5}]}, "less than 1"),
        ({"silences": [{"name": "A"}, {"name": "A"}]}, "used twice: A"),
        ({"silences": [{"name": "a-b"}]}, "not a valid alert name"),
        ({"silences": [{"name": "A", "after": 60}]}, "Prometheus duration"),
        (
            {"assessments": [{"name": "A", "assessment": "x", "below": 1, "experiments": "(?=x)"}]},
            "RE2",
        ),
    ],
)
def test_bad_trace_rules_are_refused_with_the_reason(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TraceAlertsSettings.model_validate(section)


@needs_promtool
def test_promtool_accepts_and_unit_tests_the_rendered_rules(tmp_path: Path) -> None:
    path = tmp_path / "rules.yml"
    path.write_text(render_yaml(example()), encoding="utf-8")
    checked = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout
    tested = subprocess.run(
        [str(PROMTOOL), "test", "rules", str(PROMTOOL_TESTS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_rendered_rule_is_tested_by_promtool() -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text("utf-8"))["tests"]
    firing = {c["alertname"] for case in tests for c in case["alert_rule_test"] if c["exp_alerts"]}
    assert firing == {r["alert"] for g in render(example())["groups"] for r in g["rules"]}
