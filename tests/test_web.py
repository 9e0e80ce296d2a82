"""Unit tests for exporter.web: the WSGI router called directly (no socket), and `serve`'s
error when its port is taken (the only test here that binds, and it never listens for HTTP)."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from exporter.health import Health
from exporter.planners.series import FixedCollector
from exporter.web import (
    BasicAuth,
    ListenError,
    Router,
    WebConfigError,
    load_web_config,
    serve,
    with_headers,
)
from tests.fakes.http import call_wsgi
from tests.support.certs import Certs, bcrypt_hash, make_certs


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


# ---------------------------------------------------------------- web config: TLS, basic auth


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def web_config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "web-config.yml"
    path.write_text(text)
    return str(path)


def users_router(registry: CollectorRegistry) -> Router:
    users = BasicAuth({"prometheus": bcrypt_hash("s3cret").encode()})
    return router(registry, users=users)


@pytest.mark.parametrize("path", ["/metrics", "/mlflow/metrics"])
@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("prometheus", "wrong"),
        basic("nobody", "s3cret"),
        {"Authorization": "Basic !!not-base64"},
        {"Authorization": "Bearer s3cret"},
        {"Authorization": "Basic " + base64.b64encode(b"prometheus").decode()},
    ],
    ids=["none", "wrong-password", "unknown-user", "garbage", "bearer", "no-colon"],
)
def test_metrics_need_the_credentials(
    registry: CollectorRegistry, path: str, headers: dict[str, str]
) -> None:
    start, body = call_wsgi(users_router(registry), path, headers)
    assert (start.code, body) == (401, b"unauthorized\n")
    assert start.headers["WWW-Authenticate"] == 'Basic realm="mlflow-monitoring"'


def test_the_right_credentials_open_the_metrics(registry: CollectorRegistry) -> None:
    app = users_router(registry)
    start, body = call_wsgi(app, "/metrics", basic("prometheus", "s3cret"))
    assert start.code == 200
    assert "mlflow_exporter_up 1.0" in body.decode()
    start, _ = call_wsgi(app, "/mlflow/metrics", basic("prometheus", "s3cret"))
    assert start.code == 200


@pytest.mark.parametrize("path", ["/livez", "/readyz", "/healthz", "/nope"])
def test_probes_stay_open_without_credentials(registry: CollectorRegistry, path: str) -> None:
    health = Health()
    health.set("ok", "")
    users = BasicAuth({"prometheus": bcrypt_hash("s3cret").encode()})
    start, _ = call_wsgi(router(registry, health, users=users), path)
    assert start.code == (404 if path == "/nope" else 200)


def test_credentials_that_passed_are_not_hashed_again(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bcrypt

    checks: list[bytes] = []
    real = bcrypt.checkpw

    def counting(password: bytes, hashed: bytes) -> bool:
        checks.append(password)
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", counting)
    app = users_router(registry)
    for _ in range(3):
        assert call_wsgi(app, "/metrics", basic("prometheus", "s3cret"))[0].code == 200
    for _ in range(2):
        assert call_wsgi(app, "/metrics", basic("prometheus", "bad"))[0].code == 401
    assert checks == [b"s3cret", b"bad", b"bad"]  # a refusal is never remembered


def test_a_full_web_config_loads(tmp_path: Path, certs: Certs) -> None:
    path = web_config(
        tmp_path,
        f"""
tls_server_config:
  cert_file: {certs.server_cert}
  key_file: {certs.server_key}
  client_ca_file: {certs.ca}
  client_auth_type: VerifyClientCertIfGiven
  min_version: TLS13
basic_auth_users:
  prometheus: {bcrypt_hash("s3cret")}
http_server_config:
  headers:
    Strict-Transport-Security: max-age=31536000
""",
    )
    config = load_web_config(path)
    assert config.tls is not None
    assert config.tls.verify_mode == ssl.CERT_OPTIONAL
    assert config.tls.minimum_version == ssl.TLSVersion.TLSv1_3
    assert config.users is not None
    assert set(config.users.users) == {"prometheus"}
    assert config.headers == {"Strict-Transport-Security": "max-age=31536000"}


def test_relative_files_are_read_beside_the_web_config(tmp_path: Path, certs: Certs) -> None:
    for f in (certs.server_cert, certs.server_key, certs.ca):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    path = web_config(
        tmp_path,
        "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
        "  client_ca_file: ca.crt\n",
    )
    tls = load_web_config(path).tls
    assert tls is not None
    assert tls.verify_mode == ssl.CERT_REQUIRED  # a client CA alone requires client certs


def test_an_empty_web_config_means_plain_http_without_auth(tmp_path: Path) -> None:
    config = load_web_config(web_config(tmp_path, ""))
    assert (config.tls, config.users, config.headers) == (None, None, {})


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("tls_config:\n  a: 1\n", "tls_config: unknown key"),
        ("basic_auth_users:\n  u: plain-password\n", "basic_auth_users.u: not a bcrypt hash"),
        ("basic_auth_users:\n  u: $2b$10$short\n", "basic_auth_users.u: not a bcrypt hash"),
        ("basic_auth_users: [u]\n", "basic_auth_users: must be a mapping"),
        ("tls_server_config:\n  key_file: {key}\n", "tls_server_config.cert_file: required"),
        (
            "tls_server_config:\n  cert_file: {cert}\n  key_file: /nope/k\n",
            "tls_server_config.key_file: no such file /nope/k",
        ),
        (
            "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_auth_type: Any\n",
            "tls_server_config.client_auth_type: 'Any' is not one of",
        ),
        (
            (
                "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
                "  client_auth_type: RequireAndVerifyClientCert\n"
            ),
            "tls_server_config.client_ca_file: required with client_auth_type",
        ),
        (
            "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS10\n",
            "tls_server_config.min_version: 'TLS10' is not TLS12 or TLS13",
        ),
        (
            "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  ciphers: x\n",
            "tls_server_config.ciphers: unknown key",
        ),
        (
            "tls_server_config:\n  cert_file: {cert}\n  key_file: {other_key}\n",
            "tls_server_config.cert_file/key_file: cannot load them as a pair",
        ),
        (
            "tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_ca_file: {key}\n",
            "tls_server_config.client_ca_file: not a PEM CA bundle",
        ),
        ("http_server_config:\n  header: x\n", "http_server_config.header: unknown key"),
        ("- a list\n", "top level must be a mapping"),
        ("a: [unclosed\n", "is not valid YAML"),
    ],
)
def test_a_bad_web_config_is_refused_naming_the_key(
    tmp_path: Path, certs: Certs, text: str, problem: str
) -> None:
    path = web_config(
        tmp_path,
        text.format(cert=certs.server_cert, key=certs.server_key, other_key=certs.client_key),
    )
    with pytest.raises(WebConfigError) as info:
        load_web_config(path)
    assert any(problem in p for p in info.value.problems), info.value.problems
    assert "plain-password" not in str(info.value)


def test_a_missing_web_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as info:
        load_web_config(str(tmp_path / "absent.yml"))
    assert info.value.problems == [
        f"cannot read {tmp_path / 'absent.yml'} (No such file or directory)"
    ]


def test_configured_headers_are_added_to_every_response(registry: CollectorRegistry) -> None:
    app = with_headers(router(registry), {"X-Frame-Options": "DENY"})
    for path in ("/metrics", "/livez", "/nope"):
        start, _ = call_wsgi(app, path)
        assert start.headers["X-Frame-Options"] == "DENY"
    assert with_headers(app, {}) is app
