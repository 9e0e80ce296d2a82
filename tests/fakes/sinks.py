"""Fakes of the cycle's outputs (history sinks, the Pushgateway), recording what was done.

- `FakeDeliverySink`: a `DeliverySink` (what Pramathus or remote write are to the runner) that
  encodes a batch as JSON (point identities, and trace buckets as family, labels, time and
  value); `send` answers from a script (default accept) and records every accepted point,
  so a test compares deliveries with what MLflow holds, and every accepted bucket; a short
  last batch is left open (`open_tail`) as real sinks leave it, and `posts` counts the
  requests. It consumes points only unless `consumes` says trace buckets too (then it
  plans them in batches of `batch_size`, like remote write).
- `FakeStepSink`: a `DeliverySink` as the drainer sees it, bodies the JSON list of steps.
- `FakeGateway`: the Pushgateway as the runner uses it (`push`, `delete`, `start_time`,
  `existing_groups`), keeping groups in a dict; `restart()` empties it and changes its start
  time like a Pushgateway without persistence; `down` makes every call fail.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import Metric

from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.planners.series import GroupKey
from exporter.sinks.delivery import POINTS, Outcome, Outgoing, Planned, Reply
from exporter.sinks.pushgateway import PushedGroup, PushError
from exporter.trace_model import BucketSample

PointKey = tuple[str, str, int, int, int]  # run, key, step, timestamp, value bits
BucketKey = tuple[str, tuple[tuple[str, str], ...], int, float]  # family, labels, start, value


@dataclass
class FakeDeliverySink:
    """Stands in for a `DeliverySink` (Pramathus, remote write): records accepted points
    and buckets; `script` holds replies to give first."""

    name: str = "pramathus"
    batch_size: int = 100
    budget_seconds: float = 5.0
    max_attempts: int = 0
    queue_max_points: int = 1_000_000
    overflow: str = "wait"
    script: list[Reply] = field(default_factory=list)
    accepted: list[PointKey] = field(default_factory=list)
    accepted_buckets: list[BucketKey] = field(default_factory=list)
    consumes: frozenset[str] = frozenset({POINTS})
    contexts: dict[str, RunContext] = field(default_factory=dict)
    posts: int = 0

    def plan(
        self, points: Sequence[MetricPoint], contexts: Mapping[str, RunContext], now_ms: int
    ) -> Planned:
        self.contexts.update(contexts)
        size = self.batch_size
        batches = [points[start : start + size] for start in range(0, len(points), size)]
        return Planned(batches, open_tail=len(points) % size != 0)

    def plan_buckets(self, samples: Sequence[BucketSample]) -> list[Sequence[BucketSample]]:
        size = self.batch_size
        return [samples[start : start + size] for start in range(0, len(samples), size)]

    def count(self, batch: CapturedBatch) -> int:
        return batch.size

    def encode(self, batch: CapturedBatch) -> bytes:
        rows = [[p.run_id, p.key, p.step, p.timestamp_ms, p.identity[2]] for p in batch.points]
        buckets = [[b.family, dict(b.labels), b.bucket_ms, b.value] for b in batch.buckets]
        return json.dumps({"points": rows, "buckets": buckets}).encode()

    def send(self, batch: Outgoing, timeout: float | None = None) -> Reply:
        self.posts += 1
        reply = self.script.pop(0) if self.script else Reply(Outcome.ACCEPTED)
        if reply.outcome is Outcome.ACCEPTED:
            body = json.loads(batch.body)
            self.accepted.extend(tuple(p) for p in body["points"])
            self.accepted_buckets.extend(
                (f, tuple(sorted(labels.items())), t, v) for f, labels, t, v in body["buckets"]
            )
        return reply

    def counts(self) -> Counter[PointKey]:
        return Counter(self.accepted)

    def delivered(self) -> set[tuple[str, str, int, int, float]]:
        """Accepted points in `FakeMlflow.all_points()` form."""
        return {(r, k, s, t, v) for r, k, s, t, v in self.accepted}


class FakeStepSink:
    """Stands in for a `DeliverySink` as the drainer sees it: a batch's body is the JSON
    list of its points' steps (in queue order), replies come from `script` (then accepted);
    records every body (`bodies`, decoded in `sent`), its key and its count."""

    name = "scripted"
    budget_seconds = 30.0
    queue_max_points = 1000
    overflow = "wait"

    def __init__(self, script: list[Reply], max_attempts: int = 0) -> None:
        self.script = list(script)
        self.max_attempts = max_attempts
        self.bodies: list[bytes] = []
        self.sent: list[Any] = []
        self.keys: list[str] = []
        self.counts: list[int] = []

    def plan(self, pts: Sequence[MetricPoint], contexts: Any, now_ms: int) -> Planned:
        return Planned([pts])

    def count(self, batch: CapturedBatch) -> int:
        return len(batch.points)

    def encode(self, batch: CapturedBatch) -> bytes:
        return json.dumps([p.step for p in batch.points]).encode()

    def send(self, batch: Outgoing, timeout: float | None = None) -> Reply:
        self.bodies.append(batch.body)
        self.sent.append(json.loads(batch.body))
        self.keys.append(batch.idempotency_key)
        self.counts.append(batch.points)
        return self.script.pop(0) if self.script else Reply(Outcome.ACCEPTED)


@dataclass
class FakeGateway:
    """Stands in for `Pushgateway` (the `PushTarget` the runner uses), groups in memory."""

    groups: dict[GroupKey, list[Metric]] = field(default_factory=dict)
    pushes: list[GroupKey] = field(default_factory=list)
    deletes: list[GroupKey] = field(default_factory=list)
    started: str = "2026-01-01T00:00:00Z"
    down: bool = False
    listings: int = 0

    def _check(self) -> None:
        if self.down:
            raise PushError(
                "Pushgateway at http://fake:9091 cannot be reached (connection refused)"
            )

    def start_time(self) -> str:
        self._check()
        return self.started

    def push(self, key: GroupKey, families: Sequence[Metric]) -> PushedGroup:
        self._check()
        self.groups[key] = list(families)
        self.pushes.append(key)
        series = sum(len(f.samples) for f in families)
        nonfinite = sum(not math.isfinite(s.value) for f in families for s in f.samples)
        return PushedGroup(series, nonfinite)

    def delete(self, key: GroupKey) -> None:
        self._check()
        self.groups.pop(key, None)
        self.deletes.append(key)

    def existing_groups(self) -> list[GroupKey]:
        self._check()
        self.listings += 1
        return list(self.groups)

    def restart(self) -> None:
        self.groups.clear()
        self.started = f"restarted-{len(self.pushes)}"

    def value(self, family: str, **labels: str) -> list[float]:
        """Values of `family` samples whose labels include `labels`, over all groups."""
        return [
            s.value
            for fams in self.groups.values()
            for f in fams
            if f.name == family
            for s in f.samples
            if all(s.labels.get(k) == v for k, v in labels.items())
        ]
