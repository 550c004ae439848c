#!/bin/bash
# Issue 8's grid with fla in the same process (fla's public source carried as .gpu-fla/fla_src,
# never committed): Ferry's two maps (the Hopper forward where it serves), fla's chunk and
# fused_chunk paths, within the call's time. Logs under $OUT.
export PYTHONPATH=$PWD/bench/linear_attention:$PWD/.gpu-fla/fla_src FERRY_EXT_BUILD_DIR=/tmp/fe
export PYTHONUNBUFFERED=1
mkdir -p /tmp/fe
timeout 560 python3 bench/linear_attention/bench.py --batches 4,8 --ns 8192,32768 \
    --methods "ferry elu+1,ferry 1+x maxnorm,fla chunk,fla fused_chunk" --fla-budget 380 \
    --out $OUT 2>&1 | tee $OUT/bench.log | tail -40
