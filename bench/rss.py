"""Run the exporter CLI in this process and report its own peak RSS on exit.

`ru_maxrss` of a child started from a large parent includes the parent's pages (Linux keeps
the high-water mark across fork and exec), so the benchmark measures from inside instead:
VmHWM in /proc/self/status is this process's own peak after exec.
"""

from __future__ import annotations

import atexit
import sys
from pathlib import Path


def _report() -> None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(f"peak_rss_kb {line.split()[1]}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    atexit.register(_report)
    from exporter.cli import main

    main(sys.argv[1:])
