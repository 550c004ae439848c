#!/bin/bash
# Compares LeanDecode builds on the GPU machine, in one device call: lean_decode_bench of every
# build, interleaved round by round (medians of 50 launches each), whether their output digests
# agree with the first build's, optionally one build's GPU tests under compute-sanitizer and
# peers.py (SDPA cuDNN / FlashAttention-2) on one build's CSV.
#
# Usage, from the repository root on the GPU machine:
#   [ROUNDS=3] [ONLY=substring] [TEST=build [SANITIZE=0]] [PEERS=build] \
#       bash bench/decode_attention/compare_builds.sh BUNDLE BUILD...
# BUNDLE is a tools/gpu-bundle folder (carried by the run tool) holding bin/lean_decode_bench_BUILD
# for every BUILD, bin/lean_attention_test_TEST when TEST is set, and peers.py when PEERS is set.
# The first BUILD is the reference of the printed changes. Logs go to $OUT/logs.tgz.
set -u
bundle=$1
shift
builds=("$@")
source "$bundle/env.sh"
L=/tmp/compare_logs
mkdir -p "$L"
start=$(date +%s)
only=()
[ -n "${ONLY:-}" ] && only=(--only "$ONLY")
for round in $(seq "${ROUNDS:-3}"); do
  for b in "${builds[@]}"; do
    "$bundle/bin/lean_decode_bench_$b" --iters 50 "${only[@]}" --csv "$L/ours_${b}_$round.csv" \
        > "$L/bench_${b}_$round.log" 2>&1 || echo "bench $b round $round failed"
  done
  echo "round $round done at $(( $(date +%s) - start )) s"
done
if [ -n "${TEST:-}" ]; then
  test_bin="$bundle/bin/lean_attention_test_$TEST"
  timeout 120 "$test_bin" > "$L/test.log" 2>&1
  echo "test rc $?"
  if [ "${SANITIZE:-1}" = 1 ]; then
    timeout 100 compute-sanitizer --tool memcheck --leak-check full "$test_bin" \
        --gtest_filter='*EveryHeadDim*:*KvRanges*:*BadDevice*:*BlockSizes*:*RejectsBad*:*ManySequences*' \
        > "$L/memcheck.log" 2>&1
    timeout 60 compute-sanitizer --tool racecheck "$test_bin" \
        --gtest_filter='*GroupSizes*:*KvRanges*:*EveryHeadDim*' > "$L/racecheck.log" 2>&1
  fi
fi
if [ -n "${PEERS:-}" ]; then
  PYTHONUNBUFFERED=1 timeout 150 python3 "$bundle/peers.py" --ours "$L/ours_${PEERS}_1.csv" \
      --table "$L/table.md" --png "$L/roofline.png" > "$L/peers.log" 2>&1
  echo "peers rc $? at $(( $(date +%s) - start )) s"
  cp "$L/roofline.png" "$OUT/" 2>/dev/null
fi
tar czf "$OUT/logs.tgz" -C /tmp compare_logs
[ -f "$L/test.log" ] && grep -h "PASSED\|FAILED" "$L/test.log" | head -3
for f in "$L/memcheck.log" "$L/racecheck.log"; do
  [ -f "$f" ] && grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$f"
done
digest() { grep -h "digest" "$L/bench_$1_1.log" | sed 's/host.*digest/digest/'; }
for b in "${builds[@]:1}"; do
  echo "rows whose digest differs, ${builds[0]} vs $b: $(diff <(digest "${builds[0]}") <(digest "$b") | grep -c '^<')"
done
python3 - "${ROUNDS:-3}" "${builds[@]}" <<'PY'
import csv, sys
rounds, builds = int(sys.argv[1]), sys.argv[2:]
ms = {(b, r): {row["name"]: float(row["ours_ms"])
               for row in csv.DictReader(open(f"/tmp/compare_logs/ours_{b}_{r}.csv"))}
      for b in builds for r in range(1, rounds + 1)}
for name in ms[(builds[0], 1)]:
    ref = sum(ms[(builds[0], r)][name] for r in range(1, rounds + 1))
    cells = []
    for b in builds:
        runs = [ms[(b, r)][name] for r in range(1, rounds + 1)]
        cells.append(f"{b} " + " ".join(f"{x:.4f}" for x in runs) + f" {sum(runs) / ref - 1:+.1%}")
    print(f"{name:30} " + " | ".join(cells))
PY
[ -f "$L/table.md" ] && grep -A20 "| shape" "$L/table.md" | cut -c1-220 | head -18
exit 0
