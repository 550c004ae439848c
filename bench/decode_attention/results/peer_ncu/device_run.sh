#!/bin/bash
# Launch shape and memory behaviour of SDPA cuDNN and of LeanDecode on two losing rows (ncu).
set -u
B=.gpu-lean5
source $B/env.sh
S=bench/decode_attention/results/peer_ncu
SECT="--section LaunchStats --section Occupancy --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats"
for shape in "64 8 4096 64" "256 8 1024 128"; do
  set -- $shape
  timeout 120 ncu --clock-control none --kernel-name regex:"sdpa|fprop|fmha|flash|attn" --launch-skip 3 --launch-count 1 $SECT \
      python3 $S/one_peer_call.py $shape > $OUT/cudnn_b$1_d$4.txt 2>&1
  echo "cudnn b$1 d$4 rc $?"
done
timeout 120 ncu --clock-control none --kernel-name regex:LeanDecodeKernel --launch-skip 30 --launch-count 1 $SECT \
    $B/bin/lean_decode_bench_main --only "b64 hq32 hkv8 L4096 d64" --iters 5 > $OUT/lean_b64_d64.txt 2>&1
echo "lean b64 rc $?"
timeout 120 ncu --clock-control none --kernel-name regex:LeanDecodeKernel --launch-skip 30 --launch-count 1 $SECT \
    $B/bin/lean_decode_bench_main --only "b256 hq32 hkv8 L1024 d128" --iters 5 > $OUT/lean_b256_d128.txt 2>&1
echo "lean b256 rc $?"
for f in $OUT/*.txt; do
  echo "=== $(basename $f)"
  grep -E "^  [a-zA-Z_0-9:<>, ()]+\(|Grid Size|Block Size|Registers Per|Shared Memory Config|Dynamic Shared|Achieved Occupancy|Theoretical Occupancy|Waves Per SM|DRAM Throughput|Memory Throughput|Duration|L2 Hit Rate|L1/TEX Hit|Mem Busy|Max Bandwidth|Issued Warp|No Eligible|Active Warps Per|Eligible Warps" $f | head -30
done
