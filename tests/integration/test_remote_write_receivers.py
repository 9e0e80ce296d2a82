"""Remote write bodies and verdicts against real receivers: VictoriaMetrics 1.79, Prometheus 2.42.

Every test sends with `RemoteWriteClient` and reads back what the receiver stored, comparing it
sample by sample with what was sent. Servers listen on free 127.0.0.1 ports with temp data
dirs; VictoriaMetrics is shared by the module (each test uses its own metric names), each
Prometheus belongs to one test because its head's time range is part of what is tested.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import pytest

from exporter.config import RemoteWriteSettings
from exporter.sinks import remote_write as rw
from exporter.sinks.remote_write import RemoteWriteClient, TimeSeries, Verdict
from tests.support import history_servers as hs
from tests.support.servers import Server, free_port

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000
STEP_MS = 600_000  # one point every 10 minutes
Samples = list[tuple[int, Any]]


def now_ms() -> int:
    return int(time.time() * 1000)


def history(name: str, end_ms: int, runs: int = 3, points: int = 200) -> list[TimeSeries]:
    """A training history ending at `end_ms`: exact decimal values (VictoriaMetrics keeps ~12
    significant digits, see below) and NaN, +Inf, -Inf among them."""
    start = end_ms - (points - 1) * STEP_MS
    special = {5: math.nan, 6: math.inf, 7: -math.inf}

    def value(r: int, i: int) -> float:
        return special.get(i, round(r - 3 + i * 0.125, 3))

    return [
        TimeSeries.of(
            name,
            {"run_id": f"run-{r}", "experiment": "exp ü"},
            [(start + i * STEP_MS, value(r, i)) for i in range(points)],
        )
        for r in range(runs)
    ]


def key(samples: Samples) -> Samples:
    """NaN-safe comparable samples (NaN != NaN)."""
    return [(t, "NaN" if math.isnan(v) else v) for t, v in samples]


def client(server: Server) -> RemoteWriteClient:
    return RemoteWriteClient(RemoteWriteSettings(url=server.url + hs.REMOTE_WRITE_PATH))


def send_all(sender: RemoteWriteClient, series: list[TimeSeries]) -> list[rw.SendResult]:
    return [sender.send(rw.encode([ts])) for ts in series]


def selector(ts: TimeSeries) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in ts.labels) + "}"


def prom_samples(prometheus: Server, ts: TimeSeries, at_ms: int) -> Samples:
    """What Prometheus stored for `ts` in the 45 days before `at_ms` (raw, via a range
    selector), as (timestamp_ms, value) pairs."""
    result = hs.prom_raw_samples(prometheus, selector(ts), 45 * 86_400, at_ms / 1000)
    assert len(result) <= 1, result
    values = result[0]["values"] if result else []
    return [(round(float(t) * 1000), float(v)) for t, v in values]


# --- VictoriaMetrics --------------------------------------------------------------------------


def vm_samples(vm: Server, ts: TimeSeries, start_ms: int, end_ms: int) -> Samples:
    hs.vm_force_flush(vm)
    lines = hs.vm_export_lines(vm, selector(ts), start_ms, end_ms)
    assert len(lines) == 1, lines
    record = hs.parse_vm_export_line(lines[0])
    return list(zip(record["timestamps"], record["values"], strict=True))


def test_victoria_metrics_keeps_a_40_day_old_history_at_its_own_timestamps_and_values(
    vm: Server,
) -> None:
    end = now_ms() - 40 * DAY_MS
    series = history("rw_vm_history", end)
    assert {r.verdict for r in send_all(client(vm), series)} == {Verdict.ACCEPTED}
    for ts in series:
        stored = vm_samples(vm, ts, ts.samples[0][0] - 1, end + 1)
        # Documented VictoriaMetrics behaviour: NaN samples are dropped on storage.
        assert stored == [(t, v) for t, v in ts.samples if not math.isnan(v)]
    # ...and infinities are printed as bare words (not JSON): parse_vm_export_line copes.
    line = hs.vm_export_lines(vm, selector(series[0]), series[0].samples[0][0], end)[0]
    assert ",+Inf,-Inf," in line


def test_victoria_metrics_rounds_values_to_about_12_significant_digits(vm: Server) -> None:
    end = now_ms() - 40 * DAY_MS
    values = [0.9560342718892494, 2.3694930874311595, 1 / 3, 0.1 + 0.2]
    ts = TimeSeries.of("rw_vm_precision", {}, [(end - i, v) for i, v in enumerate(values)])
    assert client(vm).send(rw.encode([ts])).verdict is Verdict.ACCEPTED
    stored = vm_samples(vm, ts, end - 10, end + 1)
    assert [t for t, _ in stored] == [t for t, _ in ts.samples]
    for (_, sent), (_, got) in zip(ts.samples, stored, strict=True):
        assert got == pytest.approx(sent, rel=1e-12)
    assert stored[-1][1] == 0.956034271889  # full-precision floats do not survive exactly


def test_victoria_metrics_stores_a_resent_sample_twice(vm: Server) -> None:
    end = now_ms() - DAY_MS
    body = rw.encode([TimeSeries.of("rw_vm_twice", {}, [(end, 1.5)])])
    sender = client(vm)
    assert [sender.send(body).verdict, sender.send(body).verdict] == [Verdict.ACCEPTED] * 2
    ts = rw.decode(body)[0]
    assert vm_samples(vm, ts, end - 1, end + 1) == [(end, 1.5), (end, 1.5)]


# --- Prometheus -------------------------------------------------------------------------------


def test_prometheus_with_a_60d_out_of_order_window_keeps_a_40_day_old_history(
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server, now = prometheus_receiver("60d"), now_ms()
    recent = TimeSeries.of("rw_recent", {}, [(now, 1.0)])
    series = history("rw_prom_history", now - 40 * DAY_MS)
    results = send_all(client(server), [recent, *series])
    assert [r.status for r in results] == [204] * 4
    for ts in series:
        assert key(prom_samples(server, ts, now + 1000)) == key(list(ts.samples))


def test_prometheus_without_a_window_answers_old_samples_too_old_and_keeps_none_of_them(
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server, now = prometheus_receiver(None), now_ms()
    [old] = history("rw_prom_no_window", now - 40 * DAY_MS, runs=1)
    recent = TimeSeries(old.labels, ((now, 7.0),))
    sender = client(server)
    assert sender.send(rw.encode([recent])).verdict is Verdict.ACCEPTED
    result = sender.send(rw.encode([old]))
    assert (result.verdict, result.status) == (Verdict.TOO_OLD, 400)
    assert result.message == f"POST {server.url}/api/v1/write: HTTP 400: out of bounds"
    assert prom_samples(server, old, now + 1000) == [(now, 7.0)]


def test_prometheus_without_a_window_takes_an_old_history_when_it_comes_first(
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    # An empty head has no time range yet, so acceptance depends on arrival order.
    server, now = prometheus_receiver(None), now_ms()
    [old] = history("rw_prom_first", now - 40 * DAY_MS, runs=1)
    assert client(server).send(rw.encode([old])).verdict is Verdict.ACCEPTED
    assert key(prom_samples(server, old, now + 1000)) == key(list(old.samples))


def test_prometheus_with_a_short_window_answers_500_that_is_too_old_not_retry(
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server, now = prometheus_receiver("1h"), now_ms()
    recent = TimeSeries.of("rw_prom_1h", {}, [(now, 1.0)])
    sender = client(server)
    assert sender.send(rw.encode([recent])).verdict is Verdict.ACCEPTED
    old = TimeSeries(recent.labels, ((now - 40 * DAY_MS, 2.0),))
    result = sender.send(rw.encode([old]))
    assert (result.status, result.message.rpartition(": ")[2]) == (500, "too old sample")
    assert result.verdict is Verdict.TOO_OLD
    # Inside the window an older sample is fine.
    inside = TimeSeries(recent.labels, ((now - 1_800_000, 3.0),))
    assert sender.send(rw.encode([inside])).verdict is Verdict.ACCEPTED
    assert prom_samples(server, recent, now + 1000) == [(now - 1_800_000, 3.0), (now, 1.0)]


def test_prometheus_without_a_window_answers_out_of_order_and_duplicate_samples(
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server, now = prometheus_receiver(None), now_ms()
    labels = TimeSeries.of("rw_prom_order", {}, []).labels
    sender = client(server)

    def send(t: int, v: float) -> tuple[Verdict, int | None, str]:
        r = sender.send(rw.encode([TimeSeries(labels, ((t, v),))]))
        return r.verdict, r.status, r.message.rpartition("HTTP ")[2]

    assert send(now, 1.0) == (Verdict.ACCEPTED, 204, "204")
    assert send(now - 1_800_000, 2.0) == (Verdict.OUT_OF_ORDER, 400, "400: out of order sample")
    assert send(now, 3.0) == (Verdict.OUT_OF_ORDER, 400, "400: duplicate sample for timestamp")
    assert send(now, 1.0) == (Verdict.ACCEPTED, 204, "204")  # the same sample again is fine
    assert prom_samples(server, TimeSeries(labels, ()), now + 1000) == [(now, 1.0)]


def test_a_mixed_batch_refused_as_a_whole_is_split_until_the_new_samples_land(
    prometheus_receiver: Callable[[str | None], Server],
) -> None:
    server, now = prometheus_receiver(None), now_ms()
    sender = client(server)
    assert sender.send(rw.encode([TimeSeries.of("rw_anchor", {}, [(now, 0.0)])])).status == 204
    old_part = history("rw_mixed", now - 40 * DAY_MS, points=7)
    new_part = history("rw_mixed", now - 1000, points=5)
    batch = [
        TimeSeries(o.labels, o.samples + n.samples) for o, n in zip(old_part, new_part, strict=True)
    ]
    first = sender.send(rw.encode(batch))
    assert (first.verdict, first.status) == (Verdict.TOO_OLD, 400)
    # The whole request was rolled back, its recent samples with it.
    assert all(prom_samples(server, ts, now + 1000) == [] for ts in batch)

    # The bisect loop (the production one lives in the runner). The older half must go first:
    # once a newer sample of a series has landed, Prometheus without a window refuses every
    # older one of that series for good ("out of order sample"), good ones included.
    pending, landed, isolated, posts = [rw.encode(batch)], [], [], 0
    while pending:
        body = pending.pop()
        posts += 1
        verdict = sender.send(body).verdict
        if verdict is Verdict.ACCEPTED:
            landed += rw.decode(body)
        elif verdict is Verdict.TOO_OLD and rw.sample_count(body) > 1:
            older, newer = rw.split(body)
            pending += [newer, older]  # a stack: the older half is sent next
        else:
            assert verdict is Verdict.TOO_OLD
            isolated += rw.decode(body)

    def flat(series: list[TimeSeries]) -> list[Any]:
        return sorted(
            (ts.labels, t, v) for ts in series for t, v in ts.samples if not math.isnan(v)
        )

    assert flat(landed) == flat(new_part)
    assert len(isolated) == sum(len(ts.samples) for ts in old_part)
    assert flat(isolated) == flat(old_part)
    assert posts < 2 * len(isolated) + 8
    for ts in new_part:
        assert key(prom_samples(server, ts, now + 1000)) == key(list(ts.samples))


def test_a_receiver_that_is_down_is_a_retry_naming_its_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/api/v1/write"
    sender = RemoteWriteClient(RemoteWriteSettings(url=url, timeout_seconds=2))
    result = sender.send(rw.encode([TimeSeries.of("m", {}, [(now_ms(), 1.0)])]))
    assert (result.verdict, result.status) == (Verdict.RETRY, None)
    assert result.message.startswith(f"POST {url} failed (connection refused): ")
