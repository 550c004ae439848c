"""Causal linear attention on the GPU: Ferry's CUDA kernels against fla (flash-linear-attention,
Triton: chunk_linear_attn and fused_chunk_linear_attn), the Fastmax kernel of arXiv 2510.21956
(the paper's public CUDA extension) and PyTorch SDPA causal (FlashAttention, softmax) as the
quadratic reference, in one run.

Run on the GPU machine from the repository root, with fla's source on PYTHONPATH and Fastmax's
`fastmax/` folder named by FASTMAX_SRC if they are to be compared (imported or built there when
found, never vendored):
  PYTHONPATH=bench/linear_attention:<fla source> FASTMAX_SRC=<fastmax folder> \
      python3 bench/linear_attention/bench.py [--quick] [--out DIR]
Shapes: B=4 (--batches), H=16 (q and kv heads), bf16, d in {64, 128}, N in {2k .. 32k} (--ns).
Times are medians of CUDA-event timings (triton.testing.do_bench) on fresh random inputs. Ferry runs
elu_plus_one (normalised; the feature map applied inside the kernels) and one_plus_x_max_norm
(normalised), both with the sequence segments the library picks, and elu_plus_one unsplit (one
block walks a whole sequence); fla runs normalize=True on inputs that already went through elu + 1 outside the
timed region (so it computes the same function as Ferry's elu_plus_one, which is checked), and
SDPA is causal softmax attention. Fastmax (bf16 entry points, causal) takes (B*H, N, d) inputs,
which are laid out outside the timed region; it divides q and k by their largest squared row norm
over the whole sequence in place, then computes 1 + q.k normalised: Ferry's one_plus_x_max_norm
where every row has the same norm (checked on unit-norm rows), the paper's non-causal maximum
otherwise.
Byte floor: q, k, v read and out written once forward (8 N d bytes per head), q, k, v, dout
read and dq, dk, dv written backward (14 N d), over the device-memory bandwidth measured here by a
device-to-device copy (bytes read + written over time). 'floor' is that time over the measured
one. Peak memory: torch.cuda.max_memory_allocated over one forward + backward, inputs included.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import triton

import ferry_linear_attn as ferry

try:
    from fla.ops.linear_attn import chunk_linear_attn, fused_chunk_linear_attn
    HAVE_FLA = True
except Exception as e:  # noqa: BLE001 - report and go on without it
    print(f"fla not importable ({type(e).__name__}: {e}); skipping it", flush=True)
    HAVE_FLA = False


FASTMAX = None
if os.environ.get("FASTMAX_SRC"):
    try:
        from torch.utils.cpp_extension import load
        _t = time.time()
        _src = os.environ["FASTMAX_SRC"]
        FASTMAX = load("fastmax_cuda", [os.path.join(_src, f) for f in (
            "fastmax_cuda.cpp", "fastmax_cuda_forward.cu", "fastmax_cuda_backward.cu",
            "fastmax_cuda_forward_bf16.cu", "fastmax_cuda_backward_bf16.cu")],
            extra_cuda_cflags=["-O3"], verbose=False)
        print(f"fastmax extension built in {time.time() - _t:.0f} s", flush=True)
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"fastmax did not build ({type(e).__name__}: {str(e)[-2000:]}); skipping it",
              flush=True)


class FastmaxFunction(torch.autograd.Function):
    """The paper's extension with its own forward and backward (as its fastmax.py wraps them)."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, denum = FASTMAX.forwardpass_bf16(q, k, v, True)
        ctx.save_for_backward(q, k, v, o, denum)
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, denum = ctx.saved_tensors
        return tuple(FASTMAX.backwardpass_bf16(q, k, v, o, denum, dout.contiguous(), True))


def heads_major(q, k, v):
    """(B, N, H, d) -> (B*H, N, d) contiguous, Fastmax's layout."""
    return tuple(x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]).contiguous()
                 for x in (q, k, v))


def is_peer(name):
    """Methods from other projects: run after Ferry and SDPA, on --peer-shapes only."""
    return name.startswith("fla") or name == "fastmax"


def copy_bandwidth():
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.randn(512 * 1024 * 1024 // 4 * 4, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    bw = 2 * src.numel() * 4 / (ms * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return bw


def methods(d):
    """name -> (prepare(q, k, v) -> inputs, fn(*inputs) -> out)."""
    ms = {}

    def elu1(x):
        return torch.nn.functional.elu(x.float()).add_(1).to(x.dtype)

    def ferry_fn(feature_map, segment_chunks):
        # The segment setting is global to the extension: set on every forward, so the
        # backward that follows it uses it too.
        def fn(q, k, v):
            ferry.extension().set_segment_chunks(segment_chunks)
            return ferry.linear_attention(q, k, v, feature_map, True)
        return fn

    ms["ferry elu+1"] = (lambda q, k, v: (q, k, v), ferry_fn("elu_plus_one", 0))
    ms["ferry 1+x maxnorm"] = (lambda q, k, v: (q, k, v), ferry_fn("one_plus_x_max_norm", 0))
    ms["ferry elu+1 unsplit"] = (lambda q, k, v: (q, k, v), ferry_fn("elu_plus_one", -1))
    if HAVE_FLA:
        # fused_chunk first: its Triton autotuning is the shorter of the two.
        ms["fla fused_chunk"] = (lambda q, k, v: (elu1(q), elu1(k), v),
                                 lambda q, k, v: fused_chunk_linear_attn(q, k, v, normalize=True)[0])
        ms["fla chunk"] = (lambda q, k, v: (elu1(q), elu1(k), v),
                           lambda q, k, v: chunk_linear_attn(q, k, v, normalize=True)[0])
    if FASTMAX is not None:
        ms["fastmax"] = (heads_major, FastmaxFunction.apply)
    ms["sdpa causal"] = (lambda q, k, v: tuple(x.transpose(1, 2) for x in (q, k, v)),
                         lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                             q, k, v, is_causal=True))
    return ms


def bench_one(prepare, fn, b, n, h, d):
    torch.cuda.empty_cache()
    base = [(torch.randn(b, n, h, d, device="cuda") * (d ** -0.5)).bfloat16() for _ in range(3)]
    inputs = [x.detach().requires_grad_() for x in prepare(*base)]
    del base
    out = fn(*inputs)
    dout = torch.randn_like(out)
    torch.cuda.synchronize()

    def fwd():
        return fn(*inputs)

    def fwd_bwd():
        fn(*inputs).backward(dout)

    t_fwd = triton.testing.do_bench(fwd, warmup=10, rep=50, grad_to_none=inputs, return_mode="median")
    out = fn(*inputs)
    t_bwd = triton.testing.do_bench(lambda: out.backward(dout, retain_graph=True), warmup=10,
                                    rep=50, grad_to_none=inputs, return_mode="median")
    del out
    t_all = triton.testing.do_bench(fwd_bwd, warmup=10, rep=50, grad_to_none=inputs,
                                    return_mode="median")
    for x in inputs:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del inputs, dout
    return t_fwd, t_bwd, t_all, peak


def fastmax_check(d):
    """Ferry's 1+x maxnorm against Fastmax on unit-norm q and k rows (where the running and the
    whole-sequence maxima agree): relative error of out."""
    if FASTMAX is None:
        return None
    b, n, h = 2, 2048, 4
    q, k, v = [(torch.randn(b, n, h, d, device="cuda")).bfloat16() for _ in range(3)]
    q, k = [(x.float() / x.float().norm(dim=-1, keepdim=True)).bfloat16() for x in (q, k)]
    ours = ferry.linear_attention(q, k, v, "one_plus_x_max_norm", True).float()
    fq, fk, fv = heads_major(q, k, v)
    theirs = FASTMAX.forwardpass_bf16(fq, fk, fv, True)[0].float()
    theirs = theirs.reshape(b, h, n, d).permute(0, 2, 1, 3)
    return ((ours - theirs).norm() / ours.norm()).item()


def same_function_check(d):
    """Ferry's elu+1 against fla chunk on the same inputs (relative error of out)."""
    if not HAVE_FLA:
        return None
    b, n, h = 2, 2048, 4
    q, k, v = [(torch.randn(b, n, h, d, device="cuda") * d ** -0.5).bfloat16() for _ in range(3)]
    ours = ferry.linear_attention(q, k, v, "elu_plus_one", True).float()
    pq = (torch.nn.functional.elu(q.float()) + 1).bfloat16()
    pk = (torch.nn.functional.elu(k.float()) + 1).bfloat16()
    theirs = chunk_linear_attn(pq, pk, v, normalize=True)[0].float()
    return ((ours - theirs).norm() / theirs.norm()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="N = 8k only")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--fla-budget", type=float, default=1e9,
                        help="seconds after which fla (its Triton autotuning is slow) is skipped")
    parser.add_argument("--peer-shapes", "--fla-shapes", dest="peer_shapes", default="",
                        help="d:N pairs (comma separated) fla and Fastmax run at; default every shape")
    parser.add_argument("--ns", default="", help="sequence lengths (comma separated)")
    parser.add_argument("--batches", default="4", help="batch sizes (comma separated)")
    parser.add_argument("--methods", default="",
                        help="method names to run (comma separated); default all")
    args = parser.parse_args()
    torch.manual_seed(int(time.time()))
    dev = torch.cuda.get_device_properties(0)
    t0 = time.time()
    ferry.extension()
    print(f"device: {dev.name}, {dev.multi_processor_count} SMs; ferry extension built in "
          f"{ferry.build_seconds:.1f} s", flush=True)
    bw = copy_bandwidth()
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + written)", flush=True)
    h = 16
    batches = [int(x) for x in args.batches.split(",")]
    ns = [8192] if args.quick else [2048, 4096, 8192, 16384, 32768]
    if args.ns:
        ns = [int(x) for x in args.ns.split(",")]
    chosen = set(args.methods.split(",")) if args.methods else None
    rows = []
    err = same_function_check(128)
    if err is not None:
        print(f"d=128: ferry elu+1 vs fla chunk (same function) relative difference {err:.2e}",
              flush=True)
    err = fastmax_check(128)
    if err is not None:
        print(f"d=128: ferry 1+x maxnorm vs fastmax (unit-norm rows) relative difference "
              f"{err:.2e}", flush=True)
    # Ferry and SDPA for every shape first, then fla (slow to autotune) while its budget lasts.
    plan = [(b, d, n, name) for b in batches for d in (128, 64) for n in ns for name in methods(d)
            if not is_peer(name) and (chosen is None or name in chosen)]
    peer_shapes = {tuple(int(x) for x in pair.split(":")) for pair in args.peer_shapes.split(",")
                   if pair}
    plan += [(b, d, n, name) for b in batches for d in (128, 64) for n in ns
             for name in methods(d)
             if is_peer(name) and (chosen is None or name in chosen)
             and (not peer_shapes or (d, n) in peer_shapes)]
    os.makedirs(args.out, exist_ok=True)
    for i, (b, d, n, name) in enumerate(plan):
        if name.startswith("fla") and not plan[i - 1][3].startswith("fla") and not args.quick:
            plot(rows, os.path.join(args.out, "linear_attention.png"))  # in case fla runs long
        if name.startswith("fla") and time.time() - t0 > args.fla_budget:
            print(f"{name} B={b} d={d} N={n}: skipped (fla budget of {args.fla_budget:.0f} s "
                  f"spent)", flush=True)
            continue
        prepare, fn = methods(d)[name]
        try:
            t_fwd, t_bwd, t_all, peak = bench_one(prepare, fn, b, n, h, d)
        except torch.OutOfMemoryError:
            print(f"{name} B={b} d={d} N={n}: out of memory", flush=True)
            continue
        floor_fwd = 8 * n * d * b * h / bw * 1e3
        floor_all = 22 * n * d * b * h / bw * 1e3
        row = dict(method=name, b=b, d=d, n=n, fwd_ms=t_fwd, bwd_ms=t_bwd, fwd_bwd_ms=t_all,
                   peak_gib=peak / 2**30, floor_fwd=floor_fwd / t_fwd,
                   floor_fwd_bwd=floor_all / t_all)
        rows.append(row)
        print(f"{name:18} B={b} d={d:3} N={n:5}  fwd {t_fwd:8.3f} ms  bwd {t_bwd:8.3f} ms  "
              f"fwd+bwd {t_all:8.3f} ms  peak {peak / 2**30:6.2f} GiB  "
              f"floor fwd {row['floor_fwd']:.2f} fwd+bwd {row['floor_fwd_bwd']:.2f}  "
              f"[{time.time() - t0:.0f} s]", flush=True)
        # Written after every row, so a run cut short still leaves its table.
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(device=dev.name, copy_bw=bw, rows=rows), f, indent=1)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(summary(rows))
    print(summary(rows), flush=True)
    if not args.quick:
        plot(rows, os.path.join(args.out, "linear_attention.png"))
    print(f"bench done in {time.time() - t0:.0f} s", flush=True)


def summary(rows):
    """Markdown table: per (d, N) every method's fwd, bwd, fwd+bwd, peak, floor fraction,
    Ferry's speed-up over fla's best fwd+bwd and over SDPA, and over Fastmax (same map)."""
    out = ["| B | d | N | method | fwd ms | bwd ms | fwd+bwd ms | peak GiB | floor fwd | floor fwd+bwd |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({(r.get("b", 4), r["d"], r["n"]) for r in rows})
    notes, fastmax_notes = [], []
    for b, d, n in keys:
        group = [r for r in rows if r.get("b", 4) == b and r["d"] == d and r["n"] == n]
        for r in group:
            out.append(f"| {b} | {d} | {n} | {r['method']} | {r['fwd_ms']:.3f} | {r['bwd_ms']:.3f} | "
                       f"{r['fwd_bwd_ms']:.3f} | {r['peak_gib']:.2f} | {r['floor_fwd']:.2f} | "
                       f"{r['floor_fwd_bwd']:.2f} |")
        by = {r["method"]: r for r in group}
        fla = [by[m] for m in ("fla chunk", "fla fused_chunk") if m in by]
        ours = by.get("ferry elu+1")
        if ours and fla:
            best = min(fla, key=lambda r: r["fwd_bwd_ms"])
            least = min(fla, key=lambda r: r["peak_gib"])
            sdpa = by.get("sdpa causal")
            notes.append(f"| {b} | {d} | {n} | {best['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x ({best['method']}) | "
                         f"{ours['peak_gib'] / least['peak_gib']:.2f} | "
                         + (f"{sdpa['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f}x |" if sdpa else "- |"))
        fastmax, same_map = by.get("fastmax"), by.get("ferry 1+x maxnorm")
        if fastmax and same_map:
            fastmax_notes.append(
                f"| {b} | {d} | {n} | {fastmax['fwd_ms'] / same_map['fwd_ms']:.1f}x | "
                f"{fastmax['fwd_bwd_ms'] / same_map['fwd_bwd_ms']:.1f}x | "
                f"{same_map['peak_gib'] / fastmax['peak_gib']:.2f} |")
    if notes:
        out += ["", "| B | d | N | ferry elu+1 fwd+bwd speed-up over fla's best | ferry peak / fla's least peak | speed-up over SDPA causal |",
                "|---|---|---|---|---|---|"] + notes
    if fastmax_notes:
        out += ["", "| B | d | N | ferry 1+x maxnorm fwd speed-up over fastmax | fwd+bwd speed-up | ferry peak / fastmax peak |",
                "|---|---|---|---|---|---|"] + fastmax_notes
    return "\n".join(out) + "\n"


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for i, d in enumerate((64, 128)):
        for j, (key, label) in enumerate((("fwd_bwd_ms", "fwd+bwd ms"), ("peak_gib", "peak GiB"))):
            ax = axes[2 * i + j]
            for b, m in sorted({(r.get("b", 4), r["method"]) for r in rows}):
                pts = sorted((r["n"], r[key]) for r in rows
                             if r.get("b", 4) == b and r["d"] == d and r["method"] == m)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                            label=f"{m}, B={b}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (tokens)")
            ax.set_title(f"d={d}: {label} (H=16, bf16)")
            ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
