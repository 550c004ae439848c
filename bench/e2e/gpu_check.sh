#!/bin/bash
# One GPU-machine call that checks a build: every GPU test; compute-sanitizer (memcheck on the
# CUDA decoder and LeanDecode, racecheck on the prefill and linear-attention kernels); the
# end-to-end cluster comparison with a CUDA coordinator and two CUDA workers for a 1B-class model
# (bench/e2e/cluster_throughput.sh) over tcp and over shared memory; 1 against 2 micro-batches
# (bench/e2e/micro_batch_throughput.sh); and the demo (deploy/local/demo.sh, CUDA workers) on a
# tiny model.
# Usage, from the repository root on the GPU machine:
#   bash bench/e2e/gpu_check.sh BUNDLE OUT
# BUNDLE: made on the build machine with /work/shared/tools/gpu-bundle from build/bin's
# lean_attention_test linear_attention_test prefill_attention_test cuda_kv_pool_test
# cuda_decoder_test hf_parity_cuda_test cuda_worker_test ferry ferry-coordinator ferry-worker
# (large libraries may be gzipped to fit the transfer; they are unpacked here).
set -u
here=$(cd "$1" && pwd)
out=$2; mkdir -p "$out"
for z in "$here"/lib/*.gz; do gunzip -f "$z"; done
source "$here/env.sh"
export FERRY_TEST_DATA_DIR=$PWD/tests/data
summary=()
note() { summary+=("$1"); echo "$1" >> "$out/summary.txt"; }  # kept as it goes: a cut run still tells
for t in lean_attention_test linear_attention_test prefill_attention_test cuda_kv_pool_test \
         cuda_decoder_test hf_parity_cuda_test cuda_worker_test; do
  start=$SECONDS
  timeout 120 "$here/bin/$t" > "$out/$t.log" 2>&1; rc=$?
  note "$t rc=$rc $((SECONDS-start))s $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$out/$t.log" | tr -s ' ' | tr '\n' ' ')"
done
# 1B-class model, bf16, head dim 128 (the CI build's kernels).
"$here/bin/ferry" model make-tiny --out=/tmp/m1b --layers=16 --hidden=2048 --heads=16 \
  --kv-heads=8 --head-dim=128 --intermediate=8192 --vocab=32000 --dtype=bf16 \
  --max-positions=4096 > "$out/make_model.log" 2>&1
FERRY_BUILD_DIR=$here FERRY_READY_TIMEOUT_S=180 timeout 300 bash bench/e2e/cluster_throughput.sh \
  --model=/tmp/m1b --device=cuda:0 --workers=2 --requests=128 --concurrency=64 --max-tokens=64 \
  --kv-capacity=$((8 << 30)) --max-batch=64 > "$out/e2e.log" 2>&1
note "e2e rc=$?"
# The same over shared memory (UCX keeps it out of PEER error mode unless told).
UCX_MM_ERROR_HANDLING=y FERRY_BUILD_DIR=$here FERRY_READY_TIMEOUT_S=180 timeout 300 \
  bash bench/e2e/cluster_throughput.sh --model=/tmp/m1b --device=cuda:0 --workers=2 \
  --requests=128 --concurrency=64 --max-tokens=64 --kv-capacity=$((8 << 30)) --max-batch=64 \
  --ucx-tls=sm,tcp > "$out/e2e_shm.log" 2>&1
note "e2e shm rc=$?"
FERRY_BUILD_DIR=$here FERRY_READY_TIMEOUT_S=180 timeout 400 bash bench/e2e/micro_batch_throughput.sh \
  --model=/tmp/m1b --device=cuda:0 --workers=2 --requests=128 --concurrency=64 --max-tokens=64 \
  --kv-capacity=$((8 << 30)) --rounds=3 --micro-batches=2 -- --max-batch=64 \
  > "$out/micro_batch.log" 2>&1
note "micro-batch rc=$?"
"$here/bin/ferry" model make-tiny --out=/tmp/tiny128 --head-dim=128 > /dev/null 2>&1
FERRY_BIN_DIR=$here/bin FERRY_DEMO_PORT=50611 timeout 200 bash deploy/local/demo.sh \
  --model=/tmp/tiny128 > "$out/demo.log" 2>&1
note "demo rc=$? $(grep -c 'cuda:0' "$out/demo.log") lines naming cuda:0"
timeout 100 compute-sanitizer --tool memcheck --leak-check full "$here/bin/cuda_decoder_test" \
  --gtest_filter='*llama_gqa*' > "$out/memcheck_decoder.log" 2>&1
note "memcheck cuda_decoder_test(llama_gqa) rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck_decoder.log")"
timeout 100 compute-sanitizer --tool racecheck "$here/bin/prefill_attention_test" \
  > "$out/racecheck_prefill.log" 2>&1
note "racecheck prefill_attention_test rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck_prefill.log" | head -1)"
timeout 150 compute-sanitizer --tool racecheck "$here/bin/linear_attention_test" \
  > "$out/racecheck_linear.log" 2>&1
note "racecheck linear_attention_test rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck_linear.log" | head -1)"
timeout 100 compute-sanitizer --tool memcheck "$here/bin/lean_attention_test" \
  > "$out/memcheck_lean.log" 2>&1
note "memcheck lean_attention_test rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck_lean.log")"
echo "======== summary"; printf '%s\n' "${summary[@]}"; echo "======== e2e"; tail -n 8 "$out/e2e.log"; tail -n 3 "$out/e2e_shm.log"
echo "======== micro-batches"; tail -n 4 "$out/micro_batch.log"
