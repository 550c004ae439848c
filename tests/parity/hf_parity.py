#!/usr/bin/env python3
"""Parity of Ferry's CPU decoder with Hugging Face transformers on tiny checkpoints.

Run on a machine with torch + transformers (>= 5). For every model folder under MODELS and every
prompt in MODELS/prompts.json, the reference is computed by loading the saved folder with
from_pretrained in float64 (eager attention) and decoding greedily with a full recompute per step
(no KV cache), recording each step's top-2 logit margin. When FERRY_OUT holds Ferry's outputs
(`ferry generate --json --ignore-eos --dump-logits`, one <model>_<prompt>.json each), the script
compares: exact token equality, and the max |logit difference| at the last position of Ferry's
own sequence. It writes GOLDEN (the transformers reference, for the CPU-only ctest) and prints a
report. The golden comes from transformers only, never from Ferry.

Usage: hf_parity.py MODELS FERRY_OUT GOLDEN
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM


def greedy(model, prompt, steps):
    ids = list(prompt)
    tokens, margins = [], []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            top = torch.topk(logits, 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(tokens[-1])
    return tokens, margins


def main():
    models_dir, ferry_dir, golden_path = sys.argv[1:4]
    spec = json.load(open(os.path.join(models_dir, "prompts.json")))
    golden = {"transformers": transformers.__version__, "torch": torch.__version__,
              "new_tokens": spec["new_tokens"], "models": {}}
    report, all_ok = [], True
    for name in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, name)
        if not os.path.isdir(path):
            continue
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                         attn_implementation="eager")
        except Exception as e:  # report per model; the others still run
            report.append(f"{name}: transformers could not load it: {e!r}")
            all_ok = False
            continue
        model.eval()
        inv = model.model.rotary_emb.inv_freq
        entry = {"class": type(model).__name__, "inv_freq_dtype": str(inv.dtype), "prompts": []}
        for i, prompt in enumerate(spec["prompts"]):
            tokens, margins = greedy(model, prompt, spec["new_tokens"])
            rec = {"prompt_ids": prompt, "token_ids": tokens, "min_top2_margin": min(margins)}
            ferry_file = os.path.join(ferry_dir, f"{name}_{i}.json")
            if os.path.exists(ferry_file):
                ferry = json.load(open(ferry_file))
                seq = prompt + ferry["token_ids"][:-1]
                with torch.no_grad():
                    ref = model(torch.tensor([seq]), use_cache=False).logits[0, -1]
                diff = (ref - torch.tensor(ferry["last_logits"], dtype=torch.float64)).abs().max()
                match = ferry["token_ids"] == tokens
                all_ok &= match
                rec["ferry_tokens_match"] = match
                rec["ferry_max_abs_logit_diff"] = float(diff)
                report.append(f"{name} prompt {i} ({len(prompt)} tokens): tokens "
                              f"{'MATCH' if match else 'DIFFER'}, max |logit diff| {float(diff):.3e},"
                              f" min top-2 margin {min(margins):.3f}")
            # The reference logits on transformers' own sequence, for the CPU ctest.
            with torch.no_grad():
                last = model(torch.tensor([prompt + tokens[:-1]]), use_cache=False).logits[0, -1]
            rec["last_logits"] = [float(v) for v in last]
            entry["prompts"].append(rec)
        golden["models"][name] = entry
    golden["report"] = report
    with open(golden_path, "w") as f:
        json.dump(golden, f)
    print("\n".join(report))
    print("ALL MATCH" if all_ok else "MISMATCH")


if __name__ == "__main__":
    main()
