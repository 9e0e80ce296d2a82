"""Unit tests for exporter.alert_rules and `exporter alert-rules`: the `alerts:` config section,
its validation, the PromQL each rule renders to, and the rendered file Prometheus loads.

No servers: promtool is a local binary and checks and unit-tests the rendered rules.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from pydantic import Field

from exporter import cli, config, model
from exporter.alert_rules import (
    GROUP_NAME,
    HEADER,
    regression_expr,
    render,
    render_yaml,
    threshold_expr,
)
from exporter.alert_settings import AlertsSettings, RunStatus
from exporter.config import ConfigError, load_settings
from exporter.durations import prometheus_seconds as duration_seconds
from exporter.promql import promql_string

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "prometheus" / "model-alerts.example.yaml"
COMMITTED = ROOT / "prometheus" / "rules" / "model-alerts.yml"
PROMTOOL_TESTS = ROOT / "prometheus" / "tests" / "model_alerts_test.yml"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")


def alerts(**section: Any) -> AlertsSettings:
    return AlertsSettings.model_validate(section)


def threshold(**rule: Any) -> dict[str, Any]:
    return {"name": "T", "metric": "accuracy", "below": 0.7, **rule}


def regression(**rule: Any) -> dict[str, Any]:
    return {
        "name": "R",
        "model": "churn-classifier",
        "metric": "accuracy",
        "direction": "higher_is_better",
        "candidate_alias": "challenger",
        **rule,
    }


def only_rule(section: AlertsSettings) -> dict[str, Any]:
    rules = render(section)["groups"][0]["rules"]
    assert len(rules) == 1
    return typing.cast("dict[str, Any]", rules[0])


def example() -> AlertsSettings:
    return AlertsSettings.model_validate(yaml.safe_load(EXAMPLE.read_text("utf-8"))["alerts"])


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings with the `alerts` section, as exporter.config will have it once wired; a
    no-op once it is. Also keeps the process environment out of load_settings."""
    if "alerts" not in config.Settings.model_fields:

        class WiredSettings(config.Settings):
            alerts: AlertsSettings = Field(default_factory=AlertsSettings)

        monkeypatch.setattr(config, "Settings", WiredSettings)
    for name in [*config.ENV_KEYS, config.DEFAULT_CONFIG_ENV]:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------ threshold rules


def test_a_model_alias_threshold_watches_the_version_the_alias_points_at() -> None:
    rule = only_rule(
        alerts(thresholds=[threshold(model="churn-classifier", alias="champion", below=0.7)])
    )
    # One alert per alias, version and key: the copies of `prometheus.mode: both` (pushed,
    # with the experiment group's key; pulled, with instance) collapse into one series.
    assert rule["expr"] == (
        "max by (model_name, alias, version, metric_key) (\n"
        '  mlflow_model_alias_metric{model_name="churn-classifier", alias="champion", '
        'metric_key="accuracy"} < 0.7\n'
        ")\n"
    )


def test_a_run_threshold_judges_finished_runs_that_ended_within_a_day_by_default() -> None:
    section = alerts(
        thresholds=[threshold(metric="val/loss", below=None, above=0.5, experiments=".*")]
    )
    # One alert per experiment, run and key whatever the copies; the names come from one
    # copy of run_info (topk), so copies that disagree on a label cannot break the join.
    assert only_rule(section)["expr"] == (
        "max by (experiment_id, run_id, metric_key) (\n"
        '  mlflow_val_loss{metric_key="val/loss", experiment_name=~".*"} > 0.5\n'
        ")\n"
        "* on (experiment_id, run_id) group_left (experiment_name, run_name)\n"
        '  topk by (experiment_id, run_id) (1, mlflow_run_info{status="FINISHED"})\n'
        "and on (experiment_id, run_id)\n"
        "  (time() - mlflow_run_end_time_seconds < 86400)\n"
    )


def test_a_run_threshold_can_judge_runs_of_any_status_whenever_they_ended() -> None:
    expr = threshold_expr(
        alerts(thresholds=[threshold(run_status=[], ended_within=None)]).thresholds[0]
    )
    assert expr == (
        "max by (experiment_id, run_id, metric_key) (\n"
        '  mlflow_accuracy{metric_key="accuracy"} < 0.7\n'
        ")\n"
        "* on (experiment_id, run_id) group_left (experiment_name, run_name)\n"
        "  topk by (experiment_id, run_id) (1, mlflow_run_info)\n"
    )


def test_experiment_patterns_and_statuses_become_one_alternation_each() -> None:
    expr = threshold_expr(
        alerts(
            thresholds=[
                threshold(
                    experiments=["churn", "fraud-.*"],
                    exclude_experiments="tmp-.*",
                    run_status=["KILLED", "FINISHED"],
                    ended_within="2h",
                )
            ]
        ).thresholds[0]
    )
    # Prometheus anchors the whole alternation, so each pattern still matches whole names.
    assert 'experiment_name=~"(?:churn)|(?:fraud-.*)"' in expr
    assert 'experiment_name!~"tmp-.*"' in expr
    assert 'mlflow_run_info{status=~"FINISHED|KILLED"}' in expr
    assert "mlflow_run_end_time_seconds < 7200)" in expr


def test_a_run_threshold_matches_the_original_key_within_its_family() -> None:
    # `val.loss` shares the family mlflow_val_loss with `val/loss`.
    expr = threshold_expr(alerts(thresholds=[threshold(metric="val.loss")]).thresholds[0])
    assert '\n  mlflow_val_loss{metric_key="val.loss"} < 0.7\n' in expr


def test_rules_carry_for_severity_alert_source_and_extra_labels() -> None:
    rule = only_rule(
        alerts(
            thresholds=[
                threshold(**{"for": "1h30m"}, severity="critical", labels={"team": "growth"})
            ]
        )
    )
    assert rule["alert"] == "T"
    assert rule["for"] == "1h30m"
    assert rule["labels"] == {"severity": "critical", "alert_source": "config", "team": "growth"}


def test_default_annotations_template_the_series_labels_and_value() -> None:
    rule = only_rule(alerts(thresholds=[threshold(model="m", alias="champion")]))
    assert rule["annotations"] == {
        "summary": "{{ $labels.metric_key }} of {{ $labels.model_name }}@{{ $labels.alias }} "
        "is below 0.7",
        "description": "Version {{ $labels.version }} of model {{ $labels.model_name }} (alias "
        "{{ $labels.alias }}) has {{ $labels.metric_key }} {{ $value }}, below 0.7 (rule T).",
    }


def test_summary_and_description_overrides_replace_the_defaults() -> None:
    rule = only_rule(
        alerts(thresholds=[threshold(summary="Churn model is slipping", description="Retrain.")])
    )
    assert rule["annotations"] == {
        "summary": "Churn model is slipping",
        "description": "Retrain.",
    }


def test_rule_defaults_are_warning_after_fifteen_minutes() -> None:
    rule = only_rule(alerts(regressions=[regression()]))
    assert rule["for"] == "15m"
    assert rule["labels"] == {"severity": "warning", "alert_source": "config"}


# ------------------------------------------------------------------ regression rules


def test_a_challenger_regression_compares_it_with_the_champion_minus_the_margin() -> None:
    expr = regression_expr(alerts(regressions=[regression(margin=0.02)]).regressions[0])
    assert expr == (
        "max by (model_name, alias, version, metric_key) (\n"
        '  mlflow_model_alias_metric{model_name="churn-classifier", alias="challenger", '
        'metric_key="accuracy"}\n'
        ")\n"
        "< on (model_name, metric_key) group_left (champion_version)\n"
        "  label_replace(\n"
        "    max by (model_name, metric_key, version) (mlflow_model_alias_metric"
        '{model_name="churn-classifier", alias="champion", metric_key="accuracy"})\n'
        "      - 0.02,\n"
        '    "champion_version", "$1", "version", "(.*)"\n'
        "  )\n"
    )


def test_lower_is_better_flips_the_comparison_and_the_margin() -> None:
    expr = regression_expr(
        alerts(
            regressions=[regression(metric="loss", direction="lower_is_better", margin=0.1)]
        ).regressions[0]
    )
    assert "\n> on (model_name, metric_key) group_left (champion_version)\n" in expr
    assert "\n      + 0.1,\n" in expr


def test_without_a_margin_any_shortfall_against_the_champion_counts() -> None:
    expr = regression_expr(alerts(regressions=[regression()]).regressions[0])
    assert 'metric_key="accuracy"}),\n    "champion_version"' in expr


def test_a_relative_margin_counts_when_it_is_larger_than_the_absolute_one() -> None:
    expr = regression_expr(
        alerts(regressions=[regression(margin=0.01, relative_margin=0.05)]).regressions[0]
    )
    champion = (
        'max by (model_name, metric_key, version) (mlflow_model_alias_metric{model_name="churn-'
        'classifier", alias="champion", metric_key="accuracy"})'
    )
    assert f"- clamp_min(abs({champion}) * 0.05, 0.01)," in expr


def test_newer_versions_are_those_created_after_the_champions_and_not_archived() -> None:
    expr = regression_expr(
        alerts(
            regressions=[
                regression(candidate_alias=None, newer_versions=True, champion="prod", margin=1)
            ]
        ).regressions[0]
    )
    model = 'model_name="churn-classifier"'
    created = f"mlflow_model_version_created_timestamp_seconds{{{model}}}"
    assert expr.startswith(
        "max by (model_name, version, run_id, metric_key) (\n"
        f'    mlflow_model_version_metric{{{model}, metric_key="accuracy"}}\n'
        "  and on (model_name, version)\n"
        "    (\n"
        f"        {created}\n"
        "      > on (model_name) group_left ()\n"
        "        max by (model_name) (\n"
        f"            {created}\n"
        "          and on (model_name, version)\n"
        f'            mlflow_model_alias_info{{{model}, alias="prod"}}\n'
        "        )\n"
        "    )\n"
        "  unless on (model_name, version)\n"
        f'    mlflow_model_version_info{{{model}, stage="Archived"}}\n'
        ")\n"
        "< on (model_name, metric_key) group_left (champion_version)\n"
    )
    assert 'alias="prod", metric_key="accuracy"})\n      - 1,' in expr


def test_regression_annotations_name_both_versions_and_the_tolerance() -> None:
    rule = only_rule(alerts(regressions=[regression(margin=0.02, relative_margin=0.1)]))
    assert rule["annotations"]["summary"] == (
        "{{ $labels.model_name }}@{{ $labels.alias }} has worse {{ $labels.metric_key }} "
        "than @champion"
    )
    assert rule["annotations"]["description"] == (
        "Version {{ $labels.version }} of {{ $labels.model_name }} (alias {{ $labels.alias }}) "
        "has {{ $labels.metric_key }} {{ $value }}, more than the larger of 0.02 and 10% of the "
        "champion's value below that of version {{ $labels.champion_version }} (alias "
        "champion); higher is better (rule R)."
    )


# ------------------------------------------------------------------ the whole file


def test_render_is_one_group_with_thresholds_then_regressions_in_config_order() -> None:
    section = alerts(
        thresholds=[threshold(name="B"), threshold(name="A")],
        regressions=[regression(name="D"), regression(name="C")],
    )
    (group,) = render(section)["groups"]
    assert group["name"] == GROUP_NAME == "mlflow-model-alerts"
    assert [r["alert"] for r in group["rules"]] == ["B", "A", "D", "C"]
    assert [list(r) for r in group["rules"]] == [
        ["alert", "expr", "for", "labels", "annotations"]
    ] * 4


def test_render_yaml_is_the_rendered_structure_under_a_do_not_edit_header() -> None:
    text = render_yaml(example())
    assert text.startswith(HEADER)
    assert "DO NOT EDIT BY HAND" in HEADER
    assert "exporter alert-rules" in HEADER
    assert yaml.safe_load(text) == render(example())
    # Multi-line PromQL stays readable: a literal block, not a quoted one-liner.
    assert "expr: |\n" in text


def test_no_alerts_configured_renders_an_empty_group() -> None:
    assert render(AlertsSettings()) == {"groups": [{"name": GROUP_NAME, "rules": []}]}


def test_rule_run_statuses_are_the_exporters_run_statuses() -> None:
    assert typing.get_args(RunStatus) == model.RUN_STATUSES


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0), ("0s", 0), ("90s", 90), ("15m", 900), ("1h30m", 5400), ("1d", 86400),
     ("2w", 1_209_600), ("1y", 31_536_000), ("500ms", 0.5)],
)  # fmt: skip
def test_durations_are_read_as_prometheus_reads_them(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


# ------------------------------------------------------------------ PromQL quoting


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("val/loss", '"val/loss"'),
        ('say "hi"', r'"say \"hi\""'),
        ("C:\\models\\churn", r'"C:\\models\\churn"'),
        ('\\"', r'"\\\""'),
        ("line\nbreak\ttab", r'"line\nbreak\ttab"'),
        ("bell\x07", r'"bell\x07"'),
        ("précision 精度", '"précision 精度"'),
        (r"churn\.v[0-9]+", r'"churn\\.v[0-9]+"'),
    ],
)
def test_promql_strings_escape_backslashes_quotes_and_control_characters(
    value: str, literal: str
) -> None:
    assert promql_string(value) == literal


def test_awkward_names_are_quoted_in_every_matcher() -> None:
    section = alerts(
        thresholds=[
            threshold(name="A", model='we"ird\\model', alias='champ"ion'),
            threshold(name="B", metric="précision", experiments=r"churn\.v2"),
        ]
    )
    a, b = (r["expr"] for r in render(section)["groups"][0]["rules"])
    assert 'model_name="we\\"ird\\\\model", alias="champ\\"ion"' in a
    assert b.startswith(
        "max by (experiment_id, run_id, metric_key) (\n"
        '  mlflow_precision{metric_key="précision", experiment_name=~"churn\\\\.v2"}'
    )


def test_literal_names_in_annotations_cannot_start_a_template_action() -> None:
    rule = only_rule(alerts(regressions=[regression(champion="prod{{x}}")]))
    assert '@{{ "prod{{x}}" }}' in rule["annotations"]["summary"]


# ------------------------------------------------------------------ validation


def problems_of(tmp_path: Path, section: Any) -> list[str]:
    """What a user sees for an `alerts:` section: config problems, each with its key path."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"alerts": section}), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    return info.value.problems


T0, R0 = "alerts.thresholds.0", "alerts.regressions.0"
PROBLEMS = [
    # (alerts section, the one problem expected, starting with its key path)
    ({"thresholds": [threshold(above=0.9)]}, f"{T0}: set exactly one of above or below"),
    ({"thresholds": [threshold(below=None)]}, f"{T0}: set exactly one of above or below"),
    ({"thresholds": [threshold(below=float("nan"))]}, f"{T0}.below: Input should be a finite"),
    ({"thresholds": [threshold(experiments="(")]}, f"{T0}.experiments: bad regular expression '('"),
    (
        {"thresholds": [threshold(exclude_experiments=["ok", "(?!tmp).*"])]},
        f"{T0}.exclude_experiments: regular expression '(?!tmp).*' uses lookaround",
    ),
    ({"thresholds": [threshold(name="churn low")]}, f"{T0}.name: 'churn low' is not a valid alert"),
    ({"thresholds": [threshold(name="Churn:Low")]}, f"{T0}.name: 'Churn:Low' is not a valid alert"),
    (
        {"thresholds": [threshold(severity="page")]},
        f"{T0}.severity: Input should be 'critical', 'warning' or 'info'",
    ),
    ({"thresholds": [threshold(**{"for": "15 min"})]}, f"{T0}.for: '15 min' is not a Prometheus"),
    ({"thresholds": [threshold(**{"for": "1.5h"})]}, f"{T0}.for: '1.5h' is not a Prometheus"),
    ({"thresholds": [threshold(**{"for": "30m1h"})]}, f"{T0}.for: '30m1h' is not a Prometheus"),
    ({"regressions": [regression(**{"for": 15})]}, f"{R0}.for: must be a Prometheus duration"),
    (
        {"thresholds": [threshold(ended_within="yesterday")]},
        f"{T0}.ended_within: 'yesterday' is not a Prometheus duration",
    ),
    (
        {"thresholds": [threshold(ended_within="10m", **{"for": "15m"})]},
        f"{T0}: ended_within (10m) must be longer than for (15m)",
    ),
    (
        {"thresholds": [threshold(run_status=["FINISHED", "RUNNING"])]},
        f"{T0}: run_status RUNNING never matches with ended_within set",
    ),
    ({"thresholds": [threshold(run_status=["DONE"])]}, f"{T0}.run_status.0: Input should be"),
    ({"thresholds": [threshold(model="churn")]}, f"{T0}: model 'churn' needs an alias"),
    ({"thresholds": [threshold(alias="champion")]}, f"{T0}: alias 'champion' needs the model"),
    (
        {"thresholds": [threshold(model="m", alias="a", experiments=".*", ended_within="1h")]},
        f"{T0}: experiments, ended_within select runs and do not apply to a model/alias rule",
    ),
    ({"thresholds": [threshold(metric="")]}, f"{T0}.metric: String should have at least 1"),
    (
        {"thresholds": [threshold(labels={"severity": "page"})]},
        f"{T0}.labels: label 'severity' is set by the renderer",
    ),
    (
        {"thresholds": [threshold(labels={"__name__": "x"})]},
        f"{T0}.labels: '__name__' is not a valid label name",
    ),
    ({"thresholds": [threshold(threshold=0.7)]}, f"{T0}.threshold: unknown key"),
    (
        {"regressions": [regression(direction="up")]},
        f"{R0}.direction: Input should be 'higher_is_better' or 'lower_is_better'",
    ),
    (
        {"regressions": [{k: v for k, v in regression().items() if k != "direction"}]},
        f"{R0}.direction: Field required",
    ),
    (
        {"regressions": [regression(newer_versions=True)]},
        f"{R0}: set exactly one of candidate_alias (an alias such as challenger) or newer_versions",
    ),
    ({"regressions": [regression(candidate_alias=None)]}, f"{R0}: set exactly one of candidate"),
    (
        {"regressions": [regression(candidate_alias="champion")]},
        f"{R0}: candidate_alias and champion are both 'champion'",
    ),
    ({"regressions": [regression(margin=-0.1)]}, f"{R0}.margin: Input should be greater than"),
    (
        {"regressions": [regression(relative_margin=-1)]},
        f"{R0}.relative_margin: Input should be greater than or equal to 0",
    ),
    (
        {"thresholds": [threshold(name="X")], "regressions": [regression(name="X")]},
        f"alerts: alert name 'X' is used twice, at {T0}.name and {R0}.name",
    ),
    ({"rules": []}, "alerts.rules: unknown key"),
]


@pytest.mark.usefixtures("wired")
@pytest.mark.parametrize(("section", "expected"), PROBLEMS)
def test_each_invalid_setting_is_reported_with_its_key_path(
    tmp_path: Path, section: Any, expected: str
) -> None:
    (problem,) = problems_of(tmp_path, section)
    assert problem.startswith(expected), problem


@pytest.mark.parametrize(
    "pattern", [r"(?i)churn-.*", r"(?P<team>[a-z]+)-v\d+", r"a\\1", r"prod|staging", "精度.*"]
)
def test_patterns_prometheus_can_run_are_accepted(pattern: str) -> None:
    rule = alerts(thresholds=[threshold(experiments=pattern)]).thresholds[0]
    assert rule.experiments == [pattern]


@pytest.mark.parametrize(
    "pattern", [r"(?=a)b", r"(?<!tmp)-x", r"(a)\1", r"(x)\\\1", r"(?P<x>a)(?P=x)"]
)
def test_lookaround_and_backreferences_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="lookaround or a backreference"):
        alerts(thresholds=[threshold(experiments=pattern)])


@pytest.mark.usefixtures("wired")
def test_problems_in_several_rules_are_reported_together(tmp_path: Path) -> None:
    problems = problems_of(
        tmp_path,
        {
            "thresholds": [threshold(severity="page"), threshold(name="U", experiments="[")],
            "regressions": [regression(direction="sideways")],
        },
    )
    assert [p.split(":")[0] for p in problems] == [
        "alerts.thresholds.0.severity",
        "alerts.thresholds.1.experiments",
        "alerts.regressions.0.direction",
    ]


@pytest.mark.usefixtures("wired")
def test_the_example_config_loads_through_the_settings_with_all_four_rules() -> None:
    settings = load_settings(EXAMPLE, env={})
    assert getattr(settings, "alerts", None) == example()
    assert [r.name for r in [*example().thresholds, *example().regressions]] == [
        "ChurnChampionAccuracyLow",
        "RunValidationLossHigh",
        "ChurnChallengerWorseThanChampion",
        "ChurnNewVersionValLossRegressed",
    ]


def test_the_section_dumps_with_the_keys_a_user_writes() -> None:
    # check-config prints the effective config; it must show `for`, not the Python name.
    section = alerts(
        thresholds=[threshold(**{"for": "5m"}), threshold(name="M", model="m", alias="a")],
        regressions=[regression(newer_versions=True, candidate_alias=None)],
    )
    dumped = section.model_dump(mode="json")
    assert dumped["thresholds"][0]["for"] == "5m"
    assert "for_" not in dumped["thresholds"][0]
    # Defaults included, it loads back: a model rule's run filters at their defaults are fine.
    assert AlertsSettings.model_validate(dumped) == section


# ------------------------------------------------------------------ promtool

AWKWARD: dict[str, Any] = {
    "thresholds": [
        threshold(name="Quoted", model='we"ird\\model ünï', alias='champ"ion'),
        threshold(name="Unicode", metric="précision", experiments=[r"churn\.v2", "精度.*"]),
        threshold(name="Cjk", metric="精度", below=None, above=1, exclude_experiments="a\\\\b"),
    ],
    "regressions": [
        regression(name="Brace", model="m{{x}}", champion="c}}h{{", margin=0.5),
        regression(
            name="Newer",
            metric="val/loss",
            direction="lower_is_better",
            candidate_alias=None,
            newer_versions=True,
            relative_margin=0.1,
        ),
    ],
}
EVERY_OPTION: dict[str, Any] = {
    "thresholds": [
        threshold(
            name="Everything",
            experiments=["a", "b"],
            exclude_experiments=["c"],
            run_status=["FINISHED", "KILLED", "FAILED"],
            ended_within="2w",
            severity="info",
            labels={"team": "growth", "runbook": "https://example.com/rb"},
            summary="{{ $labels.run_name }} is bad",
            description="Value {{ $value | humanize }}.",
            **{"for": "1h30m"},
        ),
        threshold(name="AnyRun", run_status=[], ended_within=None, **{"for": "0s"}),
    ]
}


# Labels that only tell copies of one value apart: `instance` (empty when pushed, the
# exporter's address when pulled), `job`, and the Pushgateway group's key (`group` of the
# registry group; `experiment_id`, which is also a label of its own of run series).
COPY_LABELS = {"instance", "job", "group"}


@pytest.mark.parametrize(
    "section",
    [pytest.param(None, id="example"), pytest.param(AWKWARD, id="awkward-names"),
     pytest.param(EVERY_OPTION, id="every-option")],
)  # fmt: skip
def test_every_rule_counts_each_copy_of_a_series_once(section: Any) -> None:
    # prometheus.mode: both holds every series twice (pushed and pulled); each rule first
    # keeps only the labels naming what it judges, and never matches on a copy's labels.
    settings = example() if section is None else AlertsSettings.model_validate(section)
    for rule in render(settings)["groups"][0]["rules"]:
        expr = rule["expr"]
        assert expr.startswith("max by ("), rule["alert"]
        lists = re.findall(r"\b(?:by|on|group_left)\s*\(([^)]*)\)", expr)
        named = {label.strip() for names in lists for label in names.split(",")} - {""}
        copy_labels = COPY_LABELS if "mlflow_run_info" in expr else {*COPY_LABELS, "experiment_id"}
        assert named.isdisjoint(copy_labels), (rule["alert"], named & copy_labels)


@needs_promtool
@pytest.mark.parametrize(
    "section",
    [pytest.param(None, id="example"), pytest.param({}, id="empty"),
     pytest.param(AWKWARD, id="awkward-names"), pytest.param(EVERY_OPTION, id="every-option")],
)  # fmt: skip
def test_promtool_accepts_the_rendered_rules(tmp_path: Path, section: Any) -> None:
    settings = example() if section is None else AlertsSettings.model_validate(section)
    path = tmp_path / "rules.yml"
    path.write_text(render_yaml(settings), encoding="utf-8")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    count = len(settings.thresholds) + len(settings.regressions)
    assert f"SUCCESS: {count} rules found" in result.stdout


@needs_promtool
def test_awkward_names_select_exactly_their_series_in_prometheus(tmp_path: Path) -> None:
    # The escaped matchers must select the series whose labels hold the raw names.
    model, alias, key = 'we"ird\\model ünï', 'champ"ion', "précision"
    rules = tmp_path / "rules.yml"
    section = alerts(
        thresholds=[threshold(name="Quoted", model=model, alias=alias, metric=key, **{"for": "0s"})]
    )
    rules.write_text(render_yaml(section), encoding="utf-8")
    labels = {"model_name": model, "alias": alias, "version": "1", "metric_key": key}

    def series(labels: dict[str, str]) -> str:
        matchers = ", ".join(f"{name}={promql_string(value)}" for name, value in labels.items())
        return f"mlflow_model_alias_metric{{{matchers}}}"

    # What an over- or under-escaped matcher would select instead.
    near_miss = {**labels, "model_name": model.replace("\\", "\\\\")}
    test = {
        "rule_files": ["rules.yml"],
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series(labels), "values": "0.5x5"},
                    {"series": series(near_miss), "values": "0.5x5"},
                ],
                "alert_rule_test": [
                    {
                        "eval_time": "2m",
                        "alertname": "Quoted",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    **labels,
                                    "severity": "warning",
                                    "alert_source": "config",
                                },
                                "exp_annotations": {
                                    "summary": f"{key} of {model}@{alias} is below 0.7",
                                    "description": f"Version 1 of model {model} (alias {alias}) "
                                    f"has {key} 0.5, below 0.7 (rule Quoted).",
                                },
                            }
                        ],
                    }
                ],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, allow_unicode=True), encoding="utf-8")
    result = promtool("test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_committed_rules_pass() -> None:
    result = promtool("test", "rules", str(PROMTOOL_TESTS.relative_to(ROOT)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_cover_every_committed_rule() -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text("utf-8"))["tests"]
    tested = {case["alertname"] for t in tests for case in t["alert_rule_test"]}
    firing = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    rules = {r["alert"] for r in render(example())["groups"][0]["rules"]}
    assert tested == firing == rules


def test_promtool_unit_tests_run_every_rule_on_pushed_and_pulled_copies_at_once() -> None:
    # A case of prometheus.mode: both for each rule: pushed (instance="") and pulled
    # (instance="<exporter>") copies of its series side by side, and the rule firing.
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text("utf-8"))["tests"]
    both = set()
    for case in tests:
        series = [s["series"] for s in case["input_series"]]
        if any('instance=""' in s for s in series) and any(
            re.search(r'instance="[^"]+"', s) for s in series
        ):
            both |= {c["alertname"] for c in case["alert_rule_test"] if c["exp_alerts"]}
    assert both == {r["alert"] for r in render(example())["groups"][0]["rules"]}


def test_the_committed_rule_file_is_a_fresh_render_of_the_example() -> None:
    # If this fails, regenerate it:
    #   exporter --config prometheus/model-alerts.example.yaml alert-rules \
    #     -o prometheus/rules/model-alerts.yml
    assert COMMITTED.read_text("utf-8") == render_yaml(example())


# ------------------------------------------------------------------ the CLI command


@pytest.fixture
def run(wired: None) -> Any:
    """`exporter ARGS...` in-process; returns click's Result (stdout and stderr apart)."""

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(cli.main, list(args))

    return invoke


def test_alert_rules_prints_the_rule_file_on_stdout(run: Any) -> None:
    result = run("--config", str(EXAMPLE), "alert-rules")
    assert result.exit_code == 0, result.output
    assert result.stdout == render_yaml(example())


def test_global_flags_work_after_the_command_too(run: Any) -> None:
    result = run("alert-rules", "--config", str(EXAMPLE))
    assert result.exit_code == 0, result.output
    assert result.stdout == render_yaml(example())


def test_alert_rules_writes_the_rule_file_given_with_output(run: Any, tmp_path: Path) -> None:
    target = tmp_path / "model-alerts.yml"
    target.write_text("stale\n", encoding="utf-8")
    result = run("--config", str(EXAMPLE), "alert-rules", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 4 alert rules to {target}\n"
    assert target.read_text("utf-8") == render_yaml(example())
    assert [p.name for p in tmp_path.iterdir()] == ["model-alerts.yml"]  # no partial file left


def test_check_passes_when_the_file_is_current(run: Any, tmp_path: Path) -> None:
    target = tmp_path / "model-alerts.yml"
    target.write_text(render_yaml(example()), encoding="utf-8")
    result = run("--config", str(EXAMPLE), "alert-rules", "--check", "--output", str(target))
    assert result.exit_code == 0, result.output
    assert target.read_text("utf-8") == render_yaml(example())


def test_check_fails_with_one_line_when_the_file_differs(run: Any, tmp_path: Path) -> None:
    target = tmp_path / "model-alerts.yml"
    edited = render_yaml(example()).replace("below: 0.7", "below: 0.6").replace("< 0.7", "< 0.6")
    target.write_text(edited, encoding="utf-8")
    result = run("--config", str(EXAMPLE), "alert-rules", "--check", "-o", str(target))
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {target} is out of date with the alerts config; regenerate it with: "
        f"exporter --config {EXAMPLE} alert-rules -o {target}\n"
    )
    assert target.read_text("utf-8") == edited  # --check never writes


def test_check_fails_when_the_file_does_not_exist(run: Any, tmp_path: Path) -> None:
    target = tmp_path / "missing.yml"
    result = run("--config", str(EXAMPLE), "alert-rules", "--check", "-o", str(target))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {target} does not exist; render it with: ")
    assert not target.exists()


def test_check_without_output_is_a_usage_error(run: Any) -> None:
    result = run("--config", str(EXAMPLE), "alert-rules", "--check")
    assert result.exit_code == 2
    assert result.stderr == "error: --check needs --output FILE: the rule file to compare\n"


def test_an_invalid_alerts_section_exits_2_listing_every_problem(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump({"alerts": {"thresholds": [threshold(above=1)], "regressions": [{}]}}),
        encoding="utf-8",
    )
    result = run("--config", str(path), "alert-rules")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "  - alerts.thresholds.0: set exactly one of above or below" in result.stderr
    assert "  - alerts.regressions.0.direction: Field required" in result.stderr


def test_a_config_without_alerts_renders_an_empty_group(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Not wired: the command falls back to an empty section while Settings has no `alerts`.
    for name in [*config.ENV_KEYS, config.DEFAULT_CONFIG_ENV]:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "config.yaml"
    path.write_text("export:\n  interval_seconds: 30\n", encoding="utf-8")
    result = CliRunner().invoke(cli.main, ["--config", str(path), "alert-rules"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout) == {"groups": [{"name": GROUP_NAME, "rules": []}]}


def test_zero_rules_never_replace_a_rule_file_that_holds_some(run: Any, tmp_path: Path) -> None:
    # As a newcomer typed the README's command without --config: no `alerts:` section at all.
    target = tmp_path / "model-alerts.yml"
    shipped = render_yaml(example())
    target.write_text(shipped, encoding="utf-8")
    result = run("alert-rules", "-o", str(target))
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"error: refusing to replace {target} with 0 alert rules (no --config or "
        "EXPORTER_CONFIG given, so no `alerts:` rules); name the config holding them, e.g. "
        "exporter --config prometheus/model-alerts.example.yaml alert-rules "
        f"-o {target}, or pass --allow-empty\n"
    )
    assert target.read_text("utf-8") == shipped


def test_zero_rules_refusal_names_the_config_that_was_read(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("export:\n  interval_seconds: 30\n", encoding="utf-8")
    target = tmp_path / "model-alerts.yml"
    target.write_text(render_yaml(example()), encoding="utf-8")
    result = run("--config", str(path), "alert-rules", "-o", str(target))
    assert result.exit_code == 1
    assert f"(config {path} has no `alerts:` rules)" in result.stderr


def test_allow_empty_replaces_the_rule_file_with_an_empty_group(run: Any, tmp_path: Path) -> None:
    target = tmp_path / "model-alerts.yml"
    target.write_text(render_yaml(example()), encoding="utf-8")
    result = run("alert-rules", "--allow-empty", "-o", str(target))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote 0 alert rules to {target}\n"
    assert yaml.safe_load(target.read_text("utf-8"))["groups"][0]["rules"] == []


def test_zero_rules_may_create_a_new_file_or_rewrite_an_identical_one(
    run: Any, tmp_path: Path
) -> None:
    target = tmp_path / "model-alerts.yml"
    for _ in range(2):  # created, then rewritten unchanged
        result = run("alert-rules", "-o", str(target))
        assert result.exit_code == 0, result.output
    assert yaml.safe_load(target.read_text("utf-8"))["groups"][0]["rules"] == []


def test_the_readme_command_reproduces_the_shipped_rule_file_byte_for_byte(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The exact line of the README's "Using the exporter" block, run from a copy of the repo's
    # prometheus/ folder with the shipped rule file removed.
    [line] = [
        line
        for line in (ROOT / "README.md").read_text("utf-8").splitlines()
        if line.startswith("exporter ") and " alert-rules " in line
    ]
    argv = shlex.split(line, comments=True)
    assert argv[0] == "exporter"
    shutil.copytree(ROOT / "prometheus", tmp_path / "prometheus")
    (tmp_path / "prometheus" / "rules" / "model-alerts.yml").unlink()
    monkeypatch.chdir(tmp_path)
    result = run(*argv[1:])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "prometheus" / "rules" / "model-alerts.yml").read_bytes()
    assert written == COMMITTED.read_bytes()
