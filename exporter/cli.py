"""The `exporter` command: thin click wrappers over config, runner and scheduler."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import click
import requests
import structlog
import yaml

from exporter import __version__, logs
from exporter.config import ConfigError, Settings, load_settings
from exporter.state import StateError

log = structlog.get_logger("exporter.cli")

# Secret values of the loaded settings: `_fail` masks them, as the log scrubber does for logs,
# in case a backend's error text repeats one.
_secret_values: list[str] = []


def _fail(message: str, code: int = 1) -> NoReturn:
    for secret in _secret_values:
        message = message.replace(secret, logs.MASK)
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    """Load settings with this command's flags on top; exit 2 listing every problem."""
    params = ctx.find_root().params
    flags = {
        "mlflow.tracking_uri": params.get("mlflow_uri"),
        "prometheus.gateway": params.get("gateway"),
        "export.state_dir": params.get("state_dir"),
        "logging.level": params.get("log_level"),
        "logging.format": params.get("log_format"),
        "export.shard_index": params.get("shard_index"),
        "export.shard_count": params.get("shard_count"),
        **overrides,
    }
    try:
        settings = load_settings(params.get("config"), overrides=flags)
    except ConfigError as exc:
        count = len(exc.problems)
        click.echo(f"error: invalid configuration ({count} problem{'s' * (count != 1)}):", err=True)
        for problem in exc.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(2)
    _secret_values[:] = sorted(
        (v for v in _secrets(settings) if len(v) >= 4), key=len, reverse=True
    )
    logs.configure(settings.logging.level, settings.logging.format, _secret_values)
    return settings


def _secrets(settings: Settings) -> list[str]:
    from exporter.app import secrets_of

    return secrets_of(settings)


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn expected failures into one line and an exit code, never a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except StateError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            _fail(f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # a bug: one line for the user, the traceback at DEBUG
            log.debug("internal.error", exc_info=True)
            _fail(f"internal error: {type(exc).__name__}: {exc}", 70)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exporter")
@click.option(
    "--config",
    "-c",
    type=click.Path(dir_okay=False),
    help="YAML config file (default: $EXPORTER_CONFIG, else built-in defaults).",
)
@click.option("--mlflow-uri", help="MLflow tracking server URL (MLFLOW_TRACKING_URI).")
@click.option("--gateway", help="Pushgateway address (PROMETHEUS_GATEWAY).")
@click.option("--state-dir", help="Directory for the exporter's state (EXPORTER_STATE_DIR).")
@click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL).")
@click.option("--log-format", help="auto, json or console (LOG_FORMAT).")
@click.option("--shard-index", type=int, help="This replica's shard (EXPORTER_SHARD_INDEX).")
@click.option("--shard-count", type=int, help="Number of replicas (EXPORTER_SHARD_COUNT).")
def main(**_: Any) -> None:
    """Export MLflow experiments, runs and models to Prometheus and Pramathus."""


@main.command("export-once")
@click.pass_context
@_guarded
def export_once(ctx: click.Context) -> None:
    """Run one export cycle; exit 0 on success, 1 with the reason on failure."""
    from exporter.app import open_runner

    settings = _settings(ctx)
    with open_runner(settings) as runner:
        result = runner.run_cycle()
        requests_made = runner.client.requests_made
    if not result.ok:
        _fail(result.reason())
    click.echo(
        f"exported {result.experiments} experiments, {result.runs} runs, "
        f"{result.pushed_series} series, {result.points_sent} points sent, "
        f"{requests_made} MLflow requests in {result.duration_seconds:.2f}s"
    )


@main.command()
@click.option("--interval", type=float, help="Seconds between cycles (EXPORT_INTERVAL).")
@click.option("--port", type=int, help="Port of /metrics and /healthz (EXPORTER_PORT).")
@click.pass_context
@_guarded
def continuous(ctx: click.Context, interval: float | None, port: int | None) -> None:
    """Run export cycles every interval until SIGTERM or Ctrl-C."""
    from exporter.app import open_runner
    from exporter.health import Health, SelfMetrics, serve
    from exporter.scheduler import run_forever

    settings = _settings(ctx, **{"export.interval_seconds": interval, "server.port": port})
    metrics, health, stop = SelfMetrics(), Health(secrets=_secret_values), threading.Event()
    if settings.server.enabled:
        server = serve(metrics, health, settings.server.host, settings.server.port)
        log.info("http.listening", host=settings.server.host, port=server.server_port)
    with open_runner(settings, stop, metrics, health) as runner:
        finished = run_forever(runner, settings.export.interval_seconds, stop)
        if not finished:
            # The abandoned cycle's thread cannot be interrupted; its writes are atomic,
            # so leaving now loses nothing.
            sys.stderr.flush()
            os._exit(0)


@main.command("check-config")
@click.pass_context
@_guarded
def check_config(ctx: click.Context) -> None:
    """Print the effective config (secrets masked) and whether each backend answers."""
    settings = _settings(ctx)
    click.echo(yaml.safe_dump(settings.masked(), sort_keys=False).rstrip())
    checks = _probes(settings)
    failed = 0
    click.echo("")
    for name, probe in checks:
        ok, detail = probe()
        failed += not ok
        click.echo(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if failed:
        sys.exit(1)


def _probes(settings: Settings) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    from exporter.mlflow_source import MlflowClient, MlflowError

    def mlflow() -> tuple[bool, str]:
        client = MlflowClient.from_settings(settings.mlflow.model_copy(update={"max_retries": 0}))
        try:
            client.call("POST", "experiments/search", {"max_results": 1})
        except MlflowError as exc:
            return False, str(exc)
        return True, f"{settings.mlflow.tracking_uri} answers"

    def http(name: str, url: str, method: str = "GET", **kw: Any) -> tuple[bool, str]:
        try:
            response = requests.request(method, url, timeout=5, **kw)
        except requests.RequestException as exc:
            return False, f"cannot reach {name}: {type(exc).__name__}"
        if response.status_code >= 500 or response.status_code in (401, 403):
            return False, f"{name} answered HTTP {response.status_code}"
        return True, f"{name} answers (HTTP {response.status_code})"

    probes: list[tuple[str, Callable[[], tuple[bool, str]]]] = [("mlflow", mlflow)]
    if settings.prometheus.enabled:
        gw = settings.prometheus.gateway
        probes.append(("pushgateway", lambda: http("Pushgateway", f"{gw}/-/healthy")))
    if settings.pramathus.enabled:
        p = settings.pramathus
        headers = {"Authorization": f"Bearer {p.api_key.get_secret_value()}"} if p.api_key else {}
        probes.append(
            (
                "pramathus",
                lambda: http(
                    "Pramathus",
                    str(p.endpoint),
                    "HEAD",
                    headers=headers,
                    verify=p.ca_bundle or p.verify_tls,
                ),
            )
        )
    return probes


@main.command("generate-sample")
@click.option("--experiments", default=3, show_default=True, help="Experiments to create.")
@click.option("--runs", default=8, show_default=True, help="Runs per experiment.")
@click.option("--steps", default=30, show_default=True, help="Logged steps per metric.")
@click.option("--seed", default=42, show_default=True, help="Random seed (same seed, same data).")
@click.option(
    "--model-name",
    default="churn-classifier",
    show_default=True,
    help="Registered model to create versions of.",
)
@click.pass_context
@_guarded
def generate_sample(
    ctx: click.Context, experiments: int, runs: int, steps: int, seed: int, model_name: str
) -> None:
    """Fill the MLflow server with realistic sample experiments, runs and models."""
    from exporter.sample import SampleSpec, generate

    settings = _settings(ctx)
    spec = SampleSpec(
        experiments=experiments, runs=runs, steps=steps, seed=seed, model_name=model_name
    )
    try:
        summary = generate(settings, spec, progress=sys.stdout.isatty())
    except Exception as exc:  # MLflow's client raises many types; one line is what users need
        _fail(f"generate-sample failed: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    click.echo(summary)
