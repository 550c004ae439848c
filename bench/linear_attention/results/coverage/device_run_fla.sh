#!/bin/bash
# fla's two paths on the same grid (public source carried as .gpu-fla/fla_src, never committed),
# with Ferry elu+1 re-measured in the same process.
set -u
export PYTHONPATH=$PWD/bench/linear_attention:$PWD/.gpu-fla/fla_src FERRY_EXT_BUILD_DIR=/tmp/fe
mkdir -p /tmp/fe $OUT/fla
python3 bench/linear_attention/bench.py --batches 4,8 --ns 8192,32768,65536 \
    --methods "ferry elu+1,fla chunk,fla fused_chunk" --fla-budget 520 --out $OUT/fla 2>&1 \
    | tee $OUT/fla/bench.log | tail -45
