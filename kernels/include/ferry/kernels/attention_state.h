// The partial-state algebra: the one definition that CPU kernels, CUDA kernels and the wire use.
//
// A partial state summarises attention of one query over a subset S of KV positions:
//   m = max_j s_j,  l = sum_j exp(s_j - m),  o = sum_j exp(s_j - m) v_j / l,  lse = m + log(l)
// o is float32 and already normalised over S; lse is float32, natural log (not base 2).
// Merging (o1, lse1) and (o2, lse2) gives the state of the union:
//   lse = logaddexp(lse1, lse2),  o = exp(lse1 - lse) o1 + exp(lse2 - lse) o2
// The identity is (o = 0, lse = -inf): an empty shard returns it, and merging two identities
// gives the identity again (no NaN from -inf - -inf). Merge is associative and commutative up to
// float rounding; callers that need bit-identical results fix the order of their merges.
//
// Memory layout of an array of states: o is (num_states, head_dim) float32, row-major;
// lse is (num_states) float32. Everything here is header-only and host+device.
#pragma once

#include <math.h>

#include "ferry/kernels/dtype.h"  // FERRY_HOST_DEVICE

namespace ferry::kernels {

// -inf without <limits> so the header stays usable in device code.
#define FERRY_EMPTY_LSE (-__builtin_huge_valf())

// Scales that combine two states: merged = scale_a * a + scale_b * b, merged lse = lse.
struct MergeWeights {
  float lse;
  float scale_a;
  float scale_b;
};

FERRY_HOST_DEVICE MergeWeights ComputeMergeWeights(float lse_a, float lse_b) {
  const float m = fmaxf(lse_a, lse_b);
  // Both empty: exp(-inf - -inf) would be NaN. Scales of 0 keep o at 0.
  if (m == FERRY_EMPTY_LSE) return {FERRY_EMPTY_LSE, 0.0f, 0.0f};
  const float weight_a = expf(lse_a - m);  // one of the two is exp(0) = 1
  const float weight_b = expf(lse_b - m);
  const float sum = weight_a + weight_b;
  return {m + logf(sum), weight_a / sum, weight_b / sum};
}

// State of an online softmax (running max m, running sum l of exp(s - m)) as an lse.
// l == 0 means no position was seen: the identity.
FERRY_HOST_DEVICE float LseFromRunningMaxAndSum(float running_max, float running_sum) {
  return running_sum > 0.0f ? running_max + logf(running_sum) : FERRY_EMPTY_LSE;
}

// Merges the state (o_in, lse_in) into (o_acc, *lse_acc) in place. o_* hold head_dim floats.
FERRY_HOST_DEVICE void MergeStateInPlace(float* o_acc, float* lse_acc, const float* o_in,
                                         float lse_in, int head_dim) {
  const MergeWeights w = ComputeMergeWeights(*lse_acc, lse_in);
  for (int i = 0; i < head_dim; ++i) o_acc[i] = w.scale_a * o_acc[i] + w.scale_b * o_in[i];
  *lse_acc = w.lse;
}

// Sets one state to the identity.
FERRY_HOST_DEVICE void SetEmptyState(float* o, float* lse, int head_dim) {
  for (int i = 0; i < head_dim; ++i) o[i] = 0.0f;
  *lse = FERRY_EMPTY_LSE;
}

// Batched merge of num_parts arrays of states, for one state index.
//   parts_o   (num_parts, num_states, head_dim)   parts_lse (num_parts, num_states)
//   out_o     (num_states, head_dim)              out_lse   (num_states)
// Parts are merged left to right (part 0 first), so the result is deterministic. A CPU loop or
// one CUDA thread per (state, element) calls this; out may not alias parts.
FERRY_HOST_DEVICE void MergeStatesAt(const float* parts_o, const float* parts_lse, int num_parts,
                                     long long num_states, int head_dim, long long state,
                                     float* out_o, float* out_lse) {
  float* o = out_o + state * head_dim;
  SetEmptyState(o, out_lse + state, head_dim);
  for (int p = 0; p < num_parts; ++p) {
    MergeStateInPlace(o, out_lse + state, parts_o + (p * num_states + state) * head_dim,
                      parts_lse[p * num_states + state], head_dim);
  }
}

}  // namespace ferry::kernels
