// The dense building blocks against float64 loops on fresh random inputs.
// Tolerances: fp32 arithmetic over sums of at most a few hundred terms stays within 1e-5
// (1e-6 for RMSNorm) of the float64 result, as relative error in the 2-norm.
#include "runtime/model/dense_ops.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace ferry::model {
namespace {

std::vector<float> Random(size_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// Relative error in the 2-norm, ||got - want|| / ||want||: per-element ratios blow up where a
// sum cancels to near zero, which says nothing about the kernel.
void ExpectClose(const std::vector<float>& got, const std::vector<double>& want, double rel) {
  ASSERT_EQ(got.size(), want.size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << i;
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  EXPECT_LT(std::sqrt(diff / norm), rel);
}

TEST(DenseOpsTest, RmsNormMatchesFloat64) {
  std::mt19937 rng(std::random_device{}());
  const int rows = 5, dim = 384;
  auto x = Random(rows * dim, rng, 3.0f), w = Random(dim, rng);
  std::vector<float> out(rows * dim);
  RmsNorm(x.data(), w.data(), rows, dim, 1e-5, out.data());
  std::vector<double> want(rows * dim);
  for (int r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += double{x[r * dim + i]} * x[r * dim + i];
    const double s = 1.0 / std::sqrt(ss / dim + 1e-5);
    for (int i = 0; i < dim; ++i) want[r * dim + i] = double{w[i]} * x[r * dim + i] * s;
  }
  ExpectClose(out, want, 1e-6);
  // In place gives the same.
  RmsNorm(x.data(), w.data(), rows, dim, 1e-5, x.data());
  EXPECT_EQ(x, out);
}

TEST(DenseOpsTest, RopeInvFreqDefaultAndLlama3) {
  RopeConfig rope;
  rope.theta = 500000.0;
  const int hd = 128;
  auto plain = RopeInvFreq(rope, hd);
  for (int i = 0; i < hd / 2; ++i) {
    EXPECT_NEAR(plain[i], 1.0 / std::pow(500000.0, 2.0 * i / hd), 1e-6 * plain[i]);
  }
  rope.type = RopeType::kLlama3;
  rope.factor = 32;
  rope.low_freq_factor = 1;
  rope.high_freq_factor = 4;
  rope.original_max_position_embeddings = 8192;
  auto scaled = RopeInvFreq(rope, hd);
  int kept = 0, divided = 0, smoothed = 0;
  for (int i = 0; i < hd / 2; ++i) {
    const double inv = plain[i], wavelen = 2 * M_PI / inv;
    double want;
    if (wavelen < 8192.0 / 4) {
      want = inv, ++kept;
    } else if (wavelen > 8192.0 / 1) {
      want = inv / 32, ++divided;
    } else {
      const double s = (8192.0 / wavelen - 1) / (4 - 1);
      want = (1 - s) * inv / 32 + s * inv, ++smoothed;
    }
    EXPECT_NEAR(scaled[i], want, 1e-5 * want) << i;
  }
  // The three bands all occur for Llama 3.2's parameters.
  EXPECT_GT(kept, 0);
  EXPECT_GT(divided, 0);
  EXPECT_GT(smoothed, 0);
}

TEST(DenseOpsTest, ApplyRopeRotatesHalves) {
  std::mt19937 rng(std::random_device{}());
  RopeConfig rope;
  const int hd = 64, heads = 3;
  const int64_t pos = 1234;
  auto inv = RopeInvFreq(rope, hd);
  std::vector<float> cs(hd);
  RopeCosSin(inv, pos, cs.data());
  auto x = Random(heads * hd, rng);
  auto y = x;
  ApplyRope(y.data(), heads, hd, cs.data());
  std::vector<double> want(heads * hd);
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < hd / 2; ++i) {
      const double angle = static_cast<double>(static_cast<float>(pos) * inv[i]);
      const double a = x[h * hd + i], b = x[h * hd + i + hd / 2];
      want[h * hd + i] = a * std::cos(angle) - b * std::sin(angle);
      want[h * hd + i + hd / 2] = b * std::cos(angle) + a * std::sin(angle);
    }
  }
  ExpectClose(y, want, 1e-5);
}

TEST(DenseOpsTest, SwiGluAndLinearMatchFloat64) {
  std::mt19937 rng(std::random_device{}());
  const int rows = 7, in = 96, out = 80;
  auto gu = Random(rows * 2 * out, rng, 2.0f);
  std::vector<float> act(rows * out);
  SwiGlu(gu.data(), rows, out, act.data());
  std::vector<double> want_act(rows * out);
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < out; ++i) {
      const double g = gu[r * 2 * out + i], u = gu[r * 2 * out + out + i];
      want_act[r * out + i] = g / (1 + std::exp(-g)) * u;
    }
  }
  ExpectClose(act, want_act, 1e-5);

  auto x = Random(rows * in, rng), w = Random(out * in, rng), b = Random(out, rng);
  auto y = Random(rows * out, rng);
  const auto y0 = y;
  Linear(x.data(), rows, in, w.data(), out, b.data(), y.data(), /*accumulate=*/true);
  std::vector<double> want(rows * out);
  for (int r = 0; r < rows; ++r) {
    for (int o = 0; o < out; ++o) {
      double acc = double{y0[r * out + o]} + b[o];
      for (int i = 0; i < in; ++i) acc += double{x[r * in + i]} * w[o * in + i];
      want[r * out + o] = acc;
    }
  }
  ExpectClose(y, want, 1e-5);
}

}  // namespace
}  // namespace ferry::model
