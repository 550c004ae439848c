// A float64 reference of the Llama-family decoder for tests (plain loops, full recompute) and
// the relative error the decoder tests report. Shared by the CPU tests (tests/unit) and the CUDA
// tests (tests/gpu) so both backends are held to the same reference.
#pragma once

#include <cstdint>
#include <vector>

#include "runtime/model/checkpoint.h"

namespace ferry::model::ref {

// The last position's logits (vocab) of a forward over the whole of `tokens`, in float64 from the
// model's float32 weights (same RoPE inv_freq as the backends: dense_ops.h's RopeInvFreq).
std::vector<double> ReferenceLogits(const Model& m, const std::vector<int32_t>& tokens);

// max |got - want| / max |want| over a logits row; infinity when got holds a NaN.
double RelError(const float* got, const std::vector<double>& want);
double RelError(const float* got, const float* want, int n);

}  // namespace ferry::model::ref
