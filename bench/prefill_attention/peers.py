#!/usr/bin/env python3
"""PyTorch peers for the prefill-attention suite, and the comparison table.

Run on the GPU machine after prefill_attention_bench wrote its CSV (same job, same device):
    python3 peers.py --ours ours.csv --table table.md

Peers, bf16, contiguous (B, H, L, D) tensors, causal:
  * flash / cudnn: torch.nn.functional.scaled_dot_product_attention under
    sdpa_kernel(FLASH_ATTENTION) or sdpa_kernel(CUDNN_ATTENTION), is_causal=True for square
    shapes; a chunk after a cached prefix uses causal_lower_right(L, S) (the chunk's rows see the
    whole prefix). GQA via enable_gqa=True where the backend takes it, else K/V repeated per q
    head beforehand (not timed).
  * matmul: a bf16 8192^3 torch.matmul, the device's dense matrix rate as this job sees it (the
    roofline for a compute-bound kernel).
FLOPs are the causal work only, the same count as ours: 4 * d * (visible positions summed over
rows) per q head. Each timing: CUDA events between back-to-back calls, median of --iters.
"""
import argparse
import csv
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def time_ms(fn, iters):
    start = time.perf_counter()
    i = 0
    while i < 3 or time.perf_counter() - start < 0.2:
        fn()
        i += 1
        if i % 4 == 0:
            torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return statistics.median(events[i].elapsed_time(events[i + 1]) for i in range(iters))


def matmul_tflops(iters):
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: torch.matmul(a, b), iters)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def peer_ms(row, backend, iters):
    b, lq, prefix = int(row["batch"]), int(row["q_len"]), int(row["prefix"])
    hq, hkv, d = int(row["hq"]), int(row["hkv"]), int(row["d"])
    s = prefix + lq
    q = torch.randn(b, hq, lq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16)
    kwargs = {}
    if prefix == 0:
        kwargs["is_causal"] = True
    else:
        from torch.nn.attention.bias import causal_lower_right
        kwargs["attn_mask"] = causal_lower_right(lq, s)
    with sdpa_kernel(BACKENDS[backend]):
        try:
            F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
            return time_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True,
                                                                  **kwargs), iters)
        except RuntimeError:
            pass
        kr = k.repeat_interleave(hq // hkv, dim=1)
        vr = v.repeat_interleave(hq // hkv, dim=1)
        try:
            F.scaled_dot_product_attention(q, kr, vr, **kwargs)
            return time_ms(lambda: F.scaled_dot_product_attention(q, kr, vr, **kwargs), iters)
        except RuntimeError as error:
            print(f"  {backend} on {row['name']}: {str(error).splitlines()[0]}")
            return float("nan")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ours", required=True)
    parser.add_argument("--table", required=True)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    ceiling = matmul_tflops(args.iters)
    print(f"bf16 matmul 8192^3: {ceiling:.0f} TFLOP/s")
    rows = list(csv.DictReader(open(args.ours)))
    lines = [
        f"bf16 matmul ceiling measured in this job: {ceiling:.0f} TFLOP/s",
        "",
        "| shape | ours ms | ours TFLOP/s | of ceiling | flash ms | cudnn ms | ours / best peer |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours = float(row["median_ms"])
        tflops = float(row["tflops"])
        peers = {name: peer_ms(row, name, args.iters) for name in BACKENDS}
        best = min((ms for ms in peers.values() if ms == ms), default=float("nan"))
        lines.append(
            f"| {row['name']} | {ours:.3f} | {tflops:.0f} | {tflops / ceiling:.2f} | "
            f"{peers['flash']:.3f} | {peers['cudnn']:.3f} | {ours / best:.2f} |")
    text = "\n".join(lines)
    print(text)
    with open(args.table, "w") as out:
        out.write(text + "\n")


if __name__ == "__main__":
    main()
