#!/bin/bash
# d = 64 with three blocks per SM (__launch_bounds__ min 3: 168 registers, no spills):
# main (75dc2f5: two blocks, 3 stages) vs r3s3 (three blocks, 3 stages) vs r3s4 (three blocks,
# 4 stages), the d = 64 rows, interleaved x3; lean_attention_test of r3s3.
set -u
source .gpu-lean2/env.sh
L=/tmp/logs; mkdir -p $L
for r in 1 2 3; do
  for v in main r3s3 r3s4; do
    .gpu-lean2/bin/lean_decode_bench_$v --iters 50 --only d64 --csv $L/ours_${v}_$r.csv > $L/bench_${v}_$r.log 2>&1
  done
done
timeout 120 .gpu-lean2/bin/lean_attention_test_r3s3 > $L/test.log 2>&1; echo "test rc $?"
tar czf $OUT/logs.tgz -C /tmp logs
grep -h "PASSED\|FAILED" $L/test.log | head -3
python3 - <<'PY'
import csv
vs = ("main", "r3s3", "r3s4")
runs = {(v, r): {x["name"]: (float(x["ours_ms"]), x["grid"]) for x in csv.DictReader(open(f"/tmp/logs/ours_{v}_{r}.csv"))}
        for v in vs for r in (1, 2, 3)}
for name in runs[("main", 1)]:
    m = sum(runs[("main", r)][name][0] for r in (1, 2, 3))
    print(name, " | ".join(f"{v} grid {runs[(v, 1)][name][1]} " + " ".join(f"{runs[(v, r)][name][0]:.4f}" for r in (1, 2, 3)) +
                           f" {sum(runs[(v, r)][name][0] for r in (1, 2, 3)) / m - 1:+.1%}" for v in vs))
PY
