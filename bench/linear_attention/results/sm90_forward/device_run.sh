#!/bin/bash
# The Hopper forward's checks and timings, one device call (run tool, carry .gpu-lin90, built as
# in core_timing.cu's header: timing_new from the commit under test, timing_base from 02235f6,
# the kernels before the Hopper forward): the gtest, the sanitizers on the forward tests, then
# the two core_timing builds alternated. Logs under $OUT.
cd .gpu-lin90 && source env.sh
F='*ForwardMatchesFloat64*:*GqaGroups*:*ChunkedPrefill*'
timeout 240 ./bin/linear_attention_test > $OUT/test.log 2>&1; echo "test rc $?" >> $OUT/summary.txt
timeout 120 compute-sanitizer --tool memcheck ./bin/linear_attention_test --gtest_filter="$F" > $OUT/memcheck.log 2>&1
echo "memcheck rc $? $(grep -c 'ERROR SUMMARY: 0' $OUT/memcheck.log)" >> $OUT/summary.txt
timeout 150 compute-sanitizer --tool racecheck ./bin/linear_attention_test --gtest_filter='*ForwardMatchesFloat64*' > $OUT/racecheck.log 2>&1
echo "racecheck rc $? $(grep -c 'RACECHECK SUMMARY: 0' $OUT/racecheck.log)" >> $OUT/summary.txt
for round in 1 2; do
  for b in base new; do
    for batch in 1 2 4 8; do
      LINEAR_TIMING_B=$batch timeout 60 ./bin/timing_$b 8192 0 0 15 | sed "s/^/$b B=$batch auto /" >> $OUT/timing.log
    done
  done
done
for batch in 1 2 4; do  # where the unsplit Hopper forward beats the segmented core
  LINEAR_TIMING_B=$batch LINEAR_TIMING_SEGMENTS=-1 timeout 60 ./bin/timing_new 8192 0 0 15 | sed "s/^/new B=$batch unsplit /" >> $OUT/timing.log
done
for batch in 4 8; do
  LINEAR_TIMING_B=$batch timeout 90 ./bin/timing_base 32768 0 0 9 | sed "s/^/base B=$batch auto /" >> $OUT/timing.log
  LINEAR_TIMING_B=$batch timeout 90 ./bin/timing_new 32768 0 0 9 | sed "s/^/new B=$batch auto /" >> $OUT/timing.log
done
grep -E "PASSED|FAILED|OK \]" $OUT/test.log | tail -20
cat $OUT/summary.txt
cat $OUT/timing.log
