#!/bin/bash
# Device call 15: q as the register A operand of q K^T at d <= 128 (one accumulator chain again).
set -u
B=.gpu-wg
source $B/env.sh
T=$B/bin/lean_attention_test_tma
timeout 150 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
grep -h "PASSED\|FAILED" $OUT/test_tma.log | head -8
timeout 120 compute-sanitizer --tool memcheck $T \
  --gtest_filter='*EveryHeadDim*:*BlockSizes*:*PoolRows*:*BadDevice*:*Graph*:*Deterministic*' > $OUT/memcheck_tma.log 2>&1
grep -h "ERROR SUMMARY" $OUT/memcheck_tma.log
for row in "b64 hq32 hkv8 L4096 d64" "b8 hq32 hkv8 L32768 d128" "b8 hq32 hkv8 L32768 d256"; do
  echo "== $row"
  timeout 60 $B/bin/lean_decode_bench_tl --only "$row" --iters 30 2>&1 | grep -E "timeline" | sort -k3 -n | head -2
done | tee $OUT/timeline_phases.txt
ROUNDS=2 timeout 200 bash bench/decode_attention/compare_builds.sh $B mma stream tma 2>&1 | tail -17 | tee $OUT/compare.txt
