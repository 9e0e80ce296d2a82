#!/usr/bin/env bash
# The test command: set-up, linters, stack validators, unit tests with coverage, a mutation
# run over the planners, delivery and secret masking, then integration tests against real
# servers. Integration tests start their own MLflow, Pushgateway, Prometheus, Alertmanager
# and VictoriaMetrics on free 127.0.0.1 ports. Extra arguments go to pytest (e.g. `-k capture`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "== ruff"
.venv/bin/ruff check exporter tests bench scripts
.venv/bin/ruff format --check exporter tests bench scripts
echo "== mypy (strict: exporter, tests, bench, scripts)"
.venv/bin/mypy
if [ -x .ci/check-stack.sh ]; then
  echo "== stack files"
  bash .ci/check-stack.sh
fi
echo "== unit tests (no servers), line and branch coverage of exporter/"
.venv/bin/pytest -q -p no:cacheprovider -m "not integration" \
  --cov=exporter --cov-branch --cov-report=term:skip-covered --cov-fail-under=90 "$@"
echo "== mutation testing (mutmut; survivors are listed in the README's development section)"
bash scripts/mutation.sh
echo "== integration tests (real servers on 127.0.0.1)"
.venv/bin/pytest -q -p no:cacheprovider -m integration "$@"
