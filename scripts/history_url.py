"""Print query URLs that show the history VictoriaMetrics holds for one selector.

scripts/run-local.sh prints them in its READY block. Debian's VictoriaMetrics has no web UI,
and the sample history is hours (on a later start, days) old, so a query "at now" shows
nothing: these URLs cover the stored samples' own time span.

  history_url.py VICTORIA_URL SELECTOR [--timeout S]

Makes what was received readable (/internal/force_flush), reads the series' samples through
/api/v1/export (every stored sample, whatever its age) until some show up or S seconds pass,
then prints two lines: the export URL, and a /api/v1/query_range URL from the oldest to the
newest sample with a step giving about 200 points. Exits 1 (printing the export URL only)
when nothing shows up in time. Stdlib only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.parse
import urllib.request

POINTS = 200


def export_url(base: str, selector: str) -> str:
    return f"{base}/api/v1/export?" + urllib.parse.urlencode({"match[]": selector})


def range_url(base: str, selector: str, first_ms: int, last_ms: int) -> str:
    """A range query over [first_ms, last_ms] (a minute of margin each side), ~POINTS steps."""
    start, end = first_ms // 1000 - 60, last_ms // 1000 + 60
    step = max(1, (end - start) // POINTS)
    query = {"query": selector, "start": start, "end": end, "step": f"{step}s"}
    return f"{base}/api/v1/query_range?" + urllib.parse.urlencode(query)


def span(export_text: str) -> tuple[int, int] | None:
    """(oldest, newest) timestamp in ms of an /api/v1/export answer; None when empty."""
    stamps = [t for line in export_text.splitlines() if line.strip() for t in _timestamps(line)]
    return (min(stamps), max(stamps)) if stamps else None


def _timestamps(line: str) -> list[int]:
    # Only the timestamps array is parsed: the values may hold bare +Inf/-Inf (not JSON).
    _, _, tail = line.rpartition('"timestamps":')
    return [int(t) for t in json.loads(tail.rstrip().removesuffix("}"))]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="VictoriaMetrics URL, e.g. http://127.0.0.1:8428")
    parser.add_argument("selector", help="e.g. mlflow_val_loss")
    parser.add_argument("--timeout", type=float, default=30)
    args = parser.parse_args(argv)
    base = args.base.rstrip("/")
    deadline = time.monotonic() + args.timeout
    found = None
    while found is None:
        try:
            _get(f"{base}/internal/force_flush")
            found = span(_get(export_url(base, args.selector)))
        except OSError:
            found = None
        if found is None:
            if time.monotonic() >= deadline:
                break
            time.sleep(1)
    print(export_url(base, args.selector))
    if found is None:
        return 1
    print(range_url(base, args.selector, *found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
