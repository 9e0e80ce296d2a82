"""The compose stack's own files with the real binaries, on loopback.

One module-wide stack: a dedicated Pushgateway, Alertmanager on a copy of the real
prometheus/alertmanager.yml, VictoriaMetrics (the history store), `exporter continuous` (job
"mlflow_metrics", as the rules and dashboards expect; remote write on) fed by `generate-sample`
plus a FAILED run that ended just now, an HTTP receiver as Pramathus, and Prometheus on the real
prometheus.yml and rules rendered by scripts/render_prometheus.py. The tests then check that
every Grafana panel query returns data on the datasource it names (template variables filled
from the data), that MlflowRunFailed fires and reaches Alertmanager, and that every rule group
and scrape target is healthy. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
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
from tests.support.history_servers import (
    REMOTE_WRITE_PATH,
    start_victoria_metrics,
    vm_force_flush,
)
from tests.support.poll import poll_until, stop_process
from tests.support.receiver import Receiver
from tests.support.seed import make_run

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((ROOT / "prometheus" / "rules").glob("*.yml"))
JOB = "mlflow_metrics"  # the job label prometheus/rules and grafana/dashboards select on
EXPERIMENTS = ["churn-prediction", "fraud-detection"]  # what generate-sample --experiments 2 makes
GENAI = "support-chatbot"  # generate-sample's GenAI experiment (traces, judges' feedback)
VAL_LOSS = [1.2, 1.05]  # the crashed run's `val_loss`, the only run with that key
NEVER = "0001-01-01T00:00:00Z"  # Prometheus' lastEvaluation before a rule was evaluated


@dataclass
class Stack:
    pushgateway: servers.Server
    alertmanager: servers.Server
    prometheus: servers.Server
    victoria: servers.Server
    exporter: subprocess.Popen[bytes]
    exporter_port: int
    exporter_log: Path
    receiver: Receiver
    client: MlflowClient
    failed_run_id: str
    experiment_ids: dict[str, str]
    model_name: str


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
    return poll_until(what, check, timeout, interval)


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
        victoria = start_victoria_metrics(work)
        cleanup.callback(victoria.stop)

        config = work / "config.yaml"
        names = ", ".join(f"'{re.escape(n)}'" for n in [*EXPERIMENTS, GENAI])
        config.write_text(
            f"export:\n  include_experiments: [{names}]\n  max_experiments: 0\n"
            "server:\n  host: 127.0.0.1\n"
        )
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("MLFLOW_", "PRAMATHUS_", "REMOTE_WRITE_"))
            },
            "EXPORTER_CONFIG": str(config),
            "MLFLOW_TRACKING_URI": mlflow_server.url,
            "PROMETHEUS_GATEWAY": f"127.0.0.1:{pushgateway.port}",
            "PROMETHEUS_JOB_NAME": JOB,
            "PRAMATHUS_ENABLED": "true",
            "PRAMATHUS_ENDPOINT": receiver.url,
            "PRAMATHUS_API_KEY": f"key-{tag}-secret",
            # History, as in both stacks: every point at its own timestamp to VictoriaMetrics.
            "REMOTE_WRITE_ENABLED": "true",
            "REMOTE_WRITE_URL": f"{victoria.url}{REMOTE_WRITE_PATH}",
            "EXPORTER_STATE_DIR": str(work / "state"),
            "LOG_FORMAT": "json",
            # Trace history buckets close and settle within seconds, not minutes.
            "TRACES_BUCKET_SECONDS": "10",
            "TRACES_SETTLE_SECONDS": "5",
            # The sample's traces are written once, before the exporter starts: a window of
            # a day keeps the windowed series (latency, judges' means) as long as the test
            # runs, however slow a busy machine makes it (the default is 300 s).
            "TRACES_WINDOW_SECONDS": "86400",
        }
        model_name = f"stack-{tag}-model"
        sample = subprocess.run(
            [
                *(sys.executable, "-m", "exporter", "generate-sample"),
                *("--experiments", "2", "--runs", "8", "--steps", "5"),
                *("--model-name", model_name),
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
        # a training job that has just crashed. Its `val_loss` shares the family
        # mlflow_val_loss with the sample's `val/loss`: dashboards must tell them apart.
        failed_run_id = make_run(
            mlflow_client,
            experiment_ids["churn-prediction"],
            {"accuracy": [0.52, 0.55], "loss": [1.1, 0.98], "val_loss": VAL_LOSS},
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

        cleanup.callback(stop_process, exporter, 15)
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
            victoria,
            exporter,
            exporter_port,
            exporter_log,
            receiver,
            mlflow_client,
            failed_run_id,
            experiment_ids,
            model_name,
        )

        # Teardown: the exporter must stop cleanly on SIGTERM (exit 0) ...
        alive = exporter.poll() is None
        stop_process(exporter, 15)
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
#
# No Grafana server can run here, so the tests do what Grafana does with each dashboard: fill
# the template variables from the data (their own queries, on their own datasource), put the
# values into every panel query the way Grafana's Prometheus datasource formats them, and
# send each query to the datasource its panel names (instant queries at "now", range queries
# over the dashboard's default time range), expecting data.

# $name, ${name}, ${name:format}, [[name]]: how Grafana spells a variable.
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")
LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.+),\s*)?(\w+)\s*\)\s*$", re.DOTALL)
ALL = "$__all"  # Grafana's value for "All" in a multi-value variable
MAX_DATA_POINTS = 1000  # about a panel's width in pixels: Grafana's cap on points per series


def _min_steps() -> dict[str, int]:
    """Seconds per datasource uid: the provisioned `timeInterval`, Grafana's floor for a range
    query's step (15 s when unset)."""
    steps = {}
    for path in (ROOT / "grafana" / "provisioning" / "datasources").glob("*.yml"):
        for ds in yaml.safe_load(path.read_text())["datasources"]:
            interval = str((ds.get("jsonData") or {}).get("timeInterval", "15s"))
            m = re.fullmatch(r"(\d+)([sm])", interval)
            assert m, f"{path.name}: timeInterval {interval!r} not understood here"
            steps[ds["uid"]] = int(m.group(1)) * (60 if m.group(2) == "m" else 1)
    return steps


MIN_STEP = _min_steps()


@dataclass(frozen=True)
class Query:
    uid: str  # the datasource the panel names
    expr: str
    instant: bool
    range_s: int  # the dashboard's default time range, for range queries


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels") or [])


def _range_seconds(spec: str) -> int:
    """`now-6h` -> 21600: the dashboard's default time range."""
    m = re.fullmatch(r"now-(\d+)([smhdw])", spec)
    assert m, f"unsupported dashboard time.from {spec!r}"
    unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return int(m.group(1)) * unit


def _regular_escape(value: str) -> str:
    """Grafana's prometheusRegularEscape: a single-value variable, inserted as it is."""
    return value.replace("\\", "\\\\").replace("'", "\\\\'")


def _regex_escape(value: str) -> str:
    """Grafana's prometheusSpecialRegexEscape: a value of a multi-value variable, matched
    with =~ inside a PromQL string (so the regex escape is itself escaped)."""
    return re.sub(
        r"[$^*{}\[\]'+?.()|]", lambda m: "\\\\" + m.group(0), value.replace("\\", "\\\\\\\\")
    )


def _format(var: dict[str, Any], value: str, options: list[str]) -> str:
    """A variable's value as Grafana's Prometheus datasource puts it into a query."""
    if not var.get("multi") and not var.get("includeAll"):
        return _regular_escape(value)
    if value == ALL:
        if var.get("allValue"):
            return str(var["allValue"])
        return "(" + "|".join(_regex_escape(o) for o in options) + ")"
    return _regex_escape(value)


def _substitute(text: str, chosen: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        return chosen.get(name, m.group(0))

    return VARIABLE.sub(repl, text)


def _unsubstituted(expr: str) -> list[str]:
    # `$1` in a label_replace replacement is PromQL, not a variable.
    return [m.group(0) for m in VARIABLE.finditer(expr) if not m.group(0)[1:].isdigit()]


class Dashboard:
    """One dashboard file, its variables evaluated against the stack's datasources."""

    def __init__(self, path: Path, datasources: dict[str, servers.Server], now: float) -> None:
        self.path = path
        self.spec = json.loads(path.read_text())
        self.datasources = datasources
        self.now = now
        self.range_s = _range_seconds(self.spec["time"]["from"])
        self.variables: list[dict[str, Any]] = self.spec.get("templating", {}).get("list", [])

    def options(self, var: dict[str, Any], chosen: dict[str, str]) -> list[str]:
        """The values Grafana offers for `var`, given the values chosen before it."""
        kind = var.get("type")
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if kind == "custom":
            return [v.strip() for v in query.split(",") if v.strip()]
        if kind in ("constant", "textbox"):
            return [query]
        assert kind == "query", f"{self.path.name}: variable type {kind!r} not supported here"
        m = LABEL_VALUES.match(_substitute(query, chosen))
        assert m, f"{self.path.name}: ${var['name']}: only label_values(...) is supported"
        selector, label = m.groups()
        server = self.datasources[var["datasource"]["uid"]]
        window = {"start": str(self.now - self.range_s), "end": str(self.now)}
        if selector:
            # What Grafana's Prometheus datasource sends for label_values(selector, label).
            r = requests.get(
                f"{server.url}/api/v1/series", params={"match[]": selector, **window}, timeout=10
            )
            r.raise_for_status()
            values = {s[label] for s in r.json()["data"] if s.get(label)}
        else:
            r = requests.get(f"{server.url}/api/v1/label/{label}/values", params=window, timeout=10)
            r.raise_for_status()
            values = set(r.json()["data"])
        if var.get("regex"):
            values = {v for v in values if re.search(var["regex"].strip("/"), v)}
        return sorted(values)

    @staticmethod
    def default(var: dict[str, Any], options: list[str]) -> str:
        """What Grafana shows first: the saved current value when the data offers it, All
        for a variable saved on All, else the first option."""
        current = (var.get("current") or {}).get("value")
        current = current[0] if isinstance(current, list) and current else current
        if var.get("includeAll") and current in (None, ALL):
            return ALL
        return str(current) if current in options else options[0]

    def resolve(self, picks: dict[str, str]) -> tuple[dict[str, str], dict[str, list[str]]]:
        """(formatted value per variable, options per variable): each variable takes the
        value in `picks`, else its default."""
        formatted: dict[str, str] = {}
        offered: dict[str, list[str]] = {}
        for var in self.variables:
            name = var["name"]
            options = self.options(var, formatted)
            assert options, (
                f"{self.path.name}: variable ${name} has no values (picked so far: {formatted})"
            )
            value = picks[name] if name in picks else self.default(var, options)
            assert value == ALL or value in options, (
                f"{self.path.name}: ${name}={value!r} is not among {options}"
            )
            offered[name] = options
            formatted[name] = _format(var, value, options)
        return formatted, offered

    def choices(self, pins: dict[str, str]) -> list[dict[str, str]]:
        """Value sets to try: the defaults, then each variable through every value it offers
        (and All), one variable at a time, variables after it back at their defaults."""
        base_formatted, base_options = self.resolve(pins)
        out = [base_formatted]
        raw: dict[str, str] = {}
        for var in self.variables:
            name = var["name"]
            values = [*base_options[name], *([ALL] if var.get("includeAll") else [])]
            if name not in pins:
                for value in values:
                    out.append(self.resolve({**pins, **raw, name: value})[0])
            # Later variations keep this one at its default (raw value, so it is re-formatted).
            raw[name] = pins.get(name) or self.default(var, base_options[name])
        return out

    def queries(self, pins: dict[str, str]) -> dict[Query, str]:
        """Every panel target under every value set, each distinct query once, with a label."""
        found: dict[Query, str] = {}
        for chosen in self.choices(pins):
            for panel in _panels(self.spec.get("panels") or []):
                if panel.get("type") == "row":
                    continue
                uid = panel["datasource"]["uid"]
                assert uid in self.datasources, f"{self.path.name}: {panel['title']!r}: {uid!r}"
                for target in panel.get("targets") or []:
                    query = Query(
                        uid,
                        _substitute(target["expr"], chosen),
                        bool(target.get("instant")),
                        self.range_s,
                    )
                    title = _substitute(panel.get("title", "?"), chosen)
                    found.setdefault(query, f"{self.path.name} / {title!r} [{uid}]")
        return found


def _evaluate(server: servers.Server, query: Query, now: float) -> tuple[bool, str]:
    """(final, problem): problem is '' when the query returns a non-NaN value; final when the
    problem cannot go away by waiting (a query error, a variable left in)."""
    left = _unsubstituted(query.expr)
    if left:
        return True, f"unsubstituted template variable(s) {left}"
    if query.instant:
        params = {"query": query.expr, "time": str(now)}
        r = requests.get(f"{server.url}/api/v1/query", params=params, timeout=10)
    else:
        step = max(MIN_STEP[query.uid], math.ceil(query.range_s / MAX_DATA_POINTS))
        params = {
            "query": query.expr,
            "start": str(now - query.range_s),
            "end": str(now),
            "step": str(step),
        }
        r = requests.get(f"{server.url}/api/v1/query_range", params=params, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        return True, f"error: {body.get('errorType')}: {body.get('error')}"
    data = body["data"]
    if data["resultType"] == "scalar":
        samples = [data["result"][1]]
    elif data["resultType"] == "matrix":
        samples = [v for s in data["result"] for _, v in s["values"]]
    else:
        samples = [s["value"][1] for s in data["result"]]
    if not samples:
        return False, "no data"
    if all(math.isnan(float(v)) for v in samples):
        return False, f"only NaN ({len(data['result'])} series)"
    return False, ""


def _datasources(stack: Stack) -> dict[str, servers.Server]:
    return {"prometheus": stack.prometheus, "victoriametrics": stack.victoria}


def _vm_series(stack: Stack, selector: str) -> list[dict[str, str]]:
    vm_force_flush(stack.victoria)
    r = requests.get(
        f"{stack.victoria.url}/api/v1/series",
        params={"match[]": selector, "start": str(time.time() - 86400)},
        timeout=10,
    )
    r.raise_for_status()
    return r.json()["data"]  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Stack:
    """Data for every panel: points delivered to both sinks twice (rate() needs a counter to
    grow between scrapes), and the late run in both stores."""
    with _explained(stack):
        for sink in ("pramathus", "remote_write"):
            servers.wait_for_query(
                stack.prometheus, f"mlflow_exporter_{sink}_points_sent_total > 0", timeout=30
            )
        # Once Prometheus has seen points sent, a new run makes the counters grow again.
        make_run(
            stack.client,
            stack.experiment_ids["fraud-detection"],
            {"accuracy": [0.6, 0.7, 0.8], "loss": [0.9, 0.7, 0.5]},
            name="late-run",
        )
        for sink in ("pramathus", "remote_write"):
            servers.wait_for_query(
                stack.prometheus,
                f"sum(rate(mlflow_exporter_{sink}_points_sent_total[5m])) > 0",
                timeout=30,
            )
        servers.wait_for_query(stack.prometheus, 'mlflow_run_info{run_name="late-run"}', 30)
        _poll(
            "the late run's history in VictoriaMetrics",
            lambda: _vm_series(stack, 'mlflow_metric_step{run_name="late-run"}'),
            timeout=30,
        )
        servers.wait_for_query(stack.prometheus, f'mlflow_traces{{experiment_name="{GENAI}"}}', 60)
        for family in ("traces", "latency_seconds", "tokens", "assessment_value", "cost_usd"):
            _poll(
                f"trace history ({family}) in VictoriaMetrics",
                lambda family=family: _vm_series(stack, f"mlflow_trace_bucket_{family}"),
                timeout=60,
            )
    return stack


def test_every_dashboard_panel_query_returns_data_on_its_datasource(traffic: Stack) -> None:
    stack = traffic
    assert {p.name for p in DASHBOARDS} >= {
        "mlflow-overview.json",
        "exporter-health.json",
        "training-curves.json",
        "models.json",
        "genai.json",
    }
    datasources = _datasources(stack)
    now = time.time()
    # The registry is server-wide (other tests' models share this MLflow): look at ours.
    pins = {"model": stack.model_name}
    queries: dict[Query, str] = {}
    for path in DASHBOARDS:
        found = Dashboard(path, datasources, now).queries(pins)
        assert found, f"{path.name}: no panel queries"
        queries.update({q: label for q, label in found.items() if q not in queries})
    assert {q.uid for q in queries} == set(datasources), "both datasources are exercised"
    assert len(queries) > 100, len(queries)

    problems: dict[Query, str] = {}
    pending = list(queries)
    deadline = time.monotonic() + 60
    while True:
        vm_force_flush(stack.victoria)
        now = time.time()
        still = []
        for query in pending:
            final, problem = _evaluate(datasources[query.uid], query, now)
            if problem:
                problems[query] = problem
                if not final:
                    still.append(query)
            else:
                problems.pop(query, None)
        pending = still
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(1)
    report = "\n".join(
        f"- {queries[q]}: {q.expr}\n    -> {why}" for q, why in sorted(problems.items(), key=str)
    )
    assert not problems, (
        f"{len(problems)} of {len(queries)} panel queries failed:\n{report}{_diagnose(stack)}"
    )


def test_metric_panels_tell_keys_of_one_family_apart(traffic: Stack) -> None:
    """`val/loss` (sample runs) and `val_loss` (the crashed run) are both mlflow_val_loss: a
    panel on one key shows that key's values, never the other's, nor the step or timestamp
    series that carry the same metric_key."""
    stack = traffic
    datasources = _datasources(stack)
    checked = 0
    for path in DASHBOARDS:
        dashboard = Dashboard(path, datasources, time.time())
        if not any(v["name"] == "metric" and not v.get("multi") for v in dashboard.variables):
            continue
        chosen, _ = dashboard.resolve({"metric": "val_loss", "run": ALL})
        for panel in _panels(dashboard.spec.get("panels") or []):
            for target in panel.get("targets") or []:
                expr = target["expr"]
                # The panels that show the metric's values (not its step, not a count of runs).
                if 'metric_key="$metric"' not in expr or re.search(
                    r"\bmlflow_metric_step\{|\bcount\b", expr
                ):
                    continue
                uid = panel["datasource"]["uid"]
                query = Query(uid, _substitute(expr, chosen), False, dashboard.range_s)
                step = max(MIN_STEP[uid], math.ceil(query.range_s / MAX_DATA_POINTS))
                params = {
                    "query": query.expr,
                    "start": str(time.time() - query.range_s),
                    "end": str(time.time()),
                    "step": str(step),
                }
                r = requests.get(
                    f"{datasources[uid].url}/api/v1/query_range", params=params, timeout=10
                )
                result = r.json()["data"]["result"]
                where = f"{path.name} / {panel['title']!r}: {query.expr}"
                assert result, f"{where}: no data"
                for series in result:
                    labels = series["metric"]
                    assert labels.get("metric_key", "val_loss") == "val_loss", (where, labels)
                    assert labels.get("__name__", "mlflow_val_loss") == "mlflow_val_loss", (
                        where,
                        labels,
                    )
                    values = {float(v) for _, v in series["values"]}
                    assert values <= set(VAL_LOSS), f"{where}: {labels} has values {values}"
                checked += 1
    # Overview: highest, lowest, history, latest table; training curves: per run, runs
    # compared, highest and lowest per experiment.
    assert checked >= 8, checked


def test_no_panel_reads_pushgateway_push_times() -> None:
    """push_time_seconds ages on a healthy exporter (unchanged groups are not pushed again):
    health panels use what the exporter itself reports."""
    for path in DASHBOARDS:
        for panel in _panels(json.loads(path.read_text()).get("panels") or []):
            for target in panel.get("targets") or []:
                assert "push_time_seconds" not in target["expr"], (path.name, panel["title"])


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
