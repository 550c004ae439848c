#!/bin/bash
# Device call 5: two consumer warpgroups (alternate tiles); tests with both kernels, sanitizers on
# the new one, both kernels timed (compare_builds.sh, two rounds).
set -u
B=.gpu-wg
source $B/env.sh
T=$B/bin/lean_attention_test_tma
timeout 240 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
timeout 150 compute-sanitizer --tool memcheck $T \
  --gtest_filter='*EveryHeadDim*:*BlockSizes*:*PoolRows*:*BadDevice*:*ManySequences*:*Graph*' > $OUT/memcheck_tma.log 2>&1
echo "memcheck rc $?"
timeout 120 compute-sanitizer --tool racecheck $T --gtest_filter='*GroupSizes*:*EveryHeadDim*:*ManySequences*' > $OUT/racecheck_tma.log 2>&1
echo "racecheck rc $?"
ROUNDS=2 bash bench/decode_attention/compare_builds.sh $B mma stream tma 2>&1 | tail -17 | tee $OUT/compare.txt
grep -h "PASSED\|FAILED\|Failure" $OUT/test_tma.log | head -8
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" $OUT/memcheck_tma.log $OUT/racecheck_tma.log
