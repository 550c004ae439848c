#!/bin/bash
# Device call 1 for the copy-engine + wgmma kernel: GPU tests with each kernel, sanitizers on
# the new one, then both kernels timed in the same process tree (compare_builds.sh).
set -u
B=.gpu-wg
source $B/env.sh
T=$B/bin/lean_attention_test_tma
timeout 240 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
FERRY_LEAN_KERNEL=mma_sync timeout 240 $T > $OUT/test_mma.log 2>&1; echo "test mma rc $?"
timeout 150 compute-sanitizer --tool memcheck $T \
  --gtest_filter='*EveryHeadDim*:*BlockSizes*:*PoolRows*:*BadDevice*:*ManySequences*:*Graph*' > $OUT/memcheck_tma.log 2>&1
echo "memcheck rc $?"
timeout 90 compute-sanitizer --tool racecheck $T --gtest_filter='*GroupSizes*:*EveryHeadDim*' > $OUT/racecheck_tma.log 2>&1
echo "racecheck rc $?"
ROUNDS=2 bash bench/decode_attention/compare_builds.sh $B mma tma 2>&1 | tail -30 | tee $OUT/compare.txt
grep -h "PASSED\|FAILED\|Failure\|error" $OUT/test_tma.log | head -20
grep -h "PASSED\|FAILED" $OUT/test_mma.log | head -5
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" $OUT/memcheck_tma.log $OUT/racecheck_tma.log
