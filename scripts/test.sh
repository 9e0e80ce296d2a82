#!/usr/bin/env bash
# The test command: set-up, linters, stack validators, then unit + integration tests.
# Integration tests start their own MLflow, Pushgateway, Prometheus and Alertmanager on
# free 127.0.0.1 ports. Extra arguments go to pytest (e.g. `-k pramathus`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check exporter tests bench scripts
.venv/bin/ruff format --check exporter tests bench scripts
echo "== mypy"
.venv/bin/mypy exporter
if [ -x .ci/check-stack.sh ]; then
  echo "== stack files"
  bash .ci/check-stack.sh
fi
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
