#!/usr/bin/env python3
"""Checkpoints written by transformers itself, for Ferry's loader and decoder.

Builds tiny random models with transformers (LlamaForCausalLM with GQA saved in shards with
model.safetensors.index.json; Qwen2ForCausalLM with tied embeddings), scales the random init so
greedy decoding has clear margins, casts to bfloat16 and saves with save_pretrained. The reference
is then computed from the saved folder, loaded with from_pretrained in float64 (eager attention),
greedy with a full recompute per step. Writes OUT/<name>/ (the saved folder) and
OUT/hf_written_golden.json. Usage: hf_written.py OUT
"""
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

PROMPTS = [[1, 17, 42], [1] + [(7 * i + 3) % 250 + 3 for i in range(30)]]
NEW_TOKENS = 48


def build(name, config, out, shard):
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.2 * (2 * torch.rand_like(p) - 1))
            elif p.dim() == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * torch.randn_like(p))
        if "lm_head.weight" in dict(model.named_parameters()) and not config.tie_word_embeddings:
            model.lm_head.weight.mul_(3.0)
        if config.tie_word_embeddings:
            model.model.embed_tokens.weight.mul_(3.0)
    model = model.to(torch.bfloat16)
    path = os.path.join(out, name)
    model.save_pretrained(path, max_shard_size=shard) if shard else model.save_pretrained(path)
    return path


def greedy(model, prompt):
    ids, tokens, margins = list(prompt), [], []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            top = torch.topk(logits, 2)
            tokens.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            ids.append(tokens[-1])
        last = model(torch.tensor([list(prompt) + tokens[:-1]]), use_cache=False).logits[0, -1]
    return tokens, min(margins), [float(v) for v in last]


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    specs = {
        "hf_llama_sharded": (LlamaConfig(hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=256,
                                         max_position_embeddings=512, bos_token_id=1,
                                         eos_token_id=2, tie_word_embeddings=False), "300KB"),
        "hf_qwen2_tied": (Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1,
                                      vocab_size=256, max_position_embeddings=512,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True),
                          None),
    }
    golden = {"transformers": transformers.__version__, "torch": torch.__version__,
              "new_tokens": NEW_TOKENS, "models": {}}
    for name, (config, shard) in specs.items():
        path = build(name, config, out, shard)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64,
                                                     attn_implementation="eager").eval()
        recs = []
        for prompt in PROMPTS:
            tokens, margin, last = greedy(model, prompt)
            recs.append({"prompt_ids": prompt, "token_ids": tokens, "min_top2_margin": margin,
                         "last_logits": last})
            print(name, len(prompt), "min margin", round(margin, 4), tokens[:12])
        golden["models"][name] = {"files": sorted(os.listdir(path)), "prompts": recs}
    json.dump(golden, open(os.path.join(out, "hf_written_golden.json"), "w"))


if __name__ == "__main__":
    main()
