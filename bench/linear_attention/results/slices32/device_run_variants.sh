#!/bin/bash
# d = 64 linear attention: slice width 16 (base) vs 32, separate vs merged backward; B = 4, 8.
set -u
B=.gpu-lt
source $B/env.sh
for round in 1 2; do
  for b in 4 8; do
    for n in 8192 32768; do
      for v in base s32 m64 s32m; do
        echo "== round $round B=$b N=$n $v"
        LINEAR_TIMING_B=$b timeout 60 $B/bin/timing_$v $n 64 0 15
      done
    done
  done
done 2>&1 | tee $OUT/timing.log | grep -v "^$" | tail -120
