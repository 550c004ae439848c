#!/usr/bin/env bash
# End-to-end generation throughput on one host: the same load (M jobs over N concurrent streams)
# against a coordinator with in-process attention (the baseline, measured in the same run) and
# against a coordinator whose attention runs on W workers over UCX (loopback; tcp unless
# --ucx-tls says otherwise, e.g. sm,tcp for shared memory with tcp for wire-up).
# Prints one row per mode and the ratio to the baseline.
#
#   bench/e2e/cluster_throughput.sh [--model=DIR] [--requests=64] [--concurrency=16]
#                                   [--max-tokens=64] [--workers=2] [--device=cpu|cuda:N]
#                                   [--kv-capacity=BYTES] [--max-batch=N] [--ucx-tls=tcp]
# --device puts the coordinator's dense layers, the baseline's attention and the workers on that
# device (all workers share it). Needs build/bin/{ferry,ferry-coordinator,ferry-worker}
# (FERRY_BUILD_DIR to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="" requests=64 concurrency=16 max_tokens=64 workers=2 device=cpu
kv_capacity=$((256 << 20)) max_batch=64 tls=tcp
for arg in "$@"; do
  case "$arg" in
    --model=*) model=${arg#*=} ;;
    --requests=*) requests=${arg#*=} ;;
    --concurrency=*) concurrency=${arg#*=} ;;
    --max-tokens=*) max_tokens=${arg#*=} ;;
    --workers=*) workers=${arg#*=} ;;
    --device=*) device=${arg#*=} ;;
    --kv-capacity=*) kv_capacity=${arg#*=} ;;
    --max-batch=*) max_batch=${arg#*=} ;;
    --ucx-tls=*) tls=${arg#*=} ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
bin=${FERRY_BUILD_DIR:-build}/bin
work=$(mktemp -d /tmp/ferry-e2e.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
if [ -z "$model" ]; then
  model=$work/tiny
  "$bin/ferry" model make-tiny --out="$model" >/dev/null 2>&1
fi

source bench/e2e/lib.sh

# Baseline: attention in the coordinator's process.
address=127.0.0.1:$(free_port)
"$bin/ferry-coordinator" --model="$model" --listen="$address" --local-attention \
  --device="$device" --kv-capacity="$kv_capacity" --max-batch="$max_batch" >"$work/local.log" 2>&1 &
pids+=($!)
wait_ready "$address" 0
run_load "$address" >/dev/null  # warm-up
local_json=$(run_load "$address")
kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true

# Attention on workers.
address=127.0.0.1:$(free_port)
"$bin/ferry-coordinator" --model="$model" --listen="$address" --ucx-tls="$tls" --device="$device" \
  --max-batch="$max_batch" >"$work/coord.log" 2>&1 &
pids+=($!)
for i in $(seq 1 "$workers"); do
  "$bin/ferry-worker" --coordinator="$address" --ucx-tls="$tls" --kv-capacity="$kv_capacity" \
    --device="$device" \
    >"$work/worker$i.log" 2>&1 &
  pids+=($!)
done
wait_ready "$address" "$workers"
run_load "$address" >/dev/null
workers_json=$(run_load "$address")

base=$(field "$local_json" tokens_per_s)
printf '%-28s %12s %10s %12s %12s %8s\n' mode tokens/s ratio "lat p50 s" "ttft p50 s" failed
for mode in local workers; do
  json=$local_json; label="in-process attention"
  if [ "$mode" = workers ]; then json=$workers_json; label="$workers $device workers (UCX $tls)"; fi
  tps=$(field "$json" tokens_per_s)
  printf '%-28s %12.1f %10.2f %12.3f %12.3f %8s\n' "$label" "$tps" \
    "$(python3 -c "print($tps/$base)")" "$(field "$json" latency_p50_s)" \
    "$(field "$json" ttft_p50_s)" "$(field "$json" failed)"
done
echo "($requests jobs x $max_tokens tokens over $concurrency streams; model $model)"
