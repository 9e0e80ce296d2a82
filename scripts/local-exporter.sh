#!/usr/bin/env bash
# The exporter's part of scripts/run-local.sh: wait for MLflow, fill it with sample data the
# first time, then run `exporter continuous` in the foreground.
set -euo pipefail
for _ in $(seq 120); do
  .venv/bin/python -c "import sys, urllib.request as u; u.urlopen(sys.argv[1], timeout=2)" \
    "$MLFLOW_TRACKING_URI/health" >/dev/null 2>&1 && break
  sleep 1
done
stamp=$EXPORTER_STATE_DIR/../sample-generated
if [ ! -e "$stamp" ]; then
  .venv/bin/exporter generate-sample && mkdir -p "$(dirname "$stamp")" && touch "$stamp"
fi
exec .venv/bin/exporter continuous
