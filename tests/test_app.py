"""Unit tests for exporter.app: wiring settings into a runner (no servers are contacted)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest

from exporter.app import history_sinks, open_runner, pull_collector, secrets_of
from exporter.config import Settings, load_settings
from exporter.model import CaptureRecord, Experiment, LatestMetric, Run
from exporter.sinks import registry
from exporter.sinks.history import RemoteWriteSink
from exporter.sinks.pramathus import PramathusSink
from exporter.state import StateStore
from exporter.state.records import save
from exporter.state.schedule import PENDING_NONE


def settings(tmp_path: Path, **env: str) -> Settings:
    return load_settings(env={"EXPORTER_STATE_DIR": str(tmp_path / "state"), **env})


def test_every_secret_of_the_settings_is_collected_for_masking(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        MLFLOW_TRACKING_PASSWORD="a1",  # too short to mask (it would mask ordinary words)
        MLFLOW_TRACKING_TOKEN="tok-b2b2",
        PRAMATHUS_API_KEY="c3c3c3",
        PROMETHEUS_GATEWAY_PASSWORD="d4d4",
        REMOTE_WRITE_PASSWORD="e5e5e5",
    )
    secrets = secrets_of(s)

    for raw in ("tok-b2b2", "c3c3c3", "d4d4", "e5e5e5"):
        assert raw in secrets
    assert "a1" not in secrets
    assert base64.b64encode(b":e5e5e5").decode() in secrets  # remote write basic auth
    assert base64.b64encode(b":d4d4").decode() in secrets  # Pushgateway basic auth
    assert secrets == sorted(secrets, key=len, reverse=True)


def test_url_encoded_secrets_and_secret_headers_are_collected(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("remote_write:\n  headers: {X-Api-Key: hk-123456, X-Scope-OrgID: tenant-a}\n")
    s = load_settings(config, env={"PRAMATHUS_API_KEY": "a/b+c d"})

    secrets = secrets_of(s)

    assert "a%2Fb%2Bc%20d" in secrets
    assert "a%2Fb%2Bc+d" in secrets
    assert "hk-123456" in secrets
    assert "tenant-a" not in secrets


def test_the_secrets_an_installed_sink_declares_are_collected_for_masking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugin = registry.SinkSpec("acme", "ACME", lambda _c: None, secrets=lambda _s: ["acme-k9"])
    monkeypatch.setattr(registry, "installed", lambda: [plugin])

    assert "acme-k9" in secrets_of(settings(tmp_path))


def test_enabled_history_sinks_are_wired_and_remote_write_follows_the_label_length(
    tmp_path: Path,
) -> None:
    s = settings(
        tmp_path,
        PRAMATHUS_ENABLED="true",
        PRAMATHUS_ENDPOINT="http://127.0.0.1:9/p",
        REMOTE_WRITE_ENABLED="true",
        REMOTE_WRITE_URL="http://127.0.0.1:9/w",
    )
    state = StateStore(tmp_path / "state")
    try:
        pramathus, remote = history_sinks(s, state)
        assert isinstance(pramathus, PramathusSink)
        assert isinstance(remote, RemoteWriteSink)
        assert remote.run_id_length() == 12
    finally:
        state.close()
    assert history_sinks(settings(tmp_path), state) == []


def test_pull_mode_needs_no_pushgateway_and_a_corrupt_state_is_reported(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.db").write_bytes(b"garbage " * 100)
    s = settings(tmp_path, PROMETHEUS_MODE="pull")
    with structlog.testing.capture_logs() as logs, open_runner(s) as runner:
        assert runner.pushgateway is None
    assert [e["event"] for e in logs] == ["state.corrupt_set_aside"]


def test_plain_http_credentials_to_a_remote_host_are_warned_about(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        MLFLOW_TRACKING_URI="http://mlflow.example.com:5000",
        MLFLOW_TRACKING_PASSWORD="pw",
        MLFLOW_TRACKING_USERNAME="u",
    )
    with structlog.testing.capture_logs() as logs, open_runner(s) as runner:
        assert runner.pushgateway is not None
    [warning] = [e for e in logs if e["event"] == "config.plain_http_credentials"]
    assert "mlflow.example.com" in warning["detail"]
    assert "pw" not in warning["detail"]


def test_the_pull_collector_serves_the_mirror_over_its_own_connection(tmp_path: Path) -> None:
    s = settings(tmp_path, PROMETHEUS_MODE="pull")
    with open_runner(s) as runner:
        mirror = runner.state.mirror
        with runner.state.transaction():
            mirror.set_experiments([Experiment("1", "churn")], 0)
            run = Run("a" * 32, "1", "r", "FINISHED", "u", 1, 2, (LatestMetric("loss", 0.5, 1, 1),))
            mirror.write_run(run, 0, PENDING_NONE)
            save(runner.state.db.conn, CaptureRecord(last_capture_ms=1, active_experiments=1))
        registry = CollectorRegistry()
        registry.register(pull_collector(s, runner.state, runner.metrics)())
        text = generate_latest(registry).decode()
        served = runner.metrics.registry.get_sample_value("mlflow_exporter_series")
    assert 'mlflow_experiments{lifecycle_stage="active"} 1.0' in text
    assert "mlflow_experiment_runs" in text
    assert served == sum(1 for line in text.splitlines() if not line.startswith("#"))
