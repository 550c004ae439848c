#!/bin/bash
# Device call 10: descriptors built once per tile, the first q K^T step overwriting (no zeroing).
# Tests, memcheck, both kernels and the stream-only ring timed (three rounds).
set -u
B=.gpu-wg
source $B/env.sh
T=$B/bin/lean_attention_test_tma
timeout 150 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
grep -h "PASSED\|FAILED" $OUT/test_tma.log | head -8
timeout 150 compute-sanitizer --tool memcheck $T \
  --gtest_filter='*EveryHeadDim*:*BlockSizes*:*PoolRows*:*BadDevice*:*ManySequences*:*Graph*:*Deterministic*' > $OUT/memcheck_tma.log 2>&1
grep -h "ERROR SUMMARY" $OUT/memcheck_tma.log
ROUNDS=3 timeout 200 bash bench/decode_attention/compare_builds.sh $B mma stream tma 2>&1 | tail -17 | tee $OUT/compare.txt
