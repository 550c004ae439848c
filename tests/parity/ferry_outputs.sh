#!/usr/bin/env bash
# Ferry's side of the parity run: greedy tokens and last-position logits for every model and
# prompt. Usage: tests/parity/ferry_outputs.sh FERRY_BIN MODELS OUT_DIR
set -euo pipefail
ferry=$1
models=$2
out=$3
mkdir -p "$out"
n=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['prompts']))" "$models/prompts.json")
steps=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['new_tokens'])" "$models/prompts.json")
for dir in "$models"/*/; do
  name=$(basename "$dir")
  for ((i = 0; i < n; i++)); do
    ids=$(python3 -c "import json,sys; print(','.join(map(str, json.load(open(sys.argv[1]))['prompts'][$i])))" "$models/prompts.json")
    "$ferry" generate --local --model="$dir" --prompt-ids="$ids" --max-tokens="$steps" --ignore-eos \
      --json --dump-logits="$out/${name}_$i.json" > /dev/null
  done
done
