#!/bin/bash
# Device call: head-switch variants (main, sw, sw1), tests of sw1 with sanitizers, tests of sw,
# then the page-size diagnostic on sw1.
set -u
B=.gpu-lean3
source $B/env.sh
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv > $OUT/smi.txt 2>&1
TEST=sw1 bash bench/decode_attention/compare_builds.sh $B main sw sw1 2>&1 | tee $OUT/compare.txt
timeout 120 $B/bin/lean_attention_test_sw > $OUT/test_sw.log 2>&1; echo "test sw rc $?"
grep -h "PASSED\|FAILED" $OUT/test_sw.log | head -3
for bs in 64 128 256; do
  $B/bin/lean_decode_bench_sw1 --iters 50 --only " hq32 " --uniform-block-size $bs --csv $OUT/page_$bs.csv > $OUT/page_$bs.log 2>&1
done
for bs in 64 128 256; do echo "== page $bs"; cut -d, -f1,5,8 $OUT/page_$bs.csv; done
