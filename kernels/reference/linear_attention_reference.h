// Plain float64 loops for causal linear attention (linear_attention.h), for tests only.
//
// LinearAttentionReference evaluates the quadratic definition directly: for each position i it
// forms the weights w_ij of every j <= i (with the running max norms a_i, b_i for
// kOnePlusXMaxNorm) and sums, with no state and no recurrence, so it checks the kernels' state
// formulation independently. Inputs are float64 so finite differences can perturb them:
//   q (total_tokens, num_q_heads, head_dim), k and v (total_tokens, num_kv_heads, head_dim),
//   total_tokens = cu_seqlens[num_seqs]. Returns out (total_tokens, num_q_heads, head_dim).
// No initial state (positions start at 0). Inputs are trusted (validate first).
//
// LinearAttentionFiniteDifferenceGradients: dq, dk, dv of sum(dout * out) by central differences
// of the reference with step `step` (relative to max(1, |x|)); O(elements * L^2 d) per sequence,
// for small problems.
#pragma once

#include <cstdint>
#include <vector>

#include "ferry/kernels/linear_attention.h"

namespace ferry::kernels::reference {

// The feature map / normalisation combinations the kernels serve, named for test output: every
// linear-attention test (CPU and CUDA) runs over this one list.
struct LinearAttentionVariant {
  LinearFeatureMap feature_map;
  bool normalize;
  const char* name;
};
inline constexpr LinearAttentionVariant kLinearAttentionVariants[] = {
    {LinearFeatureMap::kOnePlusXMaxNorm, true, "one_plus_x_max_norm"},
    {LinearFeatureMap::kOnePlusXMaxNorm, false, "one_plus_x_max_norm_unnormalised"},
    {LinearFeatureMap::kEluPlusOne, true, "elu_plus_one"},
    {LinearFeatureMap::kEluPlusOne, false, "elu_plus_one_unnormalised"},
    {LinearFeatureMap::kIdentity, false, "identity_unnormalised"},
};

std::vector<double> LinearAttentionReference(const LinearAttentionConfig& config,
                                             const int32_t* cu_seqlens, const double* q,
                                             const double* k, const double* v);

struct LinearAttentionGradients {
  std::vector<double> dq;
  std::vector<double> dk;
  std::vector<double> dv;
};

LinearAttentionGradients LinearAttentionFiniteDifferenceGradients(
    const LinearAttentionConfig& config, const int32_t* cu_seqlens, const std::vector<double>& q,
    const std::vector<double>& k, const std::vector<double>& v, const std::vector<double>& dout,
    double step = 1e-6);

}  // namespace ferry::kernels::reference
