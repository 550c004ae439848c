#!/bin/bash
# d = 64: the per-row copy path (main, 6 stages; rows4, 4 stages) against one-page tiles with
# 6, 4 and 3 stages (f64s6, f64s4, f64s3), the d = 64 rows only, interleaved x3.
set -u
source .gpu-lean2/env.sh
L=/tmp/logs; mkdir -p $L
for r in 1 2 3; do
  for v in main rows4 f64s6 f64s4 f64s3; do
    .gpu-lean2/bin/lean_decode_bench_$v --iters 50 --only d64 --csv $L/ours_${v}_$r.csv > $L/bench_${v}_$r.log 2>&1
  done
done
tar czf $OUT/logs.tgz -C /tmp logs
python3 - <<'PY'
import csv
vs = ("main", "rows4", "f64s6", "f64s4", "f64s3")
runs = {(v, r): {x["name"]: float(x["ours_ms"]) for x in csv.DictReader(open(f"/tmp/logs/ours_{v}_{r}.csv"))}
        for v in vs for r in (1, 2, 3)}
for name in runs[("main", 1)]:
    m = sum(runs[("main", r)][name] for r in (1, 2, 3))
    print(name, " | ".join(f"{v} " + " ".join(f"{runs[(v, r)][name]:.4f}" for r in (1, 2, 3)) +
                           f" {sum(runs[(v, r)][name] for r in (1, 2, 3)) / m - 1:+.1%}" for v in vs))
PY
