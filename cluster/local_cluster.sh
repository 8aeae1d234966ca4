#!/usr/bin/env bash
# A two-node Ray cluster on this machine (a head and a worker node, both on 127.0.0.1, token
# authentication on), to try distributed merges and job submission without any cloud:
#
#   cluster/local_cluster.sh start            # head + one worker node
#   eval "$(cluster/local_cluster.sh env)"    # RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_API_SERVER_ADDRESS, ...
#   ray-merge submit recipe.yml /abs/path/out --workers 2 --wait
#   ray-merge run recipe.yml out --address "$RAY_MERGE_GCS" --workers 2     # or drive it from this shell
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop             # stops this cluster only, not other Ray instances
#
# Settings (environment): RAY_MERGE_CLUSTER_DIR (default /tmp/ray-merge-cluster; keep it short, Ray's
# socket paths live under it), HEAD_CPUS (1), WORKER_CPUS (1), DASHBOARD_PORT (8265), PYTHON (python3).
set -euo pipefail

DIR=${RAY_MERGE_CLUSTER_DIR:-/tmp/ray-merge-cluster}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

load() {
  if [[ ! -f "$DIR/cluster.env" || ! -f "$DIR/cluster.ready" ]]; then
    echo "no cluster in $DIR (run: $0 start)" >&2
    exit 1
  fi
  # shellcheck disable=SC1091
  source "$DIR/cluster.env"
  GCS=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["gcs"])' "$DIR/cluster.ready")
  DASHBOARD=$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["dashboard"])' "$DIR/cluster.ready")
}

cmd_start() {
  if [[ -f "$DIR/cluster.env" ]]; then
    echo "a cluster is already set up in $DIR (stop it first: $0 stop)" >&2
    exit 1
  fi
  mkdir -p "$DIR"
  local token
  token=$("$PYTHON" -c 'import uuid; print(uuid.uuid4().hex)')
  (umask 077 && echo "RAY_AUTH_TOKEN=$token" >"$DIR/cluster.env")
  # its own session: `stop` ends exactly the processes of this cluster
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$token setsid "$PYTHON" "$HERE/local_cluster.py" --dir "$DIR" \
    --head-cpus "${HEAD_CPUS:-1}" --worker-cpus "${WORKER_CPUS:-1}" --dashboard-port "${DASHBOARD_PORT:-8265}" \
    >"$DIR/cluster.log" 2>&1 &
  echo $! >"$DIR/cluster.sid"
  for _ in $(seq 600); do
    [[ -f "$DIR/cluster.ready" ]] && break
    if ! kill -0 "$(cat "$DIR/cluster.sid")" 2>/dev/null; then
      tail -20 "$DIR/cluster.log" >&2
      echo "the cluster did not start; log: $DIR/cluster.log" >&2
      rm -f "$DIR/cluster.env"
      exit 1
    fi
    sleep 0.5
  done
  load
  echo "Ray cluster up: a head and a worker node on 127.0.0.1 (state and logs in $DIR)"
  echo "  GCS:       $GCS        ray-merge run ... --address $GCS --workers 2"
  echo "  dashboard: $DASHBOARD  ray-merge submit ... --address $DASHBOARD"
  echo "  clients need the token and loopback mode: eval \"\$($0 env)\""
}

cmd_env() {
  load
  echo "export RAY_AUTH_MODE=token"
  echo "export RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN"
  echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD"
  echo "export RAY_MERGE_GCS=$GCS"
  # a driver on this machine (ray-merge run --address \$RAY_MERGE_GCS) must see itself on loopback too
  echo "export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0"
}

cmd_status() {
  load
  RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$RAY_AUTH_TOKEN RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 \
    "$PYTHON" -m ray.scripts.scripts status --address "$GCS"
}

cmd_stop() {
  if [[ ! -f "$DIR/cluster.sid" ]]; then
    echo "nothing to stop in $DIR"
    return 0
  fi
  local sid pids
  sid=$(cat "$DIR/cluster.sid")
  # the processes of that session: the holder, gcs_server, raylets, dashboard, workers ...
  pids=$(ps -eo pid=,sid= | awk -v s="$sid" '$2 == s {print $1}' | xargs)
  if [[ -n "$pids" ]]; then
    kill -TERM "$sid" 2>/dev/null || true  # the holder shuts its nodes down
    for _ in $(seq 20); do
      kill -0 "$sid" 2>/dev/null || break
      sleep 0.5
    done
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
  fi
  if [[ -f "$DIR/cluster.env" ]]; then
    rm -rf "$DIR"  # made by `start`: logs, token, Ray's session files
  fi
  echo "stopped the cluster in $DIR"
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) cmd_env ;;
  *)
    echo "usage: $0 start|env|status|stop" >&2
    exit 2
    ;;
esac
