#!/bin/bash
# Device call: d = 64 ring depth with the copy engine; where the uniform rows lose (layout
# diagnostics: one page per sequence, pages in pool order).
set -u
B=.gpu-lean5
source $B/env.sh
ONLY=d64 bash bench/decode_attention/compare_builds.sh $B main tma tmas4 tmas6 2>&1 | tail -4 | tee $OUT/compare_d64.txt
for b in main tma; do
  $B/bin/lean_decode_bench_cur --help > /dev/null 2>&1
  $B/bin/lean_decode_bench_$b --iters 50 --only " hq32 " --csv $OUT/${b}_default.csv > /dev/null 2>&1
  $B/bin/lean_decode_bench_$b --iters 50 --only " hq32 " --mode ordered --csv $OUT/${b}_ordered.csv > /dev/null 2>&1
done
# --uniform-block-size exists in the current tree's bench only (same kernel as tma).
$B/bin/lean_decode_bench_cur --iters 50 --only " hq32 " --uniform-block-size 4096 --csv $OUT/tma_page4096.csv > /dev/null 2>&1
$B/bin/lean_decode_bench_cur --iters 50 --only " hq32 " --uniform-block-size 4096 --mode ordered --csv $OUT/tma_page4096_ordered.csv > /dev/null 2>&1
python3 - $OUT <<'PY'
import csv, sys, os
d = sys.argv[1]
runs = ["main_default", "main_ordered", "tma_default", "tma_ordered", "tma_page4096", "tma_page4096_ordered"]
data = {r: {row["name"]: (float(row["ours_ms"]), float(row["kv_bytes"]), float(row["read_gbps"])) for row in csv.DictReader(open(os.path.join(d, r + ".csv")))} for r in runs if os.path.exists(os.path.join(d, r + ".csv"))}
names = list(next(iter(data.values())).keys())
print("%-28s" % "shape" + "".join("%22s" % r for r in data))
for n in names:
    cells = []
    for r in data:
        ms, b, bw = data[r][n]
        cells.append("%10.4f (%.3f)" % (ms, b / ms / 1e6 / bw))
    print("%-28s" % n + "".join("%22s" % c for c in cells))
PY
