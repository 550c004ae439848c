#!/usr/bin/env bash
# What losing an attention worker costs a running job, on one host: a coordinator and three CPU
# workers (UCX over loopback tcp); each round runs one long job undisturbed (the baseline, same
# run) and one whose worker is killed (SIGKILL) once the job has run for --kill-after-s, with a
# fresh worker started in its place. The killed job's KV is rebuilt on a survivor from its
# tokens. Prints per round: both jobs' wall times, whether the tokens match, and from the
# coordinator's log the time from the failure to the rebuilt KV and the positions read again;
# then the medians.
#
#   bench/e2e/worker_loss.sh [--model=DIR] [--rounds=5] [--max-tokens=2000] [--kill-after-s=0.5]
# Needs build/bin/{ferry,ferry-coordinator,ferry-worker} (FERRY_BUILD_DIR to change).
set -euo pipefail
cd "$(dirname "$0")/../.."
model="" rounds=5 max_tokens=2000 kill_after=0.5
for arg in "$@"; do
  case "$arg" in
    --model=*) model=${arg#*=} ;;
    --rounds=*) rounds=${arg#*=} ;;
    --max-tokens=*) max_tokens=${arg#*=} ;;
    --kill-after-s=*) kill_after=${arg#*=} ;;
    *) echo "unknown argument $arg" >&2; exit 2 ;;
  esac
done
bin=${FERRY_BUILD_DIR:-build}/bin
work=$(mktemp -d /tmp/ferry-e2e.XXXXXX)
declare -A worker_pid
pids=()
cleanup() {
  for p in "${pids[@]}" "${worker_pid[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap "exit 130" INT TERM
if [ -z "$model" ]; then
  model=$work/tiny
  "$bin/ferry" model make-tiny --out="$model" >/dev/null 2>&1
fi
source bench/e2e/lib.sh

address=127.0.0.1:$(free_port)
"$bin/ferry-coordinator" --model="$model" --listen="$address" --ucx-tls=tcp \
  --heartbeat-ms=50 --dead-after-ms=1000 >"$work/coordinator.log" 2>&1 &
pids+=($!)
next_worker=1
start_worker() {
  local id=w$next_worker
  next_worker=$((next_worker + 1))
  "$bin/ferry-worker" --coordinator="$address" --ucx-tls=tcp --kv-capacity=$((256 << 20)) \
    --worker-id="$id" >"$work/$id.log" 2>&1 &
  worker_pid[$id]=$!
}
for _ in 1 2 3; do start_worker; done
wait_ready "$address" 3

job() {  # $1: output file. The last line is the job's JSON summary.
  "$bin/ferry" generate --coordinator="$address" --prompt-ids=1,17,42,99,7,3,250,11 \
    --max-tokens="$max_tokens" --ignore-eos --json >"$1"
}
tokens_of() { grep -o '"token_id":[0-9]*' "$1" | tr '\n' ' '; }
seconds_of() { printf "%.3f" "$(field "$(tail -n 1 "$1")" seconds)"; }  # from its summary
# The worker holding the most sequences (the table's SEQS column), READY ones only.
holder() {
  "$bin/ferry" cluster status --coordinator="$address" --timeout-ms=300 2>/dev/null |
    awk 'NR > 1 && $4 == "READY" && $9 > most { most = $9; id = $1 } END { print id }'
}
# Milliseconds between the last "rebuilding its kv" line and the "kv rebuilt" line after it,
# and the positions read again.
rebuild_figures() {
  python3 - "$work/coordinator.log" <<'EOF'
import re, sys, datetime
lines = open(sys.argv[1]).read().splitlines()
def t(line):
    return datetime.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S.%f")
start = [l for l in lines if "rebuilding its kv" in l][-1]
done = [l for l in lines if "kv rebuilt" in l][-1]
positions = re.search(r"\((\d+) positions", done).group(1)
print("%.1f %s" % ((t(done) - t(start)).total_seconds() * 1e3, positions))
EOF
}

job "$work/warmup.txt"
printf "%-6s %-12s %-12s %-8s %-16s %-10s\n" round "baseline s" "killed s" "tokens" "rebuild ms" "positions"
baseline_times=() killed_times=() rebuild_times=()
for round in $(seq 1 "$rounds"); do
  job "$work/base$round.txt"
  baseline=$(seconds_of "$work/base$round.txt")
  job "$work/killed$round.txt" &
  long=$!
  sleep "$kill_after"
  victim=$(holder)
  kill -9 "${worker_pid[$victim]}"
  wait "${worker_pid[$victim]}" 2>/dev/null || true
  unset "worker_pid[$victim]"
  start_worker
  wait "$long"
  killed=$(seconds_of "$work/killed$round.txt")
  same=no
  [ "$(tokens_of "$work/base$round.txt")" = "$(tokens_of "$work/killed$round.txt")" ] && same=yes
  read -r rebuild_ms positions < <(rebuild_figures)
  printf "%-6s %-12s %-12s %-8s %-16s %-10s\n" "$round" "$baseline" "$killed" "$same" "$rebuild_ms" \
    "$positions"
  baseline_times+=("$baseline") killed_times+=("$killed") rebuild_times+=("$rebuild_ms")
  wait_ready "$address" 3
done
median() { printf "%s\n" "$@" | sort -g | awk '{a[NR] = $1} END { print a[int((NR + 1) / 2)] }'; }
echo "median: baseline $(median "${baseline_times[@]}") s, killed $(median "${killed_times[@]}") s," \
  "failure to rebuilt KV $(median "${rebuild_times[@]}") ms"
