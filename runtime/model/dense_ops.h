// The decoder's dense building blocks on the CPU, float32 throughout.
//
// Shapes are row-major; `rows` counts tokens. Conventions follow Hugging Face's Llama so that the
// parity tests compare like with like:
//   RmsNorm:  out = x * rsqrt(mean(x^2) + eps) * weight           x, out (rows, dim)
//   Rope:     rotate-half pairing (i, i + head_dim/2), not interleaved; inv_freq computed in
//             float32 exactly as transformers' rope init does (so the angles match its buffer),
//             llama3 scaling applied to inv_freq; angle = float32(position * inv_freq)
//   SwiGLU:   out = silu(gate) * up, gate_up (rows, 2 * inter) with gate first, out (rows, inter)
//   Linear:   y (rows, out) = x (rows, in) * W^T + b, W (out, in) as HF stores it; OpenBLAS sgemm
// In-place use is allowed where noted. Functions are stateless and thread-safe; OpenBLAS uses its
// own threads inside Linear.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/model/model_config.h"

namespace ferry::model {

// out may alias x.
void RmsNorm(const float* x, const float* weight, int64_t rows, int dim, double eps, float* out);

// inv_freq (head_dim / 2), float32, as transformers computes it for `rope`.
std::vector<float> RopeInvFreq(const RopeConfig& rope, int head_dim);

// Rotates `num_heads` heads of one token in place: x (num_heads, head_dim).
// cos_sin holds head_dim / 2 cosines then head_dim / 2 sines for the token's position.
void ApplyRope(float* x, int num_heads, int head_dim, const float* cos_sin);

// cos_sin (head_dim) for one position.
void RopeCosSin(const std::vector<float>& inv_freq, int64_t position, float* cos_sin);

// out (rows, inter) from gate_up (rows, 2 * inter).
void SwiGlu(const float* gate_up, int64_t rows, int inter, float* out);

// y = x W^T (+ bias when non-null); beta = 1 accumulates into y (residual adds).
void Linear(const float* x, int64_t rows, int in, const float* w, int out, const float* bias,
            float* y, bool accumulate = false);

}  // namespace ferry::model
