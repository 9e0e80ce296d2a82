"""Unit tests for exporter.cli through click's CliRunner: flags, config errors, check-config.

No server is started. Backends that must be unreachable point at a port on 127.0.0.1 held by
a bound socket that never listens, so connections are refused at once; backends that must
answer are `requests` calls replaced by an in-memory fake. `alert-rules` is covered in
tests/test_alert_rules.py.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests
import structlog
from click.testing import CliRunner, Result

from exporter import __version__, cli
from exporter.config import DEFAULT_CONFIG_ENV, ENV_KEYS, SECRET_ENV
from exporter.logs import MASK
from exporter.sinks import registry
from exporter.state import StateStore
from tests.fakes.http import http_response
from tests.fakes.sinks import FakeDeliverySink

SECRET = "pk_live_Zq9-hunter2-TOPSECRET"
PASSWORD = "pg-pass-Xy7-TOPSECRET"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No exporter variable from the outer environment, and `./state` inside tmp_path."""
    for name in [*ENV_KEYS, *(f"{s}_FILE" for s in SECRET_ENV), DEFAULT_CONFIG_ENV]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    yield
    structlog.reset_defaults()


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli.main, list(args), env=env, catch_exceptions=False)


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


BAD_CONFIG = f"""\
mlflow:
  tracking_uri: "{SECRET}"
prometheus:
  run_id_length: twelve
pramathus:
  enabled: true
  api_kye: "{SECRET}"
export:
  intreval_seconds: 30
"""
BAD_PROBLEMS = [
    "mlflow.tracking_uri: not a URL",
    "prometheus.run_id_length: Input should be a valid integer",
    "pramathus.api_kye: unknown key; did you mean 'api_key'?",
    "pramathus: pramathus.enabled is true but pramathus.endpoint is not set",
    "export.intreval_seconds: unknown key; did you mean 'interval_seconds'?",
]


def unreachable_config(tmp_path: Path, port: int, **extra: str) -> str:
    base = f"http://127.0.0.1:{port}"
    return write(
        tmp_path,
        f"""\
mlflow:
  tracking_uri: {base}
  password: "{PASSWORD}"
  username: alice
prometheus:
  gateway: {base}
  password: "{PASSWORD}"
  username: pg
pramathus:
  enabled: true
  endpoint: {base}/api/metrics
  api_key: "{SECRET}"
remote_write:
  enabled: true
  url: {base}/api/v1/write
  bearer_token: "{SECRET}"
export:
  state_dir: {extra.get("state_dir", tmp_path / "state")}
""",
    )


# ---------------------------------------------------------------- global flags


@pytest.mark.parametrize(
    "where", ["before", "after"], ids=["flag-before-command", "flag-after-command"]
)
def test_an_invalid_config_given_before_or_after_the_command_exits_2_listing_every_problem(
    tmp_path: Path, where: str
) -> None:
    config = write(tmp_path, BAD_CONFIG)
    args = (
        ["--config", config, "export-once"]
        if where == "before"
        else ["export-once", "--config", config]
    )

    result = invoke(*args)

    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0] == f"error: invalid configuration ({len(BAD_PROBLEMS)} problems):"
    assert len(lines) == 1 + len(BAD_PROBLEMS)
    for problem in BAD_PROBLEMS:
        assert any(line.startswith(f"  - {problem}") for line in lines[1:]), problem
    assert all(line.endswith(f"[from file {config}]") for line in lines[1:])
    assert SECRET not in result.output
    assert result.stdout == ""


def test_a_section_with_a_misspelt_key_still_reports_its_missing_endpoint(tmp_path: Path) -> None:
    result = invoke("export-once", "--config", write(tmp_path, BAD_CONFIG))

    assert "pramathus.endpoint is not set" in result.stderr


def test_invalid_values_from_the_environment_are_listed_without_their_secret_values(
    tmp_path: Path,
) -> None:
    result = invoke(
        "export-once",
        env={
            "PRAMATHUS_ENABLED": "true",
            "PRAMATHUS_ENDPOINT": SECRET,
            "EXPORT_INTERVAL": "soon",
            "PRAMATHUS_API_KEY": SECRET,
        },
    )

    assert result.exit_code == 2
    assert "error: invalid configuration (2 problems):" in result.stderr
    assert "pramathus.endpoint: not a URL" in result.stderr
    assert "[from env PRAMATHUS_ENDPOINT]" in result.stderr
    assert "export.interval_seconds" in result.stderr
    assert "[from env EXPORT_INTERVAL]" in result.stderr
    assert SECRET not in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--state-dir", "{dir}", "--shard-count", "3", "--shard-index", "2", "check-config"],
        ["check-config", "--state-dir", "{dir}", "--shard-count", "3", "--shard-index", "2"],
        ["--shard-count", "3", "check-config", "--state-dir", "{dir}", "--shard-index", "2"],
    ],
    ids=["before", "after", "mixed"],
)
def test_global_flags_apply_before_or_after_the_command(
    tmp_path: Path, bound_port: int, args: list[str]
) -> None:
    config = unreachable_config(tmp_path, bound_port)
    wanted = str(tmp_path / "flagged-state")

    result = invoke("--config", config, *[a.format(dir=wanted) for a in args])

    assert f"state_dir: {wanted}" in result.stdout
    assert "shard_index: 2" in result.stdout
    assert "shard_count: 3" in result.stdout


def test_a_flag_after_the_command_wins_over_the_same_flag_before_it(
    tmp_path: Path, bound_port: int
) -> None:
    config = unreachable_config(tmp_path, bound_port)
    result = invoke(
        "--log-level", "DEBUG", "check-config", "--config", config, "--log-level", "error"
    )
    assert "level: ERROR" in result.stdout


@pytest.mark.parametrize(
    "args", [["--confg", "c.yaml", "export-once"], ["export-once", "--confg", "c.yaml"]]
)
def test_a_misspelt_global_flag_is_refused_with_a_suggestion(args: list[str]) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert "No such option '--confg'. Did you mean '--config'?" in result.stderr


def test_a_global_flag_where_the_command_belongs_points_at_the_global_flags() -> None:
    result = invoke("--", "--config", "c.yaml", "export-once")

    assert result.exit_code == 2
    assert "no such option: --config (run `exporter --help` for the global flags)" in result.stderr


def test_version_prints_the_version() -> None:
    result = invoke("--version")
    assert (result.exit_code, result.stdout.strip()) == (0, f"exporter, version {__version__}")


def test_help_says_global_flags_may_come_before_or_after_the_command() -> None:
    result = invoke("--help")
    assert "Global flags may come before or after the command." in result.stdout
    for command in ("export-once", "continuous", "check-config", "generate-sample", "alert-rules"):
        assert command in result.stdout


# ---------------------------------------------------------------- check-config


def test_check_config_prints_the_masked_config_and_exits_1_when_backends_are_unreachable(
    tmp_path: Path, bound_port: int
) -> None:
    config = unreachable_config(tmp_path, bound_port)
    base = f"http://127.0.0.1:{bound_port}"

    result = invoke("check-config", "--config", config)

    assert result.exit_code == 1
    out = result.stdout
    assert f"tracking_uri: {base}" in out
    assert out.count(f"'{MASK}'") == 6  # both usernames and passwords, api key, bearer token
    assert SECRET not in result.output
    assert PASSWORD not in result.output
    report = [line for line in out.splitlines() if line.startswith(("ok  ", "FAIL", "warn"))]
    assert report == [
        (
            f"FAIL mlflow: cannot reach MLflow at {base} (connection refused): is the server up, "
            "and is MLFLOW_TRACKING_URI right?"
        ),
        (
            f"FAIL pushgateway: cannot reach Pushgateway at {base}/-/healthy (connection "
            "refused): is it running, and is PROMETHEUS_GATEWAY right?"
        ),
        (
            f"FAIL pramathus: cannot reach Pramathus at {base}/api/metrics (connection "
            "refused): is it running, and is PRAMATHUS_ENDPOINT right?"
        ),
        (
            f"FAIL remote_write: cannot reach remote write at {base}/api/v1/write (connection "
            "refused): is it running, and is REMOTE_WRITE_URL right?"
        ),
    ]


class FakeRequests:
    """Stands in for `requests.request` and `Session.request`: one status per URL suffix."""

    def __init__(self, statuses: dict[str, int]) -> None:
        self.statuses = statuses
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        self.calls.append((method, url, kwargs))
        status = next(s for suffix, s in self.statuses.items() if url.endswith(suffix))
        return http_response(
            status, '{"experiments": []}', {"Content-Type": "application/json"}, url
        )


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch) -> FakeRequests:
    fake = FakeRequests(
        {"experiments/search": 200, "/-/healthy": 200, "/api/metrics": 405, "/api/v1/write": 204}
    )
    monkeypatch.setattr(requests, "request", fake)
    monkeypatch.setattr(
        requests.Session, "request", lambda _session, method, url, **kw: fake(method, url, **kw)
    )
    return fake


def test_check_config_exits_0_when_every_backend_answers(
    tmp_path: Path, backends: FakeRequests
) -> None:
    config = unreachable_config(tmp_path, 9)

    result = invoke("check-config", "--config", config)

    assert result.exit_code == 0, result.output
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok  ", "FAIL"))]
    assert report == [
        "ok   mlflow: http://127.0.0.1:9 answers",
        "ok   pushgateway: Pushgateway answers (HTTP 200)",
        "ok   pramathus: Pramathus answers (HTTP 405)",
        "ok   remote_write: remote write answers (HTTP 204)",
    ]
    pramathus_call = next(c for c in backends.calls if c[1].endswith("/api/metrics"))
    assert pramathus_call[0] == "HEAD"
    assert pramathus_call[2]["headers"] == {"Authorization": f"Bearer {SECRET}"}


def test_check_config_probes_the_otlp_endpoint_with_its_vendor_headers_and_masks_them(
    tmp_path: Path, backends: FakeRequests
) -> None:
    backends.statuses["/v1/metrics"] = 401
    config = unreachable_config(tmp_path, 9)
    env = {
        "OTLP_ENABLED": "true",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-honeycomb-team=team-secret-key",
    }

    result = invoke("check-config", "--config", config, env=env)

    assert result.exit_code == 1
    assert (
        "FAIL otlp: the OTLP endpoint at http://127.0.0.1:9/v1/metrics answered HTTP 401: "
        "check its key"
    ) in result.stdout.splitlines()
    otlp_call = next(c for c in backends.calls if c[1].endswith("/v1/metrics"))
    assert otlp_call[0] == "HEAD"
    assert otlp_call[2]["headers"] == {"x-honeycomb-team": "team-secret-key"}
    assert "team-secret-key" not in result.output


def test_check_config_names_an_installed_sink_and_runs_its_probe_only_while_it_is_on(
    tmp_path: Path, backends: FakeRequests, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(context: registry.SinkContext) -> Any:
        return FakeDeliverySink(name="acme") if context.env.get("ACME_ON") else None

    probed: list[str] = []

    def probe(context: registry.SinkContext) -> tuple[bool, str]:
        probed.append("acme")
        return False, "acme at acme.test refused the key: check ACME_KEY"

    plugins = [
        registry.SinkSpec("acme", "ACME", build, probe=probe),
        registry.SinkSpec("quiet", "QUIET", lambda _c: FakeDeliverySink(name="quiet")),
    ]
    monkeypatch.setattr(registry, "installed", lambda: plugins)
    config = unreachable_config(tmp_path, 9)

    off = invoke("check-config", "--config", config)
    monkeypatch.setenv("ACME_ON", "1")
    on = invoke("check-config", "--config", config)

    assert off.exit_code == 0, off.output
    assert "ok   quiet: enabled; its package declares no probe" in off.stdout.splitlines()
    assert "acme" not in off.stdout
    assert on.exit_code == 1
    assert "FAIL acme: acme at acme.test refused the key: check ACME_KEY" in on.stdout
    assert probed == ["acme"]


@pytest.mark.parametrize("status", [401, 403, 500, 503])
def test_check_config_fails_a_backend_refusing_its_credentials_or_broken(
    tmp_path: Path, backends: FakeRequests, status: int
) -> None:
    backends.statuses["/api/metrics"] = status
    config = unreachable_config(tmp_path, 9)

    result = invoke("check-config", "--config", config)

    assert result.exit_code == 1
    step = "check its key" if status < 500 else "is it running, and is PRAMATHUS_ENDPOINT right?"
    assert (
        f"FAIL pramathus: Pramathus at http://127.0.0.1:9/api/metrics answered HTTP {status}: "
        f"{step}\n" in result.stdout
    )


def test_check_config_warns_about_credentials_over_plain_http_to_another_host(
    tmp_path: Path, backends: FakeRequests
) -> None:
    config = write(
        tmp_path,
        f"pramathus:\n  enabled: true\n  endpoint: http://pramathus.internal/api/metrics\n"
        f"  api_key: {SECRET}\nprometheus:\n  enabled: false\n",
    )

    result = invoke("check-config", "--config", config)

    assert (
        "warn pramathus: credentials go over plain http:// to pramathus.internal" in result.stdout
    )
    assert "pushgateway" not in result.stdout.split("\n\n", 1)[1]  # disabled: not probed


def test_check_config_probes_only_the_enabled_backends(
    tmp_path: Path, backends: FakeRequests
) -> None:
    config = write(tmp_path, "prometheus:\n  mode: pull\n")

    result = invoke("check-config", "--config", config)

    assert result.exit_code == 0
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok  ", "FAIL"))]
    assert report == ["ok   mlflow: http://localhost:5000 answers"]
    assert [url for _, url, _ in backends.calls] == [
        "http://localhost:5000/api/2.0/mlflow/experiments/search"
    ]


def test_prometheus_enabled_false_in_the_environment_turns_the_pushgateway_off(
    backends: FakeRequests,
) -> None:
    result = invoke("check-config", env={"PROMETHEUS_ENABLED": "false"})

    assert result.exit_code == 0, result.output
    assert "  enabled: false\n  mode: push\n" in result.stdout
    report = [line for line in result.stdout.splitlines() if line.startswith(("ok  ", "FAIL"))]
    assert report == ["ok   mlflow: http://localhost:5000 answers"]
    assert not [url for _, url, _ in backends.calls if "healthy" in url]


# ---------------------------------------------------------------- one-line failures


def test_a_state_directory_in_use_fails_with_one_line(tmp_path: Path, bound_port: int) -> None:
    state_dir = tmp_path / "busy"
    config = unreachable_config(tmp_path, bound_port, state_dir=str(state_dir))
    holder = StateStore(state_dir)
    try:
        result = invoke("export-once", "--config", config)
    finally:
        holder.close()

    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: state directory {state_dir} is in use")
    assert "Traceback" not in result.output


def test_export_once_against_unreachable_backends_exits_1_naming_them(
    tmp_path: Path, bound_port: int
) -> None:
    base = f"http://127.0.0.1:{bound_port}"
    config = write(
        tmp_path,
        f"mlflow:\n  tracking_uri: {base}\n  max_retries: 0\n  password: {PASSWORD}\n"
        f"  username: alice\nprometheus:\n  gateway: {base}\n"
        f"export:\n  state_dir: {tmp_path / 'state'}\n",
    )

    result = invoke("export-once", "--config", config, "--log-level", "ERROR")

    assert result.exit_code == 1
    [last] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert last.startswith(f"error: mlflow: cannot reach MLflow at {base}")
    assert "Traceback" not in result.output
    assert SECRET not in result.output
    assert PASSWORD not in result.output


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (RuntimeError(f"bad {SECRET}"), 70, f"error: internal error: RuntimeError: bad {MASK}"),
        (KeyboardInterrupt(), 130, "error: interrupted"),
        (
            PermissionError(13, "Permission denied"),
            1,
            "error: PermissionError: [Errno 13] Permission denied",
        ),
    ],
)
def test_unexpected_failures_end_in_one_masked_line_and_an_exit_code(
    monkeypatch: pytest.MonkeyPatch, error: BaseException, code: int, message: str
) -> None:
    import exporter.app

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(exporter.app, "open_runner", broken)

    result = invoke("export-once", env={"PRAMATHUS_API_KEY": SECRET})

    assert result.exit_code == code
    assert result.stderr.splitlines() == [message]


# ---------------------------------------------------------------- commands wired to fakes


class FakeRunner:
    """What the commands use of a `Runner`: one scripted cycle result, a request count and
    its state (handed to the pull collector, itself replaced where a test serves)."""

    def __init__(self, result: Any) -> None:
        self.result = result
        self.source = type("Source", (), {"requests_made": 17})()
        self.state = object()

    def run_cycle(self) -> Any:
        return self.result


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Replaces `open_runner` by one yielding a `FakeRunner`; records how it was opened."""
    import contextlib

    import exporter.app
    from exporter.runner import CycleResult

    calls: list[tuple[Any, ...]] = []
    result = CycleResult(
        experiments=2,
        runs=5,
        pushed_series=40,
        sent={"pramathus": 9, "remote_write": 18},
        duration_seconds=1.234,
    )

    @contextlib.contextmanager
    def fake_open(settings: Any, *args: Any) -> Iterator[FakeRunner]:
        calls.append((settings, *args))
        yield FakeRunner(result)

    monkeypatch.setattr(exporter.app, "open_runner", fake_open)
    return calls


def test_export_once_reports_what_a_successful_cycle_did(opened: list[tuple[Any, ...]]) -> None:
    result = invoke("export-once")

    assert result.exit_code == 0
    assert result.stdout == (
        "exported 2 experiments, 5 runs, 40 series, 9 points sent to pramathus, 18 samples sent "
        "to remote_write, 17 MLflow requests in 1.23s\n"
    )


def test_export_once_exits_1_with_the_cycles_reason(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[Any, ...]]
) -> None:
    from exporter.runner import CycleResult

    monkeypatch.setattr(
        FakeRunner, "run_cycle", lambda self: CycleResult(errors={"pushgateway": f"401 {SECRET}"})
    )

    result = invoke("export-once", env={"PRAMATHUS_API_KEY": SECRET})

    assert result.exit_code == 1
    assert result.stderr == f"error: pushgateway: 401 {MASK}\n"


@pytest.mark.parametrize(("mode", "pull"), [("push", False), ("pull", True), ("both", True)])
def test_continuous_serves_the_probes_and_runs_cycles_at_the_interval_given(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[Any, ...]], mode: str, pull: bool
) -> None:
    import exporter.app
    import exporter.scheduler
    import exporter.web

    served: list[tuple[Any, str, int]] = []
    ran: list[tuple[float, str | None]] = []
    monkeypatch.setattr(exporter.app, "pull_collector", lambda *_: "pull-collector")

    def fake_serve(app: Any, host: str, port: int, tls: Any = None) -> Any:
        assert tls is None
        served.append((app, host, port))
        return type("Server", (), {"server_port": 40123})()

    def fake_run_forever(runner: Any, interval: float, stop: Any, address: str | None) -> bool:
        ran.append((interval, address))
        return True

    monkeypatch.setattr(exporter.web, "serve", fake_serve)
    monkeypatch.setattr(exporter.scheduler, "run_forever", fake_run_forever)

    result = invoke("continuous", "--interval", "5", "--port", "0", env={"PROMETHEUS_MODE": mode})

    assert result.exit_code == 0, result.output
    [(router, host, port)] = served
    assert (host, port) == ("127.0.0.1", 0)
    assert router.mlflow_series == ("pull-collector" if pull else None)
    assert ran == [(5.0, "http://127.0.0.1:40123")]
    settings = opened[0][0]
    assert settings.export.interval_seconds == 5.0


def test_continuous_without_the_server_runs_cycles_without_an_address(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    import exporter.scheduler

    ran: list[str | None] = []

    def run_forever(r: Any, i: Any, s: Any, address: str | None) -> bool:
        ran.append(address)
        return True

    monkeypatch.setattr(exporter.scheduler, "run_forever", run_forever)

    result = invoke("continuous", "--config", write(tmp_path, "server:\n  enabled: false\n"))

    assert (result.exit_code, ran) == (0, [None])


def test_continuous_leaves_at_once_when_the_last_cycle_had_to_be_abandoned(
    monkeypatch: pytest.MonkeyPatch, opened: list[tuple[Any, ...]], tmp_path: Path
) -> None:
    import os

    import exporter.scheduler

    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(exporter.scheduler, "run_forever", lambda *args: False)
    monkeypatch.setattr(os, "_exit", fake_exit)

    result = invoke("continuous", "--config", write(tmp_path, "server:\n  enabled: false\n"))

    assert (result.exit_code, exits) == (0, [0])


def test_generate_sample_passes_its_options_and_prints_the_summary(
    monkeypatch: pytest.MonkeyPatch, backends: FakeRequests
) -> None:
    import exporter.sample

    specs: list[Any] = []

    def generate(settings: Any, spec: Any, progress: Any) -> str:
        specs.append(spec)
        return "made"

    monkeypatch.setattr(exporter.sample, "generate", generate)

    result = invoke("generate-sample", "--experiments", "2", "--runs", "3", "--seed", "7")

    assert (result.exit_code, result.stdout) == (0, "made\n")
    assert (specs[0].experiments, specs[0].runs, specs[0].steps, specs[0].seed) == (2, 3, 30, 7)


def test_generate_sample_failures_end_in_one_line_naming_mlflow_and_the_next_step(
    monkeypatch: pytest.MonkeyPatch, backends: FakeRequests
) -> None:
    import exporter.sample

    def broken(*args: Any, **kwargs: Any) -> str:
        raise ConnectionError("MLflow is down\nwith a long traceback-ish second line")

    monkeypatch.setattr(exporter.sample, "generate", broken)

    result = invoke("generate-sample")

    assert result.exit_code == 1
    assert result.stderr == (
        "error: generate-sample failed against MLflow at http://localhost:5000: "
        "ConnectionError: MLflow is down; see the MLflow server's log, then run it again "
        "(it adds only what is missing)\n"
    )


def test_a_long_generate_sample_error_is_cut_at_a_word_not_inside_one(
    monkeypatch: pytest.MonkeyPatch, backends: FakeRequests
) -> None:
    import exporter.sample

    def broken(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("HTTPConnectionPool(host='127.0.0.1', port=1) " + "word " * 100)

    monkeypatch.setattr(exporter.sample, "generate", broken)

    result = invoke("generate-sample")

    assert result.exit_code == 1
    assert "RuntimeError: HTTPConnectionPool(host='127.0.0.1', port=1) word word" in result.stderr
    assert " word ...; see the MLflow server's log" in result.stderr


def test_generate_sample_with_mlflow_unreachable_names_it_and_what_to_check(
    bound_port: int,
) -> None:
    result = invoke("generate-sample", "--mlflow-uri", f"http://127.0.0.1:{bound_port}")

    assert result.exit_code == 1
    assert result.stderr == (
        f"error: generate-sample: cannot reach MLflow at http://127.0.0.1:{bound_port} "
        "(connection refused): is the server up, and is MLFLOW_TRACKING_URI right?\n"
    )


def test_a_state_dir_that_is_a_file_fails_in_one_line_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("", encoding="utf-8")

    result = invoke("export-once", "--state-dir", str(path), "--mlflow-uri", "http://127.0.0.1:9")

    assert result.exit_code == 1
    assert result.stderr == (
        f"error: state directory {path} is a file, not a directory: move it away, or set "
        "EXPORTER_STATE_DIR (or --state-dir) to a directory\n"
    )


# ---------------------------------------------------------------- web config (TLS, basic auth)


@pytest.mark.parametrize("command", ["continuous", "check-config"])
def test_a_web_config_naming_a_missing_file_or_a_bad_hash_stops_start_up_with_exit_2(
    tmp_path: Path, command: str
) -> None:
    web = write(
        tmp_path,
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: nope.key\n"
        "basic_auth_users:\n  prometheus: hunter2-in-clear\n",
        "web.yml",
    )
    result = invoke(command, env={"EXPORTER_WEB_CONFIG_FILE": web})

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: invalid configuration (3 problems):",
        (
            f"  - server.web_config_file {web}: basic_auth_users.prometheus: not a bcrypt hash "
            "($2b$...); make one with `htpasswd -nBC 10 USER` or Python's bcrypt.hashpw"
        ),
        (
            f"  - server.web_config_file {web}: tls_server_config.cert_file: no such file "
            f"{tmp_path / 'nope.crt'}"
        ),
        (
            f"  - server.web_config_file {web}: tls_server_config.key_file: no such file "
            f"{tmp_path / 'nope.key'}"
        ),
    ]
    assert "hunter2" not in result.output


def test_a_missing_web_config_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    result = invoke("continuous", env={"EXPORTER_WEB_CONFIG_FILE": str(tmp_path / "w.yml")})
    assert result.exit_code == 2
    assert f"server.web_config_file {tmp_path / 'w.yml'}: cannot read" in result.stderr


def _set_aside(state_dir: Path) -> None:
    """Two set-aside Pramathus batches and one remote write batch, as a drain leaves them."""
    from tests.support.planned import entry

    store = StateStore(state_dir)
    try:
        with store.transaction():
            pramathus = store.outbox("pramathus")
            pramathus.set_aside_new(entry("k1", 3), 1_700_000_000_000, "too_large", "HTTP 413")
            pramathus.set_aside_new(entry("k2", 2), 1_700_000_000_000, "rejected", "HTTP 400")
            store.outbox("remote_write").set_aside_new(
                entry("k3", 4), 1_700_000_000_000, "too_old", "too old"
            )
    finally:
        store.close()


def test_dead_letters_list_shows_each_set_aside_batch_and_a_total(tmp_path: Path) -> None:
    _set_aside(tmp_path / "state")

    result = invoke("dead-letters", "list", "--state-dir", str(tmp_path / "state"))

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("pramathus #1 too_large points=3 status=- at=2023-11-14T22:13:20")
    assert "remote_write #3 too_old points=4" in lines[2]
    assert lines[-1] == "3 set-aside batches, 9 points"


def test_dead_letters_replay_by_sink_and_reason_queues_only_those(tmp_path: Path) -> None:
    _set_aside(tmp_path / "state")

    result = invoke(
        "dead-letters",
        "replay",
        "--sink",
        "pramathus",
        "--reason",
        "too_large",
        "--state-dir",
        str(tmp_path / "state"),
    )

    assert result.exit_code == 0, result.output
    assert result.output == "pramathus: 3 points in 1 batches queued again\n"
    store = StateStore(tmp_path / "state")
    try:
        assert [b.idempotency_key for b in store.outbox("pramathus").batches()] == ["k1"]
        assert [r.reason for r in store.outbox("pramathus").set_aside_batches()] == ["rejected"]
        assert len(store.outbox("remote_write").set_aside_batches()) == 1
    finally:
        store.close()
    everything = invoke("dead-letters", "replay", "--state-dir", str(tmp_path / "state"))
    assert everything.output.splitlines() == [
        "pramathus: 2 points in 1 batches queued again",
        "remote_write: 4 points in 1 batches queued again",
        "otlp: 0 points in 0 batches queued again",  # every registered sink is listed
    ]


def test_check_config_masks_every_header_value_of_a_sink(
    tmp_path: Path, backends: FakeRequests
) -> None:
    config = write(
        tmp_path,
        """\
mlflow: {tracking_uri: "http://127.0.0.1:9"}
remote_write:
  enabled: true
  url: http://127.0.0.1:9/api/v1/write
  headers: {X-Api-Key: hk-9f8e7d6c5b, X-Scope-OrgID: team-a}
""",
    )

    result = invoke("check-config", "--config", config)

    assert "hk-9f8e7d6c5b" not in result.output
    assert "team-a" not in result.output
    assert f"X-Api-Key: '{MASK}'" in result.stdout
    assert f"X-Scope-OrgID: '{MASK}'" in result.stdout


def test_an_error_echoing_basic_credentials_is_masked_in_every_form(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from exporter.app import secrets_of
    from exporter.config import load_settings

    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    settings = load_settings(unreachable_config(tmp_path, 9))
    monkeypatch.setattr(cli, "_secret_values", secrets_of(settings))

    with pytest.raises(SystemExit):
        cli._fail(f"MLflow said: {basic} refused, sent {quote(PASSWORD, safe='')}")

    err = capsys.readouterr().err
    assert basic not in err
    assert quote(PASSWORD, safe="") not in err
    assert err == f"error: MLflow said: {MASK} refused, sent {MASK}\n"
