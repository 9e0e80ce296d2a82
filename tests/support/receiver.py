"""A real HTTP receiver standing in for a customer's Pramathus endpoint.

It listens on 127.0.0.1, records every request (headers and parsed JSON body), and answers
with whatever `script` says: a queue of (status, headers, delay) replies, then `default`.
`judge`, when set, decides first from each request (method, path, headers, raw body): a
body limit, a key check, a redirect on one path, a refusal of some points.
Tests use it to check payloads and to play outages (503, 429, 400, slow, stopped).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from exporter.sinks.pramathus import point_json
from exporter.state import captured


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    body: bytes = b'{"status": "ok"}'


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    status: int
    at: float = 0.0  # time.monotonic() when the request arrived (before any scripted delay)


class Receiver:
    """Start with `Receiver()`, stop with `.stop()`; `.url` is its endpoint."""

    def __init__(self, port: int = 0) -> None:
        self.requests: list[Received] = []
        self.arrivals: list[float] = []  # monotonic arrival time of every request, at once
        self.script: deque[Reply] = deque()
        self.default = Reply()
        self.judge: Callable[[str, str, dict[str, str], bytes], Reply | None] | None = None
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                arrived = time.monotonic()
                with receiver._lock:
                    receiver.arrivals.append(arrived)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                judged = None
                if receiver.judge is not None:
                    judged = receiver.judge(self.command, self.path, dict(self.headers), raw)
                with receiver._lock:
                    if judged is not None:
                        reply = judged
                    else:
                        reply = receiver.script.popleft() if receiver.script else receiver.default
                if reply.delay:
                    time.sleep(reply.delay)
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver._lock:
                    receiver.requests.append(
                        Received(
                            self.command, self.path, dict(self.headers), body, reply.status, arrived
                        )
                    )
                try:
                    self.send_response(reply.status)
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(reply.body)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(reply.body)
                except OSError:
                    pass  # the client gave up (timeout test)

            do_POST = do_HEAD = do_GET = _handle

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/api/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def accepted(self) -> list[Received]:
        """POSTs answered with a 2xx."""
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and 200 <= r.status < 300]

    def accepted_points(self) -> list[dict[str, Any]]:
        """Every metric entry of every accepted batch, repeats included."""
        return [m for r in self.accepted() for m in r.body["metrics"]]

    def received_points(self, since: float | None = None) -> set[tuple[Any, ...]]:
        """Accepted points as (run_id, key, step, value-or-repr), comparable with
        `tests.support.seed.mlflow_points`; only requests arrived at or after `since`
        (a `time.monotonic()` value) when given. Repeats collapse into one."""
        return {
            point_of(m)
            for r in self.accepted()
            if since is None or r.at >= since
            for m in r.body["metrics"]
        }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


_NON_FINITE = {"NaN": "nan", "Infinity": "inf", "-Infinity": "-inf"}


def point_of(entry: dict[str, Any]) -> tuple[Any, ...]:
    """One payload entry as (run_id, key, step, value-or-repr), as `mlflow_points` has it."""
    meta = entry["metadata"]
    value = entry["value"] if entry["value"] is not None else _NON_FINITE[meta["non_finite"]]
    return (meta["run_id"], entry["name"], meta["step"], value)


def stored_points(body: bytes, form: str = "captured") -> set[tuple[Any, ...]]:
    """The points of a queued or set-aside row of the state, as `point_of` has them: a
    captured batch is rendered as the Pramathus sink encodes it at delivery; a `wire` row
    (queued by an older version) is a Pramathus body already."""
    if form == "wire":
        return {point_of(m) for m in json.loads(body)["metrics"]}
    batch = captured.loads(body)
    return {point_of(point_json(p, batch.contexts[p.run_id], 1000)) for p in batch.points}
