#!/bin/bash
# The linear-attention checks and benchmark, in one call on the GPU machine: the gtest binary,
# compute-sanitizer (memcheck, racecheck) on a small filter that still runs every kernel (split
# into sequence segments), the PyTorch extension build (timed) and its float64 gradient test, the
# segment sweep, the benchmark (fla last, at FLA_SHAPES only, while FLA_BUDGET lasts) and an ncu
# look at the core kernels. At most 8 files come back from $OUT: the sanitizer's output goes to
# test.log.
# Run from a bundle folder holding bin/linear_attention_test (tools/gpu-bundle), repo/ (this
# repository's kernels/ and bench/linear_attention/) and optionally fla_src/ (fla's source):
#   OUT=<dir> [FLA_SHAPES=128:8192] [FLA_BUDGET=s] bash repo/bench/linear_attention/device_run.sh
set -uo pipefail
cd "$(dirname "$0")/../../.."
bundle=$PWD
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu --format=csv,noheader

ok=1
timeout 120 ./bin/linear_attention_test > "$OUT/test.log" 2>&1 || ok=0
grep -E "^\[  (FAILED|PASSED|  OK) |Failure|error|Expected|Which is|seed" "$OUT/test.log" | head -40
stamp "gtest ok=$ok"

filter='*BadArguments*:*DecodeMatchesCpu*:*ExtremeMagnitudeGradients*'
for tool in memcheck racecheck; do
  timeout 75 compute-sanitizer --tool $tool --error-exitcode 9 ./bin/linear_attention_test \
      --gtest_filter="$filter" >> "$OUT/test.log" 2>&1
  stamp "compute-sanitizer $tool rc=$?"
done
grep -E "SUMMARY" "$OUT/test.log"

export PYTHONPATH="$bundle/repo/bench/linear_attention:$bundle/fla_src" PYTHONUNBUFFERED=1
export FERRY_EXT_BUILD_DIR=/tmp/ferry_linear_ext
mkdir -p "$FERRY_EXT_BUILD_DIR"
cd "$bundle/repo"
timeout 130 python3 bench/linear_attention/test_grad.py > "$OUT/grad.log" 2>&1 || ok=0
tail -30 "$OUT/grad.log"
stamp "after gradient test ok=$ok"

timeout 60 python3 bench/linear_attention/segment_sweep.py --out /tmp > "$OUT/sweep.log" 2>&1
stamp "sweep rc=$?"

timeout 130 python3 bench/linear_attention/bench.py --fla-budget "${FLA_BUDGET:-150}" \
    --fla-shapes "${FLA_SHAPES:-}" --out "$OUT" > "$OUT/bench.log" 2>&1
stamp "bench rc=$?"
grep -v "^|" "$OUT/bench.log" | tail -60

cat > /tmp/one_step.py <<'PY'
import torch, ferry_linear_attn as f
q, k, v = [(torch.randn(4, 8192, 16, 128, device="cuda") * 128 ** -0.5).bfloat16().requires_grad_() for _ in range(3)]
f.linear_attention(q, k, v, "elu_plus_one", True).backward(torch.randn(4, 8192, 16, 128, device="cuda").bfloat16())
torch.cuda.synchronize()
PY
timeout 30 ncu --clock-control none --kernel-name regex:LinearCoreKernel --launch-count 2 \
    --section SpeedOfLight --section LaunchStats --section Occupancy python3 /tmp/one_step.py \
    > "$OUT/ncu.txt" 2>&1
stamp "ncu rc=$?"
grep -E "LinearCoreKernel|Duration|Compute \(SM\)|DRAM Throughput|Registers Per|Achieved Occupancy" "$OUT/ncu.txt" | head -20
cat /tmp/segment_sweep.md "$OUT/table.md" 2>/dev/null
