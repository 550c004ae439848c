#!/bin/bash
# Device call 2: the q-staging fix under test, the peers in the same run, and ncu of both
# kernels on the rows where the copy-engine kernel is furthest behind.
set -u
B=.gpu-wg
source $B/env.sh
T=$B/bin/lean_attention_test_tma
timeout 240 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
SECT="--section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section SourceCounters"
for k in tma mma; do
  for row in "b8 hq32 hkv8 L32768 d64" "b64 hq32 hkv8 L4096 d128"; do
    tag=$(echo "$row" | awk '{print $1"_"$5}')
    timeout 120 ncu --clock-control none --kernel-name regex:LeanDecode --launch-skip 20 --launch-count 1 $SECT \
        $B/bin/lean_decode_bench_$k --only "$row" --iters 5 > $OUT/ncu_${k}_$tag.txt 2>&1
    echo "ncu $k $tag rc $?"
  done
done
ROUNDS=2 PEERS=tma bash bench/decode_attention/compare_builds.sh $B mma tma 2>&1 | tail -22 | tee $OUT/compare.txt
grep -h "PASSED\|FAILED" $OUT/test_tma.log | head -5
for f in $OUT/ncu_*.txt; do
  echo "=== $(basename $f)"
  grep -E "DRAM Throughput|Duration|Issued Warp Per|No Eligible|Registers Per|Dynamic Shared" $f | head -8
done
