"""An example third-party history sink: every accepted point as one JSON line in a file.

Settings come from the environment (`SinkContext.env`):

- `EXAMPLE_SINK_FILE`: the file to append to; the sink is off while it is unset;
- `EXAMPLE_SINK_DOWN`: when set, every send answers "retry" like an endpoint that is down;
- `EXAMPLE_SINK_BREAK`: when set at import, importing the plugin fails (a broken install).

Each line is `{"batch": <idempotency key>, "point": [run_id, key, step, timestamp_ms,
value]}`, so a test can tell a batch sent twice from a point captured twice.

The three steps of a sink (`exporter.sinks.delivery.DeliverySink`): `plan` groups captured
points into batches at capture (nothing is encoded yet: the queue keeps them in a neutral
form), `encode` turns a queued batch into a request body at delivery (the same bytes for
the same batch), and `send` makes one attempt with that body. `count` says what a batch
counts in the sink's unit. Splitting a refused batch and retrying are the framework's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.sinks.delivery import DeliverySink, Outcome, Outgoing, Planned, Reply
from exporter.sinks.registry import SinkContext, SinkSpec

if os.environ.get("EXAMPLE_SINK_BREAK"):
    raise RuntimeError("example sink is broken on purpose (EXAMPLE_SINK_BREAK)")

BATCH_SIZE = 50


@dataclass
class ExampleSink:
    """Appends every point of an accepted batch to `path`."""

    path: Path
    down: bool = False
    name: str = "example"
    budget_seconds: float = 2.0
    max_attempts: int = 1
    queue_max_points: int = 1_000_000
    overflow: str = "wait"

    def plan(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Planned:
        """Batches of up to `BATCH_SIZE` points; this sink refuses none."""
        return Planned([points[i : i + BATCH_SIZE] for i in range(0, len(points), BATCH_SIZE)])

    def count(self, batch: CapturedBatch) -> int:
        return len(batch.points)

    def encode(self, batch: CapturedBatch) -> bytes:
        rows = [[p.run_id, p.key, p.step, p.timestamp_ms, p.value] for p in batch.points]
        return json.dumps(rows).encode()

    def send(self, request: Outgoing, timeout: float | None = None) -> Reply:
        if self.down:
            return Reply(Outcome.RETRY, f"example sink at {self.path} is down")
        with self.path.open("a", encoding="utf-8") as out:
            for row in json.loads(request.body):
                out.write(json.dumps({"batch": request.idempotency_key, "point": row}) + "\n")
        return Reply(Outcome.ACCEPTED, status=200)


def build(context: SinkContext) -> DeliverySink | None:
    """The sink, while `EXAMPLE_SINK_FILE` is set."""
    path = context.env.get("EXAMPLE_SINK_FILE")
    if not path:
        return None
    return ExampleSink(Path(path), down=bool(context.env.get("EXAMPLE_SINK_DOWN")))


def probe(context: SinkContext) -> tuple[bool, str]:
    """For `check-config`: can the sink append to its file?"""
    path = Path(context.env.get("EXAMPLE_SINK_FILE", ""))
    if os.access(path.parent, os.W_OK):
        return True, f"example sink can write {path}"
    return False, f"example sink cannot write {path}: check EXAMPLE_SINK_FILE"


SPEC = SinkSpec("example", "EXAMPLE_SINK", build, probe=probe)
