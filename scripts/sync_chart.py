"""Copy the stack's rules and dashboards into the Helm chart (one source of truth).

Helm reads only files inside a chart, so the chart carries copies of prometheus/rules/*.yml
and grafana/dashboards/*.json under charts/mlflow-monitoring/files/. Edit the originals, then:

    python scripts/sync_chart.py          # write the copies
    python scripts/sync_chart.py --check  # exit 1 naming every copy that differs

tests/chart/test_chart_sync.py and .ci/check-stack.sh run the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "mlflow-monitoring"
# Source directory and glob -> the chart's copy directory.
SOURCES = {
    (REPO / "prometheus" / "rules", "*.yml"): CHART / "files" / "rules",
    (REPO / "grafana" / "dashboards", "*.json"): CHART / "files" / "dashboards",
}


def plan() -> dict[Path, bytes | None]:
    """Every chart copy -> the bytes it must hold (None: it must not exist)."""
    wanted: dict[Path, bytes | None] = {}
    for (source, pattern), target in SOURCES.items():
        for stale in target.glob(pattern):
            wanted[stale] = None
        for original in sorted(source.glob(pattern)):
            wanted[target / original.name] = original.read_bytes()
    return wanted


def drift() -> list[str]:
    """One line per chart copy that differs from its original, is missing or is extra."""
    problems = []
    for path, content in sorted(plan().items()):
        name = path.relative_to(REPO)
        if content is None:
            problems.append(f"{name}: no such file in the stack (remove it)")
        elif not path.exists():
            problems.append(f"{name}: missing")
        elif path.read_bytes() != content:
            problems.append(f"{name}: differs from its original")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 on drift")
    args = parser.parse_args(argv)
    if args.check:
        problems = drift()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("run: python scripts/sync_chart.py", file=sys.stderr)
            return 1
        print("chart files match prometheus/rules and grafana/dashboards")
        return 0
    for path, content in plan().items():
        if content is None:
            path.unlink()
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
    print(
        f"wrote {sum(c is not None for c in plan().values())} files under {CHART.relative_to(REPO)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
