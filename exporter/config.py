"""Configuration: defaults < YAML file < environment < CLI flags, typed and validated.

Every problem is collected and reported at once (`ConfigError.problems`), each naming the
dotted key and where its value came from, so a user fixes a broken config in one pass.
Secrets are `SecretStr` and only ever leave this module masked.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import yaml
from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from exporter.alert_settings import AlertsSettings
from exporter.durations import seconds
from exporter.sections import Section

DEFAULT_CONFIG_ENV = "EXPORTER_CONFIG"
# A StatefulSet pod's name; its ordinal is the shard index when EXPORTER_SHARD_INDEX is unset
# or empty (the Helm chart sets both: the pod-index label is missing before Kubernetes 1.28).
POD_NAME_ENV = "EXPORTER_POD_NAME"

# Environment variable -> dotted config key. The first block is the seed's contract.
ENV_KEYS: dict[str, str] = {
    "MLFLOW_TRACKING_URI": "mlflow.tracking_uri",
    "PROMETHEUS_GATEWAY": "prometheus.gateway",
    "PROMETHEUS_JOB_NAME": "prometheus.job_name",
    "PROMETHEUS_MODE": "prometheus.mode",
    "PROMETHEUS_ENABLED": "prometheus.enabled",
    "PRAMATHUS_ENDPOINT": "pramathus.endpoint",
    "PRAMATHUS_API_KEY": "pramathus.api_key",
    "PRAMATHUS_ENABLED": "pramathus.enabled",
    "EXPORT_INTERVAL": "export.interval_seconds",
    "MAX_EXPERIMENTS": "export.max_experiments",
    "EXPORTER_STATE_DIR": "export.state_dir",
    # MLflow's own client variables, honoured the way MLflow's client honours them.
    "MLFLOW_TRACKING_USERNAME": "mlflow.username",
    "MLFLOW_TRACKING_PASSWORD": "mlflow.password",
    "MLFLOW_TRACKING_TOKEN": "mlflow.token",
    "MLFLOW_TRACKING_INSECURE_TLS": "mlflow.insecure_tls",
    "MLFLOW_TRACKING_SERVER_CERT_PATH": "mlflow.ca_bundle",
    # The exporter's own.
    "PROMETHEUS_GATEWAY_USERNAME": "prometheus.username",
    "PROMETHEUS_GATEWAY_PASSWORD": "prometheus.password",
    "PRAMATHUS_BATCH_SIZE": "pramathus.batch_size",
    "EXPORTER_HOST": "server.host",
    "EXPORTER_PORT": "server.port",
    "EXPORTER_WEB_CONFIG_FILE": "server.web_config_file",
    "EXPORTER_SHARD_INDEX": "export.shard_index",
    "EXPORTER_SHARD_COUNT": "export.shard_count",
    "EXPORTER_REGISTRY_GROUP": "export.registry_group",
    "LOG_LEVEL": "logging.level",
    "LOG_FORMAT": "logging.format",
    "REMOTE_WRITE_ENABLED": "remote_write.enabled",
    "REMOTE_WRITE_URL": "remote_write.url",
    "REMOTE_WRITE_USERNAME": "remote_write.username",
    "REMOTE_WRITE_PASSWORD": "remote_write.password",
    "REMOTE_WRITE_BEARER_TOKEN": "remote_write.bearer_token",
    "EXPORTER_MLFLOW_CONCURRENCY": "mlflow.concurrency",
    "EXPORTER_SERIES_RUN_WINDOW": "series.run_window",
    "EXPORTER_SERIES_MIN_RUNS_PER_EXPERIMENT": "series.min_runs_per_experiment",
    "TRACES_ENABLED": "traces.enabled",
    "TRACES_WINDOW_SECONDS": "traces.window_seconds",
    "TRACES_BUCKET_SECONDS": "traces.bucket_seconds",
    "TRACES_SETTLE_SECONDS": "traces.settle_seconds",
    "TRACES_MAX_TRACE_NAMES": "traces.max_trace_names",
    # OTLP, by the OpenTelemetry exporter conventions (OTEL_EXPORTER_OTLP_ENDPOINT and
    # OTEL_EXPORTER_OTLP_HEADERS are read by `_otlp_env`).
    "OTLP_ENABLED": "otlp.enabled",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "otlp.endpoint",
    "OTEL_EXPORTER_OTLP_COMPRESSION": "otlp.compression",
    "OTEL_EXPORTER_OTLP_CERTIFICATE": "otlp.ca_bundle",
    "OTEL_SERVICE_NAME": "otlp.service_name",
}
OTLP_METRICS_PATH = "/v1/metrics"


# Secrets may instead be read from a file named by `<NAME>_FILE` (Docker and Kubernetes
# secrets); the file's content, without a trailing newline, is the value.
SECRET_ENV = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PROMETHEUS_GATEWAY_PASSWORD",
    "PRAMATHUS_API_KEY",
    "REMOTE_WRITE_PASSWORD",
    "REMOTE_WRITE_BEARER_TOKEN",
)


class ConfigError(Exception):
    """Raised with every problem found in the configuration, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"  # one DNS label
_HOST = rf"(?:\[[0-9A-Fa-f:.]+\]|{_LABEL}(?:\.{_LABEL})*)"  # [IPv6], IPv4 or a hostname
_URL = re.compile(rf"^https?://{_HOST}(?::\d{{1,5}})?(?:/\S*)?$")
# Without a scheme: host:port, or a dotted host name with an optional path.
_BARE = re.compile(rf"^(?:{_HOST}:\d{{1,5}}|{_LABEL}(?:\.{_LABEL})+(?::\d{{1,5}})?)(?:/\S*)?$")


def _http_url(value: str, *, default_scheme: str = "http") -> str:
    """An http(s) URL, or `host:port` (the seed's PROMETHEUS_GATEWAY form) made into one.

    A bare word such as `not-a-url` is refused rather than guessed into `https://not-a-url`,
    which would only fail later, once per cycle, after retries.
    """
    value = value.strip().rstrip("/")
    if "://" not in value:
        if not _BARE.match(value):
            # The value is not echoed: it may be a secret pasted into the wrong variable.
            raise ValueError(
                "not a URL: give http(s)://host[:port][/path] or host:port (credentials go in "
                "their own settings)"
            )
        value = f"{default_scheme}://{value}"
    if not _URL.match(value):
        raise ValueError(
            "not an http(s) URL like http://host:port/path (credentials go in their own settings)"
        )
    return value


def _required_when_enabled(data: Any, handler: Any, section: str, key: str) -> Any:
    """Validate a section, and report `<key>` missing while `enabled` is true even when
    other keys of the section are wrong too: every problem is listed in one pass."""
    message = f"{section}.enabled is true but {section}.{key} is not set"
    raw = data if isinstance(data, dict) else {}
    try:
        enabled = TypeAdapter(bool).validate_python(raw.get("enabled", False))
    except ValidationError:
        enabled = False
    missing = enabled and raw.get(key) in (None, "")
    try:
        model = handler(data)
    except ValidationError as exc:
        if not missing:
            raise
        errors: list[Any] = [
            {"type": e["type"], "loc": e["loc"], "input": e["input"], "ctx": e.get("ctx", {})}
            for e in exc.errors()
        ]
        errors.append({"type": "value_error", "loc": (), "input": data, "ctx": {"error": message}})
        raise ValidationError.from_exception_data(exc.title, errors) from None
    if missing:
        raise ValueError(message)
    return model


class MlflowSettings(Section):
    tracking_uri: str = "http://localhost:5000"
    timeout_seconds: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0, le=10)
    page_size: int = Field(1000, ge=1, le=50000)
    # History reads in flight at once (1: never two requests at a time).
    concurrency: int = Field(4, ge=1, le=64)
    insecure_tls: bool = False
    ca_bundle: str | None = None
    username: SecretStr | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None

    _check_uri = field_validator("tracking_uri")(_http_url)


class PrometheusSettings(Section):
    enabled: bool = True
    # push: to the Pushgateway; pull: served on the exporter's /mlflow/metrics; both.
    mode: Literal["push", "pull", "both"] = "push"
    gateway: str = "http://localhost:9091"
    job_name: str = Field("mlflow_metrics", pattern=r"^[A-Za-z0-9_.:-]+$")
    timeout_seconds: float = Field(10.0, gt=0)
    username: SecretStr | None = None
    password: SecretStr | None = None
    run_id_length: int = Field(12, ge=8, le=32)

    _check_gateway = field_validator("gateway")(_http_url)

    @property
    def pushes(self) -> bool:
        """Whether the series go to the Pushgateway (enabled, mode push or both)."""
        return self.enabled and self.mode in ("push", "both")

    @property
    def serves(self) -> bool:
        """Whether the series are served on /mlflow/metrics (enabled, mode pull or both)."""
        return self.enabled and self.mode in ("pull", "both")


class PramathusSettings(Section):
    enabled: bool = False
    endpoint: str | None = None
    api_key: SecretStr | None = None
    batch_size: int = Field(500, ge=1, le=50000)
    # Largest request body; below nginx's default client_max_body_size of 1 MiB.
    max_body_bytes: int = Field(1_000_000, ge=1024)
    timeout_seconds: float = Field(10.0, gt=0)
    # Longest a cycle spends delivering (retries included); the rest waits in the queue.
    delivery_budget_seconds: float = Field(30.0, gt=0)
    # Tries per batch per cycle; 0 = as many as the delivery budget allows.
    max_attempts: int = Field(0, ge=0, le=1000)
    max_tag_value_length: int = Field(256, ge=0)
    spool_max_points: int = Field(1_000_000, ge=1)
    # Past the bound, capture for this sink waits for delivery to drain (nothing is lost:
    # the points are read from MLflow later); dropping is an opt-in, counted as lost.
    spool_overflow: Literal["wait", "drop_oldest", "drop_newest"] = "wait"
    verify_tls: bool = True
    ca_bundle: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        return None if v in (None, "") else _http_url(v, default_scheme="https")

    @model_validator(mode="wrap")
    @classmethod
    def _endpoint_when_enabled(cls, data: Any, handler: Any) -> Any:
        return _required_when_enabled(data, handler, "pramathus", "endpoint")


class RemoteWriteSettings(Section):
    """Every metric point at its own timestamp to a Prometheus remote-write receiver."""

    enabled: bool = False
    url: str | None = None
    username: SecretStr | None = None
    password: SecretStr | None = None
    bearer_token: SecretStr | None = None
    # Extra request headers, e.g. X-Scope-OrgID for a Mimir or Cortex tenant.
    headers: dict[str, str] = Field(default_factory=dict)
    batch_size: int = Field(5000, ge=1, le=100_000)  # samples per request
    timeout_seconds: float = Field(10.0, gt=0)
    # Longest a cycle spends delivering (retries included); the rest waits in the queue.
    delivery_budget_seconds: float = Field(30.0, gt=0)
    # Samples older than this (relative to now) are set aside unsent; 0 = no limit.
    max_sample_age: float = Field(0.0, ge=0)
    queue_max_samples: int = Field(5_000_000, ge=1)
    # As pramathus.spool_overflow: wait (nothing lost), or an opt-in drop counted as lost.
    queue_overflow: Literal["wait", "drop_oldest", "drop_newest"] = "wait"
    verify_tls: bool = True
    ca_bundle: str | None = None

    _age = field_validator("max_sample_age", mode="before")(seconds)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str | None) -> str | None:
        return None if v in (None, "") else _http_url(v)

    @model_validator(mode="wrap")
    @classmethod
    def _url_when_enabled(cls, data: Any, handler: Any) -> Any:
        return _required_when_enabled(data, handler, "remote_write", "url")

    @model_validator(mode="after")
    def _one_kind_of_auth(self) -> RemoteWriteSettings:
        if self.bearer_token is not None and self.username is not None:
            raise ValueError("set either remote_write.bearer_token or username/password, not both")
        return self


class OtlpSettings(Section):
    """Every metric point at its own time to an OTLP/HTTP (protobuf) metrics endpoint."""

    enabled: bool = False
    # The metrics URL; OTEL_EXPORTER_OTLP_ENDPOINT gives a base to which /v1/metrics is added.
    endpoint: str | None = None
    # Request headers (api-key, DD-API-KEY, x-honeycomb-team...): every value is a secret.
    headers: dict[str, str] = Field(default_factory=dict)
    compression: Literal["none", "gzip"] = "none"
    service_name: str = Field("mlflow-monitoring", min_length=1)
    batch_size: int = Field(1000, ge=1, le=100_000)  # data points per request
    timeout_seconds: float = Field(10.0, gt=0)
    # Longest a cycle spends delivering (retries included); the rest waits in the queue.
    delivery_budget_seconds: float = Field(30.0, gt=0)
    queue_max_points: int = Field(5_000_000, ge=1)
    # As pramathus.spool_overflow: wait (nothing lost), or an opt-in drop counted as lost.
    queue_overflow: Literal["wait", "drop_oldest", "drop_newest"] = "wait"
    verify_tls: bool = True
    ca_bundle: str | None = None

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        return None if v in (None, "") else _http_url(v)

    @model_validator(mode="wrap")
    @classmethod
    def _endpoint_when_enabled(cls, data: Any, handler: Any) -> Any:
        return _required_when_enabled(data, handler, "otlp", "endpoint")


class ExportSettings(Section):
    interval_seconds: float = Field(60.0, ge=1)
    # The background sweep re-reads every run about once per this period (0: every cycle).
    reconcile_interval_seconds: float = Field(3600.0, ge=0)
    # A run is re-read every cycle for this long after each change seen (late points).
    settle_seconds: float = Field(600.0, ge=0)
    # Delivery marks of deleted runs are kept this long, so a restore resends nothing.
    deleted_retention_seconds: float = Field(30 * 86400.0, ge=0)
    max_experiments: int = Field(0, ge=0)
    include_experiments: list[str] = Field(default_factory=list)
    exclude_experiments: list[str] = Field(default_factory=list)
    max_runs_per_experiment: int = Field(1000, ge=0)
    include_metrics: list[str] = Field(default_factory=list)
    exclude_metrics: list[str] = Field(default_factory=list)
    shard_index: int = Field(0, ge=0)
    shard_count: int = Field(1, ge=1)
    # Push (or serve) the registry group: the model registry and the experiment counts of
    # this exporter's scope. Exporters of different scopes sharing one Pushgateway job
    # would overwrite each other's group: set it true on exactly one of them.
    registry_group: bool = True
    state_dir: str = "./state"

    @model_validator(mode="after")
    def _shard_in_range(self) -> ExportSettings:
        if self.shard_index >= self.shard_count:
            raise ValueError(
                f"shard_index {self.shard_index} must be below shard_count {self.shard_count}"
            )
        return self

    @field_validator(
        "include_experiments", "exclude_experiments", "include_metrics", "exclude_metrics"
    )
    @classmethod
    def _valid_patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return patterns


class SeriesSettings(Section):
    """Which runs get per-run latest-value series on the Pushgateway and the pull page.

    Runs that are unfinished or ended within `run_window`, plus the newest
    `min_runs_per_experiment` of each experiment whatever their age. Counts, registry and
    experiment series, and the history sinks, are not bounded by this.
    """

    run_window: float = Field(7 * 86400.0, ge=0)  # seconds or 90s/15m/12h/7d/2w; 0: no window
    min_runs_per_experiment: int = Field(100, ge=0)

    _window = field_validator("run_window", mode="before")(seconds)


class TracesSettings(Section):
    """MLflow 3 traces (GenAI): live series per experiment and bucketed history."""

    # On by default; a server without the trace metrics API turns it off (one warning).
    enabled: bool = True
    # Latency quantiles and assessment means cover the traces of this last window.
    window_seconds: int = Field(300, ge=10)
    # History: one sample per closed bucket of this size, at the bucket's start.
    bucket_seconds: int = Field(60, ge=1)
    # A closed bucket is written once this long after it closed (late traces and scores).
    settle_seconds: int = Field(300, ge=0)
    # First sight of an experiment: history starts this far back.
    backfill_seconds: int = Field(3600, ge=0)
    # Trace and assessment names with their own series, the most frequent first.
    max_trace_names: int = Field(20, ge=0, le=1000)
    max_assessment_names: int = Field(20, ge=0, le=1000)


class ServerSettings(Section):
    enabled: bool = True
    # Loopback by default; containers set EXPORTER_HOST=0.0.0.0 so Prometheus can scrape them.
    host: str = "127.0.0.1"
    port: int = Field(9877, ge=0, le=65535)
    # An exporter-toolkit web config file: TLS and basic auth for /metrics and
    # /mlflow/metrics (the probes stay open). None: plain HTTP, no auth.
    web_config_file: str | None = None


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class Settings(Section):
    """The whole effective configuration."""

    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    pramathus: PramathusSettings = Field(default_factory=PramathusSettings)
    remote_write: RemoteWriteSettings = Field(default_factory=RemoteWriteSettings)
    otlp: OtlpSettings = Field(default_factory=OtlpSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    series: SeriesSettings = Field(default_factory=SeriesSettings)
    traces: TracesSettings = Field(default_factory=TracesSettings)
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    alerts: AlertsSettings = Field(default_factory=AlertsSettings)

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data, every secret replaced by asterisks (request
        header values too: any of them may be a credential)."""
        data = self.model_dump(mode="json")  # SecretStr dumps as '**********'
        for section in data.values():
            if isinstance(section, dict) and isinstance(section.get("headers"), dict):
                section["headers"] = dict.fromkeys(section["headers"], "**********")
        return data

    @property
    def state_path(self) -> Path:
        return Path(self.export.state_dir)


def plain_http_credentials(settings: Settings) -> list[str]:
    """Warnings for credentials that would cross the network unencrypted (http:// to a host
    other than loopback): each names the setting and the URL's host."""
    checks = [
        (
            "mlflow",
            settings.mlflow.tracking_uri,
            any((settings.mlflow.password, settings.mlflow.token)),
        ),
        ("prometheus", settings.prometheus.gateway, settings.prometheus.password is not None),
        ("pramathus", settings.pramathus.endpoint, settings.pramathus.api_key is not None),
        (
            "remote_write",
            settings.remote_write.url,
            any((settings.remote_write.password, settings.remote_write.bearer_token)),
        ),
        ("otlp", settings.otlp.endpoint, bool(settings.otlp.headers)),
    ]
    warnings = []
    for section, url, has_secret in checks:
        if not url or not has_secret or not url.startswith("http://"):
            continue
        host = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
        if host not in ("localhost", "127.0.0.1", "::1"):
            warnings.append(
                f"{section}: credentials go over plain http:// to {host}; use https:// "
                "unless the network between is trusted"
            )
    return warnings


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):  # YAML gave a scalar where a section belongs
            child = node[part] = {}
        node = child
    node[leaf] = value


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{path}: cannot read config file ({exc.strerror or exc})")
        return {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        problems.append(f"{path}: not valid YAML{where}: {what}")
        return {}
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        problems.append(f"{path}: top level must be a mapping of sections")
        return {}
    return loaded


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the effective settings; raise `ConfigError` listing every problem.

    `overrides` maps dotted keys to values from CLI flags (None means "flag not given").
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    sources: dict[str, str] = {}
    tree: dict[str, Any] = {}

    path = config_path or env.get(DEFAULT_CONFIG_ENV)
    if path:
        tree = _read_yaml(Path(path), problems)
        sources.update(_leaf_sources(tree, f"file {path}"))
    _apply_env(env, tree, sources, problems)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(tree, dotted, value)
            sources[dotted] = "command line"

    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        problems.extend(_describe(err, sources) for err in exc.errors())
        settings = None
    if problems or settings is None:
        raise ConfigError(problems)
    return settings


def _apply_env(
    env: Mapping[str, str], tree: dict[str, Any], sources: dict[str, str], problems: list[str]
) -> None:
    """Environment variables over the file's values: each variable, a secret's `_FILE`,
    and a StatefulSet pod's name for its shard index."""
    for name, dotted in ENV_KEYS.items():
        if name in env and env[name] != "":
            _set_dotted(tree, dotted, env[name])
            sources[dotted] = f"env {name}"
        elif name in SECRET_ENV and env.get(f"{name}_FILE"):
            secret = _read_secret_file(env[f"{name}_FILE"], f"{name}_FILE", problems)
            if secret is not None:
                _set_dotted(tree, dotted, secret)
                sources[dotted] = f"env {name}_FILE"
    if not env.get("EXPORTER_SHARD_INDEX") and env.get(POD_NAME_ENV):
        _shard_from_pod_name(env[POD_NAME_ENV], tree, sources, problems)
    _otlp_env(env, tree, sources, problems)


def _otlp_env(
    env: Mapping[str, str], tree: dict[str, Any], sources: dict[str, str], problems: list[str]
) -> None:
    """The OpenTelemetry exporter variables that are not one key each: a base endpoint
    (used only without OTEL_EXPORTER_OTLP_METRICS_ENDPOINT) and `k=v,k2=v2` headers
    (values URL-encoded; from `OTEL_EXPORTER_OTLP_HEADERS_FILE` too), over the file's."""
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base and not env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        _set_dotted(tree, "otlp.endpoint", base.strip().rstrip("/") + OTLP_METRICS_PATH)
        sources["otlp.endpoint"] = "env OTEL_EXPORTER_OTLP_ENDPOINT"
    variable, raw = "OTEL_EXPORTER_OTLP_HEADERS", env.get("OTEL_EXPORTER_OTLP_HEADERS")
    if not raw and env.get(f"{variable}_FILE"):
        variable = f"{variable}_FILE"
        raw = _read_secret_file(env[variable], variable, problems)
    if not raw:
        return
    headers: dict[str, str] = {}
    for n, item in enumerate(raw.split(","), 1):
        key, sep, value = item.partition("=")
        if not item.strip():
            continue
        if not sep or not key.strip():
            # The entry is not echoed: it may hold a key.
            problems.append(f"{variable}: entry {n} is not key=value (give k1=v1,k2=v2)")
            continue
        headers[unquote(key.strip())] = unquote(value.strip())
    section = tree.setdefault("otlp", {})
    if not isinstance(section, dict):
        section = tree["otlp"] = {}
    given = section.get("headers")
    section["headers"] = {**(given if isinstance(given, dict) else {}), **headers}
    sources["otlp.headers"] = f"env {variable}"


def _shard_from_pod_name(
    pod_name: str, tree: dict[str, Any], sources: dict[str, str], problems: list[str]
) -> None:
    """A StatefulSet pod's ordinal (`<statefulset>-<ordinal>`) as its shard index: what a
    cluster without the `apps.kubernetes.io/pod-index` label (before 1.28) gives."""
    match = re.fullmatch(r".*-(\d+)", pod_name)
    if match is None:
        problems.append(
            f"{POD_NAME_ENV}: {pod_name!r} does not end in -<ordinal> like a StatefulSet pod's "
            "name; set EXPORTER_SHARD_INDEX instead"
        )
        return
    _set_dotted(tree, "export.shard_index", int(match.group(1)))
    sources["export.shard_index"] = f"env {POD_NAME_ENV}"


def _read_secret_file(path: str, variable: str, problems: list[str]) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        problems.append(f"{variable}: cannot read {path} ({exc.strerror or exc})")
        return None


def _leaf_sources(tree: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_leaf_sources(value, source, f"{dotted}."))
        else:
            out[dotted] = source
    return out


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """`; did you mean 'x'?` for a misspelt key, from the keys its section has."""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(err: Any, sources: Mapping[str, str]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(err["loc"])
    parents = [".".join(str(p) for p in err["loc"][:n]) for n in range(len(err["loc"]), 0, -1)]
    where = (
        sources.get(loc)
        or next((src for key, src in sources.items() if key.startswith(f"{loc}.")), None)
        # Inside a list (alerts.thresholds.0.for) sources are known for the list's key.
        or next((sources[p] for p in parents if p in sources), "default")
    )
    # Never echo the offending value: it could be a secret put under the wrong key.
    return f"{loc or '(top level)'}: {msg} [from {where}]"
