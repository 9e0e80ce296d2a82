"""A lean Pramathus stand-in for the benchmark: a real HTTP server on 127.0.0.1 that answers
200 and keeps only counts and one integer per point identity.

`tests/support/receiver.py` keeps every request body, about 400 MB at 20,000 runs (a million
points); the benchmark needs only how many points arrived, how many were repeats, and which
of them carry a given step.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class LeanReceiver:
    def __init__(self, watch_step: int) -> None:
        self.points = 0
        self.batches = 0
        self.repeats = 0  # a point identity (run, key, step, timestamp, value) seen before
        # A repeat under another idempotency key than its first arrival's: a resend that the
        # endpoint could not deduplicate (the delivery rule says this never happens).
        self.repeats_under_new_key = 0
        self.idempotency_keys: set[str] = set()
        self.watched: list[tuple[str, str, int]] = []  # (run, key, step) of points at watch_step
        self._seen: dict[int, int] = {}  # point identity -> hash of its first idempotency key
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = json.loads(raw)
                receiver._take(body, self.headers.get("Idempotency-Key", ""))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self._watch_step = watch_step
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/api/metrics"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _take(self, body: dict[str, Any], key: str) -> None:
        with self._lock:
            self.batches += 1
            self.idempotency_keys.add(key)
            for m in body["metrics"]:
                meta = m["metadata"]
                ident = hash((meta["run_id"], m["name"], meta["step"], m["timestamp"], m["value"]))
                self.points += 1
                first_key = self._seen.get(ident)
                if first_key is not None:
                    self.repeats += 1
                    if first_key != hash(key):
                        self.repeats_under_new_key += 1
                else:
                    self._seen[ident] = hash(key)
                if meta["step"] == self._watch_step:
                    self.watched.append((meta["run_id"], m["name"], meta["step"]))

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "points": self.points,
                "distinct_points": len(self._seen),
                "repeats": self.repeats,
                "repeats_under_new_key": self.repeats_under_new_key,
                "batches": self.batches,
                "idempotency_keys": len(self.idempotency_keys),
            }

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
