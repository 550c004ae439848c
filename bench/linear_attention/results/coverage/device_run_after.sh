#!/bin/bash
# After 32-column slices at d = 64: Ferry on issue 8's grid (B = 4, 8; d = 64, 128; N = 8k, 32k,
# 64k) and fla fused_chunk (fla's faster path at d = 64 in the run before) at d = 64, one process.
set -u
export PYTHONPATH=$PWD/bench/linear_attention:$PWD/.gpu-fla/fla_src FERRY_EXT_BUILD_DIR=/tmp/fe
mkdir -p /tmp/fe $OUT/after
python3 bench/linear_attention/bench.py --batches 4,8 --ns 8192,32768,65536 \
    --methods "ferry elu+1,ferry 1+x maxnorm,fla fused_chunk" \
    --peer-shapes 64:8192,64:32768,64:65536 --out $OUT/after 2>&1 | tee $OUT/after/bench.log | tail -42
