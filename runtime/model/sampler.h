// Token sampling from one logits row: greedy, temperature, top-k, top-p, with a per-request seed.
//
// temperature <= 0 (or top_k == 1) is greedy: the arg max, the lowest id on ties. Otherwise the
// logits are divided by the temperature, the top_k largest kept (0: all), then the smallest set of
// the most likely tokens whose probability reaches top_p (at least one token), renormalised, and
// one token drawn. Ties in the ordering break by lower id, so a draw depends only on the logits,
// the parameters and the sampler's stream: the stream is splitmix64 seeded by `seed` (not
// <random>, whose distributions differ between standard libraries), so a seed reproduces the
// same tokens on every platform. Softmax runs in double.
// Threads: a Sampler is one request's state; use one per request.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/status/status.h"

namespace ferry::model {

struct SamplingParams {
  double temperature = 0.0;
  int top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
};

absl::Status ValidateSamplingParams(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params) : params_(params), state_(params.seed) {}
  int32_t Sample(std::span<const float> logits);

 private:
  double NextUniform();  // [0, 1)
  SamplingParams params_;
  uint64_t state_;
  std::vector<int32_t> order_;
  std::vector<double> probs_;
};

}  // namespace ferry::model
