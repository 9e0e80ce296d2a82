"""Wiring: turn `Settings` into a ready `Runner` with real collaborators."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import structlog

from exporter.config import Settings
from exporter.health import Health, SelfMetrics
from exporter.mlflow_source import MlflowClient
from exporter.runner import Runner
from exporter.sinks.pramathus import PramathusSink
from exporter.sinks.prometheus import Pushgateway
from exporter.state import StateStore

log = structlog.get_logger("exporter.app")


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, for the log scrubber."""
    candidates = (
        settings.mlflow.password,
        settings.mlflow.token,
        settings.pramathus.api_key,
        settings.prometheus.password,
    )
    return [c.get_secret_value() for c in candidates if c is not None]


@contextmanager
def open_runner(
    settings: Settings,
    stop: threading.Event | None = None,
    metrics: SelfMetrics | None = None,
    health: Health | None = None,
) -> Iterator[Runner]:
    """A `Runner` whose state store is closed (and lock released) on exit."""
    metrics = metrics or SelfMetrics()
    state = StateStore(settings.state_path)
    if state.set_aside is not None:
        # The points it held in the spool are read again from MLflow: nothing is lost, but
        # some points may be delivered twice, and a human may want the file.
        log.warning("state.corrupt_set_aside", path=str(state.set_aside))
    try:
        client = MlflowClient.from_settings(
            settings.mlflow, on_request=lambda ep: metrics.mlflow_requests.labels(ep).inc()
        )
        pramathus = None
        if settings.pramathus.enabled:
            pramathus = PramathusSink(
                settings.pramathus,
                state,
                on_dropped=lambda n: metrics.dropped.labels("spool_overflow").inc(n),
            )
        yield Runner(
            settings=settings,
            client=client,
            state=state,
            metrics=metrics,
            health=health or Health(),
            pushgateway=Pushgateway(settings.prometheus) if settings.prometheus.enabled else None,
            pramathus=pramathus,
            should_stop=(stop.is_set if stop is not None else lambda: False),
        )
    finally:
        state.close()
