"""Render the compose stack's prometheus/ files for a run on loopback (no Docker).

The compose file addresses services by name (`pushgateway:9091`, ...). This writes a copy of
prometheus.yml into OUT_DIR with every occurrence of those targets pointed at 127.0.0.1
ports (the exporter's address serves two scrape jobs: /metrics and the pull mode's
/mlflow/metrics), copies the rule files beside it (rule paths are relative to the config),
and can shorten the intervals, the global ones and any job's own, so tests see data within
seconds. The compose shards' file discovery (`/etc/prometheus-shards`, mounted only by
docker-compose.shards.yml) is left out: on loopback the directory does not exist and
Prometheus would log an error for it on every start. Used by scripts/run-local.sh and the
stack tests.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARD_TARGETS = "/etc/prometheus-shards/"
TARGETS = {
    "pushgateway:9091": "pushgateway",
    "mlflow-exporter:9877": "exporter",
    "alertmanager:9093": "alertmanager",
    "localhost:9090": "prometheus",
}


def render(out_dir: Path, ports: dict[str, int], interval: str | None = None) -> Path:
    """Write OUT_DIR/prometheus.yml (+ rules/) and return the config's path."""
    text = (ROOT / "prometheus" / "prometheus.yml").read_text()
    for target, name in TARGETS.items():
        text = text.replace(target, f"127.0.0.1:{ports[name]}")
    config = yaml.safe_load(text)
    for job in config.get("scrape_configs") or []:
        _drop_shard_discovery(job)
    if interval:
        config["global"]["scrape_interval"] = interval
        config["global"]["evaluation_interval"] = interval
        # A job's own interval (the pull job's 60 s) would keep tests waiting; its own
        # timeout must not exceed the shorter interval, so it falls back to the global one
        # (Prometheus defaults that to the interval when below 10 s).
        for job in config.get("scrape_configs") or []:
            if "scrape_interval" in job:
                job["scrape_interval"] = interval
                job.pop("scrape_timeout", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    rules = out_dir / "rules"
    shutil.rmtree(rules, ignore_errors=True)
    shutil.copytree(ROOT / "prometheus" / "rules", rules)
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _drop_shard_discovery(job: dict[str, Any]) -> None:
    """Remove the file discovery of compose shard targets from one scrape job."""
    kept = [
        sd
        for sd in job.get("file_sd_configs") or []
        if not all(str(f).startswith(SHARD_TARGETS) for f in sd.get("files") or [])
    ]
    if kept:
        job["file_sd_configs"] = kept
    else:
        job.pop("file_sd_configs", None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    for name in TARGETS.values():
        parser.add_argument(f"--{name}-port", type=int, required=True)
    parser.add_argument("--interval", help="scrape and evaluation interval, e.g. 5s")
    args = parser.parse_args()
    ports = {name: getattr(args, f"{name}_port") for name in TARGETS.values()}
    print(render(args.out_dir, ports, args.interval))


if __name__ == "__main__":
    main()
