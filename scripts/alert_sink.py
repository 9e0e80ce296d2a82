"""The local stack's alert receiver, and the Alertmanager config that points at it.

`prometheus/alertmanager.yml` routes to Slack and a webhook whose secrets exist only in a real
deployment, so a local Alertmanager on it would log delivery errors and show nothing. For
scripts/run-local.sh:

  alert_sink.py render SRC OUT --port P [--group-wait 5s]
      writes OUT: SRC with its receivers replaced by ONE webhook receiver (this sink) and every
      route's receiver renamed to it; routing, grouping and inhibition stay as in SRC, only
      group_wait is shortened so a local alert shows within seconds.
  alert_sink.py serve --log FILE [--port P]
      serves Alertmanager webhooks on 127.0.0.1:P (ALERT_SINK_PORT, default 9095), appends one
      line per alert to FILE and prints the same line on stdout. GET answers 200 (readiness).

Stdlib and PyYAML only: no MLflow import, so it starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

RECEIVER = "local-alert-sink"
DEFAULT_PORT = 9095


# ------------------------------------------------------------------------------------------
# Config rendering
# ------------------------------------------------------------------------------------------


def _rename_receivers(route: dict[str, Any]) -> None:
    """Point `route` and every nested route at the sink, keeping matchers and grouping."""
    if "receiver" in route:
        route["receiver"] = RECEIVER
    for child in route.get("routes") or []:
        _rename_receivers(child)


def render_config(src: Path, port: int, group_wait: str | None = "5s") -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(src.read_text())
    _rename_receivers(config["route"])
    if group_wait:
        config["route"]["group_wait"] = group_wait
    config["receivers"] = [
        {
            "name": RECEIVER,
            "webhook_configs": [{"url": f"http://127.0.0.1:{port}/alerts", "send_resolved": True}],
        }
    ]
    return config


# ------------------------------------------------------------------------------------------
# The sink
# ------------------------------------------------------------------------------------------


def format_alert(alert: dict[str, Any], now: float | None = None) -> str:
    """One line: time, status, alertname, experiment and run labels, summary."""
    labels = alert.get("labels") or {}
    summary = (alert.get("annotations") or {}).get("summary", "")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if now is None else now))
    parts = [stamp, str(alert.get("status", "?")), str(labels.get("alertname", "?"))]
    if "experiment_name" in labels or "experiment_id" in labels:
        parts.append(f"experiment={labels.get('experiment_name', labels.get('experiment_id'))}")
    if "run_id" in labels or "run_name" in labels:
        parts.append(f"run={labels.get('run_name', '-')} ({labels.get('run_id', '-')})")
    if summary:
        parts.append(f"- {summary}")
    return " ".join(parts)


class Sink:
    """Appends alert lines to a file and stdout, each distinct alert state once.

    The repo's routing sends a warning or critical alert down two routes (Slack, then the
    webhook, `continue: true`); once both lead to this one receiver, Alertmanager delivers the
    same alert twice. A line per (fingerprint, status, startsAt) keeps one line per alert and
    still shows a later resolve or a new firing.
    """

    def __init__(self, log: Path, remember: int = 10_000) -> None:
        self.log = log
        self.remember = remember
        self._seen: OrderedDict[tuple[str, str, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def notify(self, payload: dict[str, Any]) -> list[str]:
        lines = []
        with self._lock:
            for alert in payload.get("alerts") or []:
                ident = alert.get("fingerprint") or json.dumps(alert.get("labels"), sort_keys=True)
                key = (
                    str(ident),
                    str(alert.get("status")),
                    str(alert.get("startsAt")),
                )
                if key in self._seen:
                    continue
                self._seen[key] = None
                if len(self._seen) > self.remember:
                    self._seen.popitem(last=False)
                lines.append(format_alert(alert))
            if lines:
                with self.log.open("a", encoding="utf-8") as f:
                    f.write("".join(f"{line}\n" for line in lines))
                print("\n".join(lines), flush=True)
        return lines


def serve(sink: Sink, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            try:
                payload = json.loads(self.rfile.read(length) or b"{}")
            except ValueError as e:
                self._reply(400, f"not JSON: {e}\n")
                return
            sink.notify(payload)
            self._reply(200, "ok\n")

        def do_GET(self) -> None:
            self._reply(200, "alert sink: POST Alertmanager webhooks here\n")

        def _reply(self, status: int, body: str) -> None:
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass  # an access line per readiness poll would bury the alert lines

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    port_default = int(os.environ.get("ALERT_SINK_PORT") or DEFAULT_PORT)
    r = sub.add_parser("render", help="write the local Alertmanager config")
    r.add_argument("src", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--port", type=int, default=port_default, help="the sink's port")
    r.add_argument("--group-wait", default="5s", help="route group_wait for local use")
    s = sub.add_parser("serve", help="receive Alertmanager webhooks")
    s.add_argument("--port", type=int, default=port_default)
    s.add_argument("--log", type=Path, required=True, help="file to append alert lines to")
    args = parser.parse_args(argv)

    if args.command == "render":
        config = render_config(args.src, args.port, args.group_wait)
        header = (
            f"# Rendered by scripts/alert_sink.py from {args.src}: every receiver replaced by\n"
            f"# the local alert sink on 127.0.0.1:{args.port}. Do not edit; edit the source.\n"
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + yaml.safe_dump(config, sort_keys=False))
        return 0

    args.log.parent.mkdir(parents=True, exist_ok=True)
    server = serve(Sink(args.log), args.port)
    print(f"alert sink on http://127.0.0.1:{args.port}, appending to {args.log}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):  # run by hand, Ctrl-C is the way out
        server.serve_forever()
    return 0


if __name__ == "__main__":
    # SIGTERM (how run-local.sh stops it) ends the process by default: nothing to flush,
    # every line is written and closed as it arrives.
    sys.exit(main())
