#!/bin/bash
# The checks of final_check.sh without the timings (run tool, carry .gpu-lin90): the gtest, the
# sanitizers on the forward tests, the torch binding's float64 gradient test. Logs under $OUT.
(
  cd .gpu-lin90 && source env.sh
  F='*ForwardMatchesFloat64*:*GqaGroups*:*ChunkedPrefill*'
  timeout 240 ./bin/linear_attention_test > $OUT/test.log 2>&1; echo "test rc $?" >> $OUT/summary.txt
  timeout 120 compute-sanitizer --tool memcheck ./bin/linear_attention_test --gtest_filter="$F" > $OUT/memcheck.log 2>&1
  echo "memcheck rc $? $(grep -c 'ERROR SUMMARY: 0' $OUT/memcheck.log)" >> $OUT/summary.txt
  timeout 150 compute-sanitizer --tool racecheck ./bin/linear_attention_test --gtest_filter='*ForwardMatchesFloat64*' > $OUT/racecheck.log 2>&1
  echo "racecheck rc $? $(grep -c 'RACECHECK SUMMARY: 0' $OUT/racecheck.log)" >> $OUT/summary.txt
)
export PYTHONPATH=$PWD/bench/linear_attention FERRY_EXT_BUILD_DIR=/tmp/fe PYTHONUNBUFFERED=1
mkdir -p /tmp/fe
timeout 300 python3 bench/linear_attention/test_grad.py > $OUT/grad.log 2>&1
echo "test_grad rc $?" >> $OUT/summary.txt
nvidia-smi --query-gpu=name --format=csv,noheader
cat $OUT/summary.txt
