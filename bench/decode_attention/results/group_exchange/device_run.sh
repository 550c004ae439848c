#!/bin/bash
# One barrier at a head switch (groups exchange o in their own rows): main (60e511d) vs xchg; tests +
# sanitizers of xchg; peers on xchg's CSV. (Template: ../d64_stages/device_run_final.sh.)

set -u
source .gpu-lean2/env.sh
L=/tmp/logs; mkdir -p $L
B=.gpu-lean2/bin
T0=$(date +%s)
for v in main xchg main2 xchg2 main3 xchg3; do
  $B/lean_decode_bench_${v%[23]} --iters 50 --csv $L/ours_$v.csv > $L/bench_$v.log 2>&1
  echo "bench $v rc $? at $(( $(date +%s) - T0 )) s"
done
timeout 120 $B/lean_attention_test_xchg > $L/test.log 2>&1
echo "test rc $? at $(( $(date +%s) - T0 )) s"
timeout 100 compute-sanitizer --tool memcheck --leak-check full $B/lean_attention_test_xchg \
  --gtest_filter="*EveryHeadDim*:*KvRanges*:*BadDevice*:*BlockSizes*:*RejectsBad*:*ManySequences*" > $L/memcheck.log 2>&1
echo "memcheck rc $? at $(( $(date +%s) - T0 )) s"
timeout 60 compute-sanitizer --tool racecheck $B/lean_attention_test_xchg \
  --gtest_filter='*GroupSizes*:*KvRanges*:*EveryHeadDim*' > $L/racecheck.log 2>&1
echo "racecheck rc $? at $(( $(date +%s) - T0 )) s"
PYTHONUNBUFFERED=1 timeout 150 python3 .gpu-lean2/peers.py --ours $L/ours_xchg.csv --table $L/table.md --png $L/roofline.png > $L/peers.log 2>&1
echo "peers rc $? at $(( $(date +%s) - T0 )) s"
tar czf $OUT/logs.tgz -C /tmp logs
cp $L/roofline.png $OUT/ 2>/dev/null
echo "== tests"; grep -h "PASSED\|FAILED\|tests ran" $L/test.log | head
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|PASSED\|FAILED" $L/memcheck.log $L/racecheck.log
for v in main xchg; do grep -h "digest" $L/bench_$v.log | sed 's/host.*digest/digest/' > /tmp/d_$v; done
echo "digest rows differing main vs xchg: $(diff /tmp/d_main /tmp/d_xchg | grep -c '^<')"
python3 - <<'PY'
import csv
runs = {}
for v in ["main", "xchg", "main2", "xchg2", "main3", "xchg3"]:
    runs[v] = {r["name"]: float(r["ours_ms"]) for r in csv.DictReader(open(f"/tmp/logs/ours_{v}.csv"))}
for name in runs["main"]:
    b = [runs[v][name] for v in ("main", "main2", "main3")]
    n = [runs[v][name] for v in ("xchg", "xchg2", "xchg3")]
    print(f"{name:34} main {' '.join(f'{x:.4f}' for x in b)}  xchg {' '.join(f'{x:.4f}' for x in n)}  {sum(n)/sum(b)-1:+.1%}")
PY
grep -A20 "| shape" $L/table.md | cut -c1-220 | head -18
