"""A counting reverse proxy for the benchmarks: how many requests, and how many at once.

It sits between the exporter and MLflow on 127.0.0.1, forwards every request as it came
(method, path, body, the headers that matter) and answers what MLflow answered. It counts
the requests and the most that were in flight at the same time, which is what says whether
`EXPORTER_MLFLOW_CONCURRENCY` really puts several reads on a multi-worker MLflow.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import requests

_FORWARDED = ("Content-Type", "Authorization", "Accept", "Accept-Encoding", "User-Agent")


class CountingProxy:
    """`url` to hand the exporter; `snapshot()` gives requests and the most in flight."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self._lock = threading.Lock()
        self._now = self.most = self.requests = 0
        self._local = threading.local()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                proxy._enter()
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                    headers = {k: v for k in _FORWARDED if (v := self.headers.get(k))}
                    answer = proxy._session().request(
                        self.command, proxy.upstream + self.path, data=body, headers=headers,
                        timeout=600,
                    )  # fmt: skip
                finally:
                    proxy._leave()
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", "text/plain"))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PATCH = do_DELETE = _forward  # noqa: N815 - http.server names

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def _enter(self) -> None:
        with self._lock:
            self.requests += 1
            self._now += 1
            self.most = max(self.most, self._now)

    def _leave(self) -> None:
        with self._lock:
            self._now -= 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "most_in_flight": self.most}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
