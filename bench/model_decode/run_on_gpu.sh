#!/bin/bash
# Everything issue 6's CUDA backend needs from a GPU machine, in one call: the GPU tests, a CLI
# and coordinator smoke run on cuda:0, the decode benchmark beside transformers, and
# compute-sanitizer on the tiny-model tests. Built elsewhere and bundled with
# /work/shared/tools/gpu-bundle (see bench/RESULTS.md, "Model decode (CUDA, H100)").
#
# Usage (repo root on the GPU machine): bench/model_decode/run_on_gpu.sh BUNDLE OUT
#   BUNDLE holds env.sh and bin/ (cuda_kv_pool_test, cuda_decoder_test, hf_parity_cuda_test,
#   cuda_decode_bench, ferry, ferry-coordinator); OUT receives the logs and CSVs.
# FERRY_GPU_STEPS="decoder_test bench ..." runs a subset. Prints a summary last. Each step is
# bounded by `timeout`. OUT gets all.log (every step's output, appended as it ends), ours.csv,
# hf.csv and table.md.
set -u
bundle=$1
out=$2
mkdir -p "$out"
source "$bundle/env.sh"
export FERRY_TEST_DATA_DIR=$PWD/tests/data
here=$(dirname "$0")
summary=()
only=" ${FERRY_GPU_STEPS:-kv_pool_test decoder_test parity_test smoke bench hf memcheck racecheck} "
step() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  [[ $only == *" $name "* ]] || return 0
  local start=$SECONDS
  timeout "$limit" "$@" > "/tmp/$name.log" 2>&1
  local rc=$?
  summary+=("$name: rc=$rc ($((SECONDS - start)) s)")
  { echo "=== $name: rc=$rc ($((SECONDS - start)) s)"; cat "/tmp/$name.log"; } >> "$out/all.log"
  tail -n 4 "/tmp/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv >> "$out/all.log"
step kv_pool_test 60 cuda_kv_pool_test
step decoder_test 90 cuda_decoder_test
step parity_test 90 hf_parity_cuda_test

# The CLI and the coordinator on cuda:0 with a tiny model: fp32 weights and KV must give the CPU's
# greedy tokens; the bf16 defaults must run.
smoke() {
  set -e
  local dir=/tmp/ferry_tiny
  ferry model make-tiny --out=$dir --layers=2 --hidden=256 --heads=4 --kv-heads=2 --vocab=512
  local common="--local --model=$dir --prompt-ids=1,2,3,4,5 --max-tokens=24 --ignore-eos --json"
  ferry generate $common --device=cpu | tail -1 > /tmp/cpu.json
  ferry generate $common --device=cuda:0 --weight-dtype=fp32 --kv-dtype=fp32 | tail -1 > /tmp/gpu.json
  ferry generate $common --device=cuda:0 | tail -1 > /tmp/bf16.json
  cat /tmp/cpu.json /tmp/gpu.json /tmp/bf16.json
  python3 -c "import json, sys
a, b = (json.load(open(f))['token_ids'] for f in ('/tmp/cpu.json', '/tmp/gpu.json'))
print('fp32 cuda tokens == cpu tokens:', a == b)
sys.exit(a != b)"
  ferry generate $common --device=cuda:7 && exit 1 || true
  ferry-coordinator --model=$dir --listen=127.0.0.1:50077 --device=cuda:0 --local-attention \
      --kv-capacity=$((256 << 20)) > /tmp/coord.log 2>&1 &
  local pid=$!
  for i in $(seq 50); do
    ferry generate --coordinator=127.0.0.1:50077 --prompt-ids=1,2,3,4,5 --max-tokens=24 \
        --ignore-eos --requests=8 --concurrency=4 > /tmp/remote.txt 2>&1 && break
    sleep 0.2
  done
  cat /tmp/remote.txt
  kill $pid
  wait $pid || true
  tail -3 /tmp/coord.log
}
step smoke 90 bash -c "$(declare -f smoke); smoke"

step bench 200 cuda_decode_bench --csv="$out/ours.csv"
step hf 200 env PYTHONUNBUFFERED=1 python3 "$here/hf_decode.py" --csv "$out/hf.csv"
if [ -f "$out/ours.csv" ] && [ -f "$out/hf.csv" ]; then
  python3 "$here/report.py" "$out/ours.csv" "$out/hf.csv" > "$out/table.md"
fi

memcheck_filter='*Fp32Logits*/llama3_bias_tied:*Bf16Logits*/llama3_bias_tied'
memcheck_filter+=':*ForwardGreedy*/llama_gqa:*HostAttention*/qwen2_bias'
step memcheck 150 compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
    cuda_decoder_test --gtest_filter="$memcheck_filter"
step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
    cuda_decoder_test --gtest_filter='*Fp32Logits*/llama_gqa'

printf '%s\n' "${summary[@]}"
[ -f "$out/table.md" ] && cat "$out/table.md"
exit 0
