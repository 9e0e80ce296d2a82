"""The exporter's HTTP endpoints as one WSGI app, and the server that runs it.

- `/metrics`: the exporter's own metrics (prometheus_client's WSGI app);
- `/mlflow/metrics`: in pull mode, the MLflow series built fresh from the mirror on each
  scrape; an empty exposition in push mode, so a scrape job pointed at it stays up;
- `/healthz`, `/readyz`, `/livez`: probes, JSON bodies.

TLS and basic auth come from an exporter-toolkit web config file (`server.web_config_file`,
the format every Go Prometheus exporter reads): `tls_server_config` turns on HTTPS,
`basic_auth_users` (bcrypt hashes) guards `/metrics` and `/mlflow/metrics`; the probes stay
open so the kubelet can ask them without credentials.

The router is a plain WSGI callable, so tests call it without a socket.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import ssl
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import bcrypt
import yaml
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_LATEST, ThreadingWSGIServer, generate_latest
from prometheus_client.registry import Collector

from exporter.health import Health

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

STATUS_TEXT = {
    200: "200 OK",
    401: "401 Unauthorized",
    404: "404 Not Found",
    503: "503 Service Unavailable",
}
# What basic auth guards; the probes and the 404 page stay open.
PROTECTED = ("/metrics", "/mlflow/metrics")


@dataclass
class Router:
    """Dispatches the exporter's paths."""

    metrics: CollectorRegistry
    health: Health
    mlflow_series: Callable[[], Collector] | None = None  # pull mode: a fresh collector per scrape
    users: BasicAuth | None = None  # basic auth on PROTECTED paths

    def __post_init__(self) -> None:
        self._metrics_app: WsgiApp = make_wsgi_app(self.metrics)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path in PROTECTED and self.users and not self.users.allows(environ):
            body = b"unauthorized\n"
            start_response(
                STATUS_TEXT[401],
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Basic realm="mlflow-monitoring"'),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        return self._route(path, environ, start_response)

    def _route(
        self, path: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        if path == "/metrics":
            return self._metrics_app(environ, start_response)
        if path == "/mlflow/metrics":
            registry = CollectorRegistry(auto_describe=False)
            if self.mlflow_series is not None:
                registry.register(self.mlflow_series())
            return _reply(start_response, 200, generate_latest(registry), CONTENT_TYPE_LATEST)
        view = self.health.view()
        if path == "/healthz":
            body = {"status": view.status, "reason": view.reason}
            return _json(start_response, 200 if view.healthy else 503, body)
        if path == "/readyz":
            ready: dict[str, Any] = {
                "status": "ready" if view.ready else "not ready",
                "reason": view.reason,
            }
            if (progress := self.health.progress()) is not None:
                ready["progress"] = progress  # a long first capture shows how far it got
            return _json(start_response, 200 if view.ready else 503, ready)
        if path == "/livez":
            return _json(start_response, 200, {"status": "alive"})
        text = b"not found: try /metrics, /mlflow/metrics, /healthz, /readyz or /livez\n"
        return _reply(start_response, 404, text, "text/plain; charset=utf-8")


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> Iterable[bytes]:
    return _reply(start_response, status, json.dumps(body).encode(), "application/json")


def _reply(
    start_response: StartResponse, status: int, body: bytes, content_type: str
) -> Iterable[bytes]:
    start_response(
        STATUS_TEXT[status], [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    )
    return [body]


class BasicAuth:
    """`basic_auth_users` of a web config: user -> bcrypt hash. A bcrypt check costs tens of
    milliseconds by design, so credentials that passed are remembered (by a digest, never in
    clear) and a scrape every few seconds costs one check per process, as in exporter-toolkit."""

    def __init__(self, users: Mapping[str, bytes]) -> None:
        self.users = dict(users)
        self._passed: set[bytes] = set()
        self._lock = threading.Lock()

    def allows(self, environ: Mapping[str, Any]) -> bool:
        header = str(environ.get("HTTP_AUTHORIZATION", ""))
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        hashed = self.users.get(user)
        if not sep or hashed is None:
            return False
        key = hashlib.sha256(b"\0".join((user.encode(), password.encode(), hashed))).digest()
        with self._lock:
            if key in self._passed:
                return True
        if not bcrypt.checkpw(password.encode(), hashed):
            return False
        with self._lock:
            self._passed.add(key)
        return True


class WebConfigError(Exception):
    """The web config file cannot be used; `problems` name each key and the fix."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class WebConfig:
    """An exporter-toolkit web config file, checked: TLS (None: plain HTTP) and users."""

    tls: ssl.SSLContext | None = None
    users: BasicAuth | None = None
    headers: dict[str, str] = field(default_factory=dict)


_BCRYPT = re.compile(r"^\$2[aby]?\$\d{2}\$[./A-Za-z0-9]{53}$")
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_OPTIONAL,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_TLS_VERSIONS = {
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_KEYS = {"tls_server_config", "basic_auth_users", "http_server_config"}
_HTTP_KEYS = {"headers", "http2"}
_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file", "min_version"}


def load_web_config(path: str) -> WebConfig:
    """Read and check a web config file; raise `WebConfigError` listing every problem, each
    naming its key (`tls_server_config.cert_file`, `basic_auth_users.<user>`, ...)."""
    problems: list[str] = []
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise WebConfigError([f"cannot read {path} ({exc.strerror or exc})"]) from None
    except yaml.YAMLError as exc:
        raise WebConfigError([f"{path} is not valid YAML: {str(exc).splitlines()[0]}"]) from None
    if not isinstance(raw, dict):
        raise WebConfigError([f"{path}: top level must be a mapping"])
    problems += [
        f"{k}: unknown key (one of {', '.join(sorted(_KEYS))})" for k in raw if k not in _KEYS
    ]
    config = WebConfig()
    users = _mapping(raw, "basic_auth_users", problems)
    hashes: dict[str, bytes] = {}
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not _BCRYPT.match(hashed):
            # The value is not echoed: a clear-text password may have been put here.
            problems.append(
                f"basic_auth_users.{user}: not a bcrypt hash ($2b$...); make one with "
                "`htpasswd -nBC 10 USER` or Python's bcrypt.hashpw"
            )
        else:
            hashes[str(user)] = hashed.encode()
    if hashes:
        config.users = BasicAuth(hashes)
    http = _mapping(raw, "http_server_config", problems)
    # `http2` is exporter-toolkit's switch for Go's HTTP/2; this server speaks HTTP/1.1.
    problems += [f"http_server_config.{k}: unknown key" for k in http if k not in _HTTP_KEYS]
    headers = _mapping(http, "headers", problems)
    config.headers = {str(k): str(v) for k, v in headers.items()}
    tls = _mapping(raw, "tls_server_config", problems)
    if tls:
        config.tls = _tls_context(tls, Path(path).parent, problems)
    if problems:
        raise WebConfigError(problems)
    return config


def _mapping(raw: Mapping[str, Any], key: str, problems: list[str]) -> dict[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        problems.append(f"{key}: must be a mapping")
        return {}
    return value


@dataclass
class _TlsFiles:
    cert: str
    key: str
    ca: str | None
    verify: ssl.VerifyMode
    version: ssl.TLSVersion


def _tls_files(tls: Mapping[str, Any], base: Path, problems: list[str]) -> _TlsFiles | None:
    """`tls_server_config` checked; relative file names are read beside the web config
    file, as exporter-toolkit does."""
    before = len(problems)
    problems += [f"tls_server_config.{k}: unknown key" for k in tls if k not in _TLS_KEYS]

    def file(key: str, *, required: bool) -> str | None:
        name = tls.get(key)
        if not name:
            if required:
                problems.append(f"tls_server_config.{key}: required to serve TLS")
            return None
        path = base / str(name)
        if not path.is_file():
            problems.append(f"tls_server_config.{key}: no such file {path}")
            return None
        return str(path)

    cert, key = file("cert_file", required=True), file("key_file", required=True)
    ca = file("client_ca_file", required=False)
    default_auth = "RequireAndVerifyClientCert" if tls.get("client_ca_file") else "NoClientCert"
    auth = str(tls.get("client_auth_type") or default_auth)
    if auth not in _CLIENT_AUTH:
        choices = ", ".join(_CLIENT_AUTH)
        problems.append(f"tls_server_config.client_auth_type: {auth!r} is not one of {choices}")
    elif _CLIENT_AUTH[auth] != ssl.CERT_NONE and not tls.get("client_ca_file"):
        problems.append(f"tls_server_config.client_ca_file: required with client_auth_type {auth}")
    version = str(tls.get("min_version") or "TLS12")
    if version not in _TLS_VERSIONS:
        problems.append(f"tls_server_config.min_version: {version!r} is not TLS12 or TLS13")
    if len(problems) > before or cert is None or key is None:
        return None
    return _TlsFiles(cert, key, ca, _CLIENT_AUTH[auth], _TLS_VERSIONS[version])


def _tls_context(tls: Mapping[str, Any], base: Path, problems: list[str]) -> ssl.SSLContext | None:
    """The server's TLS context, its certificate, key and client CA loaded now, so a bad
    file stops start-up rather than the first scrape."""
    files = _tls_files(tls, base, problems)
    if files is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = files.version
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"tls_server_config.cert_file/key_file: cannot load them as a pair ({exc})")
        return None
    if files.ca is not None:
        try:
            context.load_verify_locations(cafile=files.ca)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"tls_server_config.client_ca_file: not a PEM CA bundle ({exc})")
            return None
    context.verify_mode = files.verify
    return context


def with_headers(app: WsgiApp, headers: Mapping[str, str]) -> WsgiApp:
    """`app` adding `http_server_config.headers` to every response (e.g. HSTS)."""
    if not headers:
        return app
    extra = list(headers.items())

    def wrapped(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        return app(environ, lambda status, hs: start_response(status, [*hs, *extra]))

    return wrapped


class _QuietHandler(WSGIRequestHandler):
    # A client that opens a connection and says nothing (or stalls a TLS handshake) is
    # dropped after this long instead of holding a thread forever.
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass  # scrapes every few seconds would drown the logs


class ListenError(Exception):
    """The HTTP port cannot be bound; the message names it and what to do."""


def serve(
    app: WsgiApp, host: str, port: int, tls: ssl.SSLContext | None = None
) -> ThreadingWSGIServer:
    """Serve `app` in a daemon thread, over TLS when given a context; returns the server
    (`server_port` is the real port)."""
    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): set EXPORTER_PORT (or "
            "server.port) to a free port, or stop what uses it"
        ) from None
    if tls is not None:
        # The handshake happens in the request's own thread (on first read), so a slow or
        # silent client never blocks the accept loop.
        server.socket = tls.wrap_socket(
            server.socket, server_side=True, do_handshake_on_connect=False
        )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
