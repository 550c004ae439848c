"""Ferry's causal linear attention (normalised elu + 1, bf16, H = 16) against the number of
64-token chunks per sequence segment (cuda_linear_attention.h, "Sequence segments"): unsplit (-1),
the library's automatic choice (0) and fixed counts, for a batch of 4 sequences (the benchmark's
shapes) and of 1 (prefill of one sequence). Times: medians of CUDA-event timings
(triton.testing.do_bench). Run on the GPU machine from the repository root:
  PYTHONPATH=bench/linear_attention python3 bench/linear_attention/segment_sweep.py [--out DIR]
"""
import argparse
import os

import torch
import triton

import ferry_linear_attn as ferry

CHOICES = (-1, 0, 4, 8, 16, 32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    ext = ferry.extension()
    h = 16
    lines = ["| B | d | N | chunks per segment | fwd ms | fwd+bwd ms |", "|---|---|---|---|---|---|"]
    for b, n in ((4, 8192), (1, 8192), (1, 32768)):
        for d in (128, 64):
            q, k, v = [(torch.randn(b, n, h, d, device="cuda") * d ** -0.5).bfloat16()
                       .requires_grad_() for _ in range(3)]
            dout = torch.randn_like(q)
            for chunks in CHOICES:
                ext.set_segment_chunks(chunks)

                def fwd():
                    return ferry.linear_attention(q, k, v, "elu_plus_one", True)

                def fwd_bwd():
                    fwd().backward(dout)

                t_fwd = triton.testing.do_bench(fwd, warmup=5, rep=25, return_mode="median")
                t_all = triton.testing.do_bench(fwd_bwd, warmup=5, rep=25, grad_to_none=[q, k, v],
                                                return_mode="median")
                name = {-1: "unsplit", 0: "auto"}.get(chunks, str(chunks))
                lines.append(f"| {b} | {d} | {n} | {name} | {t_fwd:.3f} | {t_all:.3f} |")
                print(lines[-1], flush=True)
            del q, k, v, dout
            torch.cuda.empty_cache()
    ext.set_segment_chunks(0)
    with open(os.path.join(args.out, "segment_sweep.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
