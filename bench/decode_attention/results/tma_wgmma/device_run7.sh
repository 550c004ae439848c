#!/bin/bash
# Device call 7: two consumer warpgroups passing the "full" waits in tile order (call 6: a group
# could pass a parity wait on a stage's older phase). Tests, sanitizers, both kernels timed.
set -u
B=.gpu-wg
source $B/env.sh
T=$B/bin/lean_attention_test_tma
timeout 150 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
grep -h "PASSED\|FAILED" $OUT/test_tma.log | head -8
timeout 120 compute-sanitizer --tool racecheck $T --gtest_filter='*GroupSizes*:*Deterministic*:*ManySequences*' > $OUT/racecheck_tma.log 2>&1
echo "racecheck rc $?"
timeout 150 compute-sanitizer --tool memcheck $T \
  --gtest_filter='*EveryHeadDim*:*BlockSizes*:*PoolRows*:*BadDevice*:*ManySequences*:*Graph*:*Deterministic*' > $OUT/memcheck_tma.log 2>&1
echo "memcheck rc $?"
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" $OUT/memcheck_tma.log $OUT/racecheck_tma.log
ROUNDS=2 timeout 200 bash bench/decode_attention/compare_builds.sh $B mma stream tma 2>&1 | tail -17 | tee $OUT/compare.txt
