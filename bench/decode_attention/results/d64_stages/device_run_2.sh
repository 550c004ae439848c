#!/bin/bash
# Stage counts: main vs f64s3 (one-page tiles at d = 64 too, 3 stages there), f64s2 (2 stages),
# s2all (f64s3 plus 2 stages at d = 128 and 256), the whole suite, interleaved x3.
set -u
source .gpu-lean2/env.sh
L=/tmp/logs; mkdir -p $L
for r in 1 2 3; do
  for v in main f64s3 f64s2 s2all; do
    .gpu-lean2/bin/lean_decode_bench_$v --iters 50 --csv $L/ours_${v}_$r.csv > $L/bench_${v}_$r.log 2>&1
  done
done
tar czf $OUT/logs.tgz -C /tmp logs
python3 - <<'PY'
import csv
vs = ("main", "f64s3", "f64s2", "s2all")
runs = {(v, r): {x["name"]: float(x["ours_ms"]) for x in csv.DictReader(open(f"/tmp/logs/ours_{v}_{r}.csv"))}
        for v in vs for r in (1, 2, 3)}
for name in runs[("main", 1)]:
    m = sum(runs[("main", r)][name] for r in (1, 2, 3))
    print(name, " | ".join(f"{v} " + " ".join(f"{runs[(v, r)][name]:.4f}" for r in (1, 2, 3)) +
                           f" {sum(runs[(v, r)][name] for r in (1, 2, 3)) / m - 1:+.1%}" for v in vs))
PY
