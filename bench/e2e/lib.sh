# Shared by the end-to-end benchmark scripts (sourced, not run): a free port, waiting for a
# coordinator and its workers, one load run through the CLI, and reading its JSON summary.
# Needs $bin (the folder of ferry, ferry-coordinator, ferry-worker).

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# $1 address, $2 workers expected READY (0: the coordinator answers at all). Bounded:
# FERRY_READY_TIMEOUT_S seconds (20 by default; a large model takes longer to load).
wait_ready() {
  for _ in $(seq 1 $((${FERRY_READY_TIMEOUT_S:-20} * 10))); do
    if [ "$2" -eq 0 ]; then
      "$bin/ferry" cluster status --coordinator="$1" --timeout-ms=300 >/dev/null 2>&1 && return 0
    else
      [ "$("$bin/ferry" cluster status --coordinator="$1" --timeout-ms=300 2>/dev/null |
           grep -c READY)" -ge "$2" ] && return 0
    fi
    sleep 0.1
  done
  echo "cluster at $1 did not come up" >&2
  return 1
}

# $1 address; $requests $concurrency $max_tokens from the caller -> one JSON summary line.
run_load() {
  "$bin/ferry" generate --coordinator="$1" --prompt-ids=1,17,42,99,7,3,250,11 \
    --max-tokens="$max_tokens" --ignore-eos --requests="$requests" \
    --concurrency="$concurrency" --json
}

# $1 JSON text, $2 key.
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])" "$1" "$2"; }
