"""The local stack's Pramathus: a small receiver of the README's "Pramathus contract".

scripts/run-local.sh points the exporter at it, so the second output can be seen without a
customer endpoint:

  pramathus_sink.py serve --log FILE --points FILE [--port P]
      takes `POST /api/metrics` on 127.0.0.1:P (PRAMATHUS_SINK_PORT, default 9096) and checks
      what a real endpoint would: `Authorization: Bearer <key>` (the key from the environment,
      PRAMATHUS_API_KEY: 401 otherwise), the JSON body's shape (400 naming the first
      problem), and the `Idempotency-Key` header (required; a batch whose key was already
      accepted is answered 200 again and not recorded twice, also after a restart). Every
      accepted point is appended to the points file as one JSON line; one summary line per
      batch goes to the log file and stdout. GET and HEAD answer 200 (readiness).

Stdlib only: no MLflow import, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import json
import os
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DEFAULT_PORT = 9096
PATH = "/api/metrics"
NON_FINITE = ("NaN", "Infinity", "-Infinity")


def problem(body: Any) -> str | None:
    """The first way `body` breaks the contract, or None when it keeps it."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    for key in ("timestamp", "source"):
        if not isinstance(body.get(key), str):
            return f"`{key}` must be a string"
    metrics = body.get("metrics")
    if not isinstance(metrics, list) or not metrics:
        return "`metrics` must be a non-empty list"
    return next(
        (f"metrics[{i}]: {p}" for i, e in enumerate(metrics) if (p := entry_problem(e))), None
    )


def entry_problem(entry: Any) -> str | None:
    """The first way one entry of `metrics` breaks the contract, or None."""
    if not isinstance(entry, dict):
        return "must be an object"
    meta = entry.get("metadata")
    value = entry.get("value")
    checks = (
        (isinstance(entry.get("name"), str), "`name` must be a string"),
        (isinstance(entry.get("timestamp"), str), "`timestamp` must be a string"),
        (isinstance(meta, dict), "`metadata` must be an object"),
        (
            isinstance(meta, dict) and isinstance(meta.get("run_id"), str),
            "`metadata.run_id` must be a string",
        ),
        (
            isinstance(meta, dict) and isinstance(meta.get("step"), int),
            "`metadata.step` must be an integer",
        ),
        (
            value is not None or (isinstance(meta, dict) and meta.get("non_finite") in NON_FINITE),
            f"a null `value` needs `metadata.non_finite` ({', '.join(NON_FINITE)})",
        ),
        (
            value is None or (isinstance(value, int | float) and not isinstance(value, bool)),
            "`value` must be a number or null",
        ),
    )
    return next((message for ok, message in checks if not ok), None)


class Sink:
    """Checks and records batches; `receive` is the whole HTTP contract minus the socket."""

    def __init__(self, api_key: str, log: Path, points: Path) -> None:
        self.api_key = api_key
        self.log = log
        self.points = points
        self.total = 0
        self._lock = threading.Lock()
        self._seen = self._keys_on_file()

    def _keys_on_file(self) -> set[str]:
        """Idempotency keys of batches recorded by earlier starts (one per points line)."""
        keys = set()
        with contextlib.suppress(FileNotFoundError), self.points.open(encoding="utf-8") as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    keys.add(json.loads(line)["idempotency_key"])
        return keys

    def receive(self, headers: dict[str, str], raw: bytes) -> tuple[int, dict[str, Any]]:
        """Answer one POST: (status, JSON reply)."""
        given = headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return 401, {"error": "missing or wrong `Authorization: Bearer <api key>`"}
        key = headers.get("idempotency-key", "").strip()
        if not key:
            return 400, {"error": "missing `Idempotency-Key` header"}
        try:
            body = json.loads(raw)
        except ValueError as exc:
            return 400, {"error": f"not JSON: {exc}"}
        wrong = problem(body)
        if wrong is not None:
            return 400, {"error": wrong}
        with self._lock:
            if key in self._seen:
                self._say(f"batch {key[:8]} again: already recorded, not counted twice")
                return 200, {"status": "duplicate", "accepted": 0}
            self._record(key, body["metrics"])
        return 200, {"status": "ok", "accepted": len(body["metrics"])}

    def _record(self, key: str, metrics: list[dict[str, Any]]) -> None:
        with self.points.open("a", encoding="utf-8") as f:
            for entry in metrics:
                f.write(json.dumps({"idempotency_key": key, **entry}, ensure_ascii=False) + "\n")
        self._seen.add(key)
        self.total += len(metrics)
        runs = {m["metadata"]["run_id"] for m in metrics}
        names = Counter(m["name"] for m in metrics)
        shown = ", ".join(f"{name} x{n}" for name, n in names.most_common(4))
        more = f" and {len(names) - 4} more keys" if len(names) > 4 else ""
        self._say(
            f"batch {key[:8]}: {len(metrics)} points from {len(runs)} run"
            f"{'s' * (len(runs) != 1)} ({shown}{more}); {self.total} points this start"
        )

    def _say(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {text}"
        with self.log.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(line, flush=True)


def serve(sink: Sink, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            if self.path.split("?")[0] != PATH:
                self._reply(404, {"error": f"POST batches to {PATH}"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            headers = {k.lower(): v for k, v in self.headers.items()}
            self._reply(*sink.receive(headers, self.rfile.read(length)))

        def do_GET(self) -> None:
            self._reply(200, {"status": f"Pramathus sink: POST batches to {PATH}"})

        def do_HEAD(self) -> None:
            self._reply(200, {})

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass  # an access line per readiness poll would bury the batch lines

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="receive Pramathus batches")
    s.add_argument("--port", type=int, default=int(os.environ.get("PRAMATHUS_SINK_PORT") or 0))
    s.add_argument("--log", type=Path, required=True, help="file to append batch lines to")
    s.add_argument("--points", type=Path, required=True, help="file to append points to")
    args = parser.parse_args(argv)
    api_key = os.environ.get("PRAMATHUS_API_KEY", "")
    if not api_key:
        print("set PRAMATHUS_API_KEY: the bearer key batches must carry", file=sys.stderr)
        return 2
    for path in (args.log, args.points):
        path.parent.mkdir(parents=True, exist_ok=True)
    server = serve(Sink(api_key, args.log, args.points), args.port or DEFAULT_PORT)
    print(f"Pramathus sink on http://127.0.0.1:{server.server_port}{PATH}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # run by hand, Ctrl-C is the way out
        server.serve_forever()
    return 0


if __name__ == "__main__":
    # SIGTERM (how run-local.sh stops it) ends the process by default: every line is written
    # and closed as it arrives.
    sys.exit(main())
