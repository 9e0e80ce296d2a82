"""The `exporter` command: thin click wrappers over config, runner and scheduler."""

from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import structlog
import yaml

from exporter import __version__, logs
from exporter.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from pathlib import Path

    from exporter.web import WebConfig

log = structlog.get_logger("exporter.cli")

F = TypeVar("F", bound=Callable[..., Any])

# Secret values of the loaded settings: `_fail` masks them, as the log scrubber does for logs,
# in case a backend's error text repeats one.
_secret_values: list[str] = []

# Global flags: accepted before the command (`exporter --config c.yaml export-once`) and,
# as users type them too, after it (`exporter export-once --config c.yaml`).
GLOBAL_FLAGS: dict[str, str | None] = {
    "mlflow_uri": "mlflow.tracking_uri",
    "gateway": "prometheus.gateway",
    "state_dir": "export.state_dir",
    "log_level": "logging.level",
    "log_format": "logging.format",
    "shard_index": "export.shard_index",
    "shard_count": "export.shard_count",
    "config": None,
}


def global_options(fn: F) -> F:
    """The global flags, for the group and for every command."""
    options = [
        click.option(
            "--config",
            "-c",
            type=click.Path(dir_okay=False),
            help="YAML config file (default: $EXPORTER_CONFIG, else built-in defaults).",
        ),
        click.option("--mlflow-uri", help="MLflow tracking server URL (MLFLOW_TRACKING_URI)."),
        click.option("--gateway", help="Pushgateway address (PROMETHEUS_GATEWAY)."),
        click.option(
            "--state-dir", help="Directory for the exporter's state (EXPORTER_STATE_DIR)."
        ),
        click.option("--log-level", help="DEBUG, INFO, WARNING or ERROR (LOG_LEVEL)."),
        click.option("--log-format", help="auto, json or console (LOG_FORMAT)."),
        click.option(
            "--shard-index", type=int, help="This replica's shard (EXPORTER_SHARD_INDEX)."
        ),
        click.option("--shard-count", type=int, help="Number of replicas (EXPORTER_SHARD_COUNT)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {logs.redact(message, _secret_values)}", err=True)
    sys.exit(code)


def _settings(ctx: click.Context, flags: dict[str, Any], **overrides: Any) -> Settings:
    """Load settings with the global flags (given before or after the command) and this
    command's own flags on top; exit 2 listing every problem."""
    given = {**ctx.find_root().params, **{k: v for k, v in flags.items() if v is not None}}
    dotted = {key: given.get(name) for name, key in GLOBAL_FLAGS.items() if key}
    try:
        settings = load_settings(given.get("config"), overrides={**dotted, **overrides})
        from exporter.sinks.registry import all_specs

        all_specs()  # a broken sink plugin is a configuration problem, reported here
    except ConfigError as exc:
        count = len(exc.problems)
        click.echo(f"error: invalid configuration ({count} problem{'s' * (count != 1)}):", err=True)
        for problem in exc.problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(2)
    from exporter.app import secrets_of

    _secret_values[:] = secrets_of(settings)
    logs.configure(settings.logging.level, settings.logging.format, _secret_values)
    return settings


def _guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """Turn expected failures into one line and an exit code, never a traceback."""
    from exporter.state import StateError
    from exporter.web import ListenError

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (StateError, ListenError) as exc:
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


class _Group(click.Group):
    """Points at the right place when a global flag is misplaced or misspelt."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0].startswith("-"):
            ctx.fail(f"no such option: {args[0]} (run `exporter --help` for the global flags)")
        return super().resolve_command(ctx, args)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="exporter")
@global_options
def main(**_: Any) -> None:
    """Export MLflow experiments, runs and models to Prometheus, Pramathus and remote write.

    Global flags may come before or after the command.
    """


@main.command("export-once")
@global_options
@click.pass_context
@_guarded
def export_once(ctx: click.Context, **flags: Any) -> None:
    """Run one export cycle; exit 0 on success, 1 with the reason on failure."""
    from exporter.app import open_runner
    from exporter.runner import run_until_drained, unit

    settings = _settings(ctx, flags)
    with open_runner(settings) as runner:
        rounds = run_until_drained(runner)
        requests_made = getattr(runner.source, "requests_made", 0)
    result = rounds[-1]
    if not result.ok:
        _fail(result.reason())
    sent: Counter[str] = Counter()
    for r in rounds:
        sent.update(r.sent)
    sent_text = "".join(f"{n} {unit(sink)} sent to {sink}, " for sink, n in sent.items())
    seconds = sum(r.duration_seconds for r in rounds)
    in_rounds = f" ({len(rounds)} rounds: the queues' bound was reached)" if len(rounds) > 1 else ""
    click.echo(
        f"exported {result.experiments} experiments, {result.runs} runs, "
        f"{sum(r.pushed_series for r in rounds)} series, {sent_text}"
        f"{requests_made} MLflow requests in {seconds:.2f}s{in_rounds}"
    )
    if result.held_back:
        click.echo(
            "some points are still only in MLflow (the last round delivered none): "
            "run export-once again once the sinks accept them",
            err=True,
        )


@main.command()
@click.option("--interval", type=float, help="Seconds between cycles (EXPORT_INTERVAL).")
@click.option("--port", type=int, help="Port of /metrics and the probes (EXPORTER_PORT).")
@global_options
@click.pass_context
@_guarded
def continuous(ctx: click.Context, interval: float | None, port: int | None, **flags: Any) -> None:
    """Run export cycles every interval until SIGTERM or Ctrl-C."""
    from exporter.app import open_runner, pull_collector, self_metrics
    from exporter.health import Health
    from exporter.scheduler import run_forever
    from exporter.web import Router, serve, with_headers

    settings = _settings(ctx, flags, **{"export.interval_seconds": interval, "server.port": port})
    web = _web_config(settings)
    metrics, health, stop = self_metrics(), Health(secrets=_secret_values), threading.Event()
    with open_runner(settings, stop, metrics, health) as runner:
        address = None
        if settings.server.enabled:
            serves = settings.prometheus.serves
            collector = pull_collector(settings, runner.state, metrics) if serves else None
            router = Router(metrics.registry, health, collector, users=web.users)
            app = with_headers(router, web.headers)
            server = serve(app, settings.server.host, settings.server.port, web.tls)
            scheme = "https" if web.tls else "http"
            address = f"{scheme}://{settings.server.host}:{server.server_port}"
            log.info("http.listening", host=settings.server.host, port=server.server_port)
        finished = run_forever(runner, settings.export.interval_seconds, stop, address)
        if not finished:
            # The abandoned cycle's thread cannot be interrupted; its writes are atomic,
            # so leaving now loses nothing.
            sys.stderr.flush()
            os._exit(0)


def _web_config(settings: Settings) -> WebConfig:
    """The web config file `server.web_config_file` names, checked (TLS files load, every
    hash is bcrypt); exit 2 listing every problem, as for the rest of the configuration."""
    from exporter.web import WebConfig, WebConfigError, load_web_config

    path = settings.server.web_config_file
    if not path or not settings.server.enabled:
        return WebConfig()
    try:
        return load_web_config(path)
    except WebConfigError as exc:
        count = len(exc.problems)
        click.echo(f"error: invalid configuration ({count} problem{'s' * (count != 1)}):", err=True)
        for problem in exc.problems:
            click.echo(f"  - server.web_config_file {path}: {problem}", err=True)
        sys.exit(2)


@main.command("check-config")
@global_options
@click.pass_context
@_guarded
def check_config(ctx: click.Context, **flags: Any) -> None:
    """Print the effective config (secrets masked) and whether each backend answers."""
    from exporter.config import plain_http_credentials

    settings = _settings(ctx, flags)
    _web_config(settings)
    click.echo(_masked(yaml.safe_dump(settings.masked(), sort_keys=False).rstrip()))
    failed = 0
    click.echo("")
    for warning in plain_http_credentials(settings):
        click.echo(_masked(f"warn {warning}"))
    for name, probe in _probes(settings):
        ok, detail = probe()
        failed += not ok
        click.echo(_masked(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}"))
    if failed:
        sys.exit(1)


def _probes(settings: Settings) -> list[tuple[str, Callable[[], tuple[bool, str]]]]:
    """MLflow, the Pushgateway when pushing, then every enabled sink (built-in or installed)
    by its own probe."""
    from exporter.mlflow_source import MlflowError, RestSource
    from exporter.sinks import registry
    from exporter.sinks.probe import http_answers

    def mlflow() -> tuple[bool, str]:
        source = RestSource.from_settings(settings.mlflow.model_copy(update={"max_retries": 0}))
        try:
            source.call("POST", "experiments/search", {"max_results": 1})
        except MlflowError as exc:
            return False, str(exc)
        return True, f"{settings.mlflow.tracking_uri} answers"

    probes: list[tuple[str, Callable[[], tuple[bool, str]]]] = [("mlflow", mlflow)]
    prom = settings.prometheus
    if prom.pushes:
        health = f"{prom.gateway}/-/healthy"
        probes.append(
            ("pushgateway", lambda: http_answers("Pushgateway", "PROMETHEUS_GATEWAY", health))
        )
    context = registry.SinkContext(settings)
    for spec in registry.all_specs():
        if spec.build(context) is None:
            continue  # off
        if spec.probe is None:
            probes.append((spec.name, lambda: (True, "enabled; its package declares no probe")))
        else:
            probes.append((spec.name, partial(spec.probe, context)))
    return probes


@main.group("dead-letters")
def dead_letters() -> None:
    """List set-aside points, or put them back into their sink's queue."""


def _sink_option(fn: F) -> F:
    fn = click.option("--reason", help="Only this reason (too_large, rejected, too_old...).")(fn)
    return click.option(
        "--sink", help="Only this sink (a registered sink's name, e.g. pramathus)."
    )(fn)


@dead_letters.command("list")
@_sink_option
@global_options
@click.pass_context
@_guarded
def dead_letters_list(
    ctx: click.Context, sink: str | None, reason: str | None, **flags: Any
) -> None:
    """Show every set-aside batch: sink, reason, points, HTTP status and error."""
    from datetime import UTC, datetime

    from exporter.state import StateStore

    settings = _settings(ctx, flags)
    store = StateStore(settings.state_path)
    try:
        rows = [
            row for name in _sinks(sink) for row in store.outbox(name).set_aside_batches(reason)
        ]
    finally:
        store.close()
    for row in rows:
        when = datetime.fromtimestamp(row.failed_ms / 1000, tz=UTC).isoformat(timespec="seconds")
        status = row.status if row.status is not None else "-"
        click.echo(
            f"{row.sink} #{row.id} {row.reason} points={row.points} status={status} "
            f"at={when} error={_masked(row.error or '')}"
        )
    total = sum(r.points for r in rows)
    click.echo(f"{len(rows)} set-aside batches, {total} points")


@dead_letters.command("replay")
@_sink_option
@global_options
@click.pass_context
@_guarded
def dead_letters_replay(
    ctx: click.Context, sink: str | None, reason: str | None, **flags: Any
) -> None:
    """Put set-aside batches back at the end of their sink's queue (same idempotency keys);
    the next cycle delivers them."""
    from exporter.state import StateStore

    settings = _settings(ctx, flags)
    store = StateStore(settings.state_path)
    try:
        with store.transaction():
            moved = [(name, store.outbox(name).replay(reason)) for name in _sinks(sink)]
    finally:
        store.close()
    for name, totals in moved:
        click.echo(f"{name}: {totals.points} points in {totals.batches} batches queued again")


def _sinks(sink: str | None) -> list[str]:
    """The registered sinks' names (`sink`: that one only; exit 2 if it is unknown)."""
    from exporter.sinks.registry import all_specs

    names = [spec.name for spec in all_specs()]
    if sink is None:
        return names
    if sink not in names:
        _fail(f"--sink {sink!r} is not a registered sink: use one of {', '.join(names)}", 2)
    return [sink]


def _masked(text: str) -> str:
    return logs.redact(text, _secret_values)


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
@global_options
@click.pass_context
@_guarded
def generate_sample(
    ctx: click.Context,
    experiments: int,
    runs: int,
    steps: int,
    seed: int,
    model_name: str,
    **flags: Any,
) -> None:
    """Fill the MLflow server with realistic sample experiments, runs and models."""
    from exporter.sample import SampleSpec, generate

    settings = _settings(ctx, flags)
    spec = SampleSpec(
        experiments=experiments, runs=runs, steps=steps, seed=seed, model_name=model_name
    )
    # The server is probed first, with the exporter's own words for why it cannot be reached.
    ok, detail = dict(_probes(settings))["mlflow"]()
    if not ok:
        _fail(f"generate-sample: {detail}")
    try:
        summary = generate(settings, spec, progress=sys.stdout.isatty())
    except Exception as exc:  # noqa: BLE001 - MLflow's client raises many types; one line is enough
        _fail(
            f"generate-sample failed against MLflow at {settings.mlflow.tracking_uri}: "
            f"{type(exc).__name__}: {_shortened(str(exc))}; see the MLflow server's log, then "
            "run it again (it adds only what is missing)"
        )
    click.echo(summary)


def _shortened(text: str, limit: int = 200) -> str:
    """The first line of `text`, cut at a word boundary to at most `limit` characters."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0] + " ..."


# ----------------------------------------------------------------------------- alert-rules
# Kept as one block: it needs no backend, only the config and exporter.alert_rules.


@main.command("alert-rules")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Rule file to write (default: stdout), e.g. prometheus/rules/model-alerts.yml.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing; exit 1 if --output differs from what would be rendered.",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Replace a rule file even when the config has no alert rules.",
)
@global_options
@click.pass_context
@_guarded
def alert_rules(
    ctx: click.Context, output: str | None, check: bool, allow_empty: bool, **flags: Any
) -> None:
    """Render the config's `alerts:` section as a Prometheus rule file."""
    import shlex
    from pathlib import Path

    from exporter.alert_rules import render, render_yaml

    if check and output is None:
        _fail("--check needs --output FILE: the rule file to compare", 2)
    settings = _settings(ctx, flags)
    alerts = settings.alerts
    text = render_yaml(alerts)
    if output is None:
        click.echo(text, nl=False)
        return
    target = Path(output)
    config = flags.get("config") or ctx.find_root().params.get("config")
    config = config or os.environ.get("EXPORTER_CONFIG") or None
    count = sum(len(group["rules"]) for group in render(alerts)["groups"])
    if check:
        flag = f"--config {shlex.quote(config)} " if config else ""
        again = f"exporter {flag}alert-rules -o {shlex.quote(output)}"
        if not target.is_file():
            _fail(f"{output} does not exist; render it with: {again}")
        if target.read_text(encoding="utf-8") != text:
            _fail(f"{output} is out of date with the alerts config; regenerate it with: {again}")
        click.echo(f"{output} is up to date")
        return
    if count == 0 and not allow_empty and _holds_other_text(target, text):
        # An `alerts:` section left out (or no --config at all) must not wipe shipped rules.
        source = f"config {config} has" if config else "no --config or EXPORTER_CONFIG given, so"
        _fail(
            f"refusing to replace {output} with 0 alert rules ({source} no `alerts:` rules); "
            "name the config holding them, e.g. exporter --config "
            f"prometheus/model-alerts.example.yaml alert-rules -o {shlex.quote(output)}, "
            "or pass --allow-empty"
        )
    # Written beside the target and renamed over it, so Prometheus reloading its rules never
    # reads half a file; the temporary name does not match the usual rules/*.yml glob.
    partial = target.with_name(f".{target.name}.partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(target)
    click.echo(f"wrote {count} alert rule{'s' * (count != 1)} to {output}")


def _holds_other_text(path: Path, text: str) -> bool:
    """True when `path` is a file whose content is not `text` (rewriting it changes it)."""
    try:
        return path.read_text(encoding="utf-8") != text
    except FileNotFoundError:
        return False
