"""Unit tests for exporter.config.load_settings: layering, validation, secret hygiene.

Every call passes `env=` explicitly so the process environment never leaks in.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.config import ConfigError, Settings, load_settings, plain_http_credentials

FIXTURES = Path(__file__).parent / "fixtures"
VALID = FIXTURES / "config_valid.yaml"
MANY_PROBLEMS = FIXTURES / "config_many_problems.yaml"
INVALID_YAML = FIXTURES / "config_invalid_yaml.yaml"

SECRET = "sk_live_Zq9hunter2TOPSECRET"


def problems_of(**kwargs: object) -> list[str]:
    kwargs.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        load_settings(**kwargs)  # type: ignore[arg-type]
    return info.value.problems


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- layering


def test_defaults_apply_when_nothing_is_configured() -> None:
    s = load_settings(env={})
    assert s.mlflow.tracking_uri == "http://localhost:5000"
    assert s.prometheus.enabled is True
    assert s.prometheus.gateway == "http://localhost:9091"
    assert s.prometheus.job_name == "mlflow_metrics"
    assert s.prometheus.run_id_length == 12
    assert s.pramathus.enabled is False
    assert s.pramathus.endpoint is None
    assert s.pramathus.api_key is None
    assert s.pramathus.batch_size == 500
    assert s.pramathus.spool_overflow == "wait"
    assert s.export.interval_seconds == 60
    assert s.export.max_experiments == 0
    assert s.export.state_dir == "./state"
    assert s.state_path == Path("./state")
    assert s.server.port == 9877
    assert s.logging.level == "INFO"


def test_yaml_overrides_defaults() -> None:
    s = load_settings(VALID, env={})
    assert s.mlflow.tracking_uri == "http://mlflow.internal:5000"
    assert s.mlflow.timeout_seconds == 5
    assert s.prometheus.gateway == "http://pushgateway.internal:9091"
    assert s.prometheus.job_name == "from_yaml"
    assert s.pramathus.enabled is True
    assert s.pramathus.endpoint == "https://pramathus.example.com/api/metrics"
    assert s.pramathus.batch_size == 100
    assert s.export.interval_seconds == 15
    assert s.export.include_experiments == ["^prod-.*"]
    assert s.logging.level == "DEBUG"
    # Keys the file does not mention keep their defaults.
    assert s.mlflow.page_size == 1000
    assert s.server.port == 9877


def test_env_overrides_yaml() -> None:
    env = {
        "PROMETHEUS_JOB_NAME": "from_env",
        "EXPORT_INTERVAL": "30",
        "PRAMATHUS_BATCH_SIZE": "7",
        "LOG_LEVEL": "warning",
    }
    s = load_settings(VALID, env=env)
    assert s.prometheus.job_name == "from_env"
    assert s.export.interval_seconds == 30.0
    assert s.pramathus.batch_size == 7
    assert s.logging.level == "WARNING"
    # Untouched YAML values survive.
    assert s.prometheus.gateway == "http://pushgateway.internal:9091"


def test_env_strings_are_coerced_to_typed_values() -> None:
    env = {
        "PRAMATHUS_ENABLED": "true",
        "PRAMATHUS_ENDPOINT": "https://p.example.com/ingest",
        "MAX_EXPERIMENTS": "0",
        "MLFLOW_TRACKING_INSECURE_TLS": "1",
        "EXPORTER_PORT": "0",
        "PROMETHEUS_ENABLED": "false",
    }
    s = load_settings(env=env)
    assert s.prometheus.enabled is False
    assert s.pramathus.enabled is True
    assert s.export.max_experiments == 0
    assert s.mlflow.insecure_tls is True
    assert s.server.port == 0


def test_empty_env_variable_does_not_override_yaml() -> None:
    s = load_settings(VALID, env={"PROMETHEUS_JOB_NAME": ""})
    assert s.prometheus.job_name == "from_yaml"


def test_command_line_overrides_beat_env() -> None:
    env = {"PROMETHEUS_JOB_NAME": "from_env", "EXPORT_INTERVAL": "30"}
    s = load_settings(
        VALID,
        env=env,
        overrides={"prometheus.job_name": "from_cli", "export.interval_seconds": 5},
    )
    assert s.prometheus.job_name == "from_cli"
    assert s.export.interval_seconds == 5


def test_command_line_override_of_none_means_flag_not_given() -> None:
    s = load_settings(
        VALID, env={"PROMETHEUS_JOB_NAME": "from_env"}, overrides={"prometheus.job_name": None}
    )
    assert s.prometheus.job_name == "from_env"


def test_config_path_can_come_from_exporter_config_env() -> None:
    s = load_settings(env={"EXPORTER_CONFIG": str(VALID)})
    assert s.prometheus.job_name == "from_yaml"


def test_empty_yaml_file_means_all_defaults(tmp_path: Path) -> None:
    s = load_settings(write(tmp_path, "# nothing but a comment\n"), env={})
    assert s == Settings()


# ---------------------------------------------------------------- URL normalisation


def test_bare_host_port_gateway_is_normalised_to_http_url() -> None:
    s = load_settings(env={"PROMETHEUS_GATEWAY": "host:9091"})
    assert s.prometheus.gateway == "http://host:9091"


def test_trailing_slash_and_whitespace_are_stripped_from_urls() -> None:
    s = load_settings(env={"MLFLOW_TRACKING_URI": " http://mlflow:5000/ "})
    assert s.mlflow.tracking_uri == "http://mlflow:5000"


def test_bare_pramathus_endpoint_defaults_to_https() -> None:
    s = load_settings(
        env={"PRAMATHUS_ENABLED": "true", "PRAMATHUS_ENDPOINT": "p.example.com/api/metrics"}
    )
    assert s.pramathus.endpoint == "https://p.example.com/api/metrics"


# ---------------------------------------------------------------- reporting problems


def test_every_problem_is_reported_at_once_naming_key_and_source() -> None:
    source = f"[from file {MANY_PROBLEMS}]"
    problems = problems_of(config_path=MANY_PROBLEMS)
    text = "\n".join(problems)

    def line_for(key: str) -> str:
        hits = [p for p in problems if p.startswith(f"{key}: ")]
        assert len(hits) == 1, f"expected one problem for {key!r} in:\n{text}"
        return hits[0]

    expected = {  # dotted key -> what its line must say
        "prometheus.run_id_length": "integer",
        "export.intreval_seconds": "unknown key",
        "prometheus.gateway": "URL",
        "pramathus": "pramathus.endpoint is not set",
        "export.include_experiments": "regular expression",
    }
    for key, says in expected.items():
        line = line_for(key)
        assert says in line
        assert line.endswith(source)

    assert len(problems) == len(expected)
    assert str(ConfigError(problems)) == text


def test_problem_from_env_names_the_env_variable() -> None:
    problems = problems_of(env={"MAX_EXPERIMENTS": "-1", "EXPORTER_PORT": "seventy"})
    assert len(problems) == 2
    assert any(
        p.startswith("export.max_experiments: ") and p.endswith("[from env MAX_EXPERIMENTS]")
        for p in problems
    )
    assert any(
        p.startswith("server.port: ") and p.endswith("[from env EXPORTER_PORT]") for p in problems
    )


def test_problem_from_command_line_names_the_command_line() -> None:
    problems = problems_of(overrides={"export.interval_seconds": 0})
    assert problems == [problems[0]]
    assert problems[0].startswith("export.interval_seconds: ")
    assert problems[0].endswith("[from command line]")


def test_unknown_top_level_section_is_reported_with_its_file(tmp_path: Path) -> None:
    path = write(tmp_path, "promethues:\n  gateway: http://x:9091\n")
    assert problems_of(config_path=path) == [
        f"promethues: unknown key; did you mean 'prometheus'? [from file {path}]"
    ]


def test_invalid_yaml_is_reported_with_the_file_name() -> None:
    problems = problems_of(config_path=INVALID_YAML)
    assert len(problems) == 1
    assert problems[0].startswith(f"{INVALID_YAML}: not valid YAML")


def test_invalid_yaml_is_reported_alongside_env_problems() -> None:
    problems = problems_of(config_path=INVALID_YAML, env={"EXPORTER_PORT": "99999"})
    assert len(problems) == 2
    assert problems[0].startswith(f"{INVALID_YAML}: not valid YAML")
    assert problems[1].startswith("server.port: ")


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    problems = problems_of(config_path=missing)
    assert len(problems) == 1
    assert problems[0].startswith(f"{missing}: cannot read config file")


def test_yaml_whose_top_level_is_not_a_mapping_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "- just\n- a list\n")
    assert problems_of(config_path=path) == [f"{path}: top level must be a mapping of sections"]


# ---------------------------------------------------------------- secrets


def test_secrets_are_masked_in_masked_view() -> None:
    env = {
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": SECRET + "-mlflow-pw",
        "MLFLOW_TRACKING_TOKEN": SECRET + "-mlflow-token",
        "PROMETHEUS_GATEWAY_USERNAME": "pg-user",
        "PROMETHEUS_GATEWAY_PASSWORD": SECRET + "-pg-pw",
        "PRAMATHUS_ENABLED": "true",
        "PRAMATHUS_ENDPOINT": "https://p.example.com/api/metrics",
        "PRAMATHUS_API_KEY": SECRET + "-api-key",
    }
    s = load_settings(env=env)
    masked = s.masked()
    dumped = json.dumps(masked)
    assert SECRET not in dumped
    assert SECRET not in repr(s)
    assert SECRET not in str(s)
    assert masked["pramathus"]["api_key"] == "**********"
    assert masked["mlflow"]["password"] == "**********"
    assert masked["mlflow"]["token"] == "**********"
    assert masked["prometheus"]["password"] == "**********"
    # Non-secret values stay readable, and the secret itself is still usable.
    assert masked["pramathus"]["endpoint"] == "https://p.example.com/api/metrics"
    assert s.pramathus.api_key is not None
    assert s.pramathus.api_key.get_secret_value() == SECRET + "-api-key"


def test_unset_secrets_are_shown_as_null_in_masked_view() -> None:
    masked = load_settings(env={}).masked()
    assert masked["pramathus"]["api_key"] is None
    assert masked["mlflow"]["token"] is None


def test_secret_under_unknown_key_never_appears_in_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, f"pramathus:\n  apikey: {SECRET}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert info.value.problems == [
        f"pramathus.apikey: unknown key; did you mean 'api_key'? [from file {path}]"
    ]
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("env_name", "dotted"),
    [
        ("EXPORT_INTERVAL", "export.interval_seconds"),
        ("PRAMATHUS_BATCH_SIZE", "pramathus.batch_size"),
        ("PRAMATHUS_ENABLED", "pramathus.enabled"),
        ("LOG_FORMAT", "logging.format"),
        ("PROMETHEUS_JOB_NAME", "prometheus.job_name"),
    ],
)
def test_secret_under_wrongly_typed_key_never_appears_in_config_error(
    env_name: str, dotted: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={env_name: SECRET + " =/"})
    assert info.value.problems[0].startswith(f"{dotted}: ")
    assert SECRET not in str(info.value)
    # Nothing carrying the raw value is chained on for a traceback to print.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_secret_on_a_broken_yaml_line_never_appears_in_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, f'pramathus:\n  api_key: "{SECRET}\n  endpoint: [\n')
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert "not valid YAML" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "env",
    [
        {"MLFLOW_TRACKING_URI": f"https://bob:{SECRET}@mlflow.example.com"},
        {"PROMETHEUS_GATEWAY": f"Bearer:{SECRET}"},
    ],
    ids=["credentials-in-url", "api-key-in-gateway-variable"],
)
def test_secret_under_url_key_never_appears_in_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert SECRET not in str(info.value)


# ---------------------------------------------------------------- operator-facing checks


def test_a_yaml_error_names_its_line_and_column() -> None:
    [problem] = problems_of(config_path=INVALID_YAML)
    assert "at line 3, column 19" in problem


@pytest.mark.parametrize(
    "variable", ["PRAMATHUS_ENDPOINT", "PROMETHEUS_GATEWAY", "MLFLOW_TRACKING_URI"]
)
def test_a_bare_word_is_not_taken_for_a_url(variable: str) -> None:
    [problem] = problems_of(env={variable: "not-a-url"})
    assert "not a URL" in problem
    assert "not-a-url" not in problem  # the value may be a secret pasted in the wrong place


def test_a_secret_can_come_from_a_file_named_by_its_variable(tmp_path: Path) -> None:
    (tmp_path / "key").write_text("pk-from-file\n")
    s = load_settings(env={"PRAMATHUS_API_KEY_FILE": str(tmp_path / "key")})
    assert s.pramathus.api_key is not None
    assert s.pramathus.api_key.get_secret_value() == "pk-from-file"
    assert problems_of(env={"REMOTE_WRITE_PASSWORD_FILE": str(tmp_path / "nope")}) == [
        f"REMOTE_WRITE_PASSWORD_FILE: cannot read {tmp_path / 'nope'} (No such file or directory)"
    ]


def test_the_variable_beats_its_file() -> None:
    s = load_settings(env={"PRAMATHUS_API_KEY": "direct", "PRAMATHUS_API_KEY_FILE": "/nonexistent"})
    assert s.pramathus.api_key is not None
    assert s.pramathus.api_key.get_secret_value() == "direct"


def test_credentials_over_plain_http_to_a_remote_host_are_warned_about() -> None:
    s = load_settings(
        env={
            "MLFLOW_TRACKING_URI": "http://mlflow.internal:5000",
            "MLFLOW_TRACKING_TOKEN": "t0ken",
            "PROMETHEUS_GATEWAY": "http://127.0.0.1:9091",
            "PROMETHEUS_GATEWAY_USERNAME": "u",
            "PROMETHEUS_GATEWAY_PASSWORD": "pw-local",
            "REMOTE_WRITE_ENABLED": "true",
            "REMOTE_WRITE_URL": "https://vm.example.com/api/v1/write",
            "REMOTE_WRITE_BEARER_TOKEN": "secure",
        }
    )
    expected = (
        "mlflow: credentials go over plain http:// to mlflow.internal; use https:// unless "
        "the network between is trusted"
    )
    assert plain_http_credentials(s) == [expected]


# ---------------------------------------------------------------- shard from a StatefulSet pod


def test_the_registry_group_is_pushed_by_default_and_can_be_given_to_another_exporter() -> None:
    assert load_settings(env={}).export.registry_group is True
    assert load_settings(env={"EXPORTER_REGISTRY_GROUP": "false"}).export.registry_group is False


def test_the_pod_index_label_gives_the_shard_index_directly() -> None:
    # The chart's EXPORTER_SHARD_INDEX comes from the apps.kubernetes.io/pod-index label.
    env = {"EXPORTER_SHARD_INDEX": "2", "EXPORTER_SHARD_COUNT": "3", "EXPORTER_POD_NAME": "m-0"}
    assert load_settings(env=env).export.shard_index == 2


def test_without_the_pod_index_label_the_pod_names_ordinal_is_the_shard_index() -> None:
    # Before Kubernetes 1.28 the label is missing: the downward API gives an empty value.
    env = {"EXPORTER_SHARD_INDEX": "", "EXPORTER_SHARD_COUNT": "4", "EXPORTER_POD_NAME": "mm-x-3"}
    assert load_settings(env=env).export.shard_index == 3


def test_the_pod_names_ordinal_beats_the_yaml_file(tmp_path: Path) -> None:
    path = write(tmp_path, "export:\n  shard_index: 0\n  shard_count: 3\n")
    env = {"EXPORTER_POD_NAME": "mm-12-1"}
    assert load_settings(path, env=env).export.shard_index == 1


def test_a_pod_name_without_an_ordinal_is_a_problem_naming_the_variable() -> None:
    [problem] = problems_of(env={"EXPORTER_POD_NAME": "exporter"})
    assert problem.startswith("EXPORTER_POD_NAME: 'exporter' does not end in -<ordinal>")


def test_an_ordinal_beyond_the_shard_count_is_refused() -> None:
    [problem] = problems_of(env={"EXPORTER_POD_NAME": "mm-3", "EXPORTER_SHARD_COUNT": "3"})
    assert "shard_index 3 must be below shard_count 3" in problem


def test_series_window_and_mlflow_concurrency_come_from_their_env_variables() -> None:
    s = load_settings(
        env={
            "EXPORTER_SERIES_RUN_WINDOW": "30d",
            "EXPORTER_SERIES_MIN_RUNS_PER_EXPERIMENT": "5",
            "EXPORTER_MLFLOW_CONCURRENCY": "1",
        }
    )
    assert s.series.run_window == 30 * 86400
    assert s.series.min_runs_per_experiment == 5
    assert s.mlflow.concurrency == 1
    assert Settings().series.run_window == 7 * 86400
    problems = problems_of(env={"EXPORTER_MLFLOW_CONCURRENCY": "0"})
    assert problems[0].startswith("mlflow.concurrency:")
    assert "EXPORTER_MLFLOW_CONCURRENCY" in problems[0]


# ---------------------------------------------------------------------- OTLP


def test_otlp_follows_the_opentelemetry_exporter_variables() -> None:
    s = load_settings(
        env={
            "OTLP_ENABLED": "true",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "https://otlp.example.com/",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=k%3D1, x-honeycomb-team=hc,",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_SERVICE_NAME": "ml-prod",
        }
    )

    assert s.otlp.enabled
    assert s.otlp.endpoint == "https://otlp.example.com/v1/metrics"
    assert s.otlp.headers == {"api-key": "k=1", "x-honeycomb-team": "hc"}
    assert s.otlp.compression == "gzip"
    assert s.otlp.service_name == "ml-prod"
    assert s.masked()["otlp"]["headers"] == {
        "api-key": "**********",
        "x-honeycomb-team": "**********",
    }


def test_the_metrics_endpoint_variable_wins_over_the_base_one() -> None:
    s = load_settings(
        env={
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://127.0.0.1:4318/custom",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
        }
    )

    assert s.otlp.endpoint == "http://127.0.0.1:4318/custom"


def test_otlp_headers_from_env_join_the_files_and_can_come_from_a_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("otlp:\n  headers: {X-Tenant: t1}\n")
    secret = tmp_path / "headers"
    secret.write_text("DD-API-KEY=dd-1\n")

    s = load_settings(config, env={"OTEL_EXPORTER_OTLP_HEADERS_FILE": str(secret)})

    assert s.otlp.headers == {"X-Tenant": "t1", "DD-API-KEY": "dd-1"}


def test_a_malformed_otlp_header_entry_is_named_without_its_value() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"OTEL_EXPORTER_OTLP_HEADERS": "api-key=ok,secret-without-equals"})

    assert caught.value.problems == [
        "OTEL_EXPORTER_OTLP_HEADERS: entry 2 is not key=value (give k1=v1,k2=v2)"
    ]


def test_otlp_enabled_without_an_endpoint_names_the_key() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"OTLP_ENABLED": "1"})

    assert "otlp.enabled is true but otlp.endpoint is not set" in caught.value.problems[0]


def test_otlp_headers_over_plain_http_to_another_host_are_warned_about() -> None:
    s = Settings.model_validate(
        {"otlp": {"endpoint": "http://collector.example:4318/v1/metrics", "headers": {"k": "v"}}}
    )

    assert plain_http_credentials(s) == [
        (
            "otlp: credentials go over plain http:// to collector.example; use https:// unless "
            "the network between is trusted"
        )
    ]


@pytest.mark.parametrize(
    ("enabled", "mode", "pushes", "serves"),
    [
        (True, "push", True, False),
        (True, "pull", False, True),
        (True, "both", True, True),
        (False, "both", False, False),
    ],
)
def test_prometheus_pushes_and_serves_follow_the_mode_when_enabled(
    enabled: bool, mode: str, pushes: bool, serves: bool
) -> None:
    settings = Settings.model_validate({"prometheus": {"enabled": enabled, "mode": mode}})
    assert (settings.prometheus.pushes, settings.prometheus.serves) == (pushes, serves)
