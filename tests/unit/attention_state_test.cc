// The partial-state algebra: identity, commutativity, associativity, numerical edge cases.
#include "ferry/kernels/attention_state.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace ferry::kernels {
namespace {

constexpr int kDim = 8;

struct State {
  std::vector<float> o = std::vector<float>(kDim, 0.0f);
  float lse = FERRY_EMPTY_LSE;
};

State Merge(const State& a, const State& b) {
  State out = a;
  MergeStateInPlace(out.o.data(), &out.lse, b.o.data(), b.lse, kDim);
  return out;
}

State Random(std::mt19937& rng, float lse_scale = 3.0f) {
  std::normal_distribution<float> normal;
  State s;
  for (float& x : s.o) x = normal(rng);
  s.lse = lse_scale * normal(rng);
  return s;
}

void ExpectNear(const State& a, const State& b, float tolerance) {
  EXPECT_NEAR(a.lse, b.lse, tolerance * (1 + std::fabs(b.lse)));
  for (int i = 0; i < kDim; ++i) EXPECT_NEAR(a.o[i], b.o[i], tolerance) << "element " << i;
}

TEST(AttentionStateTest, IdentityIsNeutralOnBothSides) {
  std::mt19937 rng(1);
  const State a = Random(rng);
  const State empty;
  const State left = Merge(empty, a);
  const State right = Merge(a, empty);
  EXPECT_EQ(left.lse, a.lse);
  EXPECT_EQ(right.lse, a.lse);
  EXPECT_EQ(left.o, a.o);
  EXPECT_EQ(right.o, a.o);
}

TEST(AttentionStateTest, TwoIdentitiesGiveTheIdentityWithoutNaN) {
  const State merged = Merge(State{}, State{});
  EXPECT_EQ(merged.lse, FERRY_EMPTY_LSE);
  for (float x : merged.o) EXPECT_EQ(x, 0.0f);
}

TEST(AttentionStateTest, MergeIsCommutative) {
  std::mt19937 rng(2);
  for (int trial = 0; trial < 100; ++trial) {
    const State a = Random(rng), b = Random(rng);
    ExpectNear(Merge(a, b), Merge(b, a), 1e-6f);
  }
}

TEST(AttentionStateTest, MergeIsAssociative) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 100; ++trial) {
    const State a = Random(rng), b = Random(rng), c = Random(rng);
    ExpectNear(Merge(Merge(a, b), c), Merge(a, Merge(b, c)), 1e-5f);
  }
}

TEST(AttentionStateTest, MergeMatchesSoftmaxOverTheUnion) {
  // Two shards of scores; each shard's state from its own softmax; the merge must equal the
  // softmax over all scores (float64 reference).
  std::mt19937 rng(4);
  std::normal_distribution<double> normal(0.0, 4.0);
  std::vector<double> scores(20), values(20);
  for (int i = 0; i < 20; ++i) { scores[i] = normal(rng); values[i] = normal(rng); }
  auto shard_state = [&](int begin, int end) {
    double m = -INFINITY;
    for (int i = begin; i < end; ++i) m = std::max(m, scores[i]);
    double l = 0, o = 0;
    for (int i = begin; i < end; ++i) { l += std::exp(scores[i] - m); o += std::exp(scores[i] - m) * values[i]; }
    State s;
    s.o.assign(kDim, static_cast<float>(o / l));
    s.lse = static_cast<float>(m + std::log(l));
    return s;
  };
  const State merged = Merge(shard_state(0, 7), shard_state(7, 20));
  const State whole = shard_state(0, 20);
  ExpectNear(merged, whole, 1e-5f);
}

TEST(AttentionStateTest, StableForHugeLogitsAndEmptyShards) {
  std::mt19937 rng(5);
  State a = Random(rng), b = Random(rng);
  a.lse = 1e4f;
  b.lse = -1e4f;
  const State merged = Merge(a, b);
  EXPECT_FALSE(std::isnan(merged.lse));
  EXPECT_FLOAT_EQ(merged.lse, 1e4f);
  for (int i = 0; i < kDim; ++i) EXPECT_FLOAT_EQ(merged.o[i], a.o[i]);
  const State equal_huge = Merge(a, a);
  EXPECT_NEAR(equal_huge.lse, 1e4f + std::log(2.0f), 1e-2f);
  for (int i = 0; i < kDim; ++i) EXPECT_NEAR(equal_huge.o[i], a.o[i], 1e-6f);
  const State with_empty = Merge(State{}, a);
  EXPECT_EQ(with_empty.lse, 1e4f);
}

TEST(AttentionStateTest, BatchedMergeFollowsPartOrder) {
  std::mt19937 rng(6);
  constexpr int kParts = 5, kStates = 3;
  std::vector<float> parts_o(kParts * kStates * kDim), parts_lse(kParts * kStates);
  std::vector<State> parts(kParts * kStates);
  for (int i = 0; i < kParts * kStates; ++i) {
    parts[i] = Random(rng);
    if (i % 4 == 0) parts[i] = State{};  // empty shards among the parts
    std::copy(parts[i].o.begin(), parts[i].o.end(), parts_o.begin() + i * kDim);
    parts_lse[i] = parts[i].lse;
  }
  std::vector<float> out_o(kStates * kDim, NAN), out_lse(kStates, NAN);
  for (int s = 0; s < kStates; ++s) {
    MergeStatesAt(parts_o.data(), parts_lse.data(), kParts, kStates, kDim, s, out_o.data(),
                  out_lse.data());
    State expected;
    for (int p = 0; p < kParts; ++p) expected = Merge(expected, parts[p * kStates + s]);
    EXPECT_EQ(out_lse[s], expected.lse);
    for (int i = 0; i < kDim; ++i) EXPECT_EQ(out_o[s * kDim + i], expected.o[i]);
  }
}

}  // namespace
}  // namespace ferry::kernels
