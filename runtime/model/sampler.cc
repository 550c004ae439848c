#include "runtime/model/sampler.h"

#include <algorithm>
#include <cmath>

namespace ferry::model {

absl::Status ValidateSamplingParams(const SamplingParams& p) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) {
    return absl::InvalidArgumentError("sampling: temperature must be a finite number >= 0");
  }
  if (p.top_k < 0) return absl::InvalidArgumentError("sampling: top_k must be >= 0");
  if (!(p.top_p > 0 && p.top_p <= 1)) {
    return absl::InvalidArgumentError("sampling: top_p must be in (0, 1]");
  }
  return absl::OkStatus();
}

double Sampler::NextUniform() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

int32_t Sampler::Sample(std::span<const float> logits) {
  const int32_t n = static_cast<int32_t>(logits.size());
  auto better = [&](int32_t a, int32_t b) {
    // NaN logits never win: treat them as -inf.
    const float la = std::isnan(logits[a]) ? -INFINITY : logits[a];
    const float lb = std::isnan(logits[b]) ? -INFINITY : logits[b];
    return la != lb ? la > lb : a < b;
  };
  if (params_.temperature <= 0 || params_.top_k == 1) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i) {
      if (better(i, best)) best = i;
    }
    return best;
  }
  order_.resize(n);
  for (int32_t i = 0; i < n; ++i) order_[i] = i;
  const int32_t k = params_.top_k > 0 ? std::min(params_.top_k, n) : n;
  std::partial_sort(order_.begin(), order_.begin() + k, order_.end(), better);
  probs_.resize(k);
  const double max_logit = logits[order_[0]];
  double sum = 0;
  for (int32_t i = 0; i < k; ++i) {
    const double l = logits[order_[i]];
    probs_[i] = std::isnan(l) ? 0.0 : std::exp((l - max_logit) / params_.temperature);
    sum += probs_[i];
  }
  int32_t keep = k;
  if (params_.top_p < 1.0) {
    double cumulative = 0;
    for (int32_t i = 0; i < k; ++i) {
      cumulative += probs_[i] / sum;
      if (cumulative >= params_.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept_sum = 0;
  for (int32_t i = 0; i < keep; ++i) kept_sum += probs_[i];
  double u = NextUniform() * kept_sum;
  for (int32_t i = 0; i < keep; ++i) {
    u -= probs_[i];
    if (u < 0) return order_[i];
  }
  return order_[keep - 1];  // rounding left u at or just above zero
}

}  // namespace ferry::model
