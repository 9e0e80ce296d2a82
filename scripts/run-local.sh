#!/usr/bin/env bash
# The whole stack on loopback, no Docker: MLflow (SQLite) filled by `exporter generate-sample`,
# the Pushgateway, Prometheus (the compose stack's prometheus/ files and rules), Alertmanager,
# and `exporter continuous` pushing every 15 s. Ctrl-C stops everything it started.
# Ports: MLFLOW_PORT=5000 PUSHGATEWAY_PORT=9091 PROMETHEUS_PORT=9090 ALERTMANAGER_PORT=9093
#        EXPORTER_PORT=9877 (override any of them in the environment). Data: .local-stack/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

: "${MLFLOW_PORT:=5000}" "${PUSHGATEWAY_PORT:=9091}" "${PROMETHEUS_PORT:=9090}"
: "${ALERTMANAGER_PORT:=9093}" "${EXPORTER_PORT:=9877}" "${EXPORT_INTERVAL:=15}"
for p in "$MLFLOW_PORT" "$PUSHGATEWAY_PORT" "$PROMETHEUS_PORT" "$ALERTMANAGER_PORT" "$EXPORTER_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p on 127.0.0.1 is already in use; stop what uses it or set the *_PORT variables" >&2
    exit 1
  fi
done

data=$PWD/.local-stack
mkdir -p "$data"/{mlflow,tsdb,alertmanager}
.venv/bin/python scripts/render_prometheus.py "$data/prometheus" \
  --pushgateway-port "$PUSHGATEWAY_PORT" --exporter-port "$EXPORTER_PORT" \
  --alertmanager-port "$ALERTMANAGER_PORT" --prometheus-port "$PROMETHEUS_PORT" >/dev/null

export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PROMETHEUS_GATEWAY=127.0.0.1:$PUSHGATEWAY_PORT
export EXPORTER_STATE_DIR=$data/exporter-state EXPORTER_PORT EXPORT_INTERVAL
export LOG_FORMAT=${LOG_FORMAT:-console}
cat > "$data/Procfile" <<PROCFILE
mlflow: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec .venv/bin/mlflow server --backend-store-uri sqlite:///$data/mlflow/mlflow.db --default-artifact-root $data/mlflow/artifacts --host 127.0.0.1 --port $MLFLOW_PORT --workers 1
pushgateway: exec prometheus-pushgateway --web.listen-address=127.0.0.1:$PUSHGATEWAY_PORT --persistence.file=$data/pushgateway.db
prometheus: exec prometheus --config.file=$data/prometheus/prometheus.yml --storage.tsdb.path=$data/tsdb --web.listen-address=127.0.0.1:$PROMETHEUS_PORT
alertmanager: exec prometheus-alertmanager --config.file=$PWD/prometheus/alertmanager.yml --storage.path=$data/alertmanager --web.listen-address=127.0.0.1:$ALERTMANAGER_PORT --cluster.listen-address=
exporter: bash scripts/local-exporter.sh
PROCFILE

cat <<INFO

  MLflow UI        http://127.0.0.1:$MLFLOW_PORT
  Pushgateway      http://127.0.0.1:$PUSHGATEWAY_PORT
  Prometheus       http://127.0.0.1:$PROMETHEUS_PORT   (try: mlflow_accuracy)
  Alertmanager     http://127.0.0.1:$ALERTMANAGER_PORT
  Exporter health  http://127.0.0.1:$EXPORTER_PORT/metrics  and  /healthz
  Data in .local-stack/  -  Ctrl-C stops everything.

INFO
exec .venv/bin/honcho -f "$data/Procfile" -d "$PWD" start
