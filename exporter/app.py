"""Wiring: turn `Settings` into a ready `Runner` with real collaborators."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog
from pydantic import SecretStr

from exporter.config import Settings, plain_http_credentials
from exporter.health import Health
from exporter.logs import secret_forms
from exporter.mlflow_source import RestSource
from exporter.model import LabelRecord
from exporter.planners.scope import owns_registry
from exporter.runner import Runner
from exporter.selfmetrics import SelfMetrics
from exporter.sinks import registry
from exporter.sinks.delivery import DeliverySink
from exporter.sinks.groups import GroupBuilder, MirrorCollector, mirror_builder
from exporter.sinks.pushgateway import Pushgateway
from exporter.state import StateStore

log = structlog.get_logger("exporter.app")


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings in every form it travels in (raw, URL-encoded,
    base64, `user:password` in base64), longest first, for the one redaction. Each sink
    declares its own (`SinkSpec.secrets`, `SinkSpec.logins`)."""
    candidates = (settings.mlflow.password, settings.mlflow.token, settings.prometheus.password)
    values = [c.get_secret_value() for c in candidates if c is not None]
    pairs = [
        (_plain(section.username), _plain(section.password))
        for section in (settings.mlflow, settings.prometheus)
    ]
    for spec in registry.all_specs():
        values += spec.secrets(settings)
        pairs += spec.logins(settings)
    return secret_forms(values, pairs)


def _plain(value: SecretStr | None) -> str:
    return "" if value is None else value.get_secret_value()


def history_sinks(settings: Settings, state: StateStore) -> list[DeliverySink]:
    """The enabled sinks that receive every captured point, built from the registry
    (built-in ones, then those installed packages declare)."""
    minimum = settings.prometheus.run_id_length
    context = registry.SinkContext(
        settings, run_id_length=lambda: max(state.load(LabelRecord).run_id_length, minimum)
    )
    return registry.build_sinks(context)


def self_metrics() -> SelfMetrics:
    """Self-metrics with the families of every registered sink, on or off."""
    return SelfMetrics(spec.name for spec in registry.all_specs())


@contextmanager
def open_runner(
    settings: Settings,
    stop: threading.Event | None = None,
    metrics: SelfMetrics | None = None,
    health: Health | None = None,
) -> Iterator[Runner]:
    """A `Runner` whose state store is closed (and lock released) on exit."""
    metrics = metrics or self_metrics()
    state = StateStore(settings.state_path)
    if state.set_aside is not None:
        # The points it had queued are read again from MLflow: nothing is lost, but some
        # may be delivered twice, and a human may want the file.
        log.warning("state.corrupt_set_aside", path=str(state.set_aside))
    for warning in plain_http_credentials(settings):
        log.warning("config.plain_http_credentials", detail=warning)
    try:
        source = RestSource.from_settings(
            settings.mlflow, on_request=lambda ep: metrics.mlflow_requests.labels(ep).inc()
        )
        prometheus = settings.prometheus
        yield Runner(
            settings=settings,
            source=source,
            state=state,
            metrics=metrics,
            health=health or Health(),
            pushgateway=Pushgateway(prometheus) if prometheus.pushes else None,
            sinks=history_sinks(settings, state),
            should_stop=(stop.is_set if stop is not None else lambda: False),
        )
    finally:
        state.close()


def pull_collector(
    settings: Settings,
    state: StateStore,
    metrics: SelfMetrics,
    clock: Callable[[], float] = time.time,
) -> Callable[[], MirrorCollector]:
    """Pull mode: a collector building every group from the state on each scrape, over
    its own read-only connection (the cycle thread keeps writing meanwhile)."""

    def open_builder() -> tuple[GroupBuilder, Callable[[], None]]:
        mirror = state.reader()
        return mirror_builder(mirror, settings, clock), mirror.conn.close

    with_registry = owns_registry(settings.export)
    gauge = metrics.exported_series
    return lambda: MirrorCollector(open_builder, with_registry, gauge.set)
