#!/bin/bash
# Wave-aware segment counts (waves) against 32-chunk segments (s32only), elu + 1; then the tests.
set -u
B=.gpu-lt2
source $B/env.sh
for round in 1 2; do
  for cfg in "1 8192 64" "1 32768 64" "1 8192 128" "1 32768 128" "2 8192 128" "4 8192 64" "4 32768 64" "4 8192 128"; do
    set -- $cfg
    for v in s32only waves; do
      echo "== round $round B=$1 N=$2 d=$3 $v"
      LINEAR_TIMING_B=$1 timeout 60 $B/bin/timing_$v $2 $3 2 15
    done
  done
done 2>&1 | tee $OUT/timing.log | grep -v "^$" > /dev/null
python3 - $OUT/timing.log <<'PY'
import re, sys, collections
cur = None; t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"== round \d B=(\d+) N=(\d+) d=(\d+) (\w+)", line)
    if m: cur = m.groups(); continue
    m = re.search(r"fwd ([\d.]+) bwd ([\d.]+) total ([\d.]+)", line)
    if m and cur: t[cur].append(tuple(float(x) for x in m.groups()))
keys = sorted({k[:3] for k in t}, key=lambda k: (int(k[0]), int(k[2]), int(k[1])))
for k in keys:
    a = t[k + ("s32only",)]; b = t[k + ("waves",)]
    ma = sum(x[2] for x in a) / len(a); mb = sum(x[2] for x in b) / len(b)
    print(f"B={k[0]} N={k[1]:>5} d={k[2]:>3}  32-chunk fwd+bwd {ma:7.3f} ms  waves {mb:7.3f} ms  {100*(mb/ma-1):+.1f}%   ({a} | {b})")
PY
timeout 200 $B/bin/linear_attention_test > $OUT/test.log 2>&1; echo "test rc $?"; grep -h "PASSED\|FAILED" $OUT/test.log | head -3
timeout 150 compute-sanitizer --tool memcheck $B/bin/linear_attention_test \
    --gtest_filter='*LongSequenceGradientsAcrossSegments*:*GqaGroupsAndALongSequence*' > $OUT/memcheck.log 2>&1
grep -h "ERROR SUMMARY" $OUT/memcheck.log
