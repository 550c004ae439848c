#!/bin/bash
# Block id read one tile ahead: main (f517e34) vs ahead (d >= 128 one-page tiles, next page's id
# read a tile ahead) vs ahead64 (the same with one-page tiles at d = 64 too), interleaved x3;
# tests + sanitizers of ahead64 (every path).
set -u
source .gpu-lean2/env.sh
L=/tmp/logs; mkdir -p $L
B=.gpu-lean2/bin
T0=$(date +%s)
for r in 1 2 3; do
  for v in main ahead ahead64; do
    $B/lean_decode_bench_$v --iters 50 --csv $L/ours_${v}_$r.csv > $L/bench_${v}_$r.log 2>&1
  done
  echo "round $r at $(( $(date +%s) - T0 )) s"
done
timeout 120 $B/lean_attention_test_ahead64 > $L/test.log 2>&1
echo "test rc $? at $(( $(date +%s) - T0 )) s"
timeout 100 compute-sanitizer --tool memcheck --leak-check full $B/lean_attention_test_ahead64 \
  --gtest_filter='*EveryHeadDim*:*KvRanges*:*BadDevice*:*BlockSizes*:*RejectsBad*' > $L/memcheck.log 2>&1
echo "memcheck rc $? at $(( $(date +%s) - T0 )) s"
timeout 60 compute-sanitizer --tool racecheck $B/lean_attention_test_ahead64 \
  --gtest_filter='*GroupSizes*:*KvRanges*:*BlockSizes*' > $L/racecheck.log 2>&1
echo "racecheck rc $? at $(( $(date +%s) - T0 )) s"
tar czf $OUT/logs.tgz -C /tmp logs
grep -h "PASSED\|FAILED\|tests ran" $L/test.log | head -3
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" $L/memcheck.log $L/racecheck.log
for v in main ahead ahead64; do grep -h "digest" $L/bench_${v}_1.log | sed 's/host.*digest/digest/' > /tmp/d_$v; done
echo "digest rows differing main vs ahead: $(diff /tmp/d_main /tmp/d_ahead | grep -c '^<'), vs ahead64: $(diff /tmp/d_main /tmp/d_ahead64 | grep -c '^<')"
python3 - <<'PY'
import csv
runs = {(v, r): {x["name"]: float(x["ours_ms"]) for x in csv.DictReader(open(f"/tmp/logs/ours_{v}_{r}.csv"))}
        for v in ("main", "ahead", "ahead64") for r in (1, 2, 3)}
for name in runs[("main", 1)]:
    m = [runs[("main", r)][name] for r in (1, 2, 3)]
    out = f"{name:30} main {' '.join(f'{x:.4f}' for x in m)}"
    for v in ("ahead", "ahead64"):
        a = [runs[(v, r)][name] for r in (1, 2, 3)]
        out += f" | {v} {' '.join(f'{x:.4f}' for x in a)} {sum(a)/sum(m)-1:+.1%}"
    print(out)
PY
