"""Sinks by name: the built-in history sinks and those other packages add.

A sink is a `SinkSpec`: its name (its queue's, its self-metrics' `mlflow_exporter_<name>_...`
families' and its health stage's), its config section, what its counts count, and a
factory that builds the `DeliverySink` from a `SinkContext`, or returns None while it is
off. A `DeliverySink` plans captured points into batches (`plan`, at capture), encodes a
queued batch into a request body (`encode`, at delivery: the queue holds every sink's
batches in one neutral form, `CapturedBatch`) and sends one body (`send`); see
`delivery.py`, and tests/plugins/example_sink for a complete one. The sink itself says
what it consumes (`consumes`, optional: captured points only when absent; trace buckets
with `plan_buckets`, a `delivery.BucketSink`), checked when it is built. The framework gives
every sink the rest: its durable queue and delivery marks, retries within its budget,
splitting of refused batches, set-aside and replay, self-metrics, health stage and
backfill when it is first enabled.

A package installed next to the exporter adds a sink with no change here: it declares an
entry point in the `mlflow_monitoring.sinks` group whose object is a `SinkSpec`, e.g. in
its pyproject.toml::

    [project.entry-points."mlflow_monitoring.sinks"]
    example = "example_sink:SPEC"

Such a sink reads its own settings from the environment (`SinkContext.env`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points

from pydantic import SecretStr

from exporter.config import ConfigError, Settings
from exporter.sinks.delivery import (
    CONSUMABLE,
    CREDENTIAL_HEADER,
    POINTS,
    TRACE_BUCKETS,
    BucketSink,
    DeliverySink,
    consumes,
)
from exporter.sinks.probe import Probe, http_answers

ENTRY_POINT_GROUP = "mlflow_monitoring.sinks"
# A name becomes part of metric names and a label value: lower case, digits and `_`.
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
# Cycle stages that are not sinks: a sink may not take one of their names.
_RESERVED = frozenset({"mlflow", "traces", "pushgateway", "state", "internal"})


@dataclass(frozen=True)
class SinkContext:
    """What a factory may use: the settings, the `run_id` label length decided for the
    cycle before anything is captured or delivered (call it in `encode`, at delivery, and
    never cache it), and the environment (where third-party sinks find their own
    settings)."""

    settings: Settings
    run_id_length: Callable[[], int] = lambda: 12
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))


@dataclass(frozen=True)
class SinkSpec:
    """One sink as the exporter knows it (see the module docstring)."""

    name: str
    section: str  # where its settings live (`pramathus`, `remote_write`, or an env prefix)
    build: Callable[[SinkContext], DeliverySink | None]
    unit: str = "points"  # what its counts count (remote write: `samples`, two per point)
    # Its secret setting values (keys, tokens, credential headers), masked in every log
    # line, health reason and error message.
    secrets: Callable[[Settings], Iterable[str]] = lambda _settings: ()
    # Its basic-auth `(username, password)` pairs, masked also as their base64 form.
    logins: Callable[[Settings], Iterable[tuple[str, str]]] = lambda _settings: ()
    # Whether its endpoint answers, for `check-config` (called only while it is enabled);
    # None: `check-config` says the sink is on and has no probe.
    probe: Callable[[SinkContext], Probe] | None = None


def _pramathus(context: SinkContext) -> DeliverySink | None:
    if not context.settings.pramathus.enabled:
        return None
    from exporter.sinks.pramathus import PramathusSink

    return PramathusSink(context.settings.pramathus)


def _remote_write(context: SinkContext) -> DeliverySink | None:
    if not context.settings.remote_write.enabled:
        return None
    from exporter.sinks.history import RemoteWriteSink

    return RemoteWriteSink(context.settings.remote_write, run_id_length=context.run_id_length)


def _otlp(context: SinkContext) -> DeliverySink | None:
    if not context.settings.otlp.enabled:
        return None
    from exporter.sinks.otlp import OtlpSink

    return OtlpSink(context.settings.otlp, run_id_length=context.run_id_length)


def _probe_pramathus(context: SinkContext) -> Probe:
    p = context.settings.pramathus
    headers = {"Authorization": f"Bearer {p.api_key.get_secret_value()}"} if p.api_key else {}
    return http_answers(
        "Pramathus",
        "PRAMATHUS_ENDPOINT",
        str(p.endpoint),
        "HEAD",
        headers=headers,
        verify=p.ca_bundle or p.verify_tls,
    )


def _probe_remote_write(context: SinkContext) -> Probe:
    from exporter.sinks.remote_write import request_headers

    rw = context.settings.remote_write
    return http_answers(
        "remote write",
        "REMOTE_WRITE_URL",
        str(rw.url),
        "HEAD",
        headers=request_headers(rw)[0],
        verify=rw.ca_bundle or rw.verify_tls,
    )


def _probe_otlp(context: SinkContext) -> Probe:
    o = context.settings.otlp
    return http_answers(
        "the OTLP endpoint",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        str(o.endpoint),
        "HEAD",
        headers=dict(o.headers),
        verify=o.ca_bundle or o.verify_tls,
    )


def _plain(value: SecretStr | None) -> str:
    return "" if value is None else value.get_secret_value()


def _pramathus_secrets(settings: Settings) -> list[str]:
    return [_plain(settings.pramathus.api_key)] if settings.pramathus.api_key else []


def _remote_write_secrets(settings: Settings) -> list[str]:
    rw = settings.remote_write
    values = [_plain(v) for v in (rw.password, rw.bearer_token) if v is not None]
    # Headers whose names say they carry credentials (a tenant id is not one).
    return values + [v for k, v in rw.headers.items() if CREDENTIAL_HEADER.search(k)]


BUILTIN: tuple[SinkSpec, ...] = (
    SinkSpec(
        "pramathus", "pramathus", _pramathus, secrets=_pramathus_secrets, probe=_probe_pramathus
    ),
    SinkSpec(
        "remote_write",
        "remote_write",
        _remote_write,
        unit="samples",
        secrets=_remote_write_secrets,
        logins=lambda s: [(_plain(s.remote_write.username), _plain(s.remote_write.password))],
        probe=_probe_remote_write,
    ),
    SinkSpec("otlp", "otlp", _otlp, secrets=lambda s: s.otlp.headers.values(), probe=_probe_otlp),
)


def installed() -> list[SinkSpec]:
    """The sinks other installed packages declare; ConfigError names the entry point of any
    that cannot be loaded or is not a `SinkSpec` (one line each)."""
    specs, problems = [], []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        where = f"sink entry point {ep.name!r} ({ep.value}) in {ENTRY_POINT_GROUP}"
        try:
            spec = ep.load()
        except Exception as exc:  # noqa: BLE001 (a third party's error: name it, never crash)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            problems.append(
                f"{where} cannot be loaded ({type(exc).__name__}: {detail}): fix or "
                "uninstall the package that declares it"
            )
            continue
        if not isinstance(spec, SinkSpec):
            problems.append(
                f"{where} is a {type(spec).__name__}, not an exporter SinkSpec: point it at "
                "a SinkSpec object"
            )
            continue
        specs.append(spec)
    if problems:
        raise ConfigError(problems)
    return specs


def all_specs(extra: Iterable[SinkSpec] | None = None) -> list[SinkSpec]:
    """Built-in sinks then installed ones (`extra`: instead of the installed ones), names
    checked: valid, unique and not a stage's; ConfigError lists every problem."""
    specs = [*BUILTIN, *(installed() if extra is None else extra)]
    problems, seen = [], set()
    for spec in specs:
        if not _NAME.match(spec.name) or spec.name in _RESERVED:
            problems.append(
                f"sink name {spec.name!r} is invalid: use lower case letters, digits and _ "
                f"(not {', '.join(sorted(_RESERVED))})"
            )
        elif spec.name in seen:
            problems.append(f"sink name {spec.name!r} is registered twice: rename one")
        seen.add(spec.name)
    if problems:
        raise ConfigError(problems)
    return specs


def unit(name: str) -> str:
    """What the counts of the built-in sink `name` count (`points` for any other)."""
    return next((s.unit for s in BUILTIN if s.name == name), "points")


def build_sinks(
    context: SinkContext, specs: Iterable[SinkSpec] | None = None
) -> list[DeliverySink]:
    """The enabled sinks, in registration order (built-in first)."""
    sinks = []
    for spec in all_specs() if specs is None else specs:
        sink = spec.build(context)
        if sink is None:
            continue
        if sink.name != spec.name:
            raise ConfigError(
                [f"sink {spec.name!r} built a sink named {sink.name!r}: use one name"]
            )
        _check_consumes(spec.name, sink)
        sinks.append(sink)
    return sinks


def _check_consumes(name: str, sink: DeliverySink) -> None:
    """ConfigError unless what a sink declares it consumes is something it can take: known
    values, captured points (every sink gets them), and `plan_buckets` for trace buckets."""
    taken = consumes(sink)
    problems = []
    if taken - CONSUMABLE:
        problems.append(
            f"sink {name!r} declares it consumes {sorted(taken - CONSUMABLE)}: "
            f"use {', '.join(sorted(CONSUMABLE))}"
        )
    if POINTS not in taken:
        problems.append(f"sink {name!r} must consume {POINTS!r}: every sink takes captured points")
    if TRACE_BUCKETS in taken and not isinstance(sink, BucketSink):
        problems.append(
            f"sink {name!r} declares it consumes {TRACE_BUCKETS!r} but has no plan_buckets"
        )
    if problems:
        raise ConfigError(problems)
