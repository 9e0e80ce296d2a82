#!/usr/bin/env bash
# The whole stack on loopback, no Docker: MLflow (SQLite) filled by `exporter generate-sample`
# plus a fresh FAILED demo run, the Pushgateway, Prometheus (the compose stack's prometheus/
# files and rules), Alertmanager (receivers replaced by a local alert sink), the alert sink,
# VictoriaMetrics (the history store: every metric point at its own timestamp, kept for years),
# a local Pramathus receiver (scripts/pramathus_sink.py), and `exporter continuous` pushing
# every 15 s, remote-writing history to VictoriaMetrics and POSTing points to the Pramathus
# receiver: all three outputs, visible locally.
#
# Ports and data (override any in the environment):
#   MLFLOW_PORT=5000 PUSHGATEWAY_PORT=9091 PROMETHEUS_PORT=9090 ALERTMANAGER_PORT=9093
#   EXPORTER_PORT=9877 ALERT_SINK_PORT=9095 VICTORIA_PORT=8428 PRAMATHUS_SINK_PORT=9096
#   LOCAL_STACK_DIR=.local-stack
#   STOP_GRACE=10
# Server logs go to $LOCAL_STACK_DIR/logs/<name>.log; the terminal shows progress, the
# exporter's log, alert lines, and a line starting with READY after the first export cycle.
#
# Stopping: Ctrl-C, SIGTERM or SIGHUP (also when piped into tee) stops every process this
# script started: TERM to all, KILL after STOP_GRACE seconds (a second Ctrl-C kills at once).
# A server that exits on its own stops everything too, and the script exits 1.
#
# How: this script stays in the terminal's foreground process group (it gets Ctrl-C) and
# writes nothing but its own lines there. Every process it starts is put in ONE other process
# group (the "stack group"), led by a watchdog: terminal signals never reach the servers
# directly, so the teardown order is ours, and one `kill -- -GROUP` reaches every process,
# grandchildren included (MLflow's uvicorn). Servers write to log files only, so a dead tee
# cannot kill them with SIGPIPE; the terminal view is a `tail` inside the group. If this
# script is killed with SIGKILL and cannot clean up, the watchdog sees it gone and takes the
# group down.
set -euo pipefail
caller_dir=$PWD
cd "$(dirname "$0")/.."
bash scripts/setup.sh

: "${MLFLOW_PORT:=5000}" "${PUSHGATEWAY_PORT:=9091}" "${PROMETHEUS_PORT:=9090}"
: "${ALERTMANAGER_PORT:=9093}" "${EXPORTER_PORT:=9877}" "${ALERT_SINK_PORT:=9095}"
: "${VICTORIA_PORT:=8428}" "${PRAMATHUS_SINK_PORT:=9096}"
: "${EXPORT_INTERVAL:=15}" "${LOCAL_STACK_DIR:=.local-stack}" "${STOP_GRACE:=10}"
# Prometheus scrapes and evaluates rules this often here (15 s in the compose stack), so the
# demo alert fires within seconds of the first push.
: "${LOCAL_EVAL_INTERVAL:=5s}"

if ! [[ $STOP_GRACE =~ ^[0-9]+$ ]]; then
  echo "STOP_GRACE=$STOP_GRACE is not a number of seconds" >&2
  exit 1
fi
port_vars=(MLFLOW_PORT PUSHGATEWAY_PORT PROMETHEUS_PORT ALERTMANAGER_PORT EXPORTER_PORT
           ALERT_SINK_PORT VICTORIA_PORT PRAMATHUS_SINK_PORT)
declare -A port_owner=()
for var in "${port_vars[@]}"; do
  p=${!var}
  if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then
    echo "$var=$p is not a port number" >&2
    exit 1
  fi
  if [[ -n ${port_owner[$p]:-} ]]; then
    echo "$var and ${port_owner[$p]} are both $p; give each server its own port" >&2
    exit 1
  fi
  port_owner[$p]=$var
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    echo "port $p on 127.0.0.1 is already in use; stop what uses it or set $var to a free port" >&2
    exit 1
  fi
done

# The default lives in the repo (git-ignored); a relative LOCAL_STACK_DIR is taken from where
# the script was called, as a user would expect.
[[ $LOCAL_STACK_DIR == /* || $LOCAL_STACK_DIR == .local-stack ]] ||
  LOCAL_STACK_DIR=$caller_dir/$LOCAL_STACK_DIR
mkdir -p "$LOCAL_STACK_DIR"
data=$(cd "$LOCAL_STACK_DIR" && pwd)
logs=$data/logs
mkdir -p "$data"/{mlflow,tsdb,alertmanager,exporter-state,victoria-metrics} "$logs"
py=$PWD/.venv/bin/python

"$py" scripts/render_prometheus.py "$data/prometheus" --interval "$LOCAL_EVAL_INTERVAL" \
  --pushgateway-port "$PUSHGATEWAY_PORT" --exporter-port "$EXPORTER_PORT" \
  --alertmanager-port "$ALERTMANAGER_PORT" --prometheus-port "$PROMETHEUS_PORT" >/dev/null
"$py" scripts/alert_sink.py render prometheus/alertmanager.yml "$data/alertmanager.yml" \
  --port "$ALERT_SINK_PORT" --group-wait 5s
if ! out=$(amtool check-config "$data/alertmanager.yml" 2>&1); then
  echo "the rendered $data/alertmanager.yml is invalid:" >&2
  echo "$out" >&2
  exit 1
fi

export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PROMETHEUS_GATEWAY=127.0.0.1:$PUSHGATEWAY_PORT
export EXPORTER_HOST=127.0.0.1 EXPORTER_PORT EXPORT_INTERVAL
export EXPORTER_STATE_DIR=$data/exporter-state
# History: every metric point, at its own timestamp, to this stack's VictoriaMetrics.
export REMOTE_WRITE_ENABLED=true
export REMOTE_WRITE_URL=http://127.0.0.1:$VICTORIA_PORT/api/v1/write
# Pramathus: every metric point as JSON batches to the local receiver, with a bearer key made
# for this start (the receiver reads the same variable).
export PRAMATHUS_ENABLED=true
export PRAMATHUS_ENDPOINT=http://127.0.0.1:$PRAMATHUS_SINK_PORT/api/metrics
PRAMATHUS_API_KEY=local-$(od -An -tx1 -N12 /dev/urandom | tr -d ' \n')
export PRAMATHUS_API_KEY
export LOG_FORMAT=${LOG_FORMAT:-console}

# ---------------------------------------------------------------------------------------------
# Supervision
# ---------------------------------------------------------------------------------------------
group=""                # process group id of the stack group (its leader is the watchdog)
declare -A pid=()       # name -> pid of each process started in the group
declare -A running=()   # names that must keep running; exiting is an error
stopping=0
hurry=0

# Live (non-zombie) processes of the stack group. Read from /proc rather than `kill -0 -G`,
# which also counts zombies that a non-reaping PID 1 may leave behind forever.
group_alive() {
  local stat line state pgrp
  for stat in /proc/[0-9]*/stat; do
    read -r line 2>/dev/null <"$stat" || continue
    # Fields after "(comm)" (which may hold spaces): state ppid pgrp ...
    read -r state _ pgrp _ <<<"${line##*) }"
    if [[ $pgrp == "$group" && $state != Z ]]; then
      return 0
    fi
  done
  return 1
}

pgid_of() {
  local line pgrp
  read -r line 2>/dev/null <"/proc/$1/stat" || return 1
  read -r _ _ pgrp _ <<<"${line##*) }"
  printf '%s' "$pgrp"
}

# Tear down the stack group: TERM, wait up to STOP_GRACE s, KILL, wait for the last to go.
# Messages go to stderr: with `| tee`, stdout may be a pipe nobody reads any more.
teardown() {
  ((stopping)) && return 0
  stopping=1
  # A failed echo (terminal gone: EIO) must not end the teardown under errexit.
  set +e
  # Further TERM/HUP/PIPE must not interrupt the teardown half way; a second Ctrl-C means
  # "kill now".
  trap '' TERM HUP PIPE
  trap 'hurry=1' INT
  [[ -n $group ]] || return 0
  group_alive || return 0
  echo "stopping the local stack (TERM; KILL after ${STOP_GRACE}s, Ctrl-C again to kill now)" >&2
  kill -TERM -- "-$group" 2>/dev/null || true
  # A process stopped by the terminal (SIGTTOU with `stty tostop`) acts on TERM only once
  # continued.
  kill -CONT -- "-$group" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_GRACE))
  while group_alive && ((!hurry && SECONDS < deadline)); do
    sleep 0.2 || true
  done
  if group_alive; then
    echo "killing what is still running" >&2
    kill -KILL -- "-$group" 2>/dev/null || true
    deadline=$((SECONDS + 5))
    while group_alive && ((SECONDS < deadline)); do
      sleep 0.1 || true
    done
  fi
  if group_alive; then
    echo "some processes of group $group could not be stopped (ps -g $group)" >&2
  else
    wait 2>/dev/null || true   # reap our children; none can block now
    echo "local stack stopped" >&2
  fi
}

on_signal() {
  teardown
  trap - EXIT
  exit "$1"
}
trap 'teardown' EXIT
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap 'on_signal 129' HUP
trap 'on_signal 141' PIPE

# The group's leader and watchdog. It creates the group (setpgid(0, 0)), then waits for this
# script to go away without cleaning up (kill -9: its parent changes); then it stops the group
# itself: TERM, KILL after STOP_GRACE s. Normally the teardown kills it first.
watchdog='
import os, signal, sys, time
supervisor, grace = int(sys.argv[1]), float(sys.argv[2])
os.setpgid(0, 0)
me = os.getpid()

def others():
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == me and state != "Z":
            return True
    return False

while os.getppid() == supervisor:
    time.sleep(1)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.killpg(me, signal.SIGTERM)
deadline = time.monotonic() + grace
while others() and time.monotonic() < deadline:
    time.sleep(0.2)
os.killpg(me, signal.SIGKILL)
'
"$py" -S -c "$watchdog" "$$" "$STOP_GRACE" </dev/null >/dev/null 2>&1 &
group=$!
for _ in $(seq 100); do
  [[ $(pgid_of "$group") == "$group" ]] && break
  sleep 0.02
done
[[ $(pgid_of "$group") == "$group" ]] || { echo "could not create the process group" >&2; exit 1; }

# spawn NAME [--stdout] CMD...: start CMD in the stack group, output to $logs/NAME.log (or,
# with --stdout, to this script's stdout, for the terminal view).
join='import os, sys; os.setpgid(0, int(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])'
spawn() {
  local name=$1 log=$logs/$1.log
  shift
  if [[ $1 == --stdout ]]; then
    shift
    "$py" -S -c "$join" "$group" "$@" </dev/null 2>>"$logs/supervisor.log" &
  else
    if [[ -f $log ]]; then
      mv -f "$log" "$log.1"   # keep the previous start's log
    fi
    "$py" -S -c "$join" "$group" "$@" </dev/null >"$log" 2>&1 &
  fi
  pid[$name]=$!
  # Until it has joined, a `kill -- -GROUP` would miss it: wait (briefly) for the join.
  for _ in $(seq 100); do
    [[ $(pgid_of "${pid[$name]}" || true) == "$group" ]] && return 0
    kill -0 "${pid[$name]}" 2>/dev/null || return 0   # already gone: reported by check_alive
    sleep 0.02
  done
  echo "$name did not join the process group" >&2
  exit 1
}

# Stop everything and exit 1 when a process that should be running has exited.
check_alive() {
  local name code
  for name in "${!running[@]}"; do
    if ! kill -0 "${pid[$name]}" 2>/dev/null; then
      code=0
      wait "${pid[$name]}" 2>/dev/null || code=$?
      if [[ $name == display ]]; then
        # The terminal view died: its reader (tee, a closed terminal) went away.
        echo "the terminal view exited; stopping" >&2
        exit 1
      fi
      echo "ERROR: $name exited early (status $code). Its log: $logs/$name.log" >&2
      tail -n 15 "$logs/$name.log" 2>/dev/null | sed 's/^/    /' >&2 || true
      exit 1
    fi
  done
}

# http_ok PORT PATH: true when GET http://127.0.0.1:PORT/PATH answers 200. Plain bash, no
# curl: a fresh Debian machine may not have it.
http_ok() {
  local status
  status=$(
    { exec 3<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || exit 1
    printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$2" "$1" >&3
    IFS= read -r -t 3 line <&3 || exit 1
    # Read the rest before closing: closing with unread data resets the connection, and some
    # servers log a traceback for every reset.
    while IFS= read -r -t 3 _ <&3; do :; done
    printf '%s' "$line"
  ) || return 1
  [[ $status == HTTP/1.?" 200"* ]]
}

started=$SECONDS
elapsed() { printf '%ss' "$((SECONDS - started))"; }

# wait_ready NAME PORT PATH TIMEOUT: poll until ready, print a progress line; exit 1 if NAME
# exits or is not ready in TIMEOUT seconds.
wait_ready() {
  local deadline=$((SECONDS + $4))
  until http_ok "$2" "$3"; do
    check_alive
    if ((SECONDS > deadline)); then
      echo "ERROR: $1 not ready on 127.0.0.1:$2 after $4 s. Its log: $logs/$1.log" >&2
      tail -n 15 "$logs/$1.log" 2>/dev/null | sed 's/^/    /' >&2 || true
      exit 1
    fi
    sleep 0.3
  done
  printf '  %-16s ready  (%s)\n' "$1" "$(elapsed)"
}

# run_step NAME TIMEOUT CMD...: a one-shot job in the group (killed with the rest on Ctrl-C);
# exit 1 if it fails or takes longer than TIMEOUT seconds.
run_step() {
  local name=$1 timeout=$2 code=0
  shift 2
  spawn "$name" "$@"
  local deadline=$((SECONDS + timeout))
  while kill -0 "${pid[$name]}" 2>/dev/null; do
    check_alive
    if ((SECONDS > deadline)); then
      echo "ERROR: $name took longer than $timeout s. Its log: $logs/$name.log" >&2
      exit 1
    fi
    sleep 0.3
  done
  wait "${pid[$name]}" || code=$?
  if ((code != 0)); then
    echo "ERROR: $name failed (status $code). Its log: $logs/$name.log" >&2
    tail -n 15 "$logs/$name.log" | sed 's/^/    /' >&2 || true
    exit 1
  fi
}

cat <<INFO

  MLflow UI        http://127.0.0.1:$MLFLOW_PORT
  Pushgateway      http://127.0.0.1:$PUSHGATEWAY_PORT
  Prometheus       http://127.0.0.1:$PROMETHEUS_PORT
  Alertmanager     http://127.0.0.1:$ALERTMANAGER_PORT
  VictoriaMetrics  http://127.0.0.1:$VICTORIA_PORT  (history; HTTP API only, no UI in Debian's build)
  Pramathus sink   http://127.0.0.1:$PRAMATHUS_SINK_PORT/api/metrics  ->  $data/pramathus-points.ndjson
  Exporter         http://127.0.0.1:$EXPORTER_PORT/metrics  /healthz  /readyz
  Alert sink       http://127.0.0.1:$ALERT_SINK_PORT  ->  $data/alerts.log
  Data and logs    $data  (logs/<server>.log)
  Ctrl-C stops everything.

INFO

spawn mlflow env MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false .venv/bin/mlflow server \
  --backend-store-uri "sqlite:///$data/mlflow/mlflow.db" \
  --default-artifact-root "$data/mlflow/artifacts" \
  --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
spawn pushgateway prometheus-pushgateway --web.listen-address="127.0.0.1:$PUSHGATEWAY_PORT" \
  --persistence.file="$data/pushgateway.db"
spawn prometheus prometheus --config.file="$data/prometheus/prometheus.yml" \
  --storage.tsdb.path="$data/tsdb" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
spawn alertmanager prometheus-alertmanager --config.file="$data/alertmanager.yml" \
  --storage.path="$data/alertmanager" --web.listen-address="127.0.0.1:$ALERTMANAGER_PORT" \
  --cluster.listen-address=
spawn alert-sink "$py" scripts/alert_sink.py serve --port "$ALERT_SINK_PORT" \
  --log "$data/alerts.log"
spawn pramathus-sink "$py" scripts/pramathus_sink.py serve --port "$PRAMATHUS_SINK_PORT" \
  --log "$data/pramathus.log" --points "$data/pramathus-points.ndjson"
# The same settings as the compose stack's victoriametrics service: years of retention (the
# default month would also refuse older points), one sample per series and millisecond (a
# batch re-sent after a lost acknowledgement does not count twice). Fresh samples show in
# queries within seconds, not after the default 30 s latency offset.
spawn victoria-metrics victoria-metrics -httpListenAddr="127.0.0.1:$VICTORIA_PORT" \
  -storageDataPath="$data/victoria-metrics" -retentionPeriod=100y -dedup.minScrapeInterval=1ms \
  -search.latencyOffset=1s
for name in mlflow pushgateway prometheus alertmanager alert-sink pramathus-sink \
  victoria-metrics; do
  running[$name]=1
done

# Fast ones first, so each progress line appears about when its server is ready.
wait_ready pushgateway "$PUSHGATEWAY_PORT" /-/ready 30
wait_ready alert-sink "$ALERT_SINK_PORT" / 30
wait_ready pramathus-sink "$PRAMATHUS_SINK_PORT" / 30
wait_ready victoria-metrics "$VICTORIA_PORT" /health 30
wait_ready alertmanager "$ALERTMANAGER_PORT" /-/ready 30
wait_ready prometheus "$PROMETHEUS_PORT" /-/ready 60
wait_ready mlflow "$MLFLOW_PORT" /health 180

# Idempotent for a seed: the first start creates the sample data, later ones find it.
run_step sample 300 .venv/bin/exporter generate-sample
summary=$(grep -E '^created ' "$logs/sample.log" | tail -n 1 || true)
printf '  %-16s %s\n' "sample data" "${summary:-see $logs/sample.log}"
# A FAILED run that ends now, on every start: MlflowRunFailed looks at the last hour only.
run_step demo-failure 120 "$py" scripts/demo_failure.py
demo=$(grep -E '^logged FAILED run ' "$logs/demo-failure.log" | tail -n 1 || true)
printf '  %-16s %s\n' "demo failure" "$demo"

# --port repeats EXPORTER_PORT so `ps` shows which stack this exporter belongs to.
spawn exporter .venv/bin/exporter continuous --port "$EXPORTER_PORT"
running[exporter]=1
# The terminal view: the exporter's log (new file each start) and the alert and Pramathus
# batch lines added from now on (both files keep earlier starts' lines), prefixed by source.
# Inside the stack group, so the teardown stops it too.
alerts_seen=$(stat -c %s "$data/alerts.log" 2>/dev/null || echo 0)
batches_seen=$(stat -c %s "$data/pramathus.log" 2>/dev/null || echo 0)
# shellcheck disable=SC2016  # $1..$5 are the inner script's arguments
spawn display --stdout bash -c '
  tail -n +1 -F "$1" 2>/dev/null | sed -u "s/^/exporter | /" &
  tail -c "+$(($3 + 1))" -F "$2" 2>/dev/null | sed -u "s/^/ALERT    | /" &
  tail -c "+$(($5 + 1))" -F "$4" 2>/dev/null | sed -u "s/^/PRAMATHUS| /" &
  wait' display "$logs/exporter.log" "$data/alerts.log" "$alerts_seen" \
  "$data/pramathus.log" "$batches_seen"
running[display]=1

deadline=$((SECONDS + 180))
hinted=0
until http_ok "$EXPORTER_PORT" /readyz; do
  check_alive
  if ((!hinted && SECONDS > deadline)); then
    echo "the exporter has not completed a cycle after 180 s; see $logs/exporter.log" >&2
    hinted=1
  fi
  sleep 0.5
done
run_name=$(sed -n 's/^logged FAILED run \([^ ]*\) .*/\1/p' <<<"$demo")
# Query URLs over the time the sample's val/loss history spans (hours or days ago: a query
# at "now" would show nothing). The first cycle has remote-written it; bounded wait.
history_urls=$("$py" scripts/history_url.py "http://127.0.0.1:$VICTORIA_PORT" mlflow_val_loss \
  --timeout 30 || true)
export_url=$(sed -n 1p <<<"$history_urls")
range_url=$(sed -n 2p <<<"$history_urls")
points=$(wc -l <"$data/pramathus-points.ndjson" 2>/dev/null || echo 0)
cat <<EOF
READY  first export cycle done ($(elapsed)). Where to look:
  Prometheus    http://127.0.0.1:$PROMETHEUS_PORT/graph?g0.expr=mlflow_accuracy&g0.tab=1
                try: mlflow_accuracy, mlflow_run_info{status="FAILED"}, ALERTS
  History       VictoriaMetrics, every val/loss point at its own time (JSON; no UI here):
                $export_url
                range query over the sample's time span:
                ${range_url:-(no val/loss history yet; see $logs/exporter.log)}
  Pramathus     $points points received so far, one JSON line each: $data/pramathus-points.ndjson
                (batches also shown below as "PRAMATHUS|" lines)
  Alertmanager  http://127.0.0.1:$ALERTMANAGER_PORT  (MlflowRunFailed for ${run_name:-the demo run} within a minute or so)
  Alert log     $data/alerts.log  (also shown below as "ALERT |" lines)
  Grafana       not available locally (no Grafana package); dashboards: docker compose up
  Logs          $logs/
EOF

while :; do
  check_alive
  sleep 1
done
