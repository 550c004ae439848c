#!/usr/bin/env bash
# Micro-batch pipelining end to end: the same load (M jobs over N concurrent streams) against two
# coordinators on one host, each with W attention workers (UCX over loopback tcp): one with
# --micro-batches=1 (the baseline) and one with --micro-batches=K. Both clusters stay up and the
# rounds alternate (baseline, pipelined, baseline, ...), so slow drifts of a shared machine hit
# both alike. Prints every round, then the median and best tokens/s of each and their ratios.
#
#   bench/e2e/micro_batch_throughput.sh [--model=DIR] [--requests=64] [--concurrency=16]
#       [--max-tokens=64] [--workers=2] [--micro-batches=2] [--rounds=5] [--device=cpu|cuda:N]
#       [--kv-capacity=BYTES] [-- coordinator flags]
# --device puts both coordinators' dense layers and all workers on that device.
# Needs build/bin/{ferry,ferry-coordinator,ferry-worker} (FERRY_BUILD_DIR to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="" requests=64 concurrency=16 max_tokens=64 workers=2 micro_batches=2 rounds=5
device=cpu kv_capacity=$((256 << 20))
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --model=*) model=${1#*=} ;;
    --requests=*) requests=${1#*=} ;;
    --concurrency=*) concurrency=${1#*=} ;;
    --max-tokens=*) max_tokens=${1#*=} ;;
    --workers=*) workers=${1#*=} ;;
    --micro-batches=*) micro_batches=${1#*=} ;;
    --rounds=*) rounds=${1#*=} ;;
    --device=*) device=${1#*=} ;;
    --kv-capacity=*) kv_capacity=${1#*=} ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
bin=${FERRY_BUILD_DIR:-build}/bin
work=$(mktemp -d /tmp/ferry-microbatch.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
source bench/e2e/lib.sh
if [ -z "$model" ]; then
  model=$work/tiny
  "$bin/ferry" model make-tiny --out="$model" >/dev/null 2>&1
fi

addresses=()
for k in 1 "$micro_batches"; do
  address=127.0.0.1:$(free_port)
  "$bin/ferry-coordinator" --model="$model" --listen="$address" --ucx-tls=tcp \
    --device="$device" --micro-batches="$k" "${extra[@]}" >"$work/coordinator$k.log" 2>&1 &
  pids+=($!)
  for i in $(seq 1 "$workers"); do
    "$bin/ferry-worker" --coordinator="$address" --ucx-tls=tcp --kv-capacity="$kv_capacity" \
      --device="$device" >"$work/worker$k.$i.log" 2>&1 &
    pids+=($!)
  done
  wait_ready "$address" "$workers"
  run_load "$address" >/dev/null  # warm-up
  addresses+=("$address")
done

declare -A tps
printf '%-6s %-16s %10s %10s %10s %7s\n' round micro-batches tokens/s "lat p50 s" "ttft p50 s" failed
for round in $(seq 1 "$rounds"); do
  for index in 0 1; do
    k=1
    [ "$index" -eq 1 ] && k=$micro_batches
    json=$(run_load "${addresses[$index]}")
    tps[$index]="${tps[$index]:-} $(field "$json" tokens_per_s)"
    printf '%-6s %-16s %10.1f %10.3f %10.3f %7s\n' "$round" "$k" "$(field "$json" tokens_per_s)" \
      "$(field "$json" latency_p50_s)" "$(field "$json" ttft_p50_s)" "$(field "$json" failed)"
  done
done
python3 - "${tps[0]}" "${tps[1]}" "$micro_batches" <<'PY'
import statistics, sys
base = [float(x) for x in sys.argv[1].split()]
piped = [float(x) for x in sys.argv[2].split()]
k = sys.argv[3]
print(f"median tokens/s: 1 micro-batch {statistics.median(base):.1f}, {k} micro-batches "
      f"{statistics.median(piped):.1f}, ratio {statistics.median(piped) / statistics.median(base):.2f}")
print(f"best tokens/s:   1 micro-batch {max(base):.1f}, {k} micro-batches {max(piped):.1f}, "
      f"ratio {max(piped) / max(base):.2f}")
PY
echo "($requests jobs x $max_tokens tokens over $concurrency streams, $workers $device workers each; model $model)"
