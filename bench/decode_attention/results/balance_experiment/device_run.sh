#!/bin/bash
# Multiprocessor balance, device run 1: benches with equal ranges (off) and measured balance (on),
# interleaved; the GPU tests (both balances); sanitizers on the skewed-weight cases; peers.
set -u
source .gpu-bal/env.sh
L=/tmp/logs; mkdir -p $L
B=.gpu-bal/bin
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $L/smi.txt 2>&1
T0=$(date +%s)
for v in off on off2 on2; do
  $B/lean_decode_bench --iters 50 --balance ${v%2} --csv $L/ours_$v.csv > $L/bench_$v.log 2>&1
  echo "bench $v rc $? at $(( $(date +%s) - T0 )) s"
done
timeout 200 $B/lean_attention_test > $L/test.log 2>&1
echo "test rc $? at $(( $(date +%s) - T0 )) s"
timeout 100 compute-sanitizer --tool memcheck --leak-check full $B/lean_attention_test \
  --gtest_filter='*SkewedWeights*EveryHeadDim*:*SkewedWeights*KvRanges*:*SkewedWeights*BadDevice*:*SkewedWeights*ManySequences*:*SkewedWeights*Contended*:*RejectsBadWeights*' > $L/memcheck.log 2>&1
echo "memcheck rc $? at $(( $(date +%s) - T0 )) s"
timeout 60 compute-sanitizer --tool racecheck $B/lean_attention_test \
  --gtest_filter='*SkewedWeights*GroupSizes*:*SkewedWeights*KvRanges*' > $L/racecheck.log 2>&1
echo "racecheck rc $? at $(( $(date +%s) - T0 )) s"
PYTHONUNBUFFERED=1 timeout 150 python3 .gpu-bal/peers.py --ours $L/ours_on.csv --table $L/table.md --png $L/roofline.png > $L/peers.log 2>&1
echo "peers rc $? at $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L/smi.txt 2>&1
tar czf $OUT/logs.tgz -C /tmp logs
cp $L/roofline.png $OUT/ 2>/dev/null
grep -h "balance d=" $L/bench_on.log $L/bench_on2.log
echo "== tests"; grep -h "PASSED\|FAILED\|tests ran\|balance:" $L/test.log | head -20
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|PASSED\|FAILED" $L/memcheck.log $L/racecheck.log
for v in off on; do grep -h "digest" $L/bench_$v.log | sed 's/host.*digest/digest/' > /tmp/d_$v; done
echo "digest rows differing off vs on: $(diff /tmp/d_off /tmp/d_on | grep -c '^<')"
paste -d, <(cut -d, -f1 $L/ours_off.csv) <(cut -d, -f8 $L/ours_off.csv) <(cut -d, -f8 $L/ours_on.csv) <(cut -d, -f8 $L/ours_off2.csv) <(cut -d, -f8 $L/ours_on2.csv) | column -t -s,
grep -A40 "| shape" $L/table.md | cut -c1-200 | head -22
