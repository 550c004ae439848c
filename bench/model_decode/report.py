#!/usr/bin/env python3
"""Joins cuda_decode_bench's CSV and hf_decode.py's CSV (same run) into the markdown table of
bench/RESULTS.md: Ferry's and transformers' median decode step, tokens/s, Ferry / HF speed-up,
and each one's fraction of the roofline (Ferry's bytes per step over the read bandwidth
cuda_decode_bench measured).

Usage: report.py FERRY_CSV HF_CSV
"""
import csv
import sys


def main():
    ours = {(int(r["context"]), int(r["batch"])): r for r in csv.DictReader(open(sys.argv[1]))}
    hf = {(int(r["context"]), int(r["batch"])): r for r in csv.DictReader(open(sys.argv[2]))}
    print("| context | batch | Ferry step ms | Ferry tok/s | GEMMs alone ms | no graphs ms "
          "| + logits to host ms | HF step ms | HF tok/s | Ferry / HF | roofline ms "
          "| Ferry of roofline | HF of roofline |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(ours):
        r = ours[key]
        h = hf.get(key)
        roof = float(r["roofline_ms"])
        step = float(r["step_ms"])
        hf_ms = float(h["step_ms"]) if h else float("nan")
        print(f"| {key[0]} | {key[1]} | {step:.3f} | {float(r['tok_s']):.0f} "
              f"| {float(r['gemm_ms']):.3f} "
              f"| {float(r['direct_ms']):.3f} | {float(r['logits_ms']):.3f} "
              f"| {hf_ms:.2f} | {key[1] / hf_ms * 1e3:.0f} | {hf_ms / step:.1f}x "
              f"| {roof:.3f} | {roof / step:.2f} | {roof / hf_ms:.3f} |")


if __name__ == "__main__":
    main()
