#!/usr/bin/env bash
# Ferry's transport beside ucx_perftest, same transport and message sizes, same run, interleaved
# size by size so both see the same machine load. Prints a markdown table for bench/RESULTS.md.
#   bench/transport/run_transport_bench.sh [BUILD_DIR] [BATCHES] [ROUNDS]
#   (defaults: build, 1,4,16,64,256, 1). With ROUNDS > 1 every cell runs that many times, Ferry
#   and perftest interleaved, and the table shows each column's median over the rounds and its
#   best round (lowest latency, highest bandwidth) as "median / best", ratios of both: on a
#   shared VM both programs' small-message latencies switch between a fast and a slow mode (about
#   3x apart, perftest's too, pinned or not), so the best rounds compare the two in the same mode.
# FERRY_BENCH_FLAGS adds flags to transport_bench (e.g. --rndv-scheme=auto, --eager-limit=N);
# UCX_* variables in the environment reach both programs, but Ferry's own settings (UCX_TLS, its
# rendezvous scheme) take precedence in Ferry.
# Latency: ucx_perftest ucp_am_lat 50th percentile (half a round trip) vs Ferry's median half
# round trip with the Attend request size both ways. Bandwidth: ucx_perftest ucp_am_bw overall
# vs Ferry with 16 requests in flight (MB = 2^20 bytes in both). perftest runs with -e (endpoints
# with error handling, PEER mode), as Ferry's endpoints always are; its endpoints then send
# rendezvous data as active messages on the AM lane, as Ferry's do under its default rendezvous
# scheme (runtime/transport/ucx_node.h). Ferry's protocol column: eager or rndv for the request,
# from the eager limit its endpoint chose (UcxNode::EagerLimit).
# The load average at the start and the end goes to stderr.
set -euo pipefail
build="${1:-build}"
batches="${2:-1,4,16,64,256}"
rounds="${3:-1}"
bench="$build/bin/transport_bench"
[[ -x "$bench" ]] || { echo "build transport_bench first" >&2; exit 1; }
command -v ucx_perftest >/dev/null || { echo "ucx_perftest not found (ucx-utils)" >&2; exit 1; }
export UCX_MM_ERROR_HANDLING=y UCX_WARN_UNUSED_ENV_VARS=n
port=$((20000 + RANDOM % 20000))

perftest() {  # tls test size iters -> the final line's fields
  local tls="$1" test="$2" size="$3" iters="$4"
  port=$((port + 1))
  UCX_TLS="$tls" timeout 120 ucx_perftest -p "$port" -e >/dev/null 2>&1 &
  local server=$!
  sleep 0.3
  UCX_TLS="$tls" timeout 120 ucx_perftest 127.0.0.1 -p "$port" -t "$test" -s "$size" \
    -n "$iters" -w $((iters / 10 + 1)) -e -f 2>/dev/null | awk 'NF == 8 && $1 ~ /^[0-9]+$/' | tail -1
  wait "$server" 2>/dev/null || true
}

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : "nan") }'; }
lowest() { tr ' ' '\n' | grep -v '^$' | sort -g | head -1; }
highest() { tr ' ' '\n' | grep -v '^$' | sort -g | tail -1; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }'; }

echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "| transport | batch | request bytes | Ferry protocol | Ferry attend RTT us | Ferry one-way us | perftest am_lat us | latency ratio | Ferry MB/s | perftest am_bw MB/s | bandwidth ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for tls in tcp sm,tcp; do
  for batch in ${batches//,/ }; do
    iters=$(( batch <= 16 ? 300 : 300 * 16 / batch ))
    (( iters < 20 )) && iters=20
    attends="" oneways="" bws="" p_lats="" p_bws=""
    for (( round = 0; round < rounds; ++round )); do
      line="$("$bench" --tls="$tls" --batches="$batch" --iters="$iters" ${FERRY_BENCH_FLAGS:-} 2>/dev/null | grep '^ferry')"
      request="$(sed -E 's/.*request=([0-9]+).*/\1/' <<<"$line")"
      eager_limit="$(sed -E 's/.*eager_limit=([0-9]+).*/\1/' <<<"$line")"
      attends+=" $(sed -E 's/.*attend_rtt_us=([0-9.]+).*/\1/' <<<"$line")"
      oneways+=" $(sed -E 's/.*oneway_us=([0-9.]+).*/\1/' <<<"$line")"
      bws+=" $(sed -E 's/.*bw_MBps=([0-9.]+).*/\1/' <<<"$line")"
      lat_fields=($(perftest "$tls" ucp_am_lat "$request" "$iters"))
      bw_fields=($(perftest "$tls" ucp_am_bw "$request" "$iters"))
      p_lats+=" ${lat_fields[1]:-}"
      p_bws+=" ${bw_fields[5]:-}"
    done
    attend="$(median <<<"$attends")" oneway="$(median <<<"$oneways")" bw="$(median <<<"$bws")"
    p_lat="$(median <<<"$p_lats")" p_bw="$(median <<<"$p_bws")"
    oneway_best="$(lowest <<<"$oneways")" p_lat_best="$(lowest <<<"$p_lats")"
    bw_best="$(highest <<<"$bws")" p_bw_best="$(highest <<<"$p_bws")"
    if (( request <= eager_limit )); then protocol=eager; else protocol=rndv; fi
    echo "| $tls | $batch | $request | $protocol | $attend | $oneway / $oneway_best | $p_lat / $p_lat_best | $(ratio "$oneway" "$p_lat") / $(ratio "$oneway_best" "$p_lat_best") | $bw / $bw_best | $p_bw / $p_bw_best | $(ratio "$p_bw" "$bw") / $(ratio "$p_bw_best" "$bw_best") |"
  done
done
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
