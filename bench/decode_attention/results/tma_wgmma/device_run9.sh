#!/bin/bash
# Device call 9: where the two-group kernel's time goes (ncu source page, stall samples by SASS
# line) on b64 d64 and b8 d128, the mma.sync kernel on b64 d64 beside it.
set -u
B=.gpu-wg
source $B/env.sh
SECT="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis"
i=0
for spec in "tma|b64 hq32 hkv8 L4096 d64" "tma|b8 hq32 hkv8 L32768 d128" "mma|b64 hq32 hkv8 L4096 d64"; do
  k=${spec%%|*}; row=${spec#*|}; i=$((i+1))
  timeout 150 ncu --clock-control none --kernel-name regex:LeanDecode --launch-skip 20 --launch-count 1 $SECT \
      -f -o /tmp/p$i $B/bin/lean_decode_bench_$k --only "$row" --iters 5 > $OUT/ncu_run_$i.log 2>&1
  ncu -i /tmp/p$i.ncu-rep --page details > $OUT/ncu_details_$i.txt 2>&1
  ncu -i /tmp/p$i.ncu-rep --page source --csv --print-source sass > $OUT/ncu_source_$i.csv 2>&1
  echo "== $k $row"
  grep -E "DRAM Throughput|Duration|Issued Warp Per|No Eligible" $OUT/ncu_details_$i.txt | head -4
  python3 bench/linear_attention/sass_hotspots.py $OUT/ncu_source_$i.csv 2>&1 | head -30 > $OUT/hotspots_$i.txt
done
