#!/usr/bin/env bash
# Runs deploy/local/demo.sh, the README's main job, on the CPU with the built binaries on a free
# port, and checks what it shows: both long jobs (one whose worker was killed, one whose worker
# was drained) give the in-process tokens, the killed worker's KV was rebuilt and the drained
# one's moved.  Usage: demo_test.sh BIN_DIR
set -euo pipefail
bin_dir=$1
cd "$(dirname "$0")/../.."
port=""
for _ in $(seq 1 50); do
  candidate=$((20000 + RANDOM % 40000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
done
[ -n "$port" ] || { echo "demo_test: no free port found" >&2; exit 1; }
out=$(FERRY_BIN_DIR=$bin_dir timeout 120 ./deploy/local/demo.sh --device=cpu --port="$port" 2>&1)
echo "$out"
fail=0
expect() {  # expect COUNT PATTERN
  local n
  n=$(grep -c -- "$2" <<<"$out" || true)
  if [ "$n" -ne "$1" ]; then echo "demo_test: expected $1 line(s) with '$2', got $n" >&2; fail=1; fi
}
expect 2 "same tokens as in-process: yes"
expect 1 "kv rebuilt"
expect 1 "moved from draining worker"
expect 1 "32 requests (0 failed)"
expect 1 "demo: done"
exit $fail
