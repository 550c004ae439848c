#!/bin/bash
# Device call 13: the consumer groups' busy time split into q K^T (issue to wait), softmax and
# P V (issue to wait), per block, one launch per row (instrumented build, not for timing).
set -u
source .gpu-wg/env.sh
for row in "b64 hq32 hkv8 L4096 d64" "b8 hq32 hkv8 L32768 d128" "b8 hq32 hkv8 L32768 d256"; do
  echo "== $row"
  timeout 60 .gpu-wg/bin/lean_decode_bench_tl --only "$row" --iters 30 2>&1 | grep -E "timeline" | sort -k3 -n | head -4
done
