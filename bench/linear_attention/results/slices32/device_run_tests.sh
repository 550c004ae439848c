#!/bin/bash
# Linear attention with 32-column slices at d = 64 and its merged backward: the GPU tests, the
# sanitizers on the gradient tests, and the float64 PyTorch gradient check.
set -u
B=.gpu-lin2
source $B/env.sh
timeout 200 $B/bin/linear_attention_test > $OUT/test.log 2>&1; echo "test rc $?"
grep -h "OK \]\|FAILED\|PASSED" $OUT/test.log | head -14
timeout 150 compute-sanitizer --tool memcheck $B/bin/linear_attention_test \
    --gtest_filter='*GradientsMatchTheCpuBackward*:*ExtremeMagnitudeGradients*:*ForwardMatchesFloat64*' > $OUT/memcheck.log 2>&1
echo "memcheck rc $?"; grep -h "ERROR SUMMARY" $OUT/memcheck.log
timeout 150 compute-sanitizer --tool racecheck $B/bin/linear_attention_test \
    --gtest_filter='*GradientsMatchTheCpuBackward*' > $OUT/racecheck.log 2>&1
echo "racecheck rc $?"; grep -h "RACECHECK SUMMARY" $OUT/racecheck.log
export PYTHONPATH=$PWD/bench/linear_attention FERRY_EXT_BUILD_DIR=/tmp/fe
mkdir -p /tmp/fe
timeout 150 python3 bench/linear_attention/test_grad.py > $OUT/grad.log 2>&1; echo "grad rc $?"
tail -5 $OUT/grad.log
