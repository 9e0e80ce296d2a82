"""The compose stack's own files with the real binaries, on loopback.

One module-wide stack: a dedicated Pushgateway, Alertmanager on a copy of the real
prometheus/alertmanager.yml, `exporter continuous` (job "mlflow_metrics", as the rules and
dashboards expect) fed by `generate-sample` plus a FAILED run that ended just now, an HTTP
receiver as Pramathus, and Prometheus on the real prometheus.yml and rules rendered by
scripts/render_prometheus.py. The tests then check that every Grafana panel query returns data,
that MlflowRunFailed fires and reaches Alertmanager, and that every rule group and scrape target
is healthy. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from scripts.render_prometheus import render
from tests.support import servers
from tests.support.receiver import Receiver
from tests.support.seed import make_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
JOB = "mlflow_metrics"  # the job label prometheus/rules and grafana/dashboards select on
EXPERIMENTS = ["churn-prediction", "fraud-detection"]  # what generate-sample --experiments 2 makes
NEVER = "0001-01-01T00:00:00Z"  # Prometheus' lastEvaluation before a rule was evaluated


@dataclass
class Stack:
    pushgateway: servers.Server
    alertmanager: servers.Server
    prometheus: servers.Server
    exporter: subprocess.Popen[bytes]
    exporter_port: int
    exporter_log: Path
    receiver: Receiver
    client: MlflowClient
    failed_run_id: str
    experiment_ids: dict[str, str]


def _api(server: servers.Server, path: str, **params: str) -> Any:
    r = requests.get(f"{server.url}{path}", params=params, timeout=10)
    r.raise_for_status()
    return r.json()


def _tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


def _diagnose(stack: Stack) -> str:
    """The exporter's state and log tail, for failure messages."""
    code = stack.exporter.poll()
    state = "running" if code is None else f"exited {code}"
    return f"\nexporter {state}; log tail:\n{_tail(stack.exporter_log, 1500)}"


@contextlib.contextmanager
def _explained(stack: Stack) -> Iterator[None]:
    """Re-raise a failed wait with the exporter's state attached."""
    try:
        yield
    except AssertionError as e:
        raise AssertionError(f"{e}{_diagnose(stack)}") from None


def _poll(what: str, check: Any, timeout: float, interval: float = 0.5) -> Any:
    """Call `check()` until it returns something truthy; bounded by `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what}: not true after {timeout}s")


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    mlflow_server: servers.Server,
    mlflow_client: MlflowClient,
) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("stack")
    tag = uuid.uuid4().hex[:8]
    with contextlib.ExitStack() as cleanup:
        pushgateway = servers.start_pushgateway(work)
        cleanup.callback(pushgateway.stop)
        # The real Alertmanager file, unchanged (its Slack secret is read only when sending).
        am_config = work / "alertmanager.yml"
        shutil.copyfile(ROOT / "prometheus" / "alertmanager.yml", am_config)
        alertmanager = servers.start_alertmanager(work, am_config)
        cleanup.callback(alertmanager.stop)
        receiver = Receiver()
        cleanup.callback(receiver.stop)

        config = work / "config.yaml"
        names = ", ".join(f"'{re.escape(n)}'" for n in EXPERIMENTS)
        config.write_text(
            f"export:\n  include_experiments: [{names}]\n  max_experiments: 0\n"
            "server:\n  host: 127.0.0.1\n"
        )
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PRAMATHUS_"))},
            "EXPORTER_CONFIG": str(config),
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "PROMETHEUS_GATEWAY": f"127.0.0.1:{pushgateway.port}",
            "PROMETHEUS_JOB_NAME": JOB,
            "PRAMATHUS_ENABLED": "true",
            "PRAMATHUS_ENDPOINT": receiver.url,
            "PRAMATHUS_API_KEY": f"key-{tag}-secret",
            "EXPORTER_STATE_DIR": str(work / "state"),
            "LOG_FORMAT": "json",
        }
        sample = subprocess.run(
            [
                *(sys.executable, "-m", "exporter", "generate-sample"),
                *("--experiments", "2", "--runs", "8", "--steps", "5"),
                *("--model-name", f"stack-{tag}-model"),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert sample.returncode == 0, sample.stderr
        experiment_ids = {
            name: mlflow_client.get_experiment_by_name(name).experiment_id  # type: ignore[union-attr]
            for name in EXPERIMENTS
        }
        # generate-sample's FAILED runs ended hours ago, outside MlflowRunFailed's 1 h window:
        # a training job that has just crashed.
        failed_run_id = make_run(
            mlflow_client,
            experiment_ids["churn-prediction"],
            {"accuracy": [0.52, 0.55], "loss": [1.1, 0.98]},
            status="FAILED",
            name=f"crashed-{tag}",
        )

        exporter_port = servers.free_port()
        exporter_log = work / "exporter.log"
        with open(exporter_log, "wb") as log:
            exporter = subprocess.Popen(
                [
                    *(sys.executable, "-m", "exporter", "continuous"),
                    *("--interval", "2", "--port", str(exporter_port)),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )

        def stop_exporter() -> None:
            if exporter.poll() is None:
                exporter.send_signal(signal.SIGTERM)
                try:
                    exporter.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(exporter.pid, signal.SIGKILL)
                    exporter.wait(5)

        cleanup.callback(stop_exporter)
        try:
            servers.wait_http(f"http://127.0.0.1:{exporter_port}/livez", 30, exporter)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"exporter did not start: {e}\n{_tail(exporter_log)}") from None

        ports = {
            "pushgateway": pushgateway.port,
            "exporter": exporter_port,
            "alertmanager": alertmanager.port,
            "prometheus": servers.free_port(),
        }
        prom_dir = work / "prometheus"
        prom_config = render(prom_dir, ports, interval="1s")
        prometheus = servers.start_prometheus(
            prom_dir, prom_config.read_text(), port=ports["prometheus"]
        )
        cleanup.callback(prometheus.stop)

        yield Stack(
            pushgateway,
            alertmanager,
            prometheus,
            exporter,
            exporter_port,
            exporter_log,
            receiver,
            mlflow_client,
            failed_run_id,
            experiment_ids,
        )

        # Teardown: the exporter must stop cleanly on SIGTERM (exit 0) ...
        alive = exporter.poll() is None
        stop_exporter()
        code = exporter.returncode
        # ... and everything else is stopped by `cleanup` on the way out.
    assert alive, f"exporter died during the tests:\n{_tail(exporter_log)}"
    assert code == 0, f"exporter exited {code} on SIGTERM:\n{_tail(exporter_log)}"
    events = [
        json.loads(line)["event"]
        for line in exporter_log.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]
    assert "cycle.succeeded" in events
    assert env["PRAMATHUS_API_KEY"] not in exporter_log.read_text(errors="replace")


# ---------------------------------------------------------------------------------------------
# Dashboards
# ---------------------------------------------------------------------------------------------

GRAFANA_BUILTINS = {
    "__interval": "15s",
    "__rate_interval": "1m",
    "__range": "5m",
    "__range_s": "300",
    "__interval_ms": "15000",
}
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def _variable_values(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Values to try for each template variable: every choice a user can pick for custom
    variables (so `$metric` covers accuracy and the rest), the All value for multi-value
    query variables (`$experiment` -> `.*`), otherwise the saved current value."""
    values = {k: [v] for k, v in GRAFANA_BUILTINS.items()}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        options = [o["value"] for o in var.get("options") or [] if o.get("value") != "$__all"]
        current = (var.get("current") or {}).get("value")
        current = current if isinstance(current, list) else [current]
        if var.get("includeAll") or name == "experiment":
            values[name] = [var.get("allValue") or ".*"]
        elif var.get("type") == "custom":
            values[name] = options or [v.strip() for v in str(var.get("query", "")).split(",")]
        elif var.get("type") == "constant":
            values[name] = [str(var.get("query", ""))]
        elif current and current[0] not in (None, "$__all"):
            values[name] = [str(current[0])]
        else:
            values[name] = options[:1] or [".*"]
    return values


def _substitute(text: str, chosen: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return chosen.get(name, m.group(0))

    return VARIABLE.sub(repl, text)


def _dashboard_queries() -> list[tuple[str, str]]:
    """(label, expr) for every panel target of every dashboard, variables substituted."""
    queries = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        values = _variable_values(dashboard)
        for panel in _panels(dashboard.get("panels") or []):
            for target in panel.get("targets") or []:
                expr = target.get("expr")
                if not expr:
                    continue
                used = sorted(
                    {n for m in VARIABLE.finditer(expr) for n in m.groups() if n in values}
                )
                for combo in itertools.product(*(values[n] for n in used)):
                    chosen = dict(zip(used, combo, strict=True))
                    label = f"{path.name} / {_substitute(panel.get('title', '?'), chosen)!r}"
                    queries.append((label, _substitute(expr, chosen)))
    return queries


def _evaluate(prometheus: servers.Server, expr: str) -> tuple[bool, str]:
    """(final, problem): problem is '' when `expr` returns a non-NaN value; final when the
    problem cannot go away by waiting (a query error)."""
    if "$" in expr or "[[" in expr:
        return True, "unsubstituted template variable"
    r = requests.get(f"{prometheus.url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        return True, f"error: {body.get('errorType')}: {body.get('error')}"
    data = body["data"]
    if data["resultType"] == "scalar":
        samples = [data["result"][1]]
    else:
        samples = [s["value"][1] for s in data["result"]]
    if not samples:
        return False, "no data"
    if all(math.isnan(float(v)) for v in samples):
        return False, f"only NaN ({len(samples)} series)"
    return False, ""


def test_every_dashboard_panel_query_returns_data(stack: Stack) -> None:
    queries = _dashboard_queries()
    assert len(queries) > 20, queries  # both dashboards were found and parsed

    # rate() of the Pramathus counters needs them to grow between two scrapes. Once Prometheus
    # has seen points sent, log a new run: the next cycle sends its points, so the counter
    # increases after a scrape and the "points and batches sent" panel shows real traffic.
    with _explained(stack):
        servers.wait_for_query(
            stack.prometheus, "mlflow_exporter_pramathus_points_sent_total > 0", timeout=30
        )
        make_run(
            stack.client,
            stack.experiment_ids["fraud-detection"],
            {"accuracy": [0.6, 0.7, 0.8], "loss": [0.9, 0.7, 0.5]},
            name="late-run",
        )
        servers.wait_for_query(
            stack.prometheus,
            "sum(rate(mlflow_exporter_pramathus_points_sent_total[5m])) > 0",
            timeout=30,
        )

    problems: dict[tuple[str, str], str] = {}
    pending = list(queries)
    deadline = time.monotonic() + 60
    while True:
        still = []
        for label, expr in pending:
            final, problem = _evaluate(stack.prometheus, expr)
            if problem:
                problems[(label, expr)] = problem
                if not final:
                    still.append((label, expr))
            else:
                problems.pop((label, expr), None)
        pending = still
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    report = "\n".join(
        f"- {label}: {expr}\n    -> {why}" for (label, expr), why in problems.items()
    )
    assert not problems, (
        f"{len(problems)} of {len(queries)} panel queries failed:\n{report}{_diagnose(stack)}"
    )


# ---------------------------------------------------------------------------------------------
# Alerts
# ---------------------------------------------------------------------------------------------


def _failed_alerts(alerts: list[dict[str, Any]], state: tuple[str, ...]) -> list[dict[str, Any]]:
    return [
        a
        for a in alerts
        if a["labels"].get("alertname") == "MlflowRunFailed" and a.get("state") in state
    ]


def _is_run(alert: dict[str, Any], run_id: str) -> bool:
    short = alert["labels"].get("run_id", "")
    return bool(short) and run_id.startswith(short)


def test_alert_rules_fire_on_a_failed_run(stack: Stack) -> None:
    rules = yaml.safe_load((ROOT / "prometheus" / "rules" / "alerts.yml").read_text())
    rule = next(
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "MlflowRunFailed"
    )
    assert "for" not in rule, "MlflowRunFailed has a `for:`; this test expects it to fire at once"

    # Prometheus knows the Alertmanager from prometheus.yml's alerting section.
    am_url = f"{stack.alertmanager.url}/api/v2/alerts"
    _poll(
        "Alertmanager active in /api/v1/alertmanagers",
        lambda: any(
            a["url"] == am_url
            for a in _api(stack.prometheus, "/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
        ),
        timeout=20,
    )

    def firing() -> list[dict[str, Any]]:
        alerts = _api(stack.prometheus, "/api/v1/alerts")["data"]["alerts"]
        return [a for a in _failed_alerts(alerts, ("firing",)) if _is_run(a, stack.failed_run_id)]

    with _explained(stack):
        alert = _poll("MlflowRunFailed firing in Prometheus", firing, timeout=40)[0]
    labels = alert["labels"]
    assert labels["experiment_name"] == "churn-prediction"
    assert labels["experiment_id"] == stack.experiment_ids["churn-prediction"]
    assert labels["run_name"].startswith("crashed-")
    assert labels["severity"] == "warning"
    assert labels["job"] == JOB
    assert alert["annotations"]["summary"] == "MLflow run failed in churn-prediction"

    # Runs that failed more than an hour ago (all of generate-sample's) must not fire.
    now_ms = time.time() * 1000
    old = [
        r.info.run_id
        for r in stack.client.search_runs(
            list(stack.experiment_ids.values()), "attributes.status = 'FAILED'"
        )
        if r.info.end_time and r.info.end_time < now_ms - 3_700_000
    ]
    assert old, "generate-sample made no FAILED run that ended over an hour ago"
    alerts = _failed_alerts(
        _api(stack.prometheus, "/api/v1/alerts")["data"]["alerts"], ("pending", "firing")
    )
    stale = [a["labels"] for a in alerts if any(_is_run(a, run_id) for run_id in old)]
    assert not stale, f"MlflowRunFailed fires for runs that ended over an hour ago: {stale}"

    # ... and Prometheus delivered it to the Alertmanager (no `for:`, so within seconds).
    def received() -> list[dict[str, Any]]:
        alerts = _api(stack.alertmanager, "/api/v2/alerts", filter='alertname="MlflowRunFailed"')
        return [a for a in alerts if _is_run(a, stack.failed_run_id)]

    got = _poll("MlflowRunFailed received by Alertmanager", received, timeout=30)[0]
    assert got["status"]["state"] == "active", got["status"]
    assert got["labels"]["experiment_name"] == "churn-prediction"
    assert got["labels"]["stack"] == "mlflow-monitoring"  # prometheus.yml's external_labels
    assert {r["name"] for r in got["receivers"]} == {"slack", "webhook"}  # severity=warning


# ---------------------------------------------------------------------------------------------
# Rules and scrape config
# ---------------------------------------------------------------------------------------------


def test_rules_and_config_load_in_the_real_prometheus(stack: Stack) -> None:
    expected: dict[str, list[str]] = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            expected[group["name"]] = [r.get("alert") or r["record"] for r in group["rules"]]
    assert expected

    def groups() -> dict[str, dict[str, Any]]:
        data = _api(stack.prometheus, "/api/v1/rules")["data"]["groups"]
        return {g["name"]: g for g in data}

    def all_evaluated() -> bool:
        got = groups()
        return set(got) == set(expected) and all(
            r["lastEvaluation"] != NEVER for g in got.values() for r in g["rules"]
        )

    with contextlib.suppress(AssertionError):
        _poll("every rule evaluated", all_evaluated, timeout=20)
    got = groups()
    assert set(got) == set(expected), f"rule groups loaded: {sorted(got)}"
    bad = []
    for name, rule_names in expected.items():
        group = got[name]
        assert [r["name"] for r in group["rules"]] == rule_names, name
        bad += [
            f"{name}/{r['name']}: health={r['health']} lastError={r.get('lastError')!r} "
            f"lastEvaluation={r['lastEvaluation']}"
            for r in group["rules"]
            if r["health"] != "ok" or r["lastEvaluation"] == NEVER
        ]
    assert not bad, "\n".join(bad)

    wanted = {
        "pushgateway": stack.pushgateway.port,
        "mlflow-exporter": stack.exporter_port,
        "prometheus": stack.prometheus.port,
    }

    def targets() -> dict[str, dict[str, Any]]:
        active = _api(stack.prometheus, "/api/v1/targets", state="active")["data"]
        return {t["labels"]["job"]: t for t in active["activeTargets"]}

    with contextlib.suppress(AssertionError):
        _poll(
            "every target up",
            lambda: all(targets().get(j, {}).get("health") == "up" for j in wanted),
            timeout=20,
        )
    got_targets = targets()
    assert set(wanted) <= set(got_targets), sorted(got_targets)
    for job, port in wanted.items():
        target = got_targets[job]
        assert target["scrapeUrl"].startswith(f"http://127.0.0.1:{port}/"), target
        assert target["health"] == "up", target
    # honor_labels on the pushgateway job keeps the pushed job label.
    assert servers.prom_query(stack.prometheus, f'mlflow_experiment_info{{job="{JOB}"}}')
    assert not servers.prom_query(stack.prometheus, "{exported_job!=''}")
