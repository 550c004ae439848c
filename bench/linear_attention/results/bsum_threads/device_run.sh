#!/bin/bash
# B = w^T V' on three threads per column (bsum) against HEAD (waves); then the tests.
set -u
B=.gpu-lt3
source $B/env.sh
timeout 200 $B/bin/linear_attention_test > $OUT/test.log 2>&1; echo "test rc $?"; grep -h "PASSED\|FAILED" $OUT/test.log | head -3
for round in 1 2; do
  for cfg in "4 8192 128" "4 32768 128" "8 8192 128" "4 8192 64" "8 8192 64" "8 32768 64" "1 8192 128"; do
    set -- $cfg
    for v in waves bsum; do
      echo "== round $round B=$1 N=$2 d=$3 $v"
      LINEAR_TIMING_B=$1 timeout 60 $B/bin/timing_$v $2 $3 0 15
    done
  done
done > $OUT/timing.log 2>&1
python3 - $OUT/timing.log <<'PY'
import re, sys, collections
cur = None; t = collections.defaultdict(list)
for line in open(sys.argv[1]):
    m = re.match(r"== round \d B=(\d+) N=(\d+) d=(\d+) (\w+)", line)
    if m: cur = m.groups(); continue
    m = re.search(r"map=(\S+) N=\d+ fwd ([\d.]+) bwd ([\d.]+) total ([\d.]+) ms \| mean\|out\| (\S+) dq (\S+) dk (\S+) dv (\S+)", line)
    if m and cur: t[cur[:3] + (m.group(1), cur[3])].append((float(m.group(2)), float(m.group(3)), float(m.group(4)), m.group(5, 6, 7, 8)))
for k in sorted({k[:4] for k in t}, key=lambda k: (int(k[0]), int(k[2]), int(k[1]), k[3])):
    a, b = t[k + ("waves",)], t[k + ("bsum",)]
    mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)
    print(f"B={k[0]} N={k[1]:>5} d={k[2]:>3} {k[3]:4}  fwd {mean(a,0):.3f} -> {mean(b,0):.3f} ({100*(mean(b,0)/mean(a,0)-1):+.1f}%)  "
          f"bwd {mean(a,1):.3f} -> {mean(b,1):.3f} ({100*(mean(b,1)/mean(a,1)-1):+.1f}%)  total {100*(mean(b,2)/mean(a,2)-1):+.1f}%  | {a[0][3]} vs {b[0][3]}")
PY
timeout 150 compute-sanitizer --tool memcheck $B/bin/linear_attention_test \
    --gtest_filter='*GradientsMatchTheCpuBackward*:*LongSequenceGradientsAcrossSegments*:*ForwardMatchesFloat64*' > $OUT/memcheck.log 2>&1
grep -h "ERROR SUMMARY" $OUT/memcheck.log
timeout 120 compute-sanitizer --tool racecheck $B/bin/linear_attention_test \
    --gtest_filter='*GradientsMatchTheCpuBackward*:*LongSequenceGradientsAcrossSegments*' > $OUT/racecheck.log 2>&1
grep -h "RACECHECK SUMMARY" $OUT/racecheck.log
