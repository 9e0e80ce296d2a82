"""scripts/run-local.sh end to end: the whole stack on free ports and a temp data dir.

Run as a terminal runs it, `bash -c 'bash scripts/run-local.sh | tee LOG'` in a session of its
own, then stopped the ways a user stops it: Ctrl-C (SIGINT to the foreground process group),
SIGTERM to the script, SIGHUP to the group (terminal closed), tee dying first (writes hit
SIGPIPE), and a server dying on its own. Each time, no process the script started may remain
and no port may still listen. Every wait is bounded.

A process "of the stack" is one whose environment holds this test's LOCAL_STACK_DIR (every
descendant inherits it) or whose command line names the data dir or one of the ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from tests.support import servers
from tests.support.poll import poll_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PORT_VARS = (
    "MLFLOW_PORT",
    "PUSHGATEWAY_PORT",
    "PROMETHEUS_PORT",
    "ALERTMANAGER_PORT",
    "EXPORTER_PORT",
    "ALERT_SINK_PORT",
    "VICTORIA_PORT",
    "PRAMATHUS_SINK_PORT",
)
READY_TIMEOUT = 180  # MLflow ~10-15 s, sample data, the exporter's first cycle
ALERT_TIMEOUT = 120  # push -> scrape (5 s) -> rule eval (5 s) -> group_wait (5 s) -> sink
STOP_GRACE = 10  # run-local.sh's TERM -> KILL grace
STOP_TIMEOUT = STOP_GRACE + 15  # grace, then KILL and the last waits
# What a user types, plus pipefail so the pipeline's status is the script's, not tee's.
PIPELINE = 'set -o pipefail; bash scripts/run-local.sh | tee "$1"'
DEMO_RE = re.compile(r"logged FAILED run (\S+) \(([0-9a-f]+)\)")


def _terminal_signals() -> None:
    """Give the pipeline the signal dispositions a terminal's shell gives: all default.

    Dispositions are inherited: under `nohup` (or as a background job of a non-interactive
    shell) the test runner ignores SIGHUP (SIGINT), and bash cannot trap a signal ignored on
    entry, so run-local.sh would rightly keep running on a "closed terminal", as nohup asks.
    The stop tests play a user at a terminal, whatever launched the test run.
    """
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _free_ports() -> dict[str, int]:
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(PORT_VARS):
        ports = {var: servers.free_port() for var in PORT_VARS}
    return ports


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None once it is gone."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return rest[0], int(rest[1])


@dataclass
class LocalStack:
    """One `run-local.sh | tee` on a data dir and a set of ports."""

    data: Path
    ports: dict[str, int]
    work: Path
    proc: subprocess.Popen[bytes] | None = None
    out: Path = field(init=False)
    err: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out = self.work / "terminal.log"  # what tee shows the user
        self.err = self.work / "stderr.log"

    def start(self, **env: str) -> None:
        self.out.unlink(missing_ok=True)
        self.err.unlink(missing_ok=True)
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                ("MLFLOW_", "PRAMATHUS_", "EXPORTER_", "PROMETHEUS_", "LOG_", "REMOTE_WRITE_")
            )
        }
        with open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", PIPELINE, "sh", str(self.out)],
                cwd=ROOT,
                env={
                    **base,
                    **{var: str(port) for var, port in self.ports.items()},
                    "LOCAL_STACK_DIR": str(self.data),
                    "STOP_GRACE": str(STOP_GRACE),
                    **env,
                },
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own session and process group, like a terminal
                preexec_fn=_terminal_signals,
            )

    def describe(self) -> str:
        return (
            f"\n--- terminal (tee) ---\n{_read(self.out)[-4000:]}"
            f"\n--- stderr ---\n{_read(self.err)[-3000:]}"
        )

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first terminal line matching `pattern` (regex, anchored at line start)."""
        assert self.proc is not None
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = regex.search(_read(self.out))
            if match:
                return match
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"run-local.sh exited {self.proc.returncode} before {pattern!r}"
                    + self.describe()
                )
            time.sleep(0.3)
        raise AssertionError(f"no {pattern!r} line after {timeout}s" + self.describe())

    def wait_for_alert(self, run_name: str, timeout: float = ALERT_TIMEOUT) -> str:
        alerts = self.data / "alerts.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in _read(alerts).splitlines():
                if " firing MlflowRunFailed " in line and f"run={run_name} " in line:
                    return line
            time.sleep(0.5)
        raise AssertionError(
            f"no MlflowRunFailed line for {run_name} in {alerts} after {timeout}s:\n"
            f"{_read(alerts)}" + self.describe()
        )

    def children(self) -> dict[str, int]:
        """The bash -c's children: the script and tee, by their first two argv words."""
        assert self.proc is not None
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (_stat(int(entry.name)) or ("", 0))[1] == self.proc.pid:
                with contextlib.suppress(OSError):
                    argv = (entry / "cmdline").read_bytes().split(b"\0")
                    found[" ".join(a.decode() for a in argv[:2])] = int(entry.name)
        return found

    def script_pid(self) -> int:
        return self.children()["bash scripts/run-local.sh"]

    def tee_pid(self) -> int:
        return next(pid for argv, pid in self.children().items() if argv.startswith("tee "))

    def leftovers(self) -> list[str]:
        """Live processes of this stack (zombies hold nothing and are not counted)."""
        marks = [str(self.data).encode()]
        port_args = {str(p).encode() for p in self.ports.values()}
        env_mark = f"LOCAL_STACK_DIR={self.data}".encode()
        left = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                state = (_stat(int(entry.name)) or ("Z", 0))[0]
                cmdline = (entry / "cmdline").read_bytes()
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if state == "Z":
                continue
            argv = cmdline.split(b"\0")
            mine = (
                env_mark in environ.split(b"\0")
                or any(m in cmdline for m in marks)
                or any(a in port_args or a.rsplit(b":", 1)[-1] in port_args for a in argv)
            )
            if mine:
                shown = b" ".join(argv).decode(errors="replace")[:200]
                left.append(f"{entry.name}: {shown}")
        return left

    def listening(self) -> list[int]:
        busy = []
        for port in self.ports.values():
            with socket.socket() as s:
                s.settimeout(1)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    busy.append(port)
        return busy

    def wait_stopped(self, timeout: float = STOP_TIMEOUT) -> float:
        """Seconds until no process and no port of the stack remains; fails past `timeout`."""
        assert self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None and not self.leftovers() and not self.listening():
                return time.monotonic() - t0
            time.sleep(0.2)
        raise AssertionError(
            f"after {timeout}s: script "
            + ("running" if self.proc.poll() is None else f"exited {self.proc.returncode}")
            + f", processes left: {self.leftovers()}, ports listening: {self.listening()}"
            + self.describe()
        )

    def kill_everything(self) -> None:
        """Last-resort cleanup so a failing test leaves nothing behind."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for line in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)


def _sample_runs(client: MlflowClient) -> tuple[Counter[str], int]:
    """(experiment/run-name counts of everything but stack-demo, stack-demo's run count)."""
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(experiments), max_results=5000)
    sample = Counter(
        f"{experiments[r.info.experiment_id]}/{r.info.run_name}"
        for r in runs
        if experiments[r.info.experiment_id] != "stack-demo"
    )
    demo = sum(1 for r in runs if experiments[r.info.experiment_id] == "stack-demo")
    return sample, demo


def _history(stack: LocalStack) -> set[tuple[str, str]]:
    """(experiment_name, run_name) of every run with history in the stack's VictoriaMetrics."""
    url = f"http://127.0.0.1:{stack.ports['VICTORIA_PORT']}"
    # Fresh samples become readable once flushed (VictoriaMetrics buffers them for a second
    # or two).
    requests.get(f"{url}/internal/force_flush", timeout=10).raise_for_status()
    r = requests.get(
        f"{url}/api/v1/series",
        # generate-sample's runs started within the last few hours: two days covers them.
        params={"match[]": "mlflow_metric_step", "start": str(time.time() - 2 * 86400)},
        timeout=10,
    )
    r.raise_for_status()
    return {(s["experiment_name"], s["run_name"]) for s in r.json()["data"]}


def _ready_block(terminal: str) -> str:
    """The READY block: from the READY line to the first line not indented under it."""
    block = terminal[terminal.index("\nREADY ") + 1 :].splitlines()
    return "\n".join([block[0], *[x for x in block[1:] if x.startswith("  ")][:40]])


def _history_urls(ready: str, port: int) -> list[str]:
    return re.findall(rf"http://127\.0\.0\.1:{port}/api/v1/\S+", ready)


def _check_history_urls_return_data(ready: str, port: int) -> None:
    """The READY block's VictoriaMetrics URLs answer the sample's val/loss history."""
    export, query_range = _history_urls(ready, port)
    assert "/api/v1/export?" in export
    lines = [x for x in requests.get(export, timeout=30).text.splitlines() if x.strip()]
    assert lines, f"{export} returned nothing"
    assert all('"__name__":"mlflow_val_loss"' in x for x in lines)
    assert "/api/v1/query_range?" in query_range
    body = requests.get(query_range, timeout=30).json()
    assert body["status"] == "success", body
    result = body["data"]["result"]
    assert result, f"{query_range} returned no series"
    assert sum(len(series["values"]) for series in result) > len(result)  # curves, not dots


def _pramathus_points(stack: LocalStack) -> list[dict[str, Any]]:
    path = stack.data / "pramathus-points.ndjson"
    return [json.loads(x) for x in _read(path).splitlines()]


def _pramathus_problem(stack: LocalStack) -> str | None:
    """Why the local Pramathus receiver does not (yet) hold points of every run of the stack's
    MLflow, each point once; None when it does."""
    client = MlflowClient(f"http://127.0.0.1:{stack.ports['MLFLOW_PORT']}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    run_ids = {r.info.run_id for r in client.search_runs(experiments, max_results=5000)}
    points = _pramathus_points(stack)
    identities = Counter(
        (p["metadata"]["run_id"], p["name"], p["metadata"]["step"], p["timestamp"]) for p in points
    )
    if identities and max(identities.values()) > 1:
        return f"points recorded twice: {identities.most_common(3)}"
    missing = run_ids - {p["metadata"]["run_id"] for p in points}
    return f"{len(missing)} runs without points, of {len(run_ids)}" if missing else None


def _check_pramathus_got_every_run_once(stack: LocalStack) -> None:
    problem: list[str | None] = [None]

    def done() -> bool:
        problem[0] = _pramathus_problem(stack)
        return problem[0] is None

    poll_until("Pramathus points of every run, once", done, 60, 1, lambda: f"{problem[0]}")


# What the first start left in MLflow, for the second start to compare with.
FIRST: dict[str, object] = {}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One data dir and port set for the first and second start."""
    work = tmp_path_factory.mktemp("local-stack-work")
    stack = LocalStack(tmp_path_factory.mktemp("local-stack"), _free_ports(), work)
    yield stack
    stack.kill_everything()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path / "data", _free_ports(), tmp_path)
    yield stack
    stack.kill_everything()


def test_first_start_is_ready_fires_the_demo_alert_and_stops_on_ctrl_c(
    shared: LocalStack,
) -> None:
    stack = shared
    stack.start()
    try:
        demo = stack.wait_for_line(DEMO_RE.pattern, READY_TIMEOUT)
        stack.wait_for_line(r"^READY ", READY_TIMEOUT)
        line = stack.wait_for_alert(demo.group(1))
        sample, demo_runs = _sample_runs(
            MlflowClient(f"http://127.0.0.1:{stack.ports['MLFLOW_PORT']}")
        )
        # History reached VictoriaMetrics: every sample run and the demo run, by name.
        expected = {tuple(k.split("/", 1)) for k in sample} | {("stack-demo", demo.group(1))}
        deadline = time.monotonic() + 60
        while not expected <= (history := _history(stack)) and time.monotonic() < deadline:
            time.sleep(1)
        missing = expected - history
        assert not missing, f"runs without history in VictoriaMetrics: {sorted(missing)}"
    except BaseException:
        stack.kill_everything()
        raise
    terminal = _read(stack.out)
    # The terminal: banner, a progress line per server, the exporter's log, READY, alerts.
    for name in (
        "pushgateway",
        "alert-sink",
        "pramathus-sink",
        "victoria-metrics",
        "alertmanager",
        "prometheus",
        "mlflow",
    ):
        assert re.search(rf"^  {name} +ready", terminal, re.MULTILINE), name
    ready = _ready_block(terminal)
    assert "/vmui" not in terminal, "Debian's VictoriaMetrics has no UI to point at"
    _check_history_urls_return_data(ready, stack.ports["VICTORIA_PORT"])
    assert re.search(r"Pramathus +[1-9]\d* points received", ready), ready
    _check_pramathus_got_every_run_once(stack)
    assert all(p["idempotency_key"] for p in _pramathus_points(stack))
    assert re.search(r"^PRAMATHUS\| \S+Z batch \w+: \d+ points from ", terminal, re.MULTILINE)
    # Prometheus runs the repo's config without a complaint (the compose shards' file
    # discovery used to log "Error adding file watch" here).
    errors = [
        x for x in _read(stack.data / "logs" / "prometheus.log").splitlines() if "level=error" in x
    ]
    assert errors == []
    assert "exporter | " in terminal
    assert "/api/2.0/mlflow" not in terminal, "MLflow's access log reached the terminal"
    assert "experiment=stack-demo" in line
    assert "MLflow run failed in stack-demo" in line
    assert sum(1 for x in _read(stack.data / "alerts.log").splitlines() if demo.group(1) in x) == 1
    # Server logs are files in the data dir.
    for name in (
        "mlflow",
        "pushgateway",
        "prometheus",
        "alertmanager",
        "alert-sink",
        "pramathus-sink",
        "victoria-metrics",
        "exporter",
    ):
        assert (stack.data / "logs" / f"{name}.log").stat().st_size > 0, name

    # Ctrl-C: SIGINT to the terminal's foreground process group (the script and tee).
    assert stack.proc is not None
    os.killpg(stack.proc.pid, signal.SIGINT)
    took = stack.wait_stopped()
    assert took < STOP_TIMEOUT
    assert "local stack stopped" in _read(stack.err), stack.describe()
    FIRST.update(sample=sample, demo_runs=demo_runs)


def test_second_start_reuses_the_sample_data_fires_again_and_stops_when_a_server_dies(
    shared: LocalStack,
) -> None:
    if not FIRST:
        pytest.skip("needs the first start (test_first_start_...) to have passed")
    stack = shared
    stack.start()
    try:
        demo = stack.wait_for_line(DEMO_RE.pattern, READY_TIMEOUT)
        stack.wait_for_line(r"^READY ", READY_TIMEOUT)
        sample, demo_runs = _sample_runs(
            MlflowClient(f"http://127.0.0.1:{stack.ports['MLFLOW_PORT']}")
        )
        # No sample run twice, none added: generate-sample found the first start's runs.
        assert sample == FIRST["sample"]
        assert max(sample.values()) == 1
        assert "created 0 runs" in _read(stack.out)
        # ... but a fresh demo failure, whose alert fires too.
        assert demo_runs == FIRST["demo_runs"] + 1  # type: ignore[operator]
        stack.wait_for_alert(demo.group(1))
        # Pramathus got the new run's points, and nothing of the first start's again.
        _check_pramathus_got_every_run_once(stack)
    except BaseException:
        stack.kill_everything()
        raise

    # A server dying on its own stops everything; the script says which and where its log is.
    prometheus = [p for p in stack.leftovers() if "prometheus --config.file" in p]
    assert len(prometheus) == 1, prometheus
    os.kill(int(prometheus[0].split(":", 1)[0]), signal.SIGKILL)
    stack.wait_stopped()
    assert stack.proc is not None
    assert stack.proc.returncode == 1, stack.describe()
    err = _read(stack.err)
    assert "prometheus exited early" in err, stack.describe()
    assert f"{stack.data}/logs/prometheus.log" in err
    assert "local stack stopped" in err


STOPS = [
    "SIGINT to the group",
    "SIGTERM to the script",
    "SIGHUP to the group",
    "tee dies",
    "SIGKILL to the script",
]


@pytest.mark.parametrize("how", STOPS)
def test_stopping_during_start_up_leaves_nothing(fresh: LocalStack, how: str) -> None:
    stack = fresh
    stack.start()
    try:
        # Mid start-up: MLflow still starting, the fast servers up.
        stack.wait_for_line(r"^  prometheus +ready", 60)
        assert stack.proc is not None
        expected: set[int] = set()  # the pipeline's exit status, when it is the script's
        if how == "SIGINT to the group":
            os.killpg(stack.proc.pid, signal.SIGINT)
            expected = {130}
        elif how == "SIGTERM to the script":
            os.kill(stack.script_pid(), signal.SIGTERM)
            expected = {143}
        elif how == "SIGHUP to the group":
            os.killpg(stack.proc.pid, signal.SIGHUP)
            expected = {129, -signal.SIGHUP}  # the outer bash -c may die of it at once
        elif how == "tee dies":
            # Only tee dies: the script learns it from its next write (SIGPIPE), here the
            # "mlflow ready" line. The pipeline's status is then tee's.
            os.kill(stack.tee_pid(), signal.SIGKILL)
        else:
            # No trap runs: the watchdog leading the stack's process group sees the script
            # gone and stops the group on its own.
            os.kill(stack.script_pid(), signal.SIGKILL)
    except BaseException:
        stack.kill_everything()
        raise
    stack.wait_stopped(STOP_TIMEOUT + (60 if how == "tee dies" else 0))
    if expected:
        assert stack.proc.returncode in expected, stack.describe()
    if how != "SIGKILL to the script":
        # The script's own teardown ran (not only the watchdog's fallback).
        assert "local stack stopped" in _read(stack.err), stack.describe()


# ---------------------------------------------------------------------------------------------
# The alert sink and its Alertmanager config (fast: no stack)
# ---------------------------------------------------------------------------------------------


def _routes(config: Path, labels: list[str]) -> list[str]:
    """Receivers Alertmanager's own routing picks for `labels` under `config`."""
    done = subprocess.run(
        ["amtool", "config", "routes", "test", f"--config.file={config}", *labels],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip().split(",")


def _without_receivers(route: dict[str, Any]) -> dict[str, Any]:
    return {
        k: [_without_receivers(r) for r in v] if k == "routes" else v
        for k, v in route.items()
        if k not in ("receiver", "group_wait")
    }


def test_rendered_alertmanager_config_is_valid_keeps_routing_and_has_one_local_receiver(
    tmp_path: Path,
) -> None:
    src = ROOT / "prometheus" / "alertmanager.yml"
    out = tmp_path / "alertmanager.yml"
    subprocess.run(
        [sys.executable, "scripts/alert_sink.py", "render", str(src), str(out), "--port", "9999"],
        cwd=ROOT,
        check=True,
        timeout=30,
    )
    check = subprocess.run(
        ["amtool", "check-config", str(out)], capture_output=True, text=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr

    repo, local = yaml.safe_load(src.read_text()), yaml.safe_load(out.read_text())
    assert local["receivers"] == [
        {
            "name": "local-alert-sink",
            "webhook_configs": [{"url": "http://127.0.0.1:9999/alerts", "send_resolved": True}],
        }
    ]
    # Same tree, matchers, grouping and inhibition; only receiver names and group_wait differ.
    assert _without_receivers(local["route"]) == _without_receivers(repo["route"])
    assert local["inhibit_rules"] == repo["inhibit_rules"]
    assert local["route"]["group_wait"] == "5s"
    # Alertmanager routes each alert down as many routes as before, each to the sink.
    for labels in (["severity=warning", "alertname=MlflowRunFailed"], ["severity=info"]):
        before, after = _routes(src, labels), _routes(out, labels)
        assert len(after) == len(before), (labels, before, after)
        assert set(after) == {"local-alert-sink"}


def test_alert_sink_logs_one_line_per_alert_state(tmp_path: Path) -> None:
    port = servers.free_port()
    log = tmp_path / "alerts.log"
    out = tmp_path / "stdout.log"
    cmd = [sys.executable, "scripts/alert_sink.py", "serve", "--port", str(port), "--log", str(log)]
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT)
    try:
        servers.wait_http(f"http://127.0.0.1:{port}/", 20, proc)
        alert = {
            "status": "firing",
            "fingerprint": "abc123",
            "startsAt": "2026-01-01T00:00:00Z",
            "labels": {
                "alertname": "MlflowRunFailed",
                "experiment_name": "stack-demo",
                "run_id": "0123456789ab",
                "run_name": "demo-failure-1",
            },
            "annotations": {"summary": "MLflow run failed in stack-demo"},
        }

        def post(*alerts: Mapping[str, object]) -> None:
            body = json.dumps({"version": "4", "status": "firing", "alerts": list(alerts)})
            r = requests.post(f"http://127.0.0.1:{port}/alerts", data=body, timeout=5)
            assert r.status_code == 200

        post(alert)
        post(alert)  # the same alert down the second route (Slack's, continue: true)
        post({**alert, "status": "resolved"})
        lines = log.read_text().splitlines()
        assert len(lines) == 2, lines
        assert re.fullmatch(
            r"\S+Z firing MlflowRunFailed experiment=stack-demo "
            r"run=demo-failure-1 \(0123456789ab\) - MLflow run failed in stack-demo",
            lines[0],
        ), lines[0]
        assert " resolved MlflowRunFailed " in lines[1]
    finally:
        proc.terminate()
        proc.wait(10)
    assert out.read_text().splitlines()[1:] == lines  # stdout: a start line, then the same
