"""Per-experiment trace marks: the last fingerprint, the live series and the history marks
(`planners.traces.Marks`), one JSON row per experiment in `trace_marks`."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from exporter.planners.traces import Marks
from exporter.trace_model import Fingerprint, NamedValues, TraceLive


class TraceMarks:
    """Reads and writes `trace_marks` over one connection (writes inside a transaction)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def load(self) -> dict[str, Marks]:
        rows = self.conn.execute("SELECT experiment_id, body FROM trace_marks")
        return {exp_id: _marks(exp_id, json.loads(body)) for exp_id, body in rows}

    def live(self) -> dict[str, TraceLive]:
        """The live series of every experiment holding traces."""
        return {e: m.live for e, m in self.load().items() if m.live is not None}

    def save(self, marks: Iterable[Marks]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO trace_marks (experiment_id, body) VALUES (?, ?)",
            [(m.experiment_id, json.dumps(_plain(m), sort_keys=True)) for m in marks],
        )

    def forget(self, experiment_ids: Iterable[str]) -> None:
        self.conn.executemany(
            "DELETE FROM trace_marks WHERE experiment_id = ?", [(e,) for e in experiment_ids]
        )


def _plain(m: Marks) -> dict[str, Any]:
    return {
        "fingerprint": {
            "statuses": list(m.fingerprint.statuses),
            "assessments": m.fingerprint.assessments,
        },
        "written_until_ms": m.written_until_ms,
        "last_trace_ms": m.last_trace_ms,
        "pending": [list(b) for b in m.pending],
        "settled_traces": m.settled_traces,
        "settled_assessments": m.settled_assessments,
        "live": None if m.live is None else _live_plain(m.live),
    }


def _named_plain(v: NamedValues) -> dict[str, Any]:
    return {
        "statuses": dict(v.statuses),
        "tokens": dict(v.tokens),
        "latency_ms": dict(v.latency_ms),
    }


def _live_plain(live: TraceLive) -> dict[str, Any]:
    return {
        "totals": _named_plain(live.totals),
        "by_name": {n: _named_plain(v) for n, v in live.by_name.items()},
        "cost_usd": live.cost_usd,
        "assessments": dict(live.assessments),
        "assessment_means": dict(live.assessment_means),
        "names_cut": live.names_cut,
        "last_trace_ms": live.last_trace_ms,
    }


def _named(raw: Mapping[str, Any]) -> NamedValues:
    return NamedValues(
        {str(k): int(v) for k, v in raw["statuses"].items()},
        {str(k): float(v) for k, v in raw["tokens"].items()},
        {str(k): float(v) for k, v in raw["latency_ms"].items()},
    )


def _marks(experiment_id: str, raw: Mapping[str, Any]) -> Marks:
    fp = raw["fingerprint"]
    live = raw.get("live")
    return Marks(
        experiment_id,
        Fingerprint(tuple((str(s), int(n)) for s, n in fp["statuses"]), int(fp["assessments"])),
        int(raw["written_until_ms"]),
        raw["last_trace_ms"],
        tuple((int(b), int(t), int(a)) for b, t, a in raw["pending"]),
        int(raw["settled_traces"]),
        int(raw["settled_assessments"]),
        None
        if live is None
        else TraceLive(
            _named(live["totals"]),
            {str(n): _named(v) for n, v in live["by_name"].items()},
            live["cost_usd"],
            {str(k): int(v) for k, v in live["assessments"].items()},
            {str(k): float(v) for k, v in live["assessment_means"].items()},
            int(live["names_cut"]),
            live["last_trace_ms"],
        ),
    )
