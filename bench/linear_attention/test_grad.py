"""Gradients of Ferry's CUDA linear attention (through the PyTorch binding) against a float64
PyTorch reference of the quadratic definition (ferry/kernels/linear_attention.h).

Run on the GPU machine: python3 bench/linear_attention/test_grad.py (or under pytest).
Inputs are fresh random bf16 tensors; the reference sees the same values in float64 and
differentiates them with autograd (cummax sends the max-norm gradient to the argmax token).
Tolerance: relative 2-norm error 1e-2 for out and every gradient (bf16 operands and outputs:
the output rounding alone is ~1e-3; see tests/gpu/linear_attention_test.cc).
"""
import math
import sys
import time

import torch

import ferry_linear_attn as fla_ferry

TOLERANCE = 1e-2
# dq of normalised elu + 1: 6e-2 (measured 1.5e-2 to 3.2e-2): see the Numerics note in
# kernels/include/ferry/kernels/cuda_linear_attention.h.
ELU_NORMALISED_DQ_TOLERANCE = 6e-2
FLOOR = 1e-12


def phi(x, feature_map):
    return torch.nn.functional.elu(x) + 1 if feature_map == "elu_plus_one" else x


def reference(q, k, v, feature_map, normalize):
    """q (B, N, Hq, d), k and v (B, N, Hkv, d), float64; out (B, N, Hq, d)."""
    group = q.shape[2] // k.shape[2]
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    n = q.shape[1]
    if feature_map == "one_plus_x_max_norm":
        a = torch.cummax(q.norm(dim=-1), dim=1).values.clamp_min(FLOOR)  # (B, N, H)
        b = torch.cummax(k.norm(dim=-1), dim=1).values.clamp_min(FLOOR)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / (a * b).permute(0, 2, 1)[..., None]
        w = 1 + s
    else:
        w = torch.einsum("bihd,bjhd->bhij", phi(q, feature_map), phi(k, feature_map))
    w = w * torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    out = torch.einsum("bhij,bjhd->bihd", w, v)
    if normalize:
        out = out / w.sum(-1).permute(0, 2, 1)[..., None]
    return out


def state_of(q, k, v, feature_map, stride):
    """The state record (B, Hkv, stride) a prefix leaves, float64, differentiable."""
    bsz, _, hq, d = q.shape
    hkv = k.shape[2]
    group = hq // hkv
    fk = phi(k, feature_map)
    records = []
    for b in range(bsz):
        heads = []
        for h in range(hkv):
            s = torch.einsum("ta,tb->ab", fk[b, :, h], v[b, :, h])
            z = fk[b, :, h].sum(0)
            vs = v[b, :, h].sum(0)
            count = torch.tensor([float(k.shape[1])], dtype=q.dtype, device=q.device)
            k_norm = k[b, :, h].norm(dim=-1).max().reshape(1)
            q_norms = q[b, :, h * group:(h + 1) * group].norm(dim=-1).max(dim=0).values
            used = d * d + 2 * d + 2 + group
            pad = torch.zeros(stride - used, dtype=q.dtype, device=q.device)
            heads.append(torch.cat([s.flatten(), z, vs, count, k_norm, q_norms, pad]))
        records.append(torch.stack(heads))
    return torch.stack(records)


def dq_tolerance(feature_map, normalize):
    return ELU_NORMALISED_DQ_TOLERANCE if feature_map == "elu_plus_one" and normalize else TOLERANCE


def rel(a, b):
    a = a.double()
    b = b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def check(name, errors, dq_tol=TOLERANCE):
    ok = all(math.isfinite(e) and e < (dq_tol if k == "dq" else TOLERANCE)
             for k, e in errors.items())
    status = "ok" if ok else "FAIL"
    print(f"{status:4} {name:58} " + "  ".join(f"{k} {e:.2e}" for k, e in errors.items()), flush=True)
    return status == "ok"


def case_plain(feature_map, normalize, d, hq, hkv, bsz=2, n=300, dtype=torch.bfloat16):
    scale = 1.0 if feature_map == "one_plus_x_max_norm" else d ** -0.5
    q = (torch.randn(bsz, n, hq, d, device="cuda") * scale).to(dtype).requires_grad_()
    k = (torch.randn(bsz, n, hkv, d, device="cuda") * scale).to(dtype).requires_grad_()
    v = torch.randn(bsz, n, hkv, d, device="cuda").to(dtype).requires_grad_()
    dout = torch.randn(bsz, n, hq, d, device="cuda").to(dtype)
    out = fla_ferry.linear_attention(q, k, v, feature_map, normalize)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, feature_map, normalize)
    ref.backward(dout.double())
    return check(f"{feature_map} norm={normalize} d={d} hq={hq} hkv={hkv} {str(dtype)[6:]}",
                 {"out": rel(out, ref), "dq": rel(q.grad, q64.grad), "dk": rel(k.grad, k64.grad),
                  "dv": rel(v.grad, v64.grad)}, dq_tolerance(feature_map, normalize))


def case_state(feature_map, normalize, d, hq=4, hkv=2, bsz=2, prefix=100, suffix=150):
    """A prefix's state as initial_state: suffix gradients and d_state (pulled back to the
    prefix's inputs through the float64 state function) against the whole-sequence reference."""
    scale = 1.0 if feature_map == "one_plus_x_max_norm" else d ** -0.5
    n = prefix + suffix
    q = (torch.randn(bsz, n, hq, d, device="cuda") * scale).bfloat16()
    k = (torch.randn(bsz, n, hkv, d, device="cuda") * scale).bfloat16()
    v = torch.randn(bsz, n, hkv, d, device="cuda").bfloat16()
    dout = torch.randn(bsz, suffix, hq, d, device="cuda").bfloat16()
    _, state = fla_ferry.linear_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], feature_map,
                                          normalize, output_final_state=True)
    state = state.detach().requires_grad_()
    qs, ks, vs = (x[:, prefix:].contiguous().requires_grad_() for x in (q, k, v))
    out = fla_ferry.linear_attention(qs, ks, vs, feature_map, normalize, initial_state=state)
    out.backward(dout)

    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    ref = reference(q64, k64, v64, feature_map, normalize)[:, prefix:]
    ref.backward(dout.double())
    # J^T d_state through the prefix's state function.
    p64 = [x.detach().double()[:, :prefix].requires_grad_() for x in (q, k, v)]
    st = state_of(*p64, feature_map, state.shape[-1])
    pulled = torch.autograd.grad(st, p64, grad_outputs=state.grad.double(), allow_unused=True)
    pulled = [torch.zeros_like(x) if g is None else g for g, x in zip(pulled, p64)]
    errors = {"out": rel(out, ref), "dq": rel(qs.grad, q64.grad[:, prefix:]),
              "dk": rel(ks.grad, k64.grad[:, prefix:]), "dv": rel(vs.grad, v64.grad[:, prefix:]),
              "dstate->dk": rel(pulled[1], k64.grad[:, :prefix]),
              "dstate->dv": rel(pulled[2], v64.grad[:, :prefix])}
    if feature_map == "one_plus_x_max_norm":
        errors["dstate->dq"] = rel(pulled[0], q64.grad[:, :prefix])
    return check(f"{feature_map} norm={normalize} d={d} initial state", errors,
                 dq_tolerance(feature_map, normalize))


def main():
    torch.manual_seed(int(time.time()))
    start = time.time()
    fla_ferry.extension()
    print(f"extension built in {fla_ferry.build_seconds:.1f} s", flush=True)
    ok = True
    variants = [("one_plus_x_max_norm", True), ("one_plus_x_max_norm", False),
                ("elu_plus_one", True), ("elu_plus_one", False), ("identity", False)]
    for d in (64, 128):
        for fm, norm in variants:
            ok &= case_plain(fm, norm, d, 4, 2)
    ok &= case_plain("elu_plus_one", True, 128, 2, 2, dtype=torch.float16)
    ok &= case_plain("one_plus_x_max_norm", True, 128, 8, 1, n=200)
    for fm, norm in variants:
        ok &= case_state(fm, norm, 128)
    print(f"{'all passed' if ok else 'FAILED'} in {time.time() - start:.1f} s", flush=True)
    return 0 if ok else 1


def test_gradients_match_float64_reference():
    assert main() == 0


if __name__ == "__main__":
    sys.exit(main())
