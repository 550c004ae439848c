#!/bin/bash
# Where the linear-attention core kernels spend their time, on the GPU machine: one normalised
# elu + 1 forward + backward (B=4, N=8192, H=16, d=128, bf16) under ncu (--clock-control none),
# every kernel of the step with its duration, throughput, occupancy and warp-stall breakdown, then
# the SASS lines with the most stall samples per kernel (source page). Run from a folder holding
# repo/ (this repository's kernels/ and bench/linear_attention/):
#   OUT=<dir> [PROFILE_SHAPE="4 8192 16 128"] bash repo/bench/linear_attention/profile_core.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD/bench/linear_attention" PYTHONUNBUFFERED=1
export FERRY_EXT_BUILD_DIR=${FERRY_EXT_BUILD_DIR:-/tmp/ferry_linear_ext}
mkdir -p "$FERRY_EXT_BUILD_DIR"
read -r B N H D <<< "${PROFILE_SHAPE:-4 8192 16 128}"
cat > /tmp/one_step.py <<PY
import torch, ferry_linear_attn as f
f.extension()
q, k, v = [(torch.randn($B, $N, $H, $D, device="cuda") * $D ** -0.5).bfloat16().requires_grad_() for _ in range(3)]
dout = torch.randn($B, $N, $H, $D, device="cuda").bfloat16()
for _ in range(2):
    f.linear_attention(q, k, v, "elu_plus_one", True).backward(dout)
torch.cuda.synchronize()
PY
python3 /tmp/one_step.py || exit 1  # builds the extension outside the profile
timeout 240 ncu --clock-control none --kernel-name regex:Linear \
    --launch-skip 5 --launch-count 5 \
    --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis \
    -f -o /tmp/core python3 /tmp/one_step.py > "$OUT/ncu_run.log" 2>&1
echo "ncu rc=$?"
ncu -i /tmp/core.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
ncu -i /tmp/core.ncu-rep --page source --csv --print-source sass > "$OUT/ncu_source.csv" 2>&1
grep -E "^  [A-Za-z_].*\(|Duration|Compute \(SM\) Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Warp Cycles Per Issued|Issued Warp Per|No Eligible" \
    "$OUT/ncu_details.txt" | head -60
