"""The exporter's HTTP endpoints as one WSGI app, and the server that runs it.

- `/metrics`: the exporter's own metrics (prometheus_client's WSGI app);
- `/mlflow/metrics`: in pull mode, the MLflow series built fresh from the mirror on each
  scrape; an empty exposition in push mode, so a scrape job pointed at it stays up;
- `/healthz`, `/readyz`, `/livez`: probes, JSON bodies.

The router is a plain WSGI callable, so tests call it without a socket.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import CONTENT_TYPE_LATEST, ThreadingWSGIServer, generate_latest
from prometheus_client.registry import Collector

from exporter.health import Health

StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

STATUS_TEXT = {200: "200 OK", 404: "404 Not Found", 503: "503 Service Unavailable"}


@dataclass
class Router:
    """Dispatches the exporter's paths."""

    metrics: CollectorRegistry
    health: Health
    mlflow_series: Callable[[], Collector] | None = None  # pull mode: a fresh collector per scrape

    def __post_init__(self) -> None:
        self._metrics_app: WsgiApp = make_wsgi_app(self.metrics)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass  # scrapes every few seconds would drown the logs


class ListenError(Exception):
    """The HTTP port cannot be bound; the message names it and what to do."""


def serve(app: WsgiApp, host: str, port: int) -> ThreadingWSGIServer:
    """Serve `app` in a daemon thread; returns the server (`server_port` is the real port)."""
    try:
        server = make_server(host, port, app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): set EXPORTER_PORT (or "
            "server.port) to a free port, or stop what uses it"
        ) from None
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server
