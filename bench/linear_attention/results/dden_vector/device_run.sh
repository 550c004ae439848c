#!/bin/bash
# The dden pre-pass reading 8 bytes per lane: linear_attention_test of the tree, then core_timing
# of main (the previous kernels) and vec (this change), alternated.
set -u
source .gpu-lin/env.sh
timeout 150 .gpu-lin/bin/linear_attention_test > $OUT/test.log 2>&1; echo "test rc $?"
grep -h "PASSED\|FAILED" $OUT/test.log | head -3
for n in 8192 8192; do for v in main vec; do echo "== $v N=$n"; .gpu-lin/bin/timing_$v $n 0 0 23; done; done
for v in main vec; do echo "== $v N=32768"; .gpu-lin/bin/timing_$v 32768 128 0 11; done
