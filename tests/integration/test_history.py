"""History through remote write, end to end: MLflow -> `exporter export-once` -> a real store.

Each test seeds its own experiment in the session's MLflow (runs holding NaN, infinities,
unicode and slash keys, a history 40 days old and points logged minutes ago), runs the
exporter CLI as a subprocess with remote write pointed at a real receiver on loopback, and
reads back what the receiver stored, sample by sample, against what MLflow holds:

- VictoriaMetrics 1.79 (Debian): keeps any age within its retention;
- Prometheus 2.42 with `--web.enable-remote-write-receiver`, with a 60 d out-of-order window
  (takes the old history) and without one (refuses it: the exporter must set it aside).

Pramathus stays enabled (the fixture's HTTP receiver) to show the sinks do not disturb each
other. Requests a receiver got are counted from its own /metrics, so "nothing was sent" is
measured, not inferred (VictoriaMetrics' /metrics is cached: see `vm_fresh_metrics`).
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from exporter.config import RemoteWriteSettings
from exporter.naming import metric_family_name
from exporter.sinks import remote_write as rw
from exporter.sinks.history import RemoteWriteSink
from exporter.state import captured
from tests.integration.conftest import ExporterEnv
from tests.support import history_servers as hs
from tests.support.poll import poll_until
from tests.support.receiver import Receiver
from tests.support.seed import mlflow_points
from tests.support.servers import Server

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
MINUTE_MS = 60_000
STEP_FAMILY = "mlflow_metric_step"  # the README's contract, spelled out rather than imported
# MLflow's SQL store keeps +inf and -inf as the largest finite floats and answers those.
MLFLOW_INF = sys.float_info.max

Labels = tuple[tuple[str, str], ...]
Samples = list[tuple[int, float]]


# --------------------------------------------------------------------------- what MLflow holds


@dataclass(frozen=True)
class Point:
    run_id: str
    key: str
    step: int
    timestamp_ms: int
    value: float


@dataclass
class History:
    """One seeded experiment and every point MLflow holds for it (as MLflow answers them)."""

    client: MlflowClient
    experiment_id: str
    experiment_name: str
    run_names: dict[str, str]
    points: list[Point]
    now_ms: int

    @property
    def run_ids(self) -> list[str]:
        return list(self.run_names)

    def is_old(self, p: Point) -> bool:
        return p.timestamp_ms < self.now_ms - 30 * DAY_MS

    def stored_points(self) -> list[Point]:
        """What a receiver can hold: one value per series and timestamp, so of points sharing
        a timestamp only the highest step (the exporter sets the others aside)."""
        best: dict[tuple[str, str, int], Point] = {}
        for p in self.points:
            slot = (p.run_id, p.key, p.timestamp_ms)
            if slot not in best or p.step > best[slot].step:
                best[slot] = p
        return list(best.values())

    def same_timestamp_losers(self) -> list[Point]:
        kept = set(self.stored_points())
        return [p for p in self.points if p not in kept]

    def labels(self, family: str, p: Point) -> Labels:
        return tuple(
            sorted(
                {
                    "__name__": family,
                    "experiment_id": self.experiment_id,
                    "experiment_name": self.experiment_name,
                    "run_id": p.run_id[:12],
                    "run_name": self.run_names[p.run_id],
                    "metric_key": p.key,
                }.items()
            )
        )

    def series(self, points: list[Point]) -> dict[Labels, Samples]:
        """The value series `mlflow_<key>` and the step series of `points`, samples in time
        order: what remote write must leave in a store."""
        out: dict[Labels, Samples] = {}
        for p in sorted(points, key=lambda p: p.timestamp_ms):
            out.setdefault(self.labels(metric_family_name(p.key), p), []).append(
                (p.timestamp_ms, p.value)
            )
            out.setdefault(self.labels(STEP_FAMILY, p), []).append((p.timestamp_ms, float(p.step)))
        return out

    def samples(self, points: list[Point]) -> int:
        return 2 * len(points)  # a value and a step sample per point


RECENT = {  # key -> values at steps 0, 1, 2... one second apart, logged minutes ago
    "val/loss": [1.0, 0.6, 0.4],
    "val.loss": [2.0, 1.5],  # the same family as val/loss: told apart by metric_key
    "précision": [0.3, 0.35],
    "损失": [5.0, 4.0],  # nothing ASCII: the family is named by a digest
    "precise": [0.9560342718892494, 2.3694930874311595, 1 / 3],  # full-precision floats
    "weird": [1.0, math.nan, 0.5],
    # Infinities alone in their series: beside other values see the infinity test below.
    "blowup": [math.inf],
    "collapse": [-math.inf],
}


def seed_history(env: ExporterEnv) -> History:
    """Three runs in a new experiment: recent awkward keys (and two points sharing one
    timestamp), a run imported with its 40-day-old history, and a run resumed today after
    40 days (old and recent points in one series)."""
    client = env.client
    now_ms = int(time.time() * 1000)
    old_ms = now_ms - 40 * DAY_MS
    recent_ms = now_ms - 5 * MINUTE_MS
    exp = env.experiment("history")
    names = {}

    def run(name: str, start_ms: int, metrics: list[Metric]) -> None:
        run_id = client.create_run(exp, start_time=start_ms, run_name=name).info.run_id
        client.log_batch(run_id, metrics=metrics)
        client.set_terminated(run_id)
        names[run_id] = name

    recent = [
        Metric(key, value, recent_ms + step * 1000, step)
        for key, values in RECENT.items()
        for step, value in enumerate(values)
    ]
    # Two steps logged at one millisecond (fast loops do this): one value fits a timestamp.
    recent += [Metric("dup", 1.0, recent_ms, 0), Metric("dup", 2.0, recent_ms, 1)]
    run("awkward ü/run", recent_ms, recent)
    run(
        "imported",
        old_ms,
        [
            Metric(key, round(base + 0.01 * i, 6), old_ms + i * 30 * MINUTE_MS, i)
            for key, base in (("loss", 1.0), ("accuracy", 0.5))
            for i in range(24)
        ],
    )
    run(
        "resumed",
        old_ms,
        [Metric("loss", 2.0 - 0.1 * i, old_ms + i * 10 * MINUTE_MS, i) for i in range(6)]
        + [Metric("loss", 1.0 - 0.1 * i, recent_ms + i * 1000, 6 + i) for i in range(3)],
    )
    held = [
        Point(run_id, m.key, m.step, m.timestamp, m.value)
        for run_id in names
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
    ]
    return History(client, exp, f"{env.prefix}history", names, held, now_ms)


# --------------------------------------------------------------------------- the exporter


def configure(env: ExporterEnv, **remote_write: Any) -> None:
    """Add `remote_write:` settings to the test's config file (the env enables it)."""
    path = Path(env.env["EXPORTER_CONFIG"])
    tree = yaml.safe_load(path.read_text())
    tree["remote_write"] = remote_write
    path.write_text(yaml.safe_dump(tree))


@dataclass
class Export:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.stderr.splitlines() if x.startswith("{")]
        return [e for e in lines if e.get("event") == name]

    def drained(self, sink: str) -> dict[str, Any]:
        [event] = [e for e in self.events("delivery.drained") if e["sink"] == sink]
        return event


def export_once(env: ExporterEnv, receiver: Server | None, timeout: float = 90) -> Export:
    """One `exporter export-once` process, remote write to `receiver` (None: disabled)."""
    extra = {"REMOTE_WRITE_ENABLED": "false"}
    if receiver is not None:
        extra = {"REMOTE_WRITE_ENABLED": "true", "REMOTE_WRITE_URL": receiver.url + "/api/v1/write"}
    started = time.monotonic()
    done = env.run("export-once", timeout=timeout, **extra)
    return Export(done.returncode, done.stdout, done.stderr, time.monotonic() - started)


def state_rows(env: ExporterEnv, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of the exporter's state database (read only; no exporter runs meanwhile)."""
    conn = sqlite3.connect(f"file:{env.state_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def remote_write_body(env: ExporterEnv, stored: bytes) -> bytes:
    """A stored (captured) batch as the remote write sink encodes it at delivery, with the
    `run_id` length the state holds (the exporter's default minimum of 12 below it)."""
    [(record,)] = state_rows(env, "SELECT value FROM record WHERE name = 'LabelRecord'")
    length = max(json.loads(record)["run_id_length"], 12)
    settings = RemoteWriteSettings(enabled=True, url="http://unused.invalid/api/v1/write")
    sink = RemoteWriteSink(settings, run_id_length=lambda: length)
    return sink.encode(captured.loads(stored))


def set_aside(env: ExporterEnv) -> dict[str, int]:
    """Samples set aside for remote write, by reason."""
    return dict(
        state_rows(
            env,
            "SELECT reason, sum(points) FROM dead_letter WHERE sink = 'remote_write' "
            "GROUP BY reason",
        )
    )


def queued(env: ExporterEnv, sink: str) -> int:
    """Samples (remote write) or points (Pramathus) waiting in a sink's queue."""
    [(samples,)] = state_rows(
        env, "SELECT coalesce(sum(points), 0) FROM spool WHERE sink = ?", sink
    )
    return int(samples)


def pramathus_got_everything_once(receiver: Receiver, history: History) -> None:
    """The Pramathus receiver accepted every point MLflow holds, each exactly once."""
    expected = mlflow_points(history.client, history.run_ids)
    assert receiver.received_points() == expected
    assert len(receiver.accepted_points()) == len(expected)


# --------------------------------------------------------------------------- the receivers


def counter(server: Server, name: str, text: str | None = None, **match: str) -> float:
    """Sum of the samples of counter `name` (labels matching `match`) on /metrics (or in
    `text`, a /metrics body already read)."""
    if text is None:
        text = requests.get(f"{server.url}/metrics", timeout=10).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
                total += s.value
    return total


def vm_fresh_metrics(vm: Server, timeout: float = 15) -> str:
    """VictoriaMetrics' /metrics as rendered after this call began.

    VictoriaMetrics serves /metrics from a cache about a second old (measured on 1.79: five
    reads 0.2 s apart showed the same counters), and `export-once` can end within that
    second. Each /metrics request counts itself in `vm_http_requests_total{path="/metrics"}`
    before the page is rendered, so a page whose count is above the first page's was rendered
    at a later request of ours, after this call began (nothing else reads this server's
    /metrics).
    """
    seen = counter(vm, "vm_http_requests_total", path="/metrics")

    def newer() -> str | None:
        text = requests.get(f"{vm.url}/metrics", timeout=10).text
        rendered = counter(vm, "vm_http_requests_total", text, path="/metrics")
        return text if rendered > seen else None

    return poll_until("a /metrics page of VictoriaMetrics rendered afresh", newer, timeout)


def vm_writes(vm: Server) -> float:
    """Remote write requests VictoriaMetrics had counted when this call began (or later)."""
    return counter(vm, "vm_http_requests_total", vm_fresh_metrics(vm), path="/api/v1/write")


def prom_writes(prometheus: Server, code: str | None = None) -> float:
    match = {"handler": "/api/v1/write", **({"code": code} if code else {})}
    return counter(prometheus, "prometheus_http_requests_total", **match)


def vm_stored(vm: Server, history: History) -> dict[Labels, Samples]:
    """Every sample VictoriaMetrics holds for the experiment, repeats included."""
    hs.vm_force_flush(vm)
    match = f'{{experiment_id="{history.experiment_id}"}}'
    lines = hs.vm_export_lines(vm, match, history.now_ms - 50 * DAY_MS, history.now_ms + DAY_MS)
    out: dict[Labels, Samples] = {}
    for line in lines:
        record = hs.parse_vm_export_line(line)
        samples = zip(record["timestamps"], record["values"], strict=True)
        out.setdefault(tuple(sorted(record["metric"].items())), []).extend(samples)
    # A series may come in several lines (one per stored block): time order, repeats kept.
    return {labels: sorted(samples, key=lambda s: s[0]) for labels, samples in out.items()}


def prom_stored(prometheus: Server, history: History) -> dict[Labels, Samples]:
    """Every raw sample Prometheus holds for the experiment over the 45 days before an hour
    from now (a range selector evaluated then: stored samples, no lookback, no step)."""
    match = f'{{experiment_id="{history.experiment_id}"}}'
    at_s = history.now_ms / 1000 + 3600
    out = {}
    for series in hs.prom_raw_samples(prometheus, match, 45 * 86_400, at_s):
        labels = tuple(sorted(series["metric"].items()))
        out[labels] = [(round(float(t) * 1000), float(v)) for t, v in series["values"]]
    return out


def anchor(prometheus: Server) -> None:
    """A sample at now, as a Prometheus in use holds: its head's range starts from there, so
    an old history arriving later is out of its bounds (an empty head takes anything first)."""
    series = rw.TimeSeries.of("history_test_anchor", {}, [(int(time.time() * 1000), 1.0)])
    r = requests.post(
        prometheus.url + "/api/v1/write",
        data=rw.encode([series]),
        headers=dict(rw.PROTOCOL_HEADERS),
        timeout=10,
    )
    assert r.status_code == 204, r.text


# --------------------------------------------------------------------------- comparing


def same_value(got: float, held: float, rel: float = 0.0, scale: float = 0.0) -> bool:
    """`got` is what a store returned for MLflow's `held` value.

    MLflow's ±inf arrive as ±MLFLOW_INF; a store may return that (to its precision) or a
    true infinity. `rel` of `scale`: the absolute error allowed (VictoriaMetrics' decimal
    storage, see VM_RELATIVE).
    """
    if math.isnan(held):
        return math.isnan(got)
    if abs(held) == MLFLOW_INF:
        return got == math.copysign(math.inf, held) or abs(got - held) <= rel * abs(held)
    return abs(got - held) <= rel * scale


def mismatches(
    stored: dict[Labels, Samples], expected: dict[Labels, Samples], rel: float = 0.0
) -> list[str]:
    """Differences between two sets of series: missing or extra series, timestamps (a
    repeated sample shows up as an extra timestamp), and values."""
    problems = [f"missing series {dict(k)}" for k in expected.keys() - stored.keys()]
    problems += [f"extra series {dict(k)}: {stored[k]}" for k in stored.keys() - expected.keys()]
    for labels in expected.keys() & stored.keys():
        want, got = expected[labels], stored[labels]
        name = dict(labels)["__name__"], dict(labels)["metric_key"]
        if [t for t, _ in got] != [t for t, _ in want]:
            problems.append(f"{name}: timestamps {[t for t, _ in got]} != {[t for t, _ in want]}")
            continue
        # Error relative to the series' largest ordinary magnitude (see vm_expected).
        scale = max(
            (abs(v) for _, v in want if math.isfinite(v) and abs(v) != MLFLOW_INF), default=1
        )
        for (t, g), (_, w) in zip(got, want, strict=True):
            if not same_value(g, w, rel, scale):
                problems.append(f"{name} at {t}: stored {g!r}, MLflow holds {w!r}")
    return sorted(problems)


# VictoriaMetrics 1.79 keeps a block of samples as integer mantissas sharing one decimal
# exponent: about 12 significant digits of the block's largest magnitude, cut rather than
# rounded (measured: 0.9560342718892494 -> 0.956034271889; 0.00123456789012345 beside
# 12.3456789012345 -> 0.0012345678901, so small values beside large ones lose digits).
# Every error measured is below 1e-11 of the series' largest ordinary value.
VM_RELATIVE = 1e-11


def vm_expected(history: History, points: list[Point]) -> dict[Labels, Samples]:
    """What VictoriaMetrics 1.79 keeps of `points`: every sample but NaN ones, which it drops
    on storage (documented; a series holding only NaN is not stored at all)."""
    out = {}
    for labels, samples in history.series(points).items():
        kept = [(t, v) for t, v in samples if not math.isnan(v)]
        if kept:
            out[labels] = kept
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def own_vm(tmp_path: Path) -> Iterator[Server]:
    """A VictoriaMetrics of this test's own, to stop and restart."""
    (tmp_path / "own-vm").mkdir()
    server = hs.start_victoria_metrics(tmp_path / "own-vm")
    yield server
    server.stop()


# --------------------------------------------------------------------------- VictoriaMetrics


def test_victoria_metrics_holds_every_mlflow_point_at_its_timestamp_once_even_after_a_second_export(
    exporter_env: ExporterEnv, receiver: Receiver, vm: Server
) -> None:
    history = seed_history(exporter_env)
    # Small batches: the history spans several requests.
    configure(exporter_env, batch_size=16)
    writes = vm_writes(vm)

    first = export_once(exporter_env, vm)

    assert first.returncode == 0, first.stderr
    # Several requests: the counter below means something.
    assert vm_writes(vm) > writes + 1, first.stderr[-3000:]
    kept = history.stored_points()
    stored = vm_stored(vm, history)
    assert mismatches(stored, vm_expected(history, kept), VM_RELATIVE) == []
    # Spot checks of the contract, readable on their own.
    by_key = {dict(k)["metric_key"]: dict(k) for k in stored if dict(k)["__name__"] != STEP_FAMILY}
    assert by_key["val/loss"]["__name__"] == by_key["val.loss"]["__name__"] == "mlflow_val_loss"
    assert by_key["précision"]["__name__"] == "mlflow_precision"
    assert by_key["损失"]["run_name"] == "awkward ü/run"
    assert len(by_key["损失"]["run_id"]) == 12
    oldest = min(t for samples in stored.values() for t, _ in samples)
    assert oldest == history.now_ms - 40 * DAY_MS  # the imported history, 40 days back
    # NaN is the one thing VictoriaMetrics drops: the value series has a gap, the step none.
    weird = {dict(k)["__name__"]: v for k, v in stored.items() if dict(k)["metric_key"] == "weird"}
    assert [v for _, v in weird["mlflow_weird"]] == [1.0, 0.5]
    assert [v for _, v in weird[STEP_FAMILY]] == [0.0, 1.0, 2.0]
    # Of two steps at one timestamp the highest is stored; the other is set aside, counted.
    [at] = {p.timestamp_ms for p in history.points if p.key == "dup"}
    dup = {dict(k)["__name__"]: v for k, v in stored.items() if dict(k)["metric_key"] == "dup"}
    assert dup == {"mlflow_dup": [(at, 2.0)], STEP_FAMILY: [(at, 1.0)]}
    assert set_aside(exporter_env) == {
        "duplicate_timestamp": history.samples(history.same_timestamp_losers())
    }
    assert first.drained("remote_write")["samples"] == history.samples(kept)
    assert queued(exporter_env, "remote_write") == 0
    pramathus_got_everything_once(receiver, history)

    writes, pramathus_requests = vm_writes(vm), len(receiver.requests)
    second = export_once(exporter_env, vm)

    assert second.returncode == 0, second.stderr
    # VictoriaMetrics stores a resent sample twice: unchanged series prove nothing was resent.
    assert vm_stored(vm, history) == stored
    assert vm_writes(vm) == writes
    assert len(receiver.requests) == pramathus_requests


def test_a_run_that_logged_infinity_keeps_its_other_values_in_victoria_metrics(
    exporter_env: ExporterEnv, vm: Server
) -> None:
    # A diverging run: MLflow keeps its inf as 1.7976931348623157e308 and answers that.
    # VictoriaMetrics keeps a block's values as mantissas of one shared decimal exponent, so a
    # finite 1.8e308 beside 0.5 turns 0.5 into 0 (measured); a true +Inf is stored apart
    # and leaves its neighbours exact. The points MLflow holds must come back as they are.
    now = int(time.time() * 1000)
    exp = exporter_env.experiment("diverged")
    client = exporter_env.client
    run_id = client.create_run(exp, run_name="diverged").info.run_id
    values = [1.0, 0.5, math.inf, -math.inf]
    client.log_batch(run_id, metrics=[Metric("loss", v, now + i, i) for i, v in enumerate(values)])
    held = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert held == [1.0, 0.5, MLFLOW_INF, -MLFLOW_INF]

    done = export_once(exporter_env, vm)

    assert done.returncode == 0, done.stderr
    hs.vm_force_flush(vm)
    [line] = hs.vm_export_lines(vm, f'mlflow_loss{{experiment_id="{exp}"}}', now - 1, now + 10)
    stored = hs.parse_vm_export_line(line)
    assert stored["timestamps"] == [now, now + 1, now + 2, now + 3]
    assert stored["values"][:2] == [1.0, 0.5], f"stored {stored['values']}, MLflow holds {held}"
    assert all(
        same_value(g, h, VM_RELATIVE) for g, h in zip(stored["values"][2:], held[2:], strict=True)
    )


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_with_a_60d_out_of_order_window_holds_every_point_at_its_timestamp(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server = prometheus_receiver("60d")
    anchor(server)  # old samples then arrive out of order, which the window allows
    history = seed_history(exporter_env)

    first = export_once(exporter_env, server)

    assert first.returncode == 0, first.stderr
    kept = history.stored_points()
    # Prometheus keeps float64 as sent, NaN included: nothing is lossy here.
    assert mismatches(prom_stored(server, history), history.series(kept)) == []
    assert prom_writes(server) == prom_writes(server, "204")
    pramathus_got_everything_once(receiver, history)

    writes = prom_writes(server)
    second = export_once(exporter_env, server)

    assert second.returncode == 0, second.stderr
    assert prom_writes(server) == writes
    assert mismatches(prom_stored(server, history), history.series(kept)) == []


def test_prometheus_without_a_window_gets_recent_points_and_the_old_history_is_set_aside_once(
    exporter_env: ExporterEnv,
    receiver: Receiver,
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server = prometheus_receiver(None)
    anchor(server)
    history = seed_history(exporter_env)
    # A budget far above what the run may take: retrying refused samples would show as a
    # run lasting at least this long.
    configure(exporter_env, delivery_budget_seconds=120, batch_size=64)

    first = export_once(exporter_env, server, timeout=180)

    assert first.seconds < 30, f"export-once took {first.seconds:.1f}s"
    kept = history.stored_points()
    old = [p for p in kept if history.is_old(p)]
    recent = [p for p in kept if not history.is_old(p)]
    assert old
    assert recent
    # As designed (tests/sinks/test_delivery.py), a cycle that set samples aside reports the
    # receiver's refusal as its remote write error: exit 1 this once, not on later cycles.
    assert first.returncode == 1
    assert "remote_write: POST" in first.stderr
    assert "HTTP 400: out of bounds" in first.stderr
    assert first.drained("remote_write")["set_aside"] == {"too_old": history.samples(old)}
    assert set_aside(exporter_env) == {
        "too_old": history.samples(old),
        "duplicate_timestamp": history.samples(history.same_timestamp_losers()),
    }
    # Prometheus refuses a request whole, so the refused samples are isolated by halving:
    # about two requests per old sample when a whole batch is old (measured 215 for 108).
    assert prom_writes(server, "400") < 2 * history.samples(old) + 8
    # Exactly the old samples were set aside, every one of them, each with the receiver's word.
    bodies = state_rows(
        exporter_env, "SELECT body, status, error FROM dead_letter WHERE reason = 'too_old'"
    )
    aside = {
        (ts.labels, t, "NaN" if math.isnan(v) else v)
        for body, _, _ in bodies
        for ts in rw.decode(remote_write_body(exporter_env, body))
        for t, v in ts.samples
    }
    assert aside == {
        (labels, t, "NaN" if math.isnan(v) else v)
        for labels, samples in history.series(old).items()
        for t, v in samples
    }
    assert {(status, error.rpartition(": ")[2]) for _, status, error in bodies} == {
        (400, "out of bounds")
    }
    assert queued(exporter_env, "remote_write") == 0
    assert mismatches(prom_stored(server, history), history.series(recent)) == []
    pramathus_got_everything_once(receiver, history)

    writes, rows = prom_writes(server), state_rows(exporter_env, "SELECT * FROM dead_letter")
    second = export_once(exporter_env, server)

    assert second.returncode == 0, second.stderr
    assert prom_writes(server) == writes  # no further attempt for the set-aside samples
    assert state_rows(exporter_env, "SELECT * FROM dead_letter") == rows
    assert mismatches(prom_stored(server, history), history.series(recent)) == []


def test_max_sample_age_sets_the_old_history_aside_without_sending_it(
    exporter_env: ExporterEnv, prometheus_receiver: Callable[[str | None], Server]
) -> None:
    server = prometheus_receiver(None)
    anchor(server)
    history = seed_history(exporter_env)
    configure(exporter_env, max_sample_age="30d")

    done = export_once(exporter_env, server)

    assert done.returncode == 0, done.stderr
    kept = history.stored_points()
    old = [p for p in kept if history.is_old(p)]
    recent = [p for p in kept if not history.is_old(p)]
    assert prom_writes(server, "400") == prom_writes(server, "500") == 0
    assert prom_writes(server) == prom_writes(server, "204") > 1  # the anchor, then ours
    assert mismatches(prom_stored(server, history), history.series(recent)) == []
    rows = state_rows(
        exporter_env,
        "SELECT reason, status, sum(points) FROM dead_letter GROUP BY reason, status",
    )
    # No status: no request was made for them.
    assert sorted(rows) == [
        ("duplicate_timestamp", None, history.samples(history.same_timestamp_losers())),
        ("too_old", None, history.samples(old)),
    ]


# --------------------------------------------------------------------------- independence


def test_remote_write_down_keeps_its_queue_while_pramathus_gets_everything_then_catches_up(
    exporter_env: ExporterEnv, receiver: Receiver, own_vm: Server
) -> None:
    history = seed_history(exporter_env)
    configure(exporter_env, delivery_budget_seconds=2, timeout_seconds=1)
    kept = history.stored_points()
    own_vm.stop()

    down = export_once(exporter_env, own_vm)

    assert down.returncode == 1
    assert "remote_write: POST" in down.stderr
    assert "failed (connection refused)" in down.stderr
    pramathus_got_everything_once(receiver, history)
    assert queued(exporter_env, "pramathus") == 0
    assert queued(exporter_env, "remote_write") == history.samples(kept)

    own_vm.restart("/health")
    pramathus_requests = len(receiver.requests)
    back = export_once(exporter_env, own_vm)

    assert back.returncode == 0, back.stderr
    assert back.drained("remote_write")["samples"] == history.samples(kept)
    assert mismatches(vm_stored(own_vm, history), vm_expected(history, kept), VM_RELATIVE) == []
    assert queued(exporter_env, "remote_write") == 0
    assert len(receiver.requests) == pramathus_requests


def test_enabling_remote_write_later_backfills_the_whole_history_and_resends_nothing_to_pramathus(
    exporter_env: ExporterEnv, receiver: Receiver, vm: Server
) -> None:
    history = seed_history(exporter_env)
    writes = vm_writes(vm)

    alone = export_once(exporter_env, None)

    assert alone.returncode == 0, alone.stderr
    pramathus_got_everything_once(receiver, history)
    # Counted, not queried: VictoriaMetrics 1.79 caches a query's matching series by filters
    # and time range, and an identical query right after the backfill answered the stale
    # empty set for over 10 s (measured).
    assert vm_writes(vm) == writes

    pramathus_requests = len(receiver.requests)
    joined = export_once(exporter_env, vm)

    assert joined.returncode == 0, joined.stderr
    kept = history.stored_points()
    assert joined.drained("remote_write")["samples"] == history.samples(kept), joined.stderr
    assert mismatches(vm_stored(vm, history), vm_expected(history, kept), VM_RELATIVE) == []
    assert len(receiver.requests) == pramathus_requests
