"""The Prometheus rules and their promtool tests, held against what the exporter really exposes.

A rule test built on a series the exporter does not produce (a misspelt name, a label it does
not have, or lacks) proves nothing about production. So every input series of every
prometheus/tests/*_test.yml is checked, name and label names, against the exporter's real
output, rendered here without servers:

- self-metrics: `SelfMetrics()` as its /metrics renders them, plus the labels a scrape adds
  (job="mlflow-exporter", instance);
- MLflow data: `experiment_families` / `registry_families` over a small mirror, as the
  Pushgateway serves it (plus job, the group's key; no instance) and as the pull endpoint
  /mlflow/metrics serves it (plus job and instance); the remote-write copy (no job);
- what Prometheus and the Pushgateway add themselves (`up`, `push_time_seconds`, ...).

The metric names the rules' expressions read are checked the same way, and promtool checks
and unit-tests the rule files (a local binary; skipped when absent).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from exporter.model import (
    LIFECYCLE_STAGES,
    MODEL_STAGES,
    RUN_STATUSES,
    Experiment,
    LatestMetric,
    MetricPoint,
    ModelVersion,
    Registry,
    Run,
    RunContext,
)
from exporter.planners.series import (
    REGISTRY_KEY,
    ExperimentView,
    FixedCollector,
    ServerCounts,
    experiment_families,
    experiment_key,
    registry_families,
)
from exporter.planners.traces import trace_families
from exporter.selfmetrics import SelfMetrics
from exporter.sinks.history import _series as remote_write_series
from exporter.trace_model import NamedValues, TraceLive

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = ROOT / "prometheus"
RULE_TEST_FILES = sorted((PROMETHEUS / "tests").glob("*_test.yml"))
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
ALERTS, ALERTS_TEST = PROMETHEUS / "rules" / "alerts.yml", PROMETHEUS / "tests" / "alerts_test.yml"
RECORDING = PROMETHEUS / "rules" / "recording.yml"
RECORDING_TEST = PROMETHEUS / "tests" / "recording_test.yml"
IDLE_CASE = "healthy, idle exporters for four hours - nothing fires"

SELF_JOB = "mlflow-exporter"  # prometheus.yml's scrape job of the exporter's /metrics
# The MLflow metric keys the rule tests use (mlflow_accuracy, mlflow_val_loss, ...): the
# mirror below has runs with these, so their families are in the rendered output. A test
# using another key needs it added here; a misspelt family name matches none.
MLFLOW_KEYS = ("accuracy", "loss", "val/loss", "val.loss")
# What Prometheus adds to every scrape target, and the Pushgateway to every group.
SCRAPE_SERIES = (
    "up",
    "scrape_duration_seconds",
    "scrape_samples_scraped",
    "scrape_samples_post_metric_relabeling",
    "scrape_series_added",
)
PUSHGATEWAY_SERIES = ("push_time_seconds", "push_failure_time_seconds")
PROMETHEUS_SERIES = ("ALERTS", "ALERTS_FOR_STATE")

LabelNames = frozenset[str]


# --------------------------------------------------------------------------- the real output


def _samples(families: Iterable[Metric]) -> Iterator[tuple[str, dict[str, str]]]:
    """(name, labels) of every sample as Prometheus stores a scrape of their text exposition:
    a label with an empty value is no label."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FixedCollector(list(families)))
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            yield sample.name, {k: v for k, v in sample.labels.items() if v != ""}


# Every trace series an experiment holding traces can show (planners/traces.py).
TRACE_LIVE = TraceLive(
    NamedValues(
        {"OK": 3},
        {"input": 10.0, "output": 5.0, "total": 15.0},
        {"P50": 1.0, "P95": 2.0, "P99": 3.0},
    ),
    {"chat": NamedValues({"OK": 3}, {"input": 10.0}, {"P95": 2.0})},
    cost_usd=0.5,
    assessments={"correct": 3},
    assessment_means={"correct": 0.5},
    last_trace_ms=1_700_000_000_000,
)


def _self_families() -> list[Metric]:
    return list(SelfMetrics().registry.collect())


def _mirror() -> tuple[ExperimentView, Registry]:
    """A small mirror: one experiment with a finished and a running run, every key of
    MLFLOW_KEYS, a registered model version (with an alias) built from the first, and the
    empty labels real data has (no user, no alias, a version without a run)."""
    metrics = tuple(LatestMetric(k, 0.5, 3, 1_700_000_000_000) for k in MLFLOW_KEYS)
    finished = Run("a" * 32, "1", "nightly", "FINISHED", "alice", 1_699_990_000_000,
                   1_700_000_000_000, metrics)  # fmt: skip
    running = Run("b" * 32, "1", "", "RUNNING", "", 1_700_000_100_000, None, metrics)
    champion = ModelVersion("churn-classifier", "3", finished.run_id, "Production", "READY",
                            ("champion",), 1_700_000_200_000)  # fmt: skip
    plain = ModelVersion("churn-classifier", "4", running.run_id, "None", "READY")
    orphan = ModelVersion("churn-classifier", "5", None, "Archived", "READY")
    registry = Registry(("churn-classifier",), (champion, plain, orphan))
    view = ExperimentView(
        experiment=Experiment("1", "churn", last_update_time_ms=1_700_000_300_000),
        runs=[finished, running],
        status_counts={"FINISHED": 1, "RUNNING": 1},
        last_run_start_ms=running.start_time_ms,
        versions=[champion, plain],
        version_metrics={finished.run_id: metrics, running.run_id: metrics},
    )
    return view, registry


@dataclass
class Exposed:
    """Every (name -> accepted label-name sets) Prometheus can hold, and enumerated values."""

    shapes: dict[str, set[LabelNames]]
    self_metrics: set[str]  # names from the exporter's /metrics
    values: dict[tuple[str, str], set[str]]  # (name, label) -> every value it can take

    def accepts(self, name: str, labels: LabelNames) -> bool:
        return labels in self.shapes.get(name, set())


def exposed() -> Exposed:
    shapes: dict[str, set[LabelNames]] = defaultdict(set)
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    scrape = {"job", "instance"}

    self_metrics = set()
    for name, labels in _samples(_self_families()):
        shapes[name].add(frozenset(labels) | scrape)
        self_metrics.add(name)
        for label, value in labels.items():
            values[(name, label)].add(value)
    # Only labels whose every value the exporter creates up front are enumerated.
    values = defaultdict(
        set, {k: v for k, v in values.items() if k[1] in ("result", "stage", "kind", "reason")}
    )

    view, registry = _mirror()
    groups = [
        (experiment_key("1").as_dict(), experiment_families(view, registry.stage_by_run(), 12,
                                                        lambda _key: True)),
        (REGISTRY_KEY.as_dict(), registry_families(registry, ServerCounts({"active": 1}), 12)),
        (experiment_key("1").as_dict(), trace_families(TRACE_LIVE, "1", "churn")),
    ]  # fmt: skip
    for key, families in groups:
        for name, labels in _samples(families):
            # Pushed: the Pushgateway adds job and the group's key; instance="" is absent.
            shapes[name].add(frozenset(labels) | {"job"} | set(key))
            # Pulled from /mlflow/metrics: the scrape's job and instance, no group key.
            shapes[name].add(frozenset(labels) | scrape)
        for name in PUSHGATEWAY_SERIES:
            shapes[name].add(frozenset({"job", *key}))
    # The remote-write copy of every point: its own labels, no job.
    points = [MetricPoint("a" * 32, key, 0.5, 3, 1_700_000_000_000) for key in MLFLOW_KEYS]
    contexts = {"a" * 32: RunContext("1", "churn", "nightly", {})}
    for series in remote_write_series(points, contexts, 12):
        labels = dict(series.labels)
        shapes[labels.pop("__name__")].add(frozenset(labels))
    for name in SCRAPE_SERIES:
        shapes[name].add(frozenset(scrape))

    for name, label, allowed in [
        ("mlflow_experiment_runs", "status", RUN_STATUSES),
        ("mlflow_run_info", "status", RUN_STATUSES),
        ("mlflow_experiment_info", "lifecycle_stage", LIFECYCLE_STAGES),
        ("mlflow_experiments", "lifecycle_stage", LIFECYCLE_STAGES),
        ("mlflow_model_versions", "stage", MODEL_STAGES),
        ("mlflow_registered_model_versions", "stage", MODEL_STAGES),
        ("mlflow_model_version_info", "stage", MODEL_STAGES),
    ]:
        values[(name, label)] = set(allowed)
    return Exposed(dict(shapes), self_metrics, dict(values))


EXPOSED = exposed()


def scrape_jobs() -> set[str]:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text("utf-8"))
    return {job["job_name"] for job in config["scrape_configs"]}


# --------------------------------------------------------------------------- input series

SERIES = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*")
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')


def parse_series(text: str) -> tuple[str, dict[str, str]]:
    """`name{label="value", ...}` as promtool reads it; empty values are absent labels."""
    match = SERIES.fullmatch(text)
    if not match:
        raise ValueError(f"not a series: {text!r}")
    name, body, labels, pos = match.group(1), match.group(2) or "", {}, 0
    while pos < len(body.rstrip()):
        label = LABEL.match(body, pos)
        if not label:
            raise ValueError(f"cannot read the labels of {text!r} from {body[pos:]!r}")
        labels[label.group(1)] = label.group(2)
        pos = label.end()
    return name, {k: v for k, v in labels.items() if v != ""}


def input_series(test_file: Path) -> Iterator[tuple[str, str]]:
    """(test case name, series) of every input series of a promtool test file."""
    for case in yaml.safe_load(test_file.read_text("utf-8"))["tests"]:
        for item in case.get("input_series") or []:
            yield case.get("name", "?"), item["series"]


def problems(series: str, exposed: Exposed, jobs: set[str]) -> list[str]:
    """Why `series` is not something Prometheus could hold from this stack ([] if it is)."""
    name, labels = parse_series(series)
    names = frozenset(labels)
    if name not in exposed.shapes:
        return [f"no metric {name} in the exporter's output (or Prometheus'/the Pushgateway's)"]
    out = []
    if not exposed.accepts(name, names):
        accepted = " or ".join(sorted(str(sorted(s)) for s in exposed.shapes[name]))
        out.append(f"labels {sorted(names)}; the real {name} has {accepted}")
    for label, value in labels.items():
        allowed = exposed.values.get((name, label))
        if allowed is not None and value not in allowed:
            out.append(f"{label}={value!r}: {name} only has {sorted(allowed)}")
    job = labels.get("job")
    if name in exposed.self_metrics and job != SELF_JOB:
        out.append(f"job={job!r}: self-metrics are scraped by the job {SELF_JOB!r}")
    if name in SCRAPE_SERIES and job not in jobs:
        out.append(f"job={job!r}: prometheus.yml scrapes {sorted(jobs)}")
    return out


# Rule tests known not to match the exporter yet, kept visible: strict, so the entry must go
# when the file is fixed (file name -> why).
KNOWN_MISMATCHES: dict[str, str] = {}


@pytest.mark.parametrize(
    "test_file",
    [
        pytest.param(
            path,
            id=path.name,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_MISMATCHES[path.name])]
            if path.name in KNOWN_MISMATCHES
            else [],
        )
        for path in RULE_TEST_FILES
    ],
)
def test_every_input_series_is_shaped_like_the_exporters(test_file: Path) -> None:
    jobs = scrape_jobs()
    found = [
        f"{case}: {series}\n    -> {why}"
        for case, series in input_series(test_file)
        for why in problems(series, EXPOSED, jobs)
    ]
    assert not found, f"{len(found)} input series the exporter does not produce:\n" + "\n".join(
        found
    )


def test_rule_tests_were_found() -> None:
    assert {p.name for p in RULE_TEST_FILES} >= {"alerts_test.yml", "recording_test.yml"}
    assert sum(1 for f in RULE_TEST_FILES for _ in input_series(f)) > 100


BAD = [
    # (a series with one mistake, what the check says)
    ('mlflow_exporter_last_succes_timestamp_seconds{job="mlflow-exporter", instance="a:1"}',
     "no metric mlflow_exporter_last_succes_timestamp_seconds"),
    ('mlflow_exporter_errors_total{job="mlflow-exporter", instance="a:1", stag="state"}',
     "labels ['instance', 'job', 'stag']"),
    ('mlflow_exporter_errors_total{job="mlflow-exporter", instance="a:1", stage="pushgatway"}',
     "stage='pushgatway'"),
    ('mlflow_exporter_cycles_total{job="mlflow-exporter", instance="a:1"}',
     "labels ['instance', 'job']"),
    ('mlflow_exporter_up{job="mlflow_metrics", instance="a:1"}', "job='mlflow_metrics'"),
    ('mlflow_exporter_up{job="mlflow-exporter"}', "labels ['job']"),
    (('mlflow_run_info{job="mlflow_metrics", experiment_id="1", experiment_name="e", run_id="r", '
     'run_name="n", status="FAILED", user_id="u"}'), "labels"),  # no model_stage
    (('mlflow_experiment_runs{job="mlflow_metrics", experiment_id="1", experiment_name="e", '
     'status="failed"}'), "status='failed'"),
    ('mlflow_registered_model_versions{job="mlflow_metrics", model_name="m", stage="None"}',
     "labels"),  # pushed registry series carry group="registry"
    (('mlflow_acuracy{job="mlflow_metrics", experiment_id="1", experiment_name="e", run_id="r", '
     'metric_key="accuracy", model_stage="none"}'), "no metric mlflow_acuracy"),
    ('up{job="mlflow-exporters", instance="a:1"}', "job='mlflow-exporters'"),
]  # fmt: skip


@pytest.mark.parametrize(("series", "said"), BAD)
def test_the_check_catches_a_misspelt_name_label_or_value(series: str, said: str) -> None:
    found = problems(series, EXPOSED, scrape_jobs())
    assert found, series
    assert any(said in why for why in found), found


GOOD = [
    # Pushed (no instance, the group's key), pulled (instance, no group key), remote write.
    (
        'mlflow_registered_model_versions{job="mlflow_metrics", instance="", group="registry", '
        'model_name="m", stage="None"}'
    ),
    (
        'mlflow_registered_model_versions{job="mlflow_metrics", instance="e:9877", model_name="m", '
        'stage="Production"}'
    ),
    (
        'mlflow_model_version_metric{job="mlflow_metrics", experiment_id="1", model_name="m", '
        'version="3", run_id="r", metric_key="val/loss"}'
    ),
    (
        'mlflow_val_loss{experiment_id="1", experiment_name="e", run_id="r", run_name="n", '
        'metric_key="val/loss"}'
    ),
    'push_time_seconds{job="mlflow_metrics", group="registry"}',
    'mlflow_exporter_cycle_duration_seconds_bucket{job="mlflow-exporter", instance="a:1", le="1.0"}',
    (
        'mlflow_exporter_remote_write_set_aside_points{job="mlflow-exporter", instance="a:1", '
        'reason="too_old"}'
    ),
]


@pytest.mark.parametrize("series", GOOD)
def test_the_check_accepts_every_real_shape(series: str) -> None:
    assert problems(series, EXPOSED, scrape_jobs()) == []


# --------------------------------------------------------------------------- rule expressions

FUNCTION_OR_KEYWORD = {
    # aggregation operators (followed by by/without, not by a parenthesis)
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile",
    # binary and modifier keywords
    "and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left",
    "group_right", "offset", "inf", "nan",
}  # fmt: skip
NAME_REGEX = re.compile(r'__name__\s*=~\s*"((?:[^"\\]|\\.)*)"')
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w:.])[a-zA-Z_:][a-zA-Z0-9_:]*")
CALL = re.compile(r"\s*\(")


def rules(path: Path) -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(path.read_text("utf-8"))["groups"] for r in g["rules"]]


def metric_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, __name__ regexes) an expression selects."""
    regexes = set(NAME_REGEX.findall(expr))
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = LABEL_LIST.sub(" ", text)
    names = {
        m.group()
        for m in IDENTIFIER.finditer(text)
        if m.group().lower() not in FUNCTION_OR_KEYWORD and not CALL.match(text, m.end())
    }
    return names, regexes


def test_metric_names_parse_from_promql() -> None:
    names, regexes = metric_names(
        'max without (instance) (time() - a_b{job="x", y=~"by|on"} > 60)\n'
        "and on (job, instance) increase(c_total[15m] offset 1h) > 0 unless d:e:f * 86400 * 7\n"
        'or sum by (le) (rate({__name__=~"g_.+", k!=""}[5m]))'
    )
    assert names == {"a_b", "c_total", "d:e:f"}
    assert regexes == {"g_.+"}


def test_every_metric_a_rule_reads_is_produced() -> None:
    recorded = {r["record"] for path in RULE_FILES for r in rules(path) if "record" in r}
    known = set(EXPOSED.shapes) | set(PROMETHEUS_SERIES)
    found = []
    for path in RULE_FILES:
        for rule in rules(path):
            names, regexes = metric_names(rule["expr"])
            what = f"{path.name}: {rule.get('alert') or rule.get('record')}"
            for name in sorted(names):
                if ":" in name:
                    if name not in recorded:
                        found.append(f"{what}: no recording rule records {name}")
                elif name not in known:
                    found.append(f"{what}: no metric {name} in the exporter's output")
            for regex in sorted(regexes):
                if not any(re.fullmatch(regex, n) for n in known):
                    found.append(f"{what}: __name__=~{regex!r} matches no real metric")
    assert not found, "\n".join(found)


# --------------------------------------------------------------------------- coverage


def _alert_cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load(ALERTS_TEST.read_text("utf-8"))["tests"]
    return cases


def test_every_alert_fires_in_some_case_and_stays_quiet_when_healthy() -> None:
    alerts = {r["alert"] for r in rules(ALERTS) if "alert" in r}
    cases = _alert_cases()
    firing = {
        check["alertname"]
        for case in cases
        for check in case["alert_rule_test"]
        if check.get("exp_alerts")
    }
    assert alerts - firing == set(), "alerts never seen firing in alerts_test.yml"
    (idle,) = [c for c in cases if c["name"] == IDLE_CASE]
    quiet_after_an_hour = {
        check["alertname"]
        for check in idle["alert_rule_test"]
        if not check.get("exp_alerts") and _minutes(check["eval_time"]) >= 60
    }
    assert alerts - quiet_after_an_hour == set(), "alerts the healthy, idle case does not check"


def test_the_idle_case_never_refreshes_push_times() -> None:
    # The point of the case: pushed groups keep their first push time while all is well.
    (idle,) = [c for c in _alert_cases() if c["name"] == IDLE_CASE]
    pushes = [s for s in idle["input_series"] if s["series"].startswith("push_time_seconds")]
    assert pushes
    for series in pushes:
        assert re.fullmatch(r"\d+x\d+", series["values"]), series


def test_every_recording_rule_is_tested() -> None:
    recorded = {r["record"] for r in rules(RECORDING)}
    tests = yaml.safe_load(RECORDING_TEST.read_text("utf-8"))["tests"]
    exprs = " ".join(t["expr"] for case in tests for t in case.get("promql_expr_test") or [])
    assert {r for r in recorded if not re.search(rf"{re.escape(r)}(?![\w:])", exprs)} == set()


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60, "d": 1440}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)([smhd])", duration))


# --------------------------------------------------------------------------- promtool, amtool

PROMTOOL, AMTOOL = shutil.which("promtool"), shutil.which("amtool")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not on PATH")
@pytest.mark.parametrize(
    "args",
    [
        ["check", "rules", *(str(p.relative_to(ROOT)) for p in RULE_FILES)],
        ["check", "config", "prometheus/prometheus.yml"],
        ["test", "rules", "prometheus/tests/alerts_test.yml"],
        ["test", "rules", "prometheus/tests/recording_test.yml"],
    ],
    ids=["check-rules", "check-config", "test-alerts", "test-recording"],
)
def test_promtool_passes(args: list[str]) -> None:
    assert PROMTOOL is not None
    result = run(PROMTOOL, *args)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(AMTOOL is None, reason="amtool is not on PATH")
def test_amtool_accepts_the_alertmanager_config() -> None:
    assert AMTOOL is not None
    result = run(AMTOOL, "check-config", "prometheus/alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_inhibitions_name_only_alerts_that_exist() -> None:
    alerts = {r["alert"] for path in RULE_FILES for r in rules(path) if "alert" in r}
    config = yaml.safe_load((PROMETHEUS / "alertmanager.yml").read_text("utf-8"))
    found = []
    for rule in config["inhibit_rules"]:
        for matcher in rule.get("source_matchers", []) + rule.get("target_matchers", []):
            m = re.fullmatch(r'alertname(=~|=)"(.*)"', matcher)
            if not m:
                continue
            names = m.group(2).split("|") if m.group(1) == "=~" else [m.group(2)]
            found += [n for n in names if n not in alerts]
    assert found == [], f"inhibit rules name alerts no rule defines: {found}"
