"""The local stack's small helpers, without servers: scripts/render_prometheus.py (the repo's
Prometheus config for loopback) and scripts/history_url.py (the READY block's history URLs).
They run for real in tests/integration/test_local_stack.py; here each rule is pinned down.
"""

from __future__ import annotations

import socket
import urllib.parse
from pathlib import Path

import pytest
import yaml

from scripts import history_url, render_prometheus

PORTS = {"pushgateway": 1, "exporter": 2, "alertmanager": 3, "prometheus": 4}


def test_the_loopback_config_has_no_compose_shard_discovery(tmp_path: Path) -> None:
    # The repo's config watches /etc/prometheus-shards (mounted by the sharded compose file
    # only); on loopback Prometheus logged "Error adding file watch" for it on every start.
    repo = (render_prometheus.ROOT / "prometheus" / "prometheus.yml").read_text()
    assert "/etc/prometheus-shards/" in repo
    path = render_prometheus.render(tmp_path, PORTS, "5s")
    text = path.read_text()
    assert "prometheus-shards" not in text
    jobs = {job["job_name"]: job for job in yaml.safe_load(text)["scrape_configs"]}
    assert jobs["mlflow-exporter"]["static_configs"] == [{"targets": ["127.0.0.1:2"]}]
    assert all("file_sd_configs" not in job for job in jobs.values())


def test_other_file_discovery_is_kept() -> None:
    job = {
        "file_sd_configs": [
            {"files": ["/etc/prometheus-shards/*.yml"]},
            {"files": ["/srv/targets/*.yml"]},
        ]
    }
    render_prometheus._drop_shard_discovery(job)
    assert job == {"file_sd_configs": [{"files": ["/srv/targets/*.yml"]}]}


EXPORT = (
    '{"metric":{"__name__":"mlflow_val_loss","run_id":"a"},"values":[1,+Inf],'
    '"timestamps":[1700000000000,1700000600000]}\n'
    '{"metric":{"__name__":"mlflow_val_loss","run_id":"b"},"values":[0.5],'
    '"timestamps":[1699990000000]}\n'
)


def test_the_span_of_an_export_is_its_oldest_and_newest_sample() -> None:
    assert history_url.span(EXPORT) == (1699990000000, 1700000600000)
    assert history_url.span("\n") is None


def test_the_range_url_covers_the_span_with_a_minute_of_margin_and_about_200_steps() -> None:
    url = history_url.range_url("http://127.0.0.1:8428", "mlflow_val_loss", 1_000_000, 21_000_000)
    base, _, query = url.partition("?")
    assert base == "http://127.0.0.1:8428/api/v1/query_range"
    assert urllib.parse.parse_qs(query) == {
        "query": ["mlflow_val_loss"],
        "start": ["940"],
        "end": ["21060"],
        "step": ["100s"],
    }


def test_the_export_url_asks_for_every_sample_of_the_selector() -> None:
    url = history_url.export_url("http://127.0.0.1:8428", 'mlflow_x{a="b"}')
    assert url == "http://127.0.0.1:8428/api/v1/export?match%5B%5D=mlflow_x%7Ba%3D%22b%22%7D"


def test_with_nothing_answering_only_the_export_url_is_printed_and_it_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with socket.socket() as held:  # bound, never listening: connections are refused
        held.bind(("127.0.0.1", 0))
        base = f"http://127.0.0.1:{held.getsockname()[1]}"
        code = history_url.main([base, "mlflow_val_loss", "--timeout", "0"])
    assert code == 1
    assert capsys.readouterr().out == f"{history_url.export_url(base, 'mlflow_val_loss')}\n"
