#!/usr/bin/env bash
# The main job on one machine: a real local Ferry cluster. Installs and builds what is missing,
# makes a tiny model when no --model is given, starts a coordinator and two attention workers
# (UCX over loopback tcp), streams a generation, runs a small load test, adds a worker while the
# cluster runs, kills the worker holding a long job (the job's KV is rebuilt on the others and
# its tokens stay those of an in-process run), drains the worker holding another (its KV moves),
# and shuts everything down (also on Ctrl-C).
# Devices: where the build has CUDA and a GPU is found (ferry-worker --list-devices), the workers
# hold their KV on GPU 0 and the coordinator runs the dense layers there; otherwise all on the CPU.
#
#   ./deploy/local/demo.sh [--model=DIR] [--prompt=TEXT | --prompt-ids=1,2,3] [--max-tokens=N]
#                          [--workers=N] [--port=P] [--device=cpu|cuda:N]
# Environment: FERRY_BUILD_DIR (default build), FERRY_BIN_DIR (prebuilt binaries: nothing is
# installed or built), FERRY_UCX_TLS (default tcp).
set -euo pipefail
cd "$(dirname "$0")/../.."

model=""
prompt_args=(--prompt-ids=1,17,42,99,7)
max_tokens=32
num_workers=2
device=""
port=${FERRY_DEMO_PORT:-50051}
for arg in "$@"; do
  case "$arg" in
    --model=*) model=${arg#*=} ;;
    --prompt=*) prompt_args=("--prompt=${arg#*=}") ;;
    --prompt-ids=*) prompt_args=("$arg") ;;
    --max-tokens=*) max_tokens=${arg#*=} ;;
    --workers=*) num_workers=${arg#*=} ;;
    --port=*) port=${arg#*=} ;;
    --device=*) device=${arg#*=} ;;
    *) echo "demo: unknown argument $arg" >&2; exit 2 ;;
  esac
done

if [ -n "${FERRY_BIN_DIR:-}" ]; then
  bin=$FERRY_BIN_DIR
else
  build_dir=${FERRY_BUILD_DIR:-build}
  if [ ! -x "$build_dir/bin/ferry-coordinator" ] || [ ! -x "$build_dir/bin/ferry-worker" ]; then
    ./deploy/install-deps.sh
    cmake -S . -B "$build_dir" -G Ninja ${FERRY_CMAKE_ARGS:-}
  fi
  cmake --build "$build_dir" --target ferry ferry-coordinator ferry-worker
  bin=$build_dir/bin
fi
if [ -z "$device" ]; then
  device=cpu
  if "$bin/ferry-worker" --list-devices | grep -qx cuda:0; then device=cuda:0; fi
fi
kind=${device%%:*}  # worker ids: cpu1, cpu2 or cuda1, cuda2
tls=${FERRY_UCX_TLS:-tcp}
work=$(mktemp -d /tmp/ferry-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM  # so that EXIT runs cleanup

if [ -z "$model" ]; then
  model=$work/tiny-llama
  "$bin/ferry" model make-tiny --out="$model" >/dev/null
  echo "demo: made a tiny random Llama checkpoint in $model"
fi

coordinator=127.0.0.1:$port
echo "demo: attention workers and dense layers on $device"
"$bin/ferry-coordinator" --model="$model" --listen="$coordinator" --ucx-tls="$tls" \
  --device="$device" --heartbeat-ms=200 --dead-after-ms=2000 >"$work/coordinator.log" 2>&1 &
pids+=($!)
for i in $(seq 1 "$num_workers"); do
  "$bin/ferry-worker" --coordinator="$coordinator" --kv-capacity=$((256 << 20)) \
    --device="$device" --ucx-tls="$tls" --worker-id="$kind$i" >"$work/worker$i.log" 2>&1 &
  pids+=($!)
done

# Waits (at most 30 s) until N workers are READY; false if they are not.
wait_workers() {
  local ready=0
  for _ in $(seq 1 150); do
    ready=$("$bin/ferry" cluster status --coordinator="$coordinator" --timeout-ms=500 2>/dev/null |
            grep -c READY || true)
    [ "$ready" -ge "$1" ] && return 0
    sleep 0.2
  done
  return 1
}
echo "demo: waiting for $num_workers workers to register with the coordinator on $coordinator"
if ! wait_workers "$num_workers"; then
  echo "demo: workers did not register; logs:" >&2
  tail -n 20 "$work"/*.log >&2
  exit 1
fi
"$bin/ferry" cluster status --coordinator="$coordinator"

echo
echo "demo: one generation, attention on the workers, tokens as they come:"
"$bin/ferry" generate --coordinator="$coordinator" "${prompt_args[@]}" --max-tokens="$max_tokens"

echo
echo "demo: the same job in-process (local attention) for comparison:"
"$bin/ferry" generate --local --model="$model" "${prompt_args[@]}" --max-tokens="$max_tokens" \
  --kv-dtype=bf16 --device="$device"

echo
echo "demo: 32 jobs over 8 concurrent streams:"
"$bin/ferry" generate --coordinator="$coordinator" "${prompt_args[@]}" --max-tokens="$max_tokens" \
  --ignore-eos --requests=32 --concurrency=8

# The worker id holding the most sequences now (the table's SEQS column), or nothing.
holder() {
  "$bin/ferry" cluster status --coordinator="$coordinator" --timeout-ms=500 2>/dev/null |
    awk 'NR > 1 && $4 == "READY" && $9 > most { most = $9; id = $1 } END { print id }'
}
# Waits until a worker reports holding a sequence; prints its id (nothing after 5 s).
wait_holder() {
  local id=""
  for _ in $(seq 1 100); do
    id=$(holder)
    [ -n "$id" ] && break
    sleep 0.05
  done
  echo "$id"
}
long_job() {
  "$bin/ferry" generate --coordinator="$coordinator" "${prompt_args[@]}" --max-tokens=2000 \
    --ignore-eos >"$work/$1.txt"
}
# The first line of a generate output: the tokens.
same_tokens() {
  if [ "$(head -n 1 "$1")" = "$(head -n 1 "$2")" ]; then echo yes; else echo NO; fi
}
"$bin/ferry" generate --local --model="$model" "${prompt_args[@]}" --max-tokens=2000 --ignore-eos \
  --kv-dtype=bf16 --device="$device" >"$work/long_local.txt"

extra=$((num_workers + 1))
echo
echo "demo: a worker joins the running cluster (${kind}$extra):"
"$bin/ferry-worker" --coordinator="$coordinator" --kv-capacity=$((256 << 20)) \
  --device="$device" --ucx-tls="$tls" --worker-id="$kind$extra" >"$work/worker$extra.log" 2>&1 &
pids+=($!)
wait_workers "$extra" || echo "demo: worker $kind$extra did not register" >&2
"$bin/ferry" cluster status --coordinator="$coordinator"

echo
echo "demo: killing the worker that holds a long job (its KV is rebuilt on the others from the"
echo "      job's tokens):"
long_job killed &
long=$!
victim=$(wait_holder)
if [ -n "$victim" ]; then
  victim_pid=${pids[${victim#"$kind"}]}
  kill -9 "$victim_pid"
  wait "$victim_pid" 2>/dev/null || true  # reaped here, so the shell prints no job notice
  echo "worker $victim: killed (SIGKILL)"
fi
wait "$long" || true
tail -n 1 "$work/killed.txt"
echo "same tokens as in-process: $(same_tokens "$work/killed.txt" "$work/long_local.txt")"
grep -h "kv rebuilt" "$work/coordinator.log" | tail -n 1 | sed 's/^.*\] //' || true

echo
echo "demo: draining the worker that holds another long job (its KV moves to the others):"
long_job drained &
long=$!
drained=$(wait_holder)
[ -n "$drained" ] && "$bin/ferry" cluster drain "$drained" --coordinator="$coordinator"
wait "$long"
tail -n 1 "$work/drained.txt"
echo "same tokens as in-process: $(same_tokens "$work/drained.txt" "$work/long_local.txt")"
grep -h "moved from draining worker" "$work/coordinator.log" | tail -n 1 | sed 's/^.*\] //' || true
sleep 2.5
"$bin/ferry" cluster status --coordinator="$coordinator"
echo
echo "demo: done (logs were in $work)"
