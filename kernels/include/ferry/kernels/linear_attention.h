// Causal linear attention: the problem every backend (CPU, CUDA) solves, and its state format.
//
// Layout (varlen, packed as flash-attn / fla's cu_seqlens):
//   cu_seqlens  (num_seqs + 1) int32: sequence s owns tokens [cu_seqlens[s], cu_seqlens[s + 1]);
//               cu_seqlens[0] == 0, non-decreasing, cu_seqlens[num_seqs] == total_tokens. Empty
//               sequences are allowed (they pass the state through).
//   q, out      (total_tokens, num_q_heads, head_dim)   config.dtype, row-major
//   k, v        (total_tokens, num_kv_heads, head_dim)  config.dtype
//   config.dtype: fp32, bf16 or fp16 for the forward and decode (inputs widened to float32 on
//   load, outputs rounded to nearest even on store); the backward takes fp32 only.
//   GQA: q head h reads kv head h / (num_q_heads / num_kv_heads). head_dim in [1, 256] (the CUDA
//   kernels serve 64, 128 and 256; the CPU takes any, so tests can use small ones).
//
// The function. For one sequence, one q head and its kv head, positions are counted from the
// sequence's true start: with an initial state that summarises n0 earlier tokens, the first token
// of the call is position n0. j <= i ranges over all earlier positions, those in the state
// included. phi is the feature map; o_i is
//   normalised:    o_i = sum_{j<=i} w_ij v_j / sum_{j<=i} w_ij
//   unnormalised:  o_i = sum_{j<=i} w_ij v_j
// with the weight w_ij per feature map:
//   kEluPlusOne:       w_ij = phi(q_i) . phi(k_j),  phi(x) = elu(x) + 1 (x + 1 for x > 0, else e^x)
//   kIdentity:         w_ij = q_i . k_j (unnormalised only: its denominator can be 0; scale q
//                      yourself, e.g. by 1/sqrt(d), to match fla's chunk_linear_attn)
//   kOnePlusXMaxNorm:  w_ij = 1 + (q_i . k_j) / (a_i b_i)   (arXiv 2510.21956, no 1/sqrt(d)) with
//                        a_i = max(kLinearNormFloor, max_{j<=i} ||q_j||_2)  (this q head)
//                        b_i = max(kLinearNormFloor, max_{j<=i} ||k_j||_2)  (this kv head)
//                      i.e. q and k are divided by their running maximum norms, so |q.k| <= 1 and
//                      w_ij is in [0, 2]. The paper takes the maximum over the whole sequence;
//                      that is not causal (o_i would depend on later tokens) and no decode step
//                      could reproduce it, so Ferry takes the maximum over positions <= i. For the
//                      last token of a sequence both agree. The rescaling is part of the function:
//                      gradients flow through a_i and b_i (into the q / k that attains the maximum;
//                      the first such position on ties; none while the floor is active).
// In recurrent form (what the state holds; the kernels compute this, the float64 reference the
// quadratic form above):
//   S_i = sum_{j<=i} phi(k_j) v_j^T (d x d),  z_i = sum_{j<=i} phi(k_j),  V_i = sum_{j<=i} v_j,
//   n_i = i + 1. For kOnePlusXMaxNorm phi(k) = k (raw, unscaled) and with c_i = 1 / (a_i b_i):
//     num_i = V_i + c_i S_i^T q_i,  den_i = n_i + c_i q_i . z_i
//   (that is phi(x) = [1, x] lifted to d + 1 with the scale applied at the query). Otherwise
//     num_i = S_i^T phi(q_i),       den_i = phi(q_i) . z_i.
//   o_i = num_i / den_i (normalised) or num_i (unnormalised).
// Numerics: float32 state and accumulation. Squared norms must be finite in float32
// (|x| up to about 1e18). Normalised outputs are 0 / 0 = NaN where the denominator is 0, and are
// ill-conditioned near it; no epsilon is added, so every backend computes the same function.
// For kOnePlusXMaxNorm den_i = 0 needs every w_ij = 0, i.e. q_i anti-parallel to each k_j,
// j <= i, with both at the running maxima (likely only for d = 1, or for a first token whose q
// opposes its k); for kEluPlusOne den_i underflows to 0 only when every feature of q_i is below
// about -87.
//
// The state. One float32 record of MakeLinearStateLayout(head_dim, group).stride floats per
// (sequence, kv head), holding everything the recurrence needs, so chunked prefill and decode
// hand it to each other and a worker can keep or move it as bytes. All-zero is the empty state.
//   [s_offset, +d*d)   S, row-major: S[a][b] = sum_j phi(k_j)_a v_j,b
//   [z_offset, +d)     z = sum_j phi(k_j)
//   [v_sum_offset, +d) V = sum_j v_j
//   count_offset       n, tokens summarised (float32: exact up to 2^24 tokens)
//   k_norm_offset      max_j ||k_j||_2 (raw, no floor)
//   q_norm_offset + g  max_j ||q_j||_2 of the group's g-th q head (raw, no floor), g < group
//   padding to a multiple of 32 floats (128 bytes), unused (copied through).
// Every field is kept for every feature map; S and z depend on the feature map, so a state is
// only valid for the feature map that made it.
//
// Gradients (backward): dq, dk, dv of sum(dout * out), for calls without an initial state (a
// training forward starts from the empty state; no gradient to or from states). The backward
// recomputes the forward; it keeps O(L d) floats per (sequence, kv head) of length L.
//
// Pointers are host pointers for the CPU backend and device pointers for the CUDA backend; the
// structs own nothing. Inputs and outputs must not overlap, except that final_state may be
// initial_state (updated in place).
#pragma once

#include <cstdint>

#include "ferry/kernels/dtype.h"

namespace ferry::kernels {

enum class LinearFeatureMap : uint8_t {
  kOnePlusXMaxNorm = 1,
  kEluPlusOne = 2,
  kIdentity = 3,
};

// Floor of the running max norms of kOnePlusXMaxNorm: keeps 1 / (a b) finite for all-zero
// inputs, where q . k is 0 anyway.
inline constexpr float kLinearNormFloor = 1e-12f;
inline constexpr int kMaxLinearHeadDim = 256;

struct LinearStateLayout {
  int64_t s_offset = 0;
  int64_t z_offset = 0;
  int64_t v_sum_offset = 0;
  int64_t count_offset = 0;
  int64_t k_norm_offset = 0;
  int64_t q_norm_offset = 0;
  int64_t stride = 0;  // floats per (sequence, kv head)
};

// group = num_q_heads / num_kv_heads.
constexpr LinearStateLayout MakeLinearStateLayout(int head_dim, int group) {
  LinearStateLayout layout;
  const int64_t d = head_dim;
  layout.s_offset = 0;
  layout.z_offset = d * d;
  layout.v_sum_offset = layout.z_offset + d;
  layout.count_offset = layout.v_sum_offset + d;
  layout.k_norm_offset = layout.count_offset + 1;
  layout.q_norm_offset = layout.k_norm_offset + 1;
  layout.stride = (layout.q_norm_offset + group + 31) / 32 * 32;
  return layout;
}

struct LinearAttentionConfig {
  int num_seqs = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  LinearFeatureMap feature_map = LinearFeatureMap::kOnePlusXMaxNorm;
  bool normalize = true;
  DType dtype = DType::kFloat32;  // of q, k, v, out (the state is float32 always)
};

struct LinearAttentionForwardArgs {
  LinearAttentionConfig config;
  const int32_t* cu_seqlens = nullptr;   // (num_seqs + 1)
  int64_t total_tokens = 0;              // must equal cu_seqlens[num_seqs]
  const void* q = nullptr;               // (total_tokens, num_q_heads, head_dim)
  const void* k = nullptr;               // (total_tokens, num_kv_heads, head_dim)
  const void* v = nullptr;               // (total_tokens, num_kv_heads, head_dim)
  const float* initial_state = nullptr;  // optional (num_seqs, num_kv_heads, stride); null: empty
  void* out = nullptr;                   // (total_tokens, num_q_heads, head_dim)
  float* final_state = nullptr;          // optional (num_seqs, num_kv_heads, stride)
};

// Gradients of sum(dout * out) for a forward with the same config, cu_seqlens, q, k, v and no
// initial state. float32 only (config.dtype must be kFloat32).
struct LinearAttentionBackwardArgs {
  LinearAttentionConfig config;
  const int32_t* cu_seqlens = nullptr;
  int64_t total_tokens = 0;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* dout = nullptr;  // (total_tokens, num_q_heads, head_dim)
  float* dq = nullptr;          // (total_tokens, num_q_heads, head_dim)
  float* dk = nullptr;          // (total_tokens, num_kv_heads, head_dim)
  float* dv = nullptr;          // (total_tokens, num_kv_heads, head_dim)
};

// One new token per sequence: appends (k, v) to the sequence's state and writes the token's
// output, equal to what the forward would give for that token. config.num_seqs is the batch.
struct LinearAttentionDecodeArgs {
  LinearAttentionConfig config;
  const void* q = nullptr;  // (num_seqs, num_q_heads, head_dim)
  const void* k = nullptr;  // (num_seqs, num_kv_heads, head_dim)
  const void* v = nullptr;  // (num_seqs, num_kv_heads, head_dim)
  float* states = nullptr;  // (num_state_slots, num_kv_heads, stride), updated in place
  // Optional (num_seqs): sequence s uses state slot state_slots[s]; distinct, in
  // [0, num_state_slots). Null: sequence s uses slot s (num_state_slots >= num_seqs).
  const int32_t* state_slots = nullptr;
  int num_state_slots = 0;
  void* out = nullptr;  // (num_seqs, num_q_heads, head_dim)
};

}  // namespace ferry::kernels
