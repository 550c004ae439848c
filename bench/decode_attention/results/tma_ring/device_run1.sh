#!/bin/bash
# Device call: the copy-engine (TMA) ring against main: tests first (stop if they fail), then
# the interleaved comparison with sanitizers.
set -u
B=.gpu-lean4
source $B/env.sh
timeout 120 $B/bin/lean_attention_test_tma > $OUT/test_tma.log 2>&1; rc=$?
echo "test tma rc $rc"; grep -h "PASSED\|FAILED\|Failure\|error" $OUT/test_tma.log | head -20
timeout 120 $B/bin/lean_attention_test_main > $OUT/test_main.log 2>&1; echo "test main rc $?"
grep -h "PASSED\|FAILED" $OUT/test_main.log | head -3
if [ $rc -ne 0 ]; then tail -40 $OUT/test_tma.log; exit 1; fi
TEST=tma bash bench/decode_attention/compare_builds.sh $B main tma 2>&1 | tee $OUT/compare.txt
