#!/bin/bash
# The final kernel's checks and timings (run tool, carry .gpu-lin90): device_run.sh (gtest,
# sanitizers, core_timing of this commit against the kernels before the Hopper forward), then the
# torch binding's float64 gradient test, which builds the extension into /tmp/fe (reused by
# final_bench.sh while the machine stays warm). Logs under $OUT.
bash bench/linear_attention/results/sm90_forward/device_run.sh > /dev/null 2>&1
export PYTHONPATH=$PWD/bench/linear_attention FERRY_EXT_BUILD_DIR=/tmp/fe PYTHONUNBUFFERED=1
mkdir -p /tmp/fe
timeout 300 python3 bench/linear_attention/test_grad.py > $OUT/grad.log 2>&1
echo "test_grad rc $?" >> $OUT/summary.txt
tail -5 $OUT/grad.log
cat $OUT/summary.txt
