// Plain float64 loops over the same inputs as the fast kernels, for tests and demos only.
//
// DecodeAttentionReference reads the paged KV of a DecodeAttentionArgs (host pointers) position
// by position and returns, per (sequence, q head), the partial state in float64:
//   o (num_seqs * num_q_heads * head_dim), lse (num_seqs * num_q_heads), identity for empty ranges.
// Inputs are trusted (validate with ValidateDecodeAttentionArgs first).
#pragma once

#include <cstdint>
#include <vector>

#include "ferry/kernels/decode_attention.h"

namespace ferry::kernels::reference {

struct ReferenceStates {
  std::vector<double> o;
  std::vector<double> lse;
};

// One element of a tensor stored in `dtype`, widened to double.
double LoadAsDouble(const void* data, DType dtype, int64_t index);

ReferenceStates DecodeAttentionReference(const DecodeAttentionArgs& args);

// ||a - b|| / ||b|| over all elements (2-norm); 0 when both are zero.
double RelativeError(const std::vector<double>& actual, const std::vector<double>& expected);

}  // namespace ferry::kernels::reference
