#!/usr/bin/env python3
"""Hugging Face transformers decode throughput at Llama-3.2-1B shapes: the baseline for
cuda_decode_bench (same shapes, same machine, same run).

LlamaForCausalLM with random bf16 weights (transformers' own init), eager execution with SDPA
attention, its default DynamicCache. For each context and batch the cache holds `context`
positions of random bf16 K/V per layer (built by one real forward, then its tensors replaced:
a 64 x 8k prefill would only cost time), then decode steps of one token per sequence: forward,
arg max of the last logits on the GPU, synchronise; the ids are fed back. Each step is timed on
the host clock from the call to the synchronised result, as cuda_decode_bench times Ferry's.
Prints a table and writes a CSV (context, batch, step_ms, min_ms, tok_s).

Usage: hf_decode.py [--batches 1,16,64] [--contexts 2048,8192] [--steps 10] [--csv FILE]
"""
import argparse
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def llama32_1b_config():
    shapes = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                  num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                  tie_word_embeddings=True)
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if int(transformers.__version__.split(".")[0]) >= 5:
        config = LlamaConfig(**shapes, rope_parameters={**rope, "rope_theta": 500000.0})
    else:
        config = LlamaConfig(**shapes, rope_theta=500000.0, rope_scaling=rope)
    config._attn_implementation = "sdpa"
    return config


def random_cache(model, batch, context, kv_heads, head_dim):
    """A DynamicCache of `context` random positions per layer, built the way generate() would
    build one (a real forward), its tensors then swapped for random ones of the full length."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    shape = (batch, kv_heads, context, head_dim)
    fresh = lambda: torch.randn(shape, dtype=torch.bfloat16, device="cuda")  # noqa: E731
    if hasattr(cache, "layers"):  # transformers >= 4.56
        for layer in cache.layers:
            layer.keys, layer.values = fresh(), fresh()
    else:
        for i in range(len(cache.key_cache)):
            cache.key_cache[i], cache.value_cache[i] = fresh(), fresh()
    assert cache.get_seq_length() == context, cache.get_seq_length()
    return cache


def time_steps(model, cache, ids, warmup, steps):
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            start = time.perf_counter()
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits
            ids = logits[:, -1, :].argmax(dim=-1, keepdim=True)
            torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--contexts", default="2048,8192")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--csv")
    args = parser.parse_args()
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]

    config = llama32_1b_config()
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, "
          f"attention {model.config._attn_implementation}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, "
          f"{torch.cuda.get_device_name()}")
    rows = []
    print("| context | batch | HF step ms | HF tok/s |\n|---|---|---|---|")
    for context in contexts:
        for batch in batches:
            cache = random_cache(model, batch, context, config.num_key_value_heads,
                                 config.head_dim)
            ids = torch.randint(0, config.vocab_size, (batch, 1), device="cuda")
            median_ms, min_ms = time_steps(model, cache, ids, 2, args.steps)
            del cache
            torch.cuda.empty_cache()
            rows.append((context, batch, median_ms, min_ms, batch / (median_ms * 1e-3)))
            print(f"| {context} | {batch} | {median_ms:.2f} | {rows[-1][4]:.0f} |", flush=True)
    if args.csv:
        with open(args.csv, "w") as out:
            out.write("context,batch,step_ms,min_ms,tok_s\n")
            for r in rows:
                out.write(",".join(str(x) for x in r) + "\n")


if __name__ == "__main__":
    main()
