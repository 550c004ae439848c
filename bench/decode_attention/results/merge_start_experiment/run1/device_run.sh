#!/bin/bash
# Device run for the LeanDecode merge/start experiment: benches of three builds, peers, tests, sanitizers.
set -u
source .gpu-lean/env.sh
L=/tmp/logs; mkdir -p $L
B=.gpu-lean/bin
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv > $L/smi.txt 2>&1
T0=$(date +%s)
for v in base full start base2 full2; do
  $B/lean_decode_bench_${v%2} --iters 50 --csv $L/ours_$v.csv > $L/bench_$v.log 2>&1
  echo "bench $v done at $(( $(date +%s) - T0 )) s"
done
PYTHONUNBUFFERED=1 timeout 150 python3 .gpu-lean/peers.py --ours $L/ours_full.csv --table $L/table.md --png $L/roofline.png > $L/peers.log 2>&1
echo "peers done at $(( $(date +%s) - T0 )) s"
timeout 90 $B/lean_attention_test > $L/test.log 2>&1
echo "test rc $? at $(( $(date +%s) - T0 )) s"
timeout 100 compute-sanitizer --tool memcheck --leak-check full $B/lean_attention_test \
  --gtest_filter='*EveryHeadDim*:*GroupSizes*:*KvRanges*:*BadDevice*:*RejectsBad*' > $L/memcheck.log 2>&1
echo "memcheck rc $? at $(( $(date +%s) - T0 )) s"
timeout 80 compute-sanitizer --tool racecheck $B/lean_attention_test \
  --gtest_filter='*GroupSizes*:*KvRanges*' > $L/racecheck.log 2>&1
echo "racecheck rc $? at $(( $(date +%s) - T0 )) s"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw --format=csv >> $L/smi.txt 2>&1
tar czf $OUT/logs.tgz -C /tmp logs
cp $L/roofline.png $OUT/ 2>/dev/null
grep -h "PASSED\|FAILED\|tests ran" $L/test.log
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY\|PASSED\|FAILED" $L/memcheck.log $L/racecheck.log
grep -h "digest" $L/bench_base.log | sed 's/host.*digest/digest/' > /tmp/d_base
grep -h "digest" $L/bench_full.log | sed 's/host.*digest/digest/' > /tmp/d_full
grep -h "digest" $L/bench_start.log | sed 's/host.*digest/digest/' > /tmp/d_start
echo "digest diffs base vs full:"; diff /tmp/d_base /tmp/d_full && echo none
echo "digest diffs base vs start:"; diff /tmp/d_base /tmp/d_start && echo none
paste <(awk 'NR>2{print $0}' $L/bench_base.log | grep -v digest) /dev/null | head -0
for v in base full start base2 full2; do echo "== $v"; grep -v "digest\|host" $L/bench_$v.log | awk '{print $NF, $(NF-2)}' | tr '\n' ' '; echo; done
grep "ours" $L/peers.log
