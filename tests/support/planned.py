"""A sink's batches as the framework makes them, for tests of one sink.

`outgoing` plans points with the sink, captures each batch as `Sync` queues it
(`delivery.queue_entries`) and encodes it as the `Drainer` does at delivery: the bodies a
receiver would get. `enqueue` queues the planned batches in a real outbox; `entry` makes
one entry of a chosen stored size for tests of the queue itself.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from exporter.model import CapturedBatch, MetricPoint, RunContext
from exporter.sinks.delivery import DeliverySink, Outgoing, queue_entries
from exporter.state import StateStore
from exporter.state.outbox import QueuedBatch, QueueEntry


def outgoing(
    sink: DeliverySink,
    points: Sequence[MetricPoint],
    contexts: Mapping[str, RunContext],
    now_ms: int = 0,
) -> list[Outgoing]:
    """The requests of the batches `sink.plan` makes of these points (refused ones left out)."""
    planned = sink.plan(points, contexts, now_ms)
    return [
        Outgoing(e.idempotency_key, e.points, sink.encode(e.batch))
        for e in queue_entries(sink, planned.batches, contexts, now_ms)
    ]


def enqueue(
    state: StateStore,
    sink: DeliverySink,
    points: Sequence[MetricPoint],
    contexts: Mapping[str, RunContext],
    now_ms: int = 0,
) -> list[QueuedBatch]:
    """Queue the planned batches of these points; the sink's whole queue after."""
    outbox = state.outbox(sink.name)
    planned = sink.plan(points, contexts, now_ms)
    with state.transaction():
        outbox.add(queue_entries(sink, planned.batches, contexts, now_ms))
    return list(outbox.batches())


def entry(key: str, points: int = 1, size: int = 0, created_ms: int = 1) -> QueueEntry:
    """An entry to queue under idempotency key `key`, counting `points`, whose stored body is
    about `size` bytes larger than an empty one's (a metric key of random hex: it does not
    compress below half its length)."""
    filler = random.Random(key).randbytes(size).hex() if size else ""
    point = MetricPoint("run-a", f"{key}{filler}", 0.5, 1, 1_000)
    return QueueEntry(key, points, CapturedBatch((point,), created_ms=created_ms))
