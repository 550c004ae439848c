#!/bin/bash
# One device call of the copy-engine + wgmma experiment (CALLS.md lists each call's settings and
# the build it ran). Run from the repository root on the GPU machine, with the bundle carried:
#   [TEST=1] [TEST_MMA=1] [MEMCHECK=gtest-filter] [RACECHECK=gtest-filter] \
#   [NCU="build|row;build|row"] [TIMELINE="row;row"] [BUILDS="mma stream tma"] [ROUNDS=2] \
#   [PEERS=build] bash bench/decode_attention/results/tma_wgmma/device_run.sh
# Logs go to $OUT; the bundle (.gpu-wg) holds lean_attention_test_tma, lean_decode_bench_<build>
# (mma: a wrapper setting FERRY_LEAN_KERNEL=mma_sync), lean_decode_bench_tl (timeline build).
set -u
B=${BUNDLE:-.gpu-wg}
source $B/env.sh
T=$B/bin/lean_attention_test_tma
if [ -n "${TEST:-}" ]; then
  timeout 240 $T > $OUT/test_tma.log 2>&1; echo "test tma rc $?"
  grep -h "PASSED\|FAILED" $OUT/test_tma.log | head -8
fi
if [ -n "${TEST_MMA:-}" ]; then
  FERRY_LEAN_KERNEL=mma_sync timeout 240 $T > $OUT/test_mma.log 2>&1; echo "test mma rc $?"
  grep -h "PASSED\|FAILED" $OUT/test_mma.log | head -5
fi
if [ -n "${MEMCHECK:-}" ]; then
  timeout 150 compute-sanitizer --tool memcheck $T --gtest_filter="$MEMCHECK" > $OUT/memcheck_tma.log 2>&1
  grep -h "ERROR SUMMARY" $OUT/memcheck_tma.log
fi
if [ -n "${RACECHECK:-}" ]; then
  timeout 120 compute-sanitizer --tool racecheck $T --gtest_filter="$RACECHECK" > $OUT/racecheck_tma.log 2>&1
  grep -h "RACECHECK SUMMARY" $OUT/racecheck_tma.log
fi
if [ -n "${NCU:-}" ]; then
  SECT="--section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats --section SourceCounters"
  i=0
  IFS=';' read -ra specs <<< "$NCU"
  for spec in "${specs[@]}"; do
    k=${spec%%|*}; row=${spec#*|}; i=$((i+1))
    timeout 150 ncu --clock-control none --kernel-name regex:LeanDecode --launch-skip 20 --launch-count 1 $SECT \
        -f -o /tmp/p$i $B/bin/lean_decode_bench_$k --only "$row" --iters 5 > $OUT/ncu_run_$i.log 2>&1
    ncu -i /tmp/p$i.ncu-rep --page details > $OUT/ncu_details_$i.txt 2>&1
    ncu -i /tmp/p$i.ncu-rep --page source --csv --print-source sass > $OUT/ncu_source_$i.csv 2>&1
    echo "== $k $row"
    grep -E "DRAM Throughput|Duration|Issued Warp Per|No Eligible" $OUT/ncu_details_$i.txt | head -4
    python3 bench/linear_attention/sass_hotspots.py $OUT/ncu_source_$i.csv 2>&1 | head -30 > $OUT/hotspots_$i.txt
  done
fi
if [ -n "${TIMELINE:-}" ]; then
  IFS=';' read -ra rows <<< "$TIMELINE"
  for row in "${rows[@]}"; do
    echo "== $row"
    timeout 60 $B/bin/lean_decode_bench_tl --only "$row" --iters 30 2>&1 | grep -E "timeline" | sort -k3 -n | head -4
  done | tee $OUT/timeline_phases.txt
fi
if [ -n "${BUILDS:-}" ]; then
  ROUNDS=${ROUNDS:-2} timeout 300 bash bench/decode_attention/compare_builds.sh $B $BUILDS 2>&1 | tail -22 | tee $OUT/compare.txt
fi
