#!/bin/bash
# The max-norm map in the merged backward: gtest, sanitizers on the gradient tests, the bench of
# both maps at d = 128 and 64 (elu + 1, whose code did not change, as the control).
set -u
source .gpu-lin/env.sh
L=$OUT/maxnorm; mkdir -p $L /tmp/fe
T0=$(date +%s)
timeout 150 .gpu-lin/bin/linear_attention_test > $L/test.log 2>&1
echo "test rc $? at $(( $(date +%s) - T0 )) s"
f='*GradientsMatchTheCpuBackward*:*ExtremeMagnitudeGradients*'
timeout 150 compute-sanitizer --tool memcheck --error-exitcode 9 .gpu-lin/bin/linear_attention_test --gtest_filter="$f" > $L/memcheck.log 2>&1
echo "memcheck rc $? at $(( $(date +%s) - T0 )) s"
timeout 150 compute-sanitizer --tool racecheck --error-exitcode 9 .gpu-lin/bin/linear_attention_test --gtest_filter="$f" > $L/racecheck.log 2>&1
echo "racecheck rc $? at $(( $(date +%s) - T0 )) s"
PYTHONPATH=$PWD/bench/linear_attention FERRY_EXT_BUILD_DIR=/tmp/fe timeout 200 python3 bench/linear_attention/bench.py \
  --ns 8192,32768 --methods "ferry elu+1,ferry 1+x maxnorm" --out $L > $L/bench.log 2>&1
echo "bench rc $? at $(( $(date +%s) - T0 )) s"
grep -h "PASSED\|FAILED\|Failure" $L/test.log | head
grep -h "grad" $L/test.log | grep -i "max" | head -8
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|PASSED\|FAILED" $L/memcheck.log $L/racecheck.log
grep -E "^ferry" $L/bench.log
