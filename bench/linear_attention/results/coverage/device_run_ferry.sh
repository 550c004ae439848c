#!/bin/bash
# Issue 8's full grid for Ferry (B = 4, 8; d = 64, 128; N = 8k, 32k, 64k) and SDPA causal at 8k,
# on the GPU machine from the repository root (the extension is built here from the tree).
set -u
export PYTHONPATH=$PWD/bench/linear_attention FERRY_EXT_BUILD_DIR=/tmp/fe
mkdir -p /tmp/fe $OUT/ferry $OUT/sdpa
python3 bench/linear_attention/bench.py --batches 4,8 --ns 8192,32768,65536 \
    --methods "ferry elu+1,ferry 1+x maxnorm" --out $OUT/ferry 2>&1 | tee $OUT/ferry/bench.log | tail -40
python3 bench/linear_attention/bench.py --batches 4,8 --ns 8192 --methods "sdpa causal" \
    --out $OUT/sdpa 2>&1 | tee $OUT/sdpa/bench.log | tail -8
