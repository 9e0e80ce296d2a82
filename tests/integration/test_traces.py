"""GenAI traces end to end: MLflow's own tracing client -> a real `mlflow server` -> the
exporter -> a real Pushgateway and VictoriaMetrics, each check compared with MLflow.

The app under test is a pair of `@mlflow.trace` functions ("answer" and "retrieve") with
token usage set on an LLM span, varied latency and some raising; an LLM judge logs boolean
feedback and a human numeric feedback (`mlflow.log_feedback`). Counts and sums are compared
with `search_traces`, quantiles with MLflow's own aggregation endpoint, history with
VictoriaMetrics' `/api/v1/export`. A proxy in front of MLflow answers 404 for the trace
metrics endpoint (an MLflow 2 or file-store server) or counts requests (the idle cost).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import mlflow
import pytest
import requests
from mlflow.entities import AssessmentSource
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import ExporterEnv
from tests.support import history_servers as hs
from tests.support.servers import Server, free_port, wait_http

pytestmark = pytest.mark.integration

BUCKET_S = 1
SETTLE_S = 2
TRACE_ENV = {
    "TRACES_BUCKET_SECONDS": str(BUCKET_S),
    "TRACES_SETTLE_SECONDS": str(SETTLE_S),
    "TRACES_WINDOW_SECONDS": "600",
}
TRACE_METRICS_PATH = "/api/3.0/mlflow/traces/metrics"


# --------------------------------------------------------------------------- the GenAI app


def write_app_traces(server: Server, experiment_id: str, n: int = 8) -> list[str]:
    """Traces of two names: "answer" (an LLM span with token usage and a cost; every other
    one raises) and
    "retrieve"; latency varies with i. Returns their trace ids."""
    mlflow.set_tracking_uri(server.url)
    ids: list[str] = []

    @mlflow.trace(name="llm", span_type="CHAT_MODEL")
    def llm(i: int) -> str:
        span = mlflow.get_current_active_span()
        assert span is not None
        span.set_attribute(
            "mlflow.chat.tokenUsage",
            {"input_tokens": 10 + i, "output_tokens": 3 * i, "total_tokens": 10 + 4 * i},
        )
        span.set_attribute(
            "mlflow.llm.cost",
            {"input_cost": 0.001 * i, "output_cost": 0.002, "total_cost": 0.001 * i + 0.002},
        )
        time.sleep(0.005 * (i % 4))
        return f"answer {i}"

    @mlflow.trace(name="answer")
    def answer(i: int) -> str:
        if i % 4 == 2:
            raise RuntimeError("the model timed out")
        return llm(i)

    @mlflow.trace(name="retrieve", span_type="RETRIEVER")
    def retrieve(i: int) -> list[str]:
        time.sleep(0.002 * i)
        return [f"doc {i}"]

    mlflow.set_experiment(experiment_id=experiment_id)
    for i in range(n):
        fn: Callable[[int], Any] = answer if i % 2 == 0 else retrieve
        with contextlib.suppress(RuntimeError):
            fn(i)
        trace_id = mlflow.get_last_active_trace_id()
        assert trace_id is not None
        ids.append(trace_id)
    mlflow.flush_trace_async_logging()
    return ids


def judge(trace_ids: list[str]) -> None:
    """An LLM judge's booleans on every trace, a human's scores on the first three."""
    judge_source = AssessmentSource(source_type="LLM_JUDGE", source_id="gpt-judge")
    human = AssessmentSource(source_type="HUMAN", source_id="alice@example.com")
    for i, trace_id in enumerate(trace_ids):
        mlflow.log_feedback(
            trace_id=trace_id, name="correct", value=i % 3 != 0, source=judge_source
        )
        if i < 3:
            mlflow.log_feedback(
                trace_id=trace_id, name="helpfulness", value=float(i + 2), source=human
            )


def mlflow_aggregate(server: Server, experiment_id: str, **body: Any) -> list[dict[str, Any]]:
    """MLflow's own aggregation of this experiment's traces."""
    r = requests.post(
        f"{server.url}/api/3.0/mlflow/traces/metrics",
        json={"experiment_ids": [experiment_id], **body},
        timeout=30,
    )
    r.raise_for_status()
    points: list[dict[str, Any]] = r.json().get("data_points", [])
    return points


# --------------------------------------------------------------------------- reading back


def pushed(pushgateway: Server, job: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the Pushgateway holds for `job`, keyed by (name, labels without job)."""
    text = requests.get(f"{pushgateway.url}/metrics", timeout=10).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("job") == job:
                labels = tuple(
                    sorted((k, v) for k, v in s.labels.items() if k not in ("job", "instance"))
                )
                out[(s.name, labels)] = s.value
    return out


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    found = [
        v for (n, ls), v in samples.items() if n == name and labels.items() <= dict(ls).items()
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


# --------------------------------------------------------------------------- a proxy


class Proxy:
    """Forwards to MLflow, counting requests by path; `refuse` paths answer 404."""

    def __init__(self, target: str, refuse: tuple[str, ...] = ()) -> None:
        self.counts: Counter[str] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                path = self.path.split("?", 1)[0]
                proxy.counts[path] += 1
                if path in refuse:
                    body = b"<html><body>404 Not Found</body></html>"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else None
                headers = {"Content-Type": self.headers.get("Content-Type", "application/json")}
                r = requests.request(
                    self.command, target + self.path, data=data, headers=headers, timeout=60
                )
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _forward  # noqa: N815 - http.server's names

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_to(mlflow_server: Server) -> Iterator[Callable[..., Proxy]]:
    made: list[Proxy] = []

    def make(refuse: tuple[str, ...] = ()) -> Proxy:
        made.append(Proxy(mlflow_server.url, refuse))
        return made[-1]

    yield make
    for p in made:
        p.stop()


# --------------------------------------------------------------------------- tests


def test_live_series_match_what_mlflow_holds_and_aggregates(
    exporter_env: ExporterEnv, mlflow_server: Server, pushgateway: Server
) -> None:
    exp = exporter_env.experiment("genai")
    plain = exporter_env.experiment("training")
    trace_ids = write_app_traces(mlflow_server, exp)
    judge(trace_ids)

    exporter_env.env.update(TRACE_ENV)
    done = exporter_env.run("export-once")
    assert done.returncode == 0, done.stderr

    got = pushed(pushgateway, exporter_env.job)
    traces = exporter_env.client.search_traces(locations=[exp], include_spans=False)
    states = Counter(str(t.info.state) for t in traces)
    assert any(s.endswith("ERROR") and n for s, n in states.items()), states
    for status in ("OK", "ERROR", "IN_PROGRESS"):
        want = sum(n for s, n in states.items() if s.endswith(status))
        assert value(got, "mlflow_traces", experiment_id=exp, status=status) == want
    for kind in ("input", "output", "total"):
        want_tokens = sum((t.info.token_usage or {}).get(f"{kind}_tokens", 0) for t in traces)
        assert value(got, "mlflow_trace_tokens", experiment_id=exp, kind=kind) == want_tokens
    by_name = Counter(
        t.info.trace_metadata.get("mlflow.traceName") or t.info.tags.get("mlflow.traceName")
        for t in traces
    )
    for name in ("answer", "retrieve"):
        total = sum(
            value(got, "mlflow_trace_name_traces", experiment_id=exp, trace_name=name, status=s)
            or 0
            for s in ("OK", "ERROR", "IN_PROGRESS")
        )
        assert total == by_name[name] == len(trace_ids) // 2
    costs = [0.001 * i + 0.002 for i in range(len(trace_ids)) if i % 4 == 0]  # answers not raising
    assert value(got, "mlflow_trace_cost_usd", experiment_id=exp) == pytest.approx(sum(costs))
    quantiles = mlflow_aggregate(
        mlflow_server,
        exp,
        view_type="TRACES",
        metric_name="latency",
        aggregations=[
            {"aggregation_type": "PERCENTILE", "percentile_value": p} for p in (50, 95, 99)
        ],
    )[0]["values"]
    for q, key in (("0.5", "P50.0"), ("0.95", "P95.0"), ("0.99", "P99.0")):
        got_q = value(got, "mlflow_trace_latency_seconds", experiment_id=exp, quantile=q)
        assert got_q == pytest.approx(quantiles[key] / 1000)
    correct = [a for t in traces for a in t.info.assessments if a.name == "correct"]
    assert value(
        got, "mlflow_trace_assessments", experiment_id=exp, assessment_name="correct"
    ) == len(correct)
    mean = sum(1.0 if a.value else 0.0 for a in correct) / len(correct)
    assert value(got, "mlflow_trace_assessment_value", assessment_name="correct") == pytest.approx(
        mean
    )
    assert value(
        got, "mlflow_trace_assessment_value", assessment_name="helpfulness"
    ) == pytest.approx(3.0)
    assert not [
        k
        for k in got
        if dict(k[1]).get("experiment_id") == plain and k[0].startswith("mlflow_trace")
    ]


def test_continuous_shows_new_traces_and_a_late_score_and_writes_each_bucket_once(
    exporter_env: ExporterEnv,
    mlflow_server: Server,
    pushgateway: Server,
    vm: Server,
    tmp_path: Path,
) -> None:
    exp = exporter_env.experiment("genai-live")
    first = write_app_traces(mlflow_server, exp, n=4)
    port = free_port()
    env = {
        **exporter_env.env,
        **TRACE_ENV,
        "EXPORT_INTERVAL": "1",
        "REMOTE_WRITE_ENABLED": "true",
        "REMOTE_WRITE_URL": f"{vm.url}/api/v1/write",
    }
    log = (tmp_path / "exporter.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter", "continuous", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/livez", 60, proc)
        wait_until(
            lambda: value(
                pushed(pushgateway, exporter_env.job),
                "mlflow_traces",
                experiment_id=exp,
                status="OK",
            ),
            60,
            "the first traces on the Pushgateway",
        )
        more = write_app_traces(mlflow_server, exp, n=4)
        mlflow.log_feedback(
            trace_id=first[0],
            name="late_review",
            value=1.0,
            source=AssessmentSource(source_type="HUMAN", source_id="bob@example.com"),
        )
        total = len(first) + len(more)

        def caught_up() -> tuple[float, float | None] | None:
            got = pushed(pushgateway, exporter_env.job)
            held = sum(
                value(got, "mlflow_traces", experiment_id=exp, status=s) or 0
                for s in ("OK", "ERROR", "IN_PROGRESS")
            )
            late = value(
                got, "mlflow_trace_assessments", experiment_id=exp, assessment_name="late_review"
            )
            return (held, late) if (held, late) == (total, 1) else None

        wait_until(caught_up, 60, "new traces and the late score")
        traces = exporter_env.client.search_traces(locations=[exp], include_spans=False)
        per_bucket = Counter(
            t.info.request_time // (BUCKET_S * 1000) * BUCKET_S * 1000 for t in traces
        )

        def history() -> dict[int, float]:
            hs.vm_force_flush(vm)
            lines = hs.vm_export_lines(
                vm,
                f'mlflow_trace_bucket_traces{{experiment_id="{exp}"}}',
                0,
                int(time.time() * 1000) + 60_000,
            )
            stored: dict[int, float] = {}
            for line in lines:
                record = hs.parse_vm_export_line(line)
                for ts, v in zip(record["timestamps"], record["values"], strict=True):
                    stored[ts] = stored.get(ts, 0.0) + v
            return stored if stored == {k: float(v) for k, v in per_bucket.items()} else {}

        stored = wait_until(history, 60, f"every bucket in VictoriaMetrics ({dict(per_bucket)})")
        assert sum(stored.values()) == total
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    # Written once: VictoriaMetrics keeps a resent sample twice.
    lines = hs.vm_export_lines(
        vm, f'mlflow_trace_bucket_traces{{experiment_id="{exp}"}}', 0, int(time.time() * 1000)
    )
    for line in lines:
        record = hs.parse_vm_export_line(line)
        assert len(record["timestamps"]) == len(set(record["timestamps"]))


def test_a_server_answering_404_turns_traces_off_with_one_warning(
    exporter_env: ExporterEnv, mlflow_server: Server, proxy_to: Callable[..., Proxy]
) -> None:
    exp = exporter_env.experiment("genai-old")
    write_app_traces(mlflow_server, exp, n=2)
    proxy = proxy_to(refuse=(TRACE_METRICS_PATH,))
    exporter_env.env.update(TRACE_ENV)
    done = exporter_env.run("export-once", MLFLOW_TRACKING_URI=proxy.url)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "traces.unsupported" in line]
    assert len(warnings) == 1
    assert "HTTP 404" in warnings[0]
    assert proxy.counts[TRACE_METRICS_PATH] == 1


def test_an_idle_cycle_costs_at_most_twelve_requests(
    exporter_env: ExporterEnv, mlflow_server: Server, proxy_to: Callable[..., Proxy]
) -> None:
    exps = [exporter_env.experiment(f"genai-{i}") for i in range(4)]
    for exp in exps:
        write_app_traces(mlflow_server, exp, n=2)
    proxy = proxy_to()
    exporter_env.env.update({**TRACE_ENV, "TRACES_WINDOW_SECONDS": "10"})
    first = exporter_env.run("export-once", MLFLOW_TRACKING_URI=proxy.url)
    assert first.returncode == 0, first.stderr
    # The last traces leave the window (and their buckets settle) at a known time.
    newest = max(
        t.info.request_time
        for exp in exps
        for t in exporter_env.client.search_traces(locations=[exp], include_spans=False)
    )
    time.sleep(max(0.0, newest / 1000 + 10 + 2 * BUCKET_S + SETTLE_S - time.time()))
    settled = exporter_env.run("export-once", MLFLOW_TRACKING_URI=proxy.url)
    assert settled.returncode == 0, settled.stderr
    before = sum(proxy.counts.values())
    traces_before = proxy.counts[TRACE_METRICS_PATH]
    idle = exporter_env.run("export-once", MLFLOW_TRACKING_URI=proxy.url)
    assert idle.returncode == 0, idle.stderr
    cost = sum(proxy.counts.values()) - before
    assert cost <= 12, dict(proxy.counts)
    assert proxy.counts[TRACE_METRICS_PATH] - traces_before == 2
