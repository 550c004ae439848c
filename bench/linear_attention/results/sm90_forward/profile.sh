#!/bin/bash
# ncu of the Hopper forward (one launch, B = 4, N = 8192, H = 16, d = 128, elu + 1, bf16) from
# core_timing in the bundle .gpu-lin90; the source page goes to bench/linear_attention/
# sass_hotspots.py on this machine.
cd .gpu-lin90 && source env.sh
timeout 200 ncu --clock-control none --kernel-name regex:Sm90 --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section ComputeWorkloadAnalysis \
    --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum \
    -f -o /tmp/sm90 ./bin/timing_new 8192 128 2 4 > $OUT/ncu_run.log 2>&1
echo "ncu rc=$?"
ncu -i /tmp/sm90.ncu-rep --page details > $OUT/ncu_details.txt 2>&1
ncu -i /tmp/sm90.ncu-rep --page source --csv --print-source sass > $OUT/ncu_source.csv 2>&1
grep -E "Duration|Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Issued Warp Per|No Eligible|gmma|Stall|Executed Ipc" $OUT/ncu_details.txt | head -40
