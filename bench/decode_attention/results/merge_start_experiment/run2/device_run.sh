#!/bin/bash
# Device run 2: benches of base / bit-exact merge / tree merge builds, peers, tests + sanitizers of both merges.
set -u
source .gpu-lean/env.sh
L=/tmp/logs; mkdir -p $L
B=.gpu-lean/bin
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $L/smi.txt 2>&1
T0=$(date +%s)
for v in base exact tree base2 exact2 tree2; do
  $B/lean_decode_bench_${v%2} --iters 50 --csv $L/ours_$v.csv > $L/bench_$v.log 2>&1
  echo "bench $v done at $(( $(date +%s) - T0 )) s"
done
PYTHONUNBUFFERED=1 timeout 150 python3 .gpu-lean/peers.py --ours $L/ours_exact.csv --table $L/table.md --png $L/roofline.png > $L/peers.log 2>&1
echo "peers done at $(( $(date +%s) - T0 )) s"
for v in exact tree; do
  timeout 90 $B/lean_attention_test_$v > $L/test_$v.log 2>&1
  echo "test $v rc $? at $(( $(date +%s) - T0 )) s"
  timeout 60 compute-sanitizer --tool memcheck --leak-check full $B/lean_attention_test_$v \
    --gtest_filter='*EveryHeadDim*:*GroupSizes*:*KvRanges*:*BadDevice*:*RejectsBad*:*LongContext512k*' > $L/memcheck_$v.log 2>&1
  echo "memcheck $v rc $? at $(( $(date +%s) - T0 )) s"
  timeout 60 compute-sanitizer --tool racecheck $B/lean_attention_test_$v \
    --gtest_filter='*GroupSizes*:*KvRanges*:*EveryHeadDim*' > $L/racecheck_$v.log 2>&1
  echo "racecheck $v rc $? at $(( $(date +%s) - T0 )) s"
done
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L/smi.txt 2>&1
tar czf $OUT/logs.tgz -C /tmp logs
cp $L/roofline.png $OUT/ 2>/dev/null
for v in exact tree; do echo "== $v"; grep -h "PASSED\|FAILED\|tests ran" $L/test_$v.log; grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|PASSED\|FAILED" $L/memcheck_$v.log $L/racecheck_$v.log; done
for v in base exact tree; do grep -h "digest" $L/bench_$v.log | sed 's/host.*digest/digest/' > /tmp/d_$v; done
echo "digest diffs base vs exact:"; diff /tmp/d_base /tmp/d_exact && echo none
echo "digest diffs base vs tree:"; diff /tmp/d_base /tmp/d_tree | head -6
for v in base exact tree base2 exact2 tree2; do echo "== $v"; cut -d, -f8 $L/ours_$v.csv | tail -n +2 | tr '\n' ' '; echo; done
grep "ours" $L/peers.log
