"""The exporter's own health: self-metrics in a private registry, served with /healthz.

`/metrics` serves only the exporter's own series (never the MLflow data, which goes through
the Pushgateway), `/healthz` answers 200 while the last cycle succeeded and 503 otherwise,
`/livez` answers 200 while the process serves HTTP at all.
"""

from __future__ import annotations

import json
import platform
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from exporter import __version__

STAGES = ("mlflow", "pushgateway", "pramathus", "state")


class SelfMetrics:
    """Every self-metric, registered in its own `CollectorRegistry`."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "mlflow_exporter_"
        self.up = Gauge(f"{p}up", "1 when the last cycle could read MLflow.", registry=r)
        self.cycles = Counter(f"{p}cycles", "Export cycles run, by result.", ["result"], registry=r)
        self.cycle_duration = Histogram(
            f"{p}cycle_duration_seconds",
            "Wall time of export cycles.",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
        )
        self.last_success = Gauge(
            f"{p}last_success_timestamp_seconds",
            "When the last fully successful cycle ended.",
            registry=r,
        )
        self.last_cycle = Gauge(
            f"{p}last_cycle_timestamp_seconds",
            "When the last cycle ended, whatever its result.",
            registry=r,
        )
        self.errors = Counter(
            f"{p}errors", "Cycle errors, by pipeline stage.", ["stage"], registry=r
        )
        self.mlflow_requests = Counter(
            f"{p}mlflow_requests", "HTTP requests made to MLflow.", ["endpoint"], registry=r
        )
        self.pushed_groups = Gauge(
            f"{p}pushed_groups",
            "Pushgateway groups pushed by the last cycle (unchanged ones are not re-pushed).",
            registry=r,
        )
        self.pushed_series = Gauge(
            f"{p}pushed_series", "Series pushed by the last cycle.", registry=r
        )
        self.nonfinite = Gauge(
            f"{p}nonfinite_values",
            "Latest metric values in the last push that were NaN or inf.",
            registry=r,
        )
        self.points_sent = Counter(
            f"{p}pramathus_points_sent", "Metric points Pramathus acknowledged.", registry=r
        )
        self.batches_sent = Counter(
            f"{p}pramathus_batches_sent", "Batches Pramathus acknowledged.", registry=r
        )
        self.spool_points = Gauge(
            f"{p}pramathus_spool_points", "Metric points waiting in the spool.", registry=r
        )
        self.spool_batches = Gauge(
            f"{p}pramathus_spool_batches", "Batches waiting in the spool.", registry=r
        )
        self.dead_letters = Gauge(
            f"{p}pramathus_dead_letter_batches",
            "Batches Pramathus refused for good, kept on disk.",
            registry=r,
        )
        self.dropped = Counter(
            f"{p}pramathus_dropped_points",
            "Points dropped by the spool's overflow policy.",
            ["reason"],
            registry=r,
        )
        self.excluded = Gauge(
            f"{p}excluded", "What the last cycle left out by config bounds.", ["kind"], registry=r
        )
        info = Gauge(
            f"{p}build_info", "Exporter build (always 1).", ["version", "python"], registry=r
        )
        info.labels(__version__, platform.python_version()).set(1)
        for stage in STAGES:
            self.errors.labels(stage)  # present at 0 from the start, so rate() works
        for result in ("success", "failure"):
            self.cycles.labels(result)
        for kind in ("experiments", "runs", "metrics"):
            self.excluded.labels(kind)
        self.dropped.labels("spool_overflow")


@dataclass
class Health:
    """Last cycle outcome, shared between the cycle thread and the HTTP thread."""

    ok: bool | None = None  # None: no cycle finished yet
    reason: str = "starting"
    ready: bool = False  # a cycle has succeeded since the process started
    # Masked out of reasons: a backend's error text may repeat a credential.
    secrets: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, ok: bool, reason: str) -> None:
        for secret in self.secrets:
            reason = reason.replace(secret, "**********")
        with self._lock:
            self.ok, self.reason = ok, reason
            self.ready = self.ready or ok

    def view(self) -> tuple[bool | None, str]:
        with self._lock:
            return self.ok, self.reason


def serve(metrics: SelfMetrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Start the health/metrics HTTP server in a daemon thread; returns the server."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._reply(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                ok, reason = health.view()
                status = 503 if ok is False else 200
                body = {
                    "status": {None: "starting", True: "ok", False: "failing"}[ok],
                    "reason": reason,
                }
                self._reply(status, json.dumps(body).encode(), "application/json")
            elif path == "/readyz":
                ready = health.ready
                body = {"status": "ready" if ready else "not ready"}
                self._reply(200 if ready else 503, json.dumps(body).encode(), "application/json")
            elif path == "/livez":
                self._reply(200, b'{"status": "alive"}', "application/json")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes every few seconds would drown the logs

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health-http", daemon=True).start()
    return server
