"""PyTorch front end of Ferry's CUDA causal linear attention.

Builds ferry_linear_attn_ext.cpp and kernels/cuda/linear_attention_{fwd,fwd_sm90,bwd,decode}.cu with
torch.utils.cpp_extension.load on first use (sm_90a; head dims from FERRY_LINEAR_HEAD_DIMS, default
"64,128"), into a fresh build directory unless FERRY_EXT_BUILD_DIR names one.

linear_attention(q, k, v, ...) takes q (B, N, Hq, d), k and v (B, N, Hkv, d) (or packed
(T, H, d) with cu_seqlens) in bf16 or fp16 and returns out (and the final state) with autograd:
gradients flow to q, k, v and to initial_state.
"""
import os
import tempfile
import time

import torch
from torch.utils.cpp_extension import load

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.abspath(os.path.join(_HERE, "..", ".."))
_ext = None
build_seconds = None


def extension():
    """The compiled extension (built on first call)."""
    global _ext, build_seconds
    if _ext is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
        dims = os.environ.get("FERRY_LINEAR_HEAD_DIMS", "64,128").split(",")
        build_dir = os.environ.get("FERRY_EXT_BUILD_DIR") or tempfile.mkdtemp(prefix="ferry_ext_")
        cuda_dir = os.path.join(_REPO, "kernels", "cuda")
        start = time.time()
        _ext = load(
            name="ferry_linear_attn_ext",
            sources=[os.path.join(_HERE, "ferry_linear_attn_ext.cpp")]
            + [os.path.join(cuda_dir, f"linear_attention_{part}.cu")
               for part in ("fwd", "fwd_sm90", "bwd", "decode")],
            extra_include_paths=[os.path.join(_REPO, "kernels", "include"), cuda_dir],
            extra_cflags=["-O2", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
            + [f"-DFERRY_LINEAR_HEAD_DIM_{d.strip()}" for d in dims],
            build_directory=build_dir,
            verbose=False,
        )
        build_seconds = time.time() - start
    return _ext


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, initial_state, cu_seqlens, feature_map, normalize, want_final_state):
        out, final_state, stats, residual = extension().forward(
            q, k, v, cu_seqlens, initial_state, feature_map, normalize, want_final_state, True)
        ctx.save_for_backward(q, k, v, initial_state, cu_seqlens, out, residual, stats)
        ctx.feature_map = feature_map
        ctx.normalize = normalize
        if final_state is not None:
            ctx.mark_non_differentiable(final_state)
        return out, final_state

    @staticmethod
    def backward(ctx, dout, _d_final_state):
        q, k, v, initial_state, cu_seqlens, out, residual, stats = ctx.saved_tensors
        want_d_state = initial_state is not None and ctx.needs_input_grad[3]
        dq, dk, dv, d_state = extension().backward(
            q, k, v, cu_seqlens, initial_state, out, residual, stats, dout, ctx.feature_map,
            ctx.normalize, want_d_state)
        return dq, dk, dv, d_state, None, None, None, None


def linear_attention(q, k, v, feature_map="one_plus_x_max_norm", normalize=True, cu_seqlens=None,
                     initial_state=None, output_final_state=False):
    """Causal linear attention. q (B, N, Hq, d) or (T, Hq, d) with cu_seqlens (int32)."""
    batched = cu_seqlens is None
    if batched:
        b, n = q.shape[0], q.shape[1]
        cu_seqlens = torch.arange(0, (b + 1) * n, n, dtype=torch.int32, device=q.device)
        q, k, v = (x.reshape(b * n, *x.shape[2:]) for x in (q, k, v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out, final_state = _LinearAttention.apply(q, k, v, initial_state, cu_seqlens, feature_map,
                                              normalize, output_final_state)
    if batched:
        out = out.reshape(b, n, *out.shape[1:])
    return (out, final_state) if output_final_state else out


def decode(q, k, v, states, feature_map="one_plus_x_max_norm", normalize=True, state_slots=None):
    """One token per sequence (q (B, Hq, d)); states (slots, Hkv, stride) float32, in place."""
    return extension().decode(q.contiguous(), k.contiguous(), v.contiguous(), states, state_slots,
                              feature_map, normalize)


def state_stride(head_dim, group):
    return extension().state_stride(head_dim, group)
