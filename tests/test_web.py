"""Unit tests for exporter.web: the WSGI router called directly (no socket), and `serve`'s
error when its port is taken (the only test here that binds, and it never listens for HTTP)."""

from __future__ import annotations

import json

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from exporter.health import Health
from exporter.planners.series import FixedCollector
from exporter.web import ListenError, Router, serve
from tests.fakes_http import call_wsgi


@pytest.fixture
def registry() -> CollectorRegistry:
    r = CollectorRegistry()
    Gauge("mlflow_exporter_up", "1 when the last cycle could read MLflow.", registry=r).set(1)
    return r


def router(registry: CollectorRegistry, health: Health | None = None, **kw: object) -> Router:
    return Router(registry, health or Health(), **kw)  # type: ignore[arg-type]


def test_metrics_serves_the_exporters_own_registry(registry: CollectorRegistry) -> None:
    start, body = call_wsgi(router(registry), "/metrics")

    assert start.code == 200
    assert "mlflow_exporter_up 1.0" in body.decode()
    assert start.headers["Content-Type"].startswith("text/plain")


def test_mlflow_metrics_is_an_empty_exposition_in_push_mode(registry: CollectorRegistry) -> None:
    start, body = call_wsgi(router(registry), "/mlflow/metrics")

    assert (start.code, body) == (200, b"")
    assert start.headers == {"Content-Type": CONTENT_TYPE_LATEST, "Content-Length": "0"}


def test_mlflow_metrics_serves_a_fresh_collector_per_scrape_in_pull_mode(
    registry: CollectorRegistry,
) -> None:
    scrapes: list[int] = []

    def fresh() -> FixedCollector:
        scrapes.append(1)
        family = GaugeMetricFamily("mlflow_loss", "Latest value.", labels=["run_id"])
        family.add_metric(["abc"], float(len(scrapes)))
        return FixedCollector([family])

    app = router(registry, mlflow_series=fresh)
    _, first = call_wsgi(app, "/mlflow/metrics")
    start, second = call_wsgi(app, "/mlflow/metrics")

    assert 'mlflow_loss{run_id="abc"} 1.0' in first.decode()
    assert 'mlflow_loss{run_id="abc"} 2.0' in second.decode()
    assert "mlflow_exporter_up" not in second.decode()
    assert start.headers["Content-Length"] == str(len(second))


@pytest.mark.parametrize(
    ("status", "reason", "code"),
    [
        ("ok", "", 200),
        ("failing", "cannot reach MLflow at http://mlflow:5000", 503),
        ("crashed", "mlflow stage: KeyError: 'x'", 503),
    ],
)
def test_healthz_shows_the_last_outcome(
    registry: CollectorRegistry, status: str, reason: str, code: int
) -> None:
    health = Health()
    health.set(status, reason)  # type: ignore[arg-type]

    start, body = call_wsgi(router(registry, health), "/healthz")

    assert start.code == code
    assert json.loads(body) == {"status": status, "reason": reason}
    assert start.headers["Content-Type"] == "application/json"


def test_healthz_is_200_while_starting(registry: CollectorRegistry) -> None:
    start, body = call_wsgi(router(registry), "/healthz")
    assert (start.code, json.loads(body)) == (200, {"status": "starting", "reason": "starting"})


def test_readyz_is_503_until_a_cycle_succeeds_and_stays_ready_after(
    registry: CollectorRegistry,
) -> None:
    health = Health()
    app = router(registry, health)

    codes = []
    for status in (None, "failing", "ok", "failing", "crashed"):
        if status:
            health.set(status, f"{status} reason")
        start, body = call_wsgi(app, "/readyz")
        codes.append((start.code, json.loads(body)["status"]))

    assert codes == [
        (503, "not ready"),
        (503, "not ready"),
        (200, "ready"),
        (200, "ready"),
        (200, "ready"),
    ]


def test_readyz_shows_the_capture_progress_while_the_first_capture_runs(
    registry: CollectorRegistry,
) -> None:
    health = Health()
    app = router(registry, health)
    assert "progress" not in json.loads(call_wsgi(app, "/readyz")[1])

    health.set_progress({"runs_done": 10, "runs_total": 100})
    start, body = call_wsgi(app, "/readyz")

    assert start.code == 503
    assert json.loads(body)["progress"] == {"runs_done": 10, "runs_total": 100}


def test_livez_is_always_200(registry: CollectorRegistry) -> None:
    health = Health()
    health.set("crashed", "boom")
    start, body = call_wsgi(router(registry, health), "/livez")
    assert (start.code, json.loads(body)) == (200, {"status": "alive"})


@pytest.mark.parametrize("path", ["/", "/metricz", "/mlflow", "/healthz/extra"])
def test_other_paths_are_404_listing_the_real_ones(registry: CollectorRegistry, path: str) -> None:
    start, body = call_wsgi(router(registry), path)

    assert start.code == 404
    assert start.status == "404 Not Found"
    assert start.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert body == b"not found: try /metrics, /mlflow/metrics, /healthz, /readyz or /livez\n"


def test_serving_on_a_taken_port_names_it_and_export_port(
    registry: CollectorRegistry, bound_port: int
) -> None:
    with pytest.raises(ListenError) as info:
        serve(router(registry), "127.0.0.1", bound_port)

    message = str(info.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:{bound_port} (")
    assert "EXPORTER_PORT" in message
    assert "\n" not in message
