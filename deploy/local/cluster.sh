#!/usr/bin/env bash
# A longer-lived local Ferry cluster: one ferry-coordinator and N CPU ferry-workers on loopback,
# started in the background with pid files and logs under a state directory, so that it outlives
# this shell and can be inspected and stopped later.
#
#   ./deploy/local/cluster.sh up     [--workers N] [--model DIR] [--port P] [--kv-capacity BYTES]
#                                    [-- extra ferry-coordinator flags, e.g. --shard=heads]
#   (options take `--name value` or `--name=value`)
#   ./deploy/local/cluster.sh status
#   ./deploy/local/cluster.sh down
#
# State directory: $FERRY_CLUSTER_DIR (default /tmp/ferry-cluster-$USER): coordinator.pid,
# worker<i>.pid, *.log, address (the coordinator's host:port), model/ when made here.
# Environment: FERRY_BUILD_DIR (default build), FERRY_UCX_TLS (default tcp).
# `up` waits (bounded) for the coordinator's health and every worker's registration and fails,
# stopping what it started, if they do not come; `down` sends SIGTERM (workers first, so they
# leave while the coordinator still runs; a worker holding KV asks to be drained), waits up to
# 15 s, then SIGKILLs what is left. Logs stay in the state directory.
set -euo pipefail
cd "$(dirname "$0")/../.."

state=${FERRY_CLUSTER_DIR:-/tmp/ferry-cluster-${USER:-$(id -un)}}
bin=${FERRY_BUILD_DIR:-build}/bin
tls=${FERRY_UCX_TLS:-tcp}

usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# Stops the processes of the pid files given: SIGTERM to all at once, up to 15 s for all of them
# to exit, then SIGKILL to any left. Removes the pid files; prints how many it stopped.
stop_pid_files() {
  local files=() pids=() file pid
  for file in "$@"; do
    [ -f "$file" ] || continue
    files+=("$file")
    pid=$(cat "$file")
    if kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    fi
  done
  for _ in $(seq 1 150); do
    local running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    [ "$running" -eq 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "cluster: pid $pid did not stop in 15 s; killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "${files[@]}"
  echo "${#pids[@]}"
}

cmd_down() {
  local stopped
  # Workers first, so that they leave while the coordinator still answers them.
  stopped=$(stop_pid_files "$state"/worker*.pid)
  stopped=$((stopped + $(stop_pid_files "$state/coordinator.pid")))
  rm -f "$state/address"
  echo "cluster: down ($stopped processes stopped; logs kept in $state)"
}

cmd_status() {
  if ! alive "$state/coordinator.pid"; then
    echo "cluster: not running (state in $state)"
    return 1
  fi
  local address
  address=$(cat "$state/address")
  echo "cluster: coordinator pid $(cat "$state/coordinator.pid") on $address"
  for file in "$state"/worker*.pid; do
    [ -e "$file" ] || continue
    if alive "$file"; then
      echo "cluster: $(basename "$file" .pid) pid $(cat "$file") running"
    else
      echo "cluster: $(basename "$file" .pid) not running (see $state/$(basename "$file" .pid).log)"
    fi
  done
  "$bin/ferry" cluster status --coordinator="$address" --timeout-ms=2000
}

cmd_up() {
  local workers=2 model="" port="" capacity=$((256 << 20))
  local extra=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --workers=*) workers=${1#*=} ;;
      --model=*) model=${1#*=} ;;
      --port=*) port=${1#*=} ;;
      --kv-capacity=*) capacity=${1#*=} ;;
      --workers|--model|--port|--kv-capacity)
        [ $# -ge 2 ] || { echo "cluster: $1 needs a value" >&2; usage; }
        case "$1" in
          --workers) workers=$2 ;;
          --model) model=$2 ;;
          --port) port=$2 ;;
          --kv-capacity) capacity=$2 ;;
        esac
        shift ;;
      --) shift; extra=("$@"); break ;;
      *) echo "cluster: unknown argument $1" >&2; usage ;;
    esac
    shift
  done
  if alive "$state/coordinator.pid"; then
    echo "cluster: already up (coordinator pid $(cat "$state/coordinator.pid")); run down first" >&2
    exit 1
  fi
  for tool in ferry ferry-coordinator ferry-worker; do
    if [ ! -x "$bin/$tool" ]; then
      echo "cluster: $bin/$tool is missing; build first (cmake --build build)" >&2
      exit 1
    fi
  done
  mkdir -p "$state"
  rm -f "$state"/*.pid "$state"/*.log "$state/address"
  if [ -z "$model" ]; then
    model=$state/model
    [ -f "$model/config.json" ] || "$bin/ferry" model make-tiny --out="$model" >/dev/null
  fi
  if [ -z "$port" ]; then
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  fi
  local address=127.0.0.1:$port
  echo "$address" >"$state/address"

  # setsid: the daemons leave this shell's process group, so a Ctrl-C here does not stop them.
  setsid "$bin/ferry-coordinator" --model="$model" --listen="$address" --ucx-tls="$tls" \
    --heartbeat-ms=200 --dead-after-ms=2000 "${extra[@]}" \
    >"$state/coordinator.log" 2>&1 </dev/null &
  echo $! >"$state/coordinator.pid"
  for i in $(seq 1 "$workers"); do
    setsid "$bin/ferry-worker" --coordinator="$address" --kv-capacity="$capacity" \
      --ucx-tls="$tls" --worker-id="cpu$i" >"$state/worker$i.log" 2>&1 </dev/null &
    echo $! >"$state/worker$i.pid"
  done

  local ready=0
  for _ in $(seq 1 150); do  # 30 s
    if ! alive "$state/coordinator.pid"; then
      echo "cluster: the coordinator exited; its log:" >&2
      tail -n 20 "$state/coordinator.log" >&2
      cmd_down >/dev/null
      exit 1
    fi
    ready=$("$bin/ferry" cluster status --coordinator="$address" --timeout-ms=500 2>/dev/null |
            grep -c READY || true)
    [ "$ready" -ge "$workers" ] && break
    sleep 0.2
  done
  if [ "$ready" -lt "$workers" ]; then
    echo "cluster: $ready of $workers workers registered in 30 s; logs:" >&2
    tail -n 5 "$state"/*.log >&2
    cmd_down >/dev/null
    exit 1
  fi
  echo "cluster: up on $address with $workers workers (model $model, state in $state)"
  echo "cluster: try  $bin/ferry generate --coordinator=$address --prompt-ids=1,2,3 --max-tokens=16"
}

[ $# -ge 1 ] || usage
command=$1
shift
case "$command" in
  up) cmd_up "$@" ;;
  down) cmd_down ;;
  status) cmd_status ;;
  -h|--help|help) usage ;;
  *) echo "cluster: unknown command $command" >&2; usage ;;
esac
