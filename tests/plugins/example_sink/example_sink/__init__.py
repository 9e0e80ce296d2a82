"""An example third-party history sink: every accepted point as one JSON line in a file.

Settings come from the environment (`SinkContext.env`):

- `EXAMPLE_SINK_FILE`: the file to append to; the sink is off while it is unset;
- `EXAMPLE_SINK_DOWN`: when set, every send answers "retry" like an endpoint that is down;
- `EXAMPLE_SINK_BREAK`: when set at import, importing the plugin fails (a broken install).

Each line is `{"batch": <idempotency key>, "point": [run_id, key, step, timestamp_ms,
value]}`, so a test can tell a batch sent twice from a point captured twice.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from exporter.model import MetricPoint, RunContext
from exporter.sinks.delivery import DeliverySink, Encoded, Outcome, Reply
from exporter.sinks.registry import SinkContext, SinkSpec
from exporter.state.outbox import EncodedBatch, QueuedBatch

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

    def encode(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Encoded:
        batches = []
        for start in range(0, len(points), BATCH_SIZE):
            chunk = points[start : start + BATCH_SIZE]
            rows = [[p.run_id, p.key, p.step, p.timestamp_ms, p.value] for p in chunk]
            batches.append(EncodedBatch(str(uuid.uuid4()), len(chunk), json.dumps(rows).encode()))
        return Encoded(batches)

    def send(self, batch: QueuedBatch, timeout: float | None = None) -> Reply:
        if self.down:
            return Reply(Outcome.RETRY, f"example sink at {self.path} is down")
        with self.path.open("a", encoding="utf-8") as out:
            for row in json.loads(batch.body):
                out.write(json.dumps({"batch": batch.idempotency_key, "point": row}) + "\n")
        return Reply(Outcome.ACCEPTED, status=200)

    def split(self, body: bytes) -> list[EncodedBatch]:
        rows = json.loads(body)
        half = len(rows) // 2
        return [
            EncodedBatch(str(uuid.uuid4()), len(part), json.dumps(part).encode())
            for part in (rows[:half], rows[half:])
        ]


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
