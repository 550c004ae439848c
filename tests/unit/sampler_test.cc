// Sampling: greedy, determinism per seed, and the distribution of draws against the softmax.
#include "runtime/model/sampler.h"

#include <cmath>
#include <map>
#include <vector>

#include "gtest/gtest.h"

namespace ferry::model {
namespace {

const std::vector<float> kLogits = {1.0f, 3.0f, 2.5f, -1.0f, 3.0f, 0.0f, 2.0f, -5.0f};

TEST(SamplerTest, GreedyTakesTheArgMaxLowestIdOnTies) {
  Sampler greedy(SamplingParams{});
  EXPECT_EQ(greedy.Sample(kLogits), 1);
  SamplingParams top1;
  top1.temperature = 1.0;
  top1.top_k = 1;
  EXPECT_EQ(Sampler(top1).Sample(kLogits), 1);
  std::vector<float> with_nan = {NAN, 0.5f, 0.25f};
  EXPECT_EQ(Sampler(SamplingParams{}).Sample(with_nan), 1);
}

TEST(SamplerTest, SameSeedSameTokensOtherSeedOtherTokens) {
  SamplingParams p;
  p.temperature = 1.5;
  p.seed = 42;
  Sampler a(p), b(p);
  p.seed = 43;
  Sampler c(p);
  int differ = 0;
  for (int i = 0; i < 200; ++i) {
    const int32_t ta = a.Sample(kLogits);
    EXPECT_EQ(ta, b.Sample(kLogits));
    differ += ta != c.Sample(kLogits);
  }
  EXPECT_GT(differ, 20);
}

// Draw counts against the expected probabilities: every bucket within 5 standard deviations
// (a false failure is a < 1e-5 event per bucket).
void ExpectDistribution(const SamplingParams& p, const std::vector<double>& want) {
  Sampler s(p);
  const int n = 200000;
  std::vector<int> counts(kLogits.size());
  for (int i = 0; i < n; ++i) ++counts[s.Sample(kLogits)];
  for (size_t t = 0; t < kLogits.size(); ++t) {
    const double sd = std::sqrt(n * want[t] * (1 - want[t])) + 1e-9;
    EXPECT_NEAR(counts[t], n * want[t], 5 * sd + (want[t] == 0 ? 0 : 1)) << "token " << t;
  }
}

std::vector<double> Softmax(double temperature, const std::vector<int>& keep) {
  std::vector<double> p(kLogits.size(), 0.0);
  double sum = 0;
  for (int t : keep) sum += (p[t] = std::exp(kLogits[t] / temperature));
  for (auto& x : p) x /= sum;
  return p;
}

TEST(SamplerTest, TemperatureFollowsTheSoftmax) {
  SamplingParams p;
  p.temperature = 0.7;
  p.seed = 7;
  ExpectDistribution(p, Softmax(0.7, {0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(SamplerTest, TopKKeepsTheKLargest) {
  SamplingParams p;
  p.temperature = 1.0;
  p.top_k = 3;
  p.seed = 8;
  ExpectDistribution(p, Softmax(1.0, {1, 4, 2}));  // 3.0, 3.0, 2.5
}

TEST(SamplerTest, TopPKeepsTheSmallestNucleus) {
  // Probabilities at T=1: the two 3.0s hold about 0.33 each, 2.5 about 0.20: top_p 0.7 needs
  // three tokens (0.66 < 0.7 <= 0.86).
  SamplingParams p;
  p.temperature = 1.0;
  p.top_p = 0.7;
  p.seed = 9;
  ExpectDistribution(p, Softmax(1.0, {1, 4, 2}));
  p.top_p = 0.5;  // two tokens
  ExpectDistribution(p, Softmax(1.0, {1, 4}));
}

TEST(SamplerTest, ValidatesParameters) {
  SamplingParams p;
  EXPECT_TRUE(ValidateSamplingParams(p).ok());
  p.temperature = -1;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.top_p = 0;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = {};
  p.top_k = -2;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
}

}  // namespace
}  // namespace ferry::model
