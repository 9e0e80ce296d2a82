"""Receivers of remote write that keep history: VictoriaMetrics and Prometheus (Debian binaries).

Each runs on a free 127.0.0.1 port with its own data directory under `workdir`, keeps data
for 100 years (so a 40-day-old history is inside retention) and is ready before the starter
returns; every wait is bounded. Read-back helpers return exactly what the server answered.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import requests

from tests.support.servers import Server, binary, free_port, start

REMOTE_WRITE_PATH = "/api/v1/write"


def start_victoria_metrics(workdir: Path, port: int | None = None) -> Server:
    """Single-node VictoriaMetrics; remote write at `REMOTE_WRITE_PATH`, ready on /health."""
    port = port or free_port()
    data = workdir / "vm-data"
    data.mkdir(parents=True, exist_ok=True)
    cmd = [
        binary("victoria-metrics"),
        f"-httpListenAddr=127.0.0.1:{port}",
        f"-storageDataPath={data}",
        # The default (1 month) refuses a 40-day-old history.
        "-retentionPeriod=100y",
        # Lean and deterministic: no response cache and no 30 s hiding of fresh samples.
        "-search.disableCache",
        "-search.latencyOffset=0s",
        "-memory.allowedPercent=20",
        "-loggerLevel=WARN",
    ]
    return start("victoria-metrics", cmd, port, workdir, "/health", 30)


def vm_force_flush(vm: Server) -> None:
    """Make every sample received so far readable (VictoriaMetrics buffers fresh ones)."""
    requests.get(f"{vm.url}/internal/force_flush", timeout=10).raise_for_status()


def vm_export_lines(vm: Server, match: str, start_ms: int, end_ms: int) -> list[str]:
    """`/api/v1/export` output for the series matching `match` between the two times: one
    JSON-like line per series, `{"metric":{...},"values":[...],"timestamps":[...]}`."""
    params: dict[str, str | float] = {
        "match[]": match,
        "start": start_ms / 1000,
        "end": end_ms / 1000,
    }
    r = requests.get(f"{vm.url}/api/v1/export", params=params, timeout=10)
    r.raise_for_status()
    return [line for line in r.text.splitlines() if line.strip()]


# VictoriaMetrics 1.79 prints infinities as bare +Inf / -Inf, which is not JSON.
_BARE_INF = re.compile(r"(?<![^\[,])([+-]?Inf)(?=[,\]])")


def parse_vm_export_line(line: str) -> dict[str, Any]:
    """One export line as a dict, with `values` as floats (bare +Inf/-Inf understood)."""
    # Only the arrays after "values" are rewritten: a label value could contain ",+Inf,".
    head, marker, arrays = line.rpartition('"values":[')
    try:
        record: dict[str, Any] = json.loads(head + marker + _BARE_INF.sub(r'"\1"', arrays))
    except ValueError:
        raise AssertionError(f"unparsable export line: {line[:400]}") from None
    record["values"] = [float(v) for v in record["values"]]
    return record


def start_prometheus_receiver(
    workdir: Path, out_of_order_window: str | None, port: int | None = None
) -> Server:
    """Prometheus 2.42 scraping nothing, taking remote write at `REMOTE_WRITE_PATH`.

    With `out_of_order_window` (e.g. "60d"), `storage.tsdb.out_of_order_time_window` is set.
    """
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = "global:\n  scrape_interval: 1m\n"
    if out_of_order_window is not None:
        config += f"storage:\n  tsdb:\n    out_of_order_time_window: {out_of_order_window}\n"
    cfg = workdir / "prometheus.yml"
    cfg.write_text(config)
    cmd = [
        binary("prometheus"),
        f"--config.file={cfg}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        # The default 15 d would let a compaction drop the 40-day-old history under test.
        "--storage.tsdb.retention.time=100y",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-remote-write-receiver",
    ]
    return start("prometheus-receiver", cmd, port, workdir, "/-/ready", 30)


def prom_raw_samples(prometheus: Server, match: str, range_s: int, at_s: float) -> list[Any]:
    """Raw samples of `match` in the `range_s` seconds before `at_s`, via a range selector
    (`match[<range_s>s]` evaluated at `at_s`): the stored samples, no lookback, no step."""
    params: dict[str, str | float] = {"query": f"{match}[{range_s}s]", "time": at_s}
    r = requests.get(f"{prometheus.url}/api/v1/query", params=params, timeout=10)
    body = r.json()
    if body.get("status") != "success":
        raise AssertionError(f"query {match!r} failed: {body}")
    return body["data"]["result"]  # type: ignore[no-any-return]
