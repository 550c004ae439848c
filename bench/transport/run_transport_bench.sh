#!/usr/bin/env bash
# Ferry's transport beside ucx_perftest, same transport and message sizes, same run, interleaved
# size by size so both see the same machine load. Prints a markdown table for bench/RESULTS.md.
#   bench/transport/run_transport_bench.sh [BUILD_DIR] [BATCHES]   (defaults: build, 1,4,16,64,256)
# Latency: ucx_perftest ucp_am_lat 50th percentile (half a round trip) vs Ferry's median half
# round trip with the Attend request size both ways. Bandwidth: ucx_perftest ucp_am_bw overall
# vs Ferry with 16 requests in flight (MB = 2^20 bytes in both). perftest runs with -e (endpoints
# with error handling, PEER mode), as Ferry's endpoints always are: PEER mode leaves cma out, so
# shared-memory rendezvous goes over tcp in both.
set -euo pipefail
build="${1:-build}"
batches="${2:-1,4,16,64,256}"
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

echo "| transport | batch | request bytes | Ferry attend RTT us | Ferry one-way us | perftest am_lat us | latency ratio | Ferry MB/s | perftest am_bw MB/s | bandwidth ratio |"
echo "|---|---|---|---|---|---|---|---|---|---|"
for tls in tcp sm,tcp; do
  for batch in ${batches//,/ }; do
    iters=$(( batch <= 16 ? 300 : 300 * 16 / batch ))
    (( iters < 20 )) && iters=20
    line="$("$bench" --tls="$tls" --batches="$batch" --iters="$iters" 2>/dev/null | grep '^ferry')"
    request="$(sed -E 's/.*request=([0-9]+).*/\1/' <<<"$line")"
    attend="$(sed -E 's/.*attend_rtt_us=([0-9.]+).*/\1/' <<<"$line")"
    oneway="$(sed -E 's/.*oneway_us=([0-9.]+).*/\1/' <<<"$line")"
    bw="$(sed -E 's/.*bw_MBps=([0-9.]+).*/\1/' <<<"$line")"
    lat_fields=($(perftest "$tls" ucp_am_lat "$request" "$iters"))
    bw_fields=($(perftest "$tls" ucp_am_bw "$request" "$iters"))
    p_lat="${lat_fields[1]:-nan}"
    p_bw="${bw_fields[5]:-nan}"
    lat_ratio="$(awk -v a="$oneway" -v b="$p_lat" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }')"
    bw_ratio="$(awk -v a="$p_bw" -v b="$bw" 'BEGIN { if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }')"
    echo "| $tls | $batch | $request | $attend | $oneway | $p_lat | $lat_ratio | $bw | $p_bw | $bw_ratio |"
  done
done
