#!/usr/bin/env bash
# Set-up shared by the run and test commands: Debian packages for the Prometheus side and a
# virtualenv (.venv) with the exporter installed. Safe to run again; skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for bin in prometheus:prometheus prometheus-pushgateway:prometheus-pushgateway \
           prometheus-alertmanager:prometheus-alertmanager victoria-metrics:victoria-metrics; do
  command -v "${bin%%:*}" >/dev/null 2>&1 || need_apt+=("${bin##*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  # The packages ship systemd units; nothing starts them here, we run the binaries by hand.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  if ! "$python" -m venv .venv 2>/dev/null; then
    # Debian's own python3 keeps venv in a separate package.
    rm -rf .venv
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    "$python" -m venv .venv
  fi
fi
stamp=.venv/.requirements.sha
want=$(cat requirements.txt requirements-dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies (about a minute the first time)"
  .venv/bin/pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
  .venv/bin/pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
fi
