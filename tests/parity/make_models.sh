#!/usr/bin/env bash
# Writes the parity checkpoints with Ferry's own make-tiny (HF layout, bf16, < 1 MB each) and the
# prompts file. Usage: tests/parity/make_models.sh FERRY_BIN OUT_DIR
set -euo pipefail
ferry=$1
out=$2
mkdir -p "$out"
common=(--layers=2 --hidden=128 --heads=2 --kv-heads=1 --intermediate=256 --vocab=256 --dtype=bf16)
"$ferry" model make-tiny --out="$out/llama_gqa" "${common[@]}" --seed=11 --max-positions=512
"$ferry" model make-tiny --out="$out/qwen2_bias" "${common[@]}" --seed=12 --arch=qwen2 \
  --config-form=4 --max-positions=512
"$ferry" model make-tiny --out="$out/llama3_rope" "${common[@]}" --seed=13 --rope=llama3 \
  --max-positions=256 --rope-theta=500000 --attention-bias
# Four heads of 64 over a hidden size of 128: q/o projections are not square.
"$ferry" model make-tiny --out="$out/mistral_tied" --layers=2 --hidden=128 --heads=4 --kv-heads=2 \
  --head-dim=64 --intermediate=256 --vocab=256 --dtype=bf16 --seed=14 --arch=mistral \
  --tie-embeddings --max-positions=512
# Three prompts: short, medium, long (ids in [3, 256), BOS 1 first).
python3 - "$out/prompts.json" <<'PY'
import json, sys
prompts, x = [], 12345
for n in (3, 21, 61):
    p = [1]
    for _ in range(n - 1):
        x = (x * 1103515245 + 12345) % (1 << 31)
        p.append(3 + x % 253)
    prompts.append(p)
json.dump({"prompts": prompts, "new_tokens": 64}, open(sys.argv[1], "w"))
PY
