// CPU causal linear attention against the float64 quadratic definition (forward), float64
// central finite differences of it (backward), and itself through the state (chunked prefill,
// decode steps).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "ferry/kernels/cpu_linear_attention.h"
#include "gtest/gtest.h"
#include "linear_attention_reference.h"

namespace ferry::kernels {
namespace {

// Forward vs float64 (relative 2-norm error per sequence): the float32 recurrence measured at
// most 5e-7 over up to 1024 tokens (8e-7 at 3000); 1e-5 leaves room for other compilers.
constexpr double kForwardTolerance = 1e-5;
// Gradients vs float64 central differences (step 1e-6 relative, their own error about 1e-9):
// float32 rounding of the backward dominates, measured at most 8.2e-7.
constexpr double kGradientTolerance = 1e-5;

using Variant = reference::LinearAttentionVariant;
constexpr const auto& kVariants = reference::kLinearAttentionVariants;

struct Problem {
  LinearAttentionConfig config;
  std::vector<int32_t> cu_seqlens;
  std::vector<float> q, k, v;

  int64_t total_tokens() const { return cu_seqlens.back(); }
  int64_t q_size() const { return total_tokens() * config.num_q_heads * config.head_dim; }
  int64_t kv_size() const { return total_tokens() * config.num_kv_heads * config.head_dim; }
  int64_t state_size() const {
    const int group = config.num_q_heads / config.num_kv_heads;
    return int64_t{config.num_seqs} * config.num_kv_heads *
           MakeLinearStateLayout(config.head_dim, group).stride;
  }
};

std::vector<float> RandomVector(int64_t n, std::mt19937& rng, float scale = 1.0f) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> x(n);
  for (float& e : x) e = normal(rng);
  return x;
}

Problem MakeProblem(const Variant& variant, const std::vector<int32_t>& lengths, int num_q_heads,
                    int num_kv_heads, int head_dim, std::mt19937& rng, float qk_scale = 1.0f,
                    float v_scale = 1.0f) {
  Problem p;
  p.config.num_seqs = static_cast<int>(lengths.size());
  p.config.num_q_heads = num_q_heads;
  p.config.num_kv_heads = num_kv_heads;
  p.config.head_dim = head_dim;
  p.config.feature_map = variant.feature_map;
  p.config.normalize = variant.normalize;
  p.cu_seqlens.assign(1, 0);
  for (int32_t len : lengths) p.cu_seqlens.push_back(p.cu_seqlens.back() + len);
  // Elu and identity sums grow with d; keep their weights O(1) so float32 is tested, not luck.
  const float feature_scale = variant.feature_map == LinearFeatureMap::kOnePlusXMaxNorm
                                  ? 1.0f
                                  : 1.0f / std::sqrt(float(head_dim));
  p.q = RandomVector(p.q_size(), rng, qk_scale * feature_scale);
  p.k = RandomVector(p.kv_size(), rng, qk_scale);
  p.v = RandomVector(p.kv_size(), rng, v_scale);
  return p;
}

std::vector<double> ToDouble(const std::vector<float>& x) { return {x.begin(), x.end()}; }

std::vector<double> Reference(const Problem& p) {
  return reference::LinearAttentionReference(p.config, p.cu_seqlens.data(), ToDouble(p.q).data(),
                                             ToDouble(p.k).data(), ToDouble(p.v).data());
}

// ||actual - expected|| / ||expected|| over elements [begin, end).
double RelativeError(const std::vector<float>& actual, const std::vector<double>& expected,
                     int64_t begin = 0, int64_t end = -1) {
  if (end < 0) end = static_cast<int64_t>(expected.size());
  double diff = 0.0, norm = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    diff += (actual[i] - expected[i]) * (actual[i] - expected[i]);
    norm += expected[i] * expected[i];
  }
  if (norm == 0.0) return std::sqrt(diff);
  return std::sqrt(diff / norm);
}

int64_t CountNaN(const std::vector<float>& x) {
  return std::count_if(x.begin(), x.end(), [](float e) { return !std::isfinite(e); });
}

std::vector<float> Poisoned(int64_t n) {
  return std::vector<float>(n, std::numeric_limits<float>::quiet_NaN());
}

LinearAttentionForwardArgs ForwardArgs(const Problem& p, float* out) {
  LinearAttentionForwardArgs args;
  args.config = p.config;
  args.cu_seqlens = p.cu_seqlens.data();
  args.total_tokens = p.total_tokens();
  args.q = p.q.data();
  args.k = p.k.data();
  args.v = p.v.data();
  args.out = out;
  return args;
}

std::vector<float> Forward(const Problem& p, ThreadPool& pool) {
  std::vector<float> out = Poisoned(p.q_size());
  const absl::Status status = LinearAttentionForwardCpu(ForwardArgs(p, out.data()), pool);
  EXPECT_TRUE(status.ok()) << status;
  return out;
}

// Checks every sequence on its own so that a wrong short sequence cannot hide in the total.
void ExpectMatchesReference(const Problem& p, const std::vector<float>& out, double tolerance,
                            const std::string& what) {
  const std::vector<double> expected = Reference(p);
  EXPECT_EQ(CountNaN(out), 0) << what;
  const int64_t width = int64_t{p.config.num_q_heads} * p.config.head_dim;
  double worst = 0.0;
  for (int s = 0; s < p.config.num_seqs; ++s) {
    const double error =
        RelativeError(out, expected, p.cu_seqlens[s] * width, p.cu_seqlens[s + 1] * width);
    worst = std::max(worst, error);
    EXPECT_LT(error, tolerance) << what << ": sequence " << s << " of length "
                                << p.cu_seqlens[s + 1] - p.cu_seqlens[s];
  }
  std::printf("%s: worst relative error %.3g\n", what.c_str(), worst);
}

TEST(LinearAttentionCpuTest, ForwardMatchesFloat64ReferenceForEveryVariant) {
  ThreadPool pool(2);
  std::mt19937 rng(11);
  for (const Variant& variant : kVariants) {
    for (int head_dim : {64, 128}) {
      const Problem p = MakeProblem(variant, {1, 7, 64, 200, 33}, 4, 2, head_dim, rng);
      ExpectMatchesReference(p, Forward(p, pool), kForwardTolerance,
                             std::string(variant.name) + " d=" + std::to_string(head_dim));
    }
  }
}

TEST(LinearAttentionCpuTest, HeadDim256AndSmallHeadDims) {
  ThreadPool pool(2);
  std::mt19937 rng(12);
  for (const Variant& variant : kVariants) {
    for (int head_dim : {1, 3, 256}) {
      // d = 1 with max-norm: w_00 = 1 + sign(q_0 k_0) is 0 for opposite signs and o_0 is 0 / 0,
      // as the function says (linear_attention.h); nothing to compare.
      if (head_dim == 1 && variant.feature_map == LinearFeatureMap::kOnePlusXMaxNorm &&
          variant.normalize) {
        continue;
      }
      const Problem p = MakeProblem(variant, {5, 40}, 2, 1, head_dim, rng);
      ExpectMatchesReference(p, Forward(p, pool), kForwardTolerance,
                             std::string(variant.name) + " d=" + std::to_string(head_dim));
    }
  }
}

TEST(LinearAttentionCpuTest, VarlenBatchWithEmptyAndLengthOneSequencesAndGqaShapes) {
  ThreadPool pool(2);
  std::mt19937 rng(13);
  struct Heads {
    int q, kv;
  };
  for (const Variant& variant : kVariants) {
    for (Heads heads : {Heads{3, 3}, Heads{8, 2}, Heads{4, 1}}) {
      const Problem p = MakeProblem(variant, {1, 0, 5, 1, 37, 0, 1}, heads.q, heads.kv, 64, rng);
      ExpectMatchesReference(p, Forward(p, pool), kForwardTolerance,
                             std::string(variant.name) + " Hq=" + std::to_string(heads.q) +
                                 " Hkv=" + std::to_string(heads.kv));
    }
  }
}

// The float32 state sums thousands of terms; its error grows slowly with the length.
TEST(LinearAttentionCpuTest, LongSequenceMatchesFloat64Reference) {
  ThreadPool pool(2);
  std::mt19937 rng(24);
  for (const Variant& variant : {kVariants[0], kVariants[2], kVariants[4]}) {
    const Problem p = MakeProblem(variant, {1024}, 2, 1, 64, rng);
    ExpectMatchesReference(p, Forward(p, pool), kForwardTolerance,
                           std::string(variant.name) + " N=1024");
  }
}

TEST(LinearAttentionCpuTest, BitIdenticalAcrossThreadCounts) {
  std::mt19937 rng(14);
  const Problem p = MakeProblem(kVariants[0], {50, 3, 17, 90}, 8, 2, 64, rng);
  ThreadPool one(1), two(2), four(4);
  const std::vector<float> a = Forward(p, one);
  EXPECT_EQ(a, Forward(p, two));
  EXPECT_EQ(a, Forward(p, four));
}

// Splits every sequence at split[s] (0 and the full length included), runs [0, split) with the
// final state out, then the rest from that state, in place, and expects one forward's outputs and
// final state exactly: both run the same float32 recurrence.
TEST(LinearAttentionCpuTest, ChunkedForwardThroughStateEqualsOneForward) {
  ThreadPool pool(2);
  std::mt19937 rng(15);
  const std::vector<int32_t> lengths = {20, 1, 33, 8, 0};
  const std::vector<int32_t> splits = {7, 0, 33, 4, 0};
  for (const Variant& variant : kVariants) {
    const Problem whole = MakeProblem(variant, lengths, 4, 2, 64, rng);
    std::vector<float> whole_state(whole.state_size(), -1.0f);
    std::vector<float> whole_out = Poisoned(whole.q_size());
    LinearAttentionForwardArgs args = ForwardArgs(whole, whole_out.data());
    args.final_state = whole_state.data();
    ASSERT_TRUE(LinearAttentionForwardCpu(args, pool).ok());

    // Two problems that hold the head and tail tokens of each sequence.
    const int64_t q_width = int64_t{whole.config.num_q_heads} * whole.config.head_dim;
    const int64_t kv_width = int64_t{whole.config.num_kv_heads} * whole.config.head_dim;
    Problem head = whole, tail = whole;
    head.cu_seqlens.assign(1, 0);
    tail.cu_seqlens.assign(1, 0);
    head.q.clear();
    head.k.clear();
    head.v.clear();
    tail.q.clear();
    tail.k.clear();
    tail.v.clear();
    for (size_t s = 0; s < lengths.size(); ++s) {
      for (int32_t i = 0; i < lengths[s]; ++i) {
        Problem& part = i < splits[s] ? head : tail;
        const int64_t t = whole.cu_seqlens[s] + i;
        part.q.insert(part.q.end(), whole.q.begin() + t * q_width,
                      whole.q.begin() + (t + 1) * q_width);
        part.k.insert(part.k.end(), whole.k.begin() + t * kv_width,
                      whole.k.begin() + (t + 1) * kv_width);
        part.v.insert(part.v.end(), whole.v.begin() + t * kv_width,
                      whole.v.begin() + (t + 1) * kv_width);
      }
      head.cu_seqlens.push_back(head.cu_seqlens.back() + splits[s]);
      tail.cu_seqlens.push_back(tail.cu_seqlens.back() + lengths[s] - splits[s]);
    }
    std::vector<float> state(whole.state_size(), -1.0f);
    std::vector<float> head_out = Poisoned(head.q_size()), tail_out = Poisoned(tail.q_size());
    LinearAttentionForwardArgs head_args = ForwardArgs(head, head_out.data());
    head_args.final_state = state.data();
    ASSERT_TRUE(LinearAttentionForwardCpu(head_args, pool).ok());
    LinearAttentionForwardArgs tail_args = ForwardArgs(tail, tail_out.data());
    tail_args.initial_state = state.data();
    tail_args.final_state = state.data();  // in place
    ASSERT_TRUE(LinearAttentionForwardCpu(tail_args, pool).ok());

    for (size_t s = 0; s < lengths.size(); ++s) {
      for (int32_t i = 0; i < lengths[s]; ++i) {
        const bool in_head = i < splits[s];
        const int64_t part_t =
            in_head ? head.cu_seqlens[s] + i : tail.cu_seqlens[s] + i - splits[s];
        const std::vector<float>& part_out = in_head ? head_out : tail_out;
        const int64_t t = whole.cu_seqlens[s] + i;
        for (int64_t e = 0; e < q_width; ++e) {
          ASSERT_EQ(part_out[part_t * q_width + e], whole_out[t * q_width + e])
              << variant.name << ": sequence " << s << " token " << i << " element " << e;
        }
      }
    }
    EXPECT_EQ(state, whole_state) << variant.name;
    EXPECT_EQ(CountNaN(whole_out), 0);
  }
}

// The state record holds what linear_attention.h says, field by field (the CUDA kernels and the
// runtime read and write the same bytes).
TEST(LinearAttentionCpuTest, FinalStateHoldsTheDocumentedSums) {
  ThreadPool pool(2);
  std::mt19937 rng(26);
  for (const Variant& variant : kVariants) {
    const int d = 16, group = 3;
    const Problem p = MakeProblem(variant, {11, 0}, group, 1, d, rng);
    const LinearStateLayout layout = MakeLinearStateLayout(d, group);
    EXPECT_EQ(layout.stride % 32, 0);
    std::vector<float> state(p.state_size(), 0.0f);
    std::vector<float> out = Poisoned(p.q_size());
    LinearAttentionForwardArgs args = ForwardArgs(p, out.data());
    args.final_state = state.data();
    ASSERT_TRUE(LinearAttentionForwardCpu(args, pool).ok());
    auto phi = [&](double x) {
      return variant.feature_map == LinearFeatureMap::kEluPlusOne ? (x > 0 ? x + 1 : std::exp(x))
                                                                  : x;
    };
    std::vector<double> s(d * d, 0.0), z(d, 0.0), v_sum(d, 0.0), q_norm(group, 0.0);
    double k_norm = 0.0;
    for (int t = 0; t < 11; ++t) {
      const float* k = &p.k[t * d];
      const float* v = &p.v[t * d];
      double norm = 0.0;
      for (int a = 0; a < d; ++a) {
        norm += double{k[a]} * k[a];
        z[a] += phi(k[a]);
        v_sum[a] += v[a];
        for (int b = 0; b < d; ++b) s[a * d + b] += phi(k[a]) * v[b];
      }
      k_norm = std::max(k_norm, std::sqrt(norm));
      for (int g = 0; g < group; ++g) {
        double qn = 0.0;
        for (int a = 0; a < d; ++a)
          qn += double{p.q[(t * group + g) * d + a]} * p.q[(t * group + g) * d + a];
        q_norm[g] = std::max(q_norm[g], std::sqrt(qn));
      }
    }
    auto slice = [&](int64_t offset, int64_t n) {
      return std::vector<float>(state.begin() + offset, state.begin() + offset + n);
    };
    EXPECT_LT(RelativeError(slice(layout.s_offset, d * d), s), 1e-6) << variant.name;
    EXPECT_LT(RelativeError(slice(layout.z_offset, d), z), 1e-6) << variant.name;
    EXPECT_LT(RelativeError(slice(layout.v_sum_offset, d), v_sum), 1e-6) << variant.name;
    EXPECT_EQ(state[layout.count_offset], 11.0f);
    EXPECT_NEAR(state[layout.k_norm_offset], k_norm, 1e-5 * k_norm);
    EXPECT_LT(RelativeError(slice(layout.q_norm_offset, group), q_norm), 1e-6) << variant.name;
    // The empty second sequence leaves its record empty.
    for (int64_t i = layout.stride; i < 2 * layout.stride; ++i) ASSERT_EQ(state[i], 0.0f);
  }
}

// Prefill of the first tokens, then one decode step per remaining token with a batch that
// shrinks as sequences end and states kept in shuffled slots of a larger pool.
TEST(LinearAttentionCpuTest, PrefillThenDecodeStepsEqualOneForward) {
  ThreadPool pool(2);
  std::mt19937 rng(16);
  const std::vector<int32_t> lengths = {12, 3, 25, 1};
  const std::vector<int32_t> prefill = {5, 0, 1, 1};
  const std::vector<int32_t> slot_of = {6, 2, 0, 4};
  const int num_slots = 7;
  for (const Variant& variant : kVariants) {
    const Problem whole = MakeProblem(variant, lengths, 6, 2, 64, rng);
    const std::vector<float> whole_out = Forward(whole, pool);
    const LinearAttentionConfig& c = whole.config;
    const int64_t q_width = int64_t{c.num_q_heads} * c.head_dim;
    const int64_t kv_width = int64_t{c.num_kv_heads} * c.head_dim;
    const int64_t record = int64_t{c.num_kv_heads} *
                           MakeLinearStateLayout(c.head_dim, c.num_q_heads / c.num_kv_heads).stride;

    // Prefill every sequence's first tokens into a dense state, then scatter to the slots.
    Problem pre = whole;
    pre.cu_seqlens.assign(1, 0);
    pre.q.clear();
    pre.k.clear();
    pre.v.clear();
    for (size_t s = 0; s < lengths.size(); ++s) {
      const int64_t t = whole.cu_seqlens[s];
      pre.q.insert(pre.q.end(), whole.q.begin() + t * q_width,
                   whole.q.begin() + (t + prefill[s]) * q_width);
      pre.k.insert(pre.k.end(), whole.k.begin() + t * kv_width,
                   whole.k.begin() + (t + prefill[s]) * kv_width);
      pre.v.insert(pre.v.end(), whole.v.begin() + t * kv_width,
                   whole.v.begin() + (t + prefill[s]) * kv_width);
      pre.cu_seqlens.push_back(pre.cu_seqlens.back() + prefill[s]);
    }
    std::vector<float> dense(pre.state_size());
    std::vector<float> pre_out = Poisoned(pre.q_size());
    LinearAttentionForwardArgs pre_args = ForwardArgs(pre, pre_out.data());
    pre_args.final_state = dense.data();
    ASSERT_TRUE(LinearAttentionForwardCpu(pre_args, pool).ok());
    std::vector<float> states(num_slots * record, std::numeric_limits<float>::quiet_NaN());
    for (size_t s = 0; s < lengths.size(); ++s) {
      std::copy(dense.begin() + s * record, dense.begin() + (s + 1) * record,
                states.begin() + slot_of[s] * record);
    }

    for (int32_t step = 0;; ++step) {
      std::vector<int> batch;
      for (size_t s = 0; s < lengths.size(); ++s) {
        if (prefill[s] + step < lengths[s]) batch.push_back(static_cast<int>(s));
      }
      if (batch.empty()) break;
      std::vector<float> q, k, v;
      std::vector<int32_t> slots;
      for (int s : batch) {
        const int64_t t = whole.cu_seqlens[s] + prefill[s] + step;
        q.insert(q.end(), whole.q.begin() + t * q_width, whole.q.begin() + (t + 1) * q_width);
        k.insert(k.end(), whole.k.begin() + t * kv_width, whole.k.begin() + (t + 1) * kv_width);
        v.insert(v.end(), whole.v.begin() + t * kv_width, whole.v.begin() + (t + 1) * kv_width);
        slots.push_back(slot_of[s]);
      }
      std::vector<float> out = Poisoned(static_cast<int64_t>(batch.size()) * q_width);
      LinearAttentionDecodeArgs args;
      args.config = c;
      args.config.num_seqs = static_cast<int>(batch.size());
      args.q = q.data();
      args.k = k.data();
      args.v = v.data();
      args.states = states.data();
      args.state_slots = slots.data();
      args.num_state_slots = num_slots;
      args.out = out.data();
      ASSERT_TRUE(LinearAttentionDecodeCpu(args, pool).ok());
      for (size_t b = 0; b < batch.size(); ++b) {
        const int64_t t = whole.cu_seqlens[batch[b]] + prefill[batch[b]] + step;
        for (int64_t e = 0; e < q_width; ++e) {
          ASSERT_EQ(out[b * q_width + e], whole_out[t * q_width + e])
              << variant.name << ": sequence " << batch[b] << " decode step " << step;
        }
      }
    }
  }
}

TEST(LinearAttentionCpuTest, DecodeWithoutSlotsFromEmptyStateIsTheFirstToken) {
  ThreadPool pool(2);
  std::mt19937 rng(17);
  for (const Variant& variant : kVariants) {
    const Problem p = MakeProblem(variant, {1, 1, 1}, 4, 4, 64, rng);
    std::vector<float> states(p.state_size(), 0.0f);
    std::vector<float> out = Poisoned(p.q_size());
    LinearAttentionDecodeArgs args;
    args.config = p.config;
    args.q = p.q.data();
    args.k = p.k.data();
    args.v = p.v.data();
    args.states = states.data();
    args.num_state_slots = p.config.num_seqs;
    args.out = out.data();
    ASSERT_TRUE(LinearAttentionDecodeCpu(args, pool).ok());
    EXPECT_EQ(out, Forward(p, pool)) << variant.name;
    ExpectMatchesReference(p, out, kForwardTolerance, std::string("decode ") + variant.name);
  }
}

// bf16 / fp16 inputs and outputs, float32 state: against float64 on the rounded inputs, where
// the output's own rounding dominates: at most the unit roundoff per element (2^-8 = 3.9e-3 for
// bf16, 2^-11 = 4.9e-4 for fp16; measured 1.7e-3 and 2.3e-4); tolerances are those bounds plus
// room for the float32 error.
TEST(LinearAttentionCpuTest, HalfPrecisionInputsMatchReferenceAndDecode) {
  ThreadPool pool(2);
  std::mt19937 rng(25);
  struct Half {
    DType dtype;
    double tolerance;
  };
  for (Half half : {Half{DType::kBFloat16, 4e-3}, Half{DType::kFloat16, 5e-4}}) {
    auto to_bits = [&](float x) {
      return half.dtype == DType::kBFloat16 ? FloatToBFloat16Bits(x) : FloatToFloat16Bits(x);
    };
    auto to_float = [&](uint16_t b) {
      return half.dtype == DType::kBFloat16 ? BFloat16BitsToFloat(b) : Float16BitsToFloat(b);
    };
    auto round = [&](std::vector<float>& x) {
      std::vector<uint16_t> bits(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        bits[i] = to_bits(x[i]);
        x[i] = to_float(bits[i]);
      }
      return bits;
    };
    for (const Variant& variant : kVariants) {
      Problem p = MakeProblem(variant, {1, 30, 90}, 4, 2, 64, rng);
      const std::vector<uint16_t> q = round(p.q), k = round(p.k), v = round(p.v);
      std::vector<uint16_t> out_bits(p.q_size(), 0x7fff);  // NaN in both formats
      LinearAttentionForwardArgs args = ForwardArgs(p, nullptr);
      args.config.dtype = half.dtype;
      args.q = q.data();
      args.k = k.data();
      args.v = v.data();
      args.out = out_bits.data();
      ASSERT_TRUE(LinearAttentionForwardCpu(args, pool).ok());
      std::vector<float> out(out_bits.size());
      for (size_t i = 0; i < out.size(); ++i) out[i] = to_float(out_bits[i]);
      ExpectMatchesReference(p, out, half.tolerance,
                             std::string(DTypeName(half.dtype)) + " " + variant.name);

      // Decode the 30-token sequence's last token from a prefill of its first 29 tokens: the
      // same bits as the forward.
      const int64_t q_width = int64_t{p.config.num_q_heads} * p.config.head_dim;
      const int64_t kv_width = int64_t{p.config.num_kv_heads} * p.config.head_dim;
      const std::vector<int32_t> prefix = {0, 29};
      std::vector<float> state(int64_t{p.config.num_kv_heads} *
                               MakeLinearStateLayout(64, 2).stride);
      std::vector<uint16_t> prefix_out(29 * q_width);
      LinearAttentionForwardArgs pre = args;
      pre.config.num_seqs = 1;
      pre.cu_seqlens = prefix.data();
      pre.total_tokens = 29;
      pre.q = q.data() + 1 * q_width;
      pre.k = k.data() + 1 * kv_width;
      pre.v = v.data() + 1 * kv_width;
      pre.out = prefix_out.data();
      pre.final_state = state.data();
      ASSERT_TRUE(LinearAttentionForwardCpu(pre, pool).ok());
      std::vector<uint16_t> step_out(q_width);
      LinearAttentionDecodeArgs decode;
      decode.config = pre.config;
      decode.q = q.data() + 30 * q_width;
      decode.k = k.data() + 30 * kv_width;
      decode.v = v.data() + 30 * kv_width;
      decode.states = state.data();
      decode.num_state_slots = 1;
      decode.out = step_out.data();
      ASSERT_TRUE(LinearAttentionDecodeCpu(decode, pool).ok());
      EXPECT_TRUE(std::equal(step_out.begin(), step_out.end(), out_bits.begin() + 30 * q_width))
          << DTypeName(half.dtype) << " " << variant.name;
    }
  }
}

struct BackwardResult {
  std::vector<float> dq, dk, dv;
};

// The problem's inputs; dout and the gradients' buffers (r) may be left null.
LinearAttentionBackwardArgs BackwardArgs(const Problem& p, const float* dout,
                                         BackwardResult* r) {
  LinearAttentionBackwardArgs args;
  args.config = p.config;
  args.cu_seqlens = p.cu_seqlens.data();
  args.total_tokens = p.total_tokens();
  args.q = p.q.data();
  args.k = p.k.data();
  args.v = p.v.data();
  args.dout = dout;
  if (r != nullptr) {
    args.dq = r->dq.data();
    args.dk = r->dk.data();
    args.dv = r->dv.data();
  }
  return args;
}

BackwardResult Backward(const Problem& p, const std::vector<float>& dout, ThreadPool& pool) {
  BackwardResult r{Poisoned(p.q_size()), Poisoned(p.kv_size()), Poisoned(p.kv_size())};
  const absl::Status status = LinearAttentionBackwardCpu(BackwardArgs(p, dout.data(), &r), pool);
  EXPECT_TRUE(status.ok()) << status;
  return r;
}

void ExpectGradientsMatchFiniteDifferences(const Problem& p, std::mt19937& rng,
                                           const std::string& what) {
  ThreadPool pool(2);
  const std::vector<float> dout = RandomVector(p.q_size(), rng);
  const BackwardResult got = Backward(p, dout, pool);
  const reference::LinearAttentionGradients want =
      reference::LinearAttentionFiniteDifferenceGradients(p.config, p.cu_seqlens.data(),
                                                          ToDouble(p.q), ToDouble(p.k),
                                                          ToDouble(p.v), ToDouble(dout));
  EXPECT_EQ(CountNaN(got.dq) + CountNaN(got.dk) + CountNaN(got.dv), 0) << what;
  const double eq = RelativeError(got.dq, want.dq);
  const double ek = RelativeError(got.dk, want.dk);
  const double ev = RelativeError(got.dv, want.dv);
  EXPECT_LT(eq, kGradientTolerance) << what << ": dq";
  EXPECT_LT(ek, kGradientTolerance) << what << ": dk";
  EXPECT_LT(ev, kGradientTolerance) << what << ": dv";
  std::printf("%s: relative error dq %.3g dk %.3g dv %.3g\n", what.c_str(), eq, ek, ev);
}

TEST(LinearAttentionCpuTest, GradientsMatchFloat64FiniteDifferences) {
  std::mt19937 rng(18);
  for (const Variant& variant : kVariants) {
    // Lengths 1 to 13 cross several changes of the running max norms (kOnePlusXMaxNorm).
    const Problem p = MakeProblem(variant, {1, 6, 13, 0}, 4, 2, 8, rng);
    ExpectGradientsMatchFiniteDifferences(p, rng, std::string(variant.name) + " d=8");
    const Problem wide = MakeProblem(variant, {3, 7}, 2, 1, 64, rng);
    ExpectGradientsMatchFiniteDifferences(wide, rng, std::string(variant.name) + " d=64");
  }
}

// Token 0 holds by far the largest q and k, so every a_i and b_i is its norm and the whole
// gradient through the rescaling lands on token 0; a backward that stopped it there would fail.
TEST(LinearAttentionCpuTest, MaxNormGradientFlowsIntoTheArgmaxToken) {
  std::mt19937 rng(19);
  Problem p = MakeProblem(kVariants[0], {6}, 1, 1, 4, rng);
  // Token 0 has by far the largest q and k: every a_i and b_i is its norm.
  for (int c = 0; c < 4; ++c) {
    p.q[c] *= 10.0f;
    p.k[c] *= 10.0f;
  }
  ExpectGradientsMatchFiniteDifferences(p, rng, "one_plus_x_max_norm, argmax at token 0");
}

TEST(LinearAttentionCpuTest, ExtremeMagnitudesGiveNoNaN) {
  ThreadPool pool(2);
  std::mt19937 rng(20);
  for (float scale : {1e2f, 1e4f}) {
    // 1 + x with max-norm is invariant to the scale of q and k.
    const Problem base = MakeProblem(kVariants[0], {1, 50, 300}, 4, 2, 128, rng);
    Problem scaled = base;
    for (float& x : scaled.q) x *= scale;
    for (float& x : scaled.k) x *= scale;
    for (float& x : scaled.v) x *= scale;
    const std::vector<float> out = Forward(scaled, pool);
    ExpectMatchesReference(scaled, out, kForwardTolerance,
                           "one_plus_x_max_norm scale " + std::to_string(scale));
    std::vector<double> base_scaled(out.size());
    const std::vector<float> base_out = Forward(base, pool);
    for (size_t i = 0; i < out.size(); ++i) base_scaled[i] = double{base_out[i]} * scale;
    EXPECT_LT(RelativeError(out, base_scaled), kForwardTolerance);
    const BackwardResult grads = Backward(scaled, RandomVector(scaled.q_size(), rng), pool);
    EXPECT_EQ(CountNaN(grads.dq) + CountNaN(grads.dk) + CountNaN(grads.dv), 0);
  }
  // elu + 1 with q, k of magnitude 1e2: features up to ~100 and down to e^-300 (0 in float32).
  const Problem elu = MakeProblem(kVariants[2], {1, 50, 300}, 4, 2, 128, rng, 1e2f, 1e2f);
  ExpectMatchesReference(elu, Forward(elu, pool), kForwardTolerance, "elu_plus_one scale 1e2");
  const BackwardResult grads = Backward(elu, RandomVector(elu.q_size(), rng), pool);
  EXPECT_EQ(CountNaN(grads.dq) + CountNaN(grads.dk) + CountNaN(grads.dv), 0);
}

TEST(LinearAttentionCpuTest, AllZeroQueriesAndKeysGiveTheRunningMeanOfV) {
  ThreadPool pool(1);
  std::mt19937 rng(21);
  Problem p = MakeProblem(kVariants[0], {9}, 2, 1, 16, rng);
  std::fill(p.q.begin(), p.q.end(), 0.0f);
  std::fill(p.k.begin(), p.k.end(), 0.0f);
  const std::vector<float> out = Forward(p, pool);
  ASSERT_EQ(CountNaN(out), 0);
  for (int i = 0; i < 9; ++i) {
    for (int c = 0; c < 16; ++c) {
      double mean = 0.0;
      for (int j = 0; j <= i; ++j) mean += p.v[j * 16 + c];
      mean /= i + 1;
      for (int h = 0; h < 2; ++h) EXPECT_NEAR(out[(i * 2 + h) * 16 + c], mean, 1e-5);
    }
  }
  const BackwardResult grads = Backward(p, RandomVector(p.q_size(), rng), pool);
  EXPECT_EQ(CountNaN(grads.dq) + CountNaN(grads.dk) + CountNaN(grads.dv), 0);
}

TEST(LinearAttentionCpuTest, EmptyBatchesAndEmptySequencesNeedNoBuffers) {
  ThreadPool pool(2);
  LinearAttentionForwardArgs args;
  args.config = {0, 4, 2, 64, LinearFeatureMap::kOnePlusXMaxNorm, true};
  const std::vector<int32_t> none = {0};
  args.cu_seqlens = none.data();
  EXPECT_TRUE(LinearAttentionForwardCpu(args, pool).ok());
  // Two empty sequences pass their initial state through unchanged.
  const std::vector<int32_t> empty = {0, 0, 0};
  args.config.num_seqs = 2;
  args.cu_seqlens = empty.data();
  const int64_t stride = MakeLinearStateLayout(64, 2).stride;
  std::mt19937 rng(23);
  const std::vector<float> initial = RandomVector(2 * 2 * stride, rng);
  std::vector<float> final_state(initial.size(), 0.0f);
  args.initial_state = initial.data();
  args.final_state = final_state.data();
  EXPECT_TRUE(LinearAttentionForwardCpu(args, pool).ok());
  EXPECT_EQ(final_state, initial);
  LinearAttentionBackwardArgs backward;
  backward.config = args.config;
  backward.cu_seqlens = empty.data();
  EXPECT_TRUE(LinearAttentionBackwardCpu(backward, pool).ok());
}

// Bad input: an error naming the field, and nothing written.
TEST(LinearAttentionCpuTest, BadInputIsAnErrorNamingTheField) {
  ThreadPool pool(1);
  std::mt19937 rng(22);
  const Problem good = MakeProblem(kVariants[0], {3, 4}, 4, 2, 64, rng);
  auto expect_error = [&](LinearAttentionForwardArgs args, const std::string& field) {
    std::vector<float> out = Poisoned(good.q_size());
    args.out = out.data();
    const absl::Status status = LinearAttentionForwardCpu(args, pool);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(std::string(status.message()).find(field), std::string::npos) << status;
    EXPECT_EQ(CountNaN(out), good.q_size()) << field << ": output written";
  };
  std::vector<float> out(good.q_size());
  const LinearAttentionForwardArgs ok_args = ForwardArgs(good, out.data());
  ASSERT_TRUE(LinearAttentionForwardCpu(ok_args, pool).ok());

  LinearAttentionForwardArgs a = ok_args;
  a.config.num_q_heads = 3;
  expect_error(a, "num_q_heads");
  a = ok_args;
  a.config.num_kv_heads = 0;
  expect_error(a, "num_kv_heads");
  a = ok_args;
  a.config.head_dim = 0;
  expect_error(a, "head_dim");
  a = ok_args;
  a.config.head_dim = 257;
  expect_error(a, "head_dim");
  a = ok_args;
  a.config.num_seqs = -1;
  expect_error(a, "num_seqs");
  a = ok_args;
  a.config.feature_map = static_cast<LinearFeatureMap>(9);
  expect_error(a, "feature_map");
  a = ok_args;
  a.config.feature_map = LinearFeatureMap::kIdentity;
  a.config.normalize = true;
  expect_error(a, "normalize");
  a = ok_args;
  a.cu_seqlens = nullptr;
  expect_error(a, "cu_seqlens");
  const std::vector<int32_t> starts_at_one = {1, 3, 7};
  a = ok_args;
  a.cu_seqlens = starts_at_one.data();
  expect_error(a, "cu_seqlens[0]");
  const std::vector<int32_t> decreasing = {0, 5, 4};
  a = ok_args;
  a.cu_seqlens = decreasing.data();
  a.total_tokens = 4;
  expect_error(a, "cu_seqlens decreases at sequence 1");
  a = ok_args;
  a.total_tokens = 8;
  expect_error(a, "total_tokens");
  a = ok_args;
  a.config.dtype = static_cast<DType>(7);
  expect_error(a, "dtype");
  a = ok_args;
  a.q = nullptr;
  expect_error(a, "q is null");
  a = ok_args;
  a.v = nullptr;
  expect_error(a, "v is null");

  LinearAttentionBackwardArgs b = BackwardArgs(good, nullptr, nullptr);
  const absl::Status no_dout = LinearAttentionBackwardCpu(b, pool);
  EXPECT_NE(std::string(no_dout.message()).find("dout"), std::string::npos) << no_dout;
  b.config.dtype = DType::kBFloat16;
  const absl::Status half = LinearAttentionBackwardCpu(b, pool);
  EXPECT_NE(std::string(half.message()).find("dtype"), std::string::npos) << half;

  std::vector<float> states(good.state_size() * 2, 0.0f);
  std::vector<float> decode_out = Poisoned(good.q_size());
  LinearAttentionDecodeArgs d;
  d.config = good.config;  // 2 sequences
  d.q = good.q.data();
  d.k = good.k.data();
  d.v = good.v.data();
  d.states = states.data();
  d.out = decode_out.data();
  d.num_state_slots = 1;
  EXPECT_NE(std::string(LinearAttentionDecodeCpu(d, pool).message()).find("num_state_slots"),
            std::string::npos);
  const std::vector<int32_t> out_of_range = {0, 4};
  d.num_state_slots = 4;
  d.state_slots = out_of_range.data();
  EXPECT_NE(std::string(LinearAttentionDecodeCpu(d, pool).message()).find("state_slots[1]"),
            std::string::npos);
  const std::vector<int32_t> twice = {2, 2};
  d.state_slots = twice.data();
  EXPECT_NE(std::string(LinearAttentionDecodeCpu(d, pool).message()).find("state_slots[1]"),
            std::string::npos);
  EXPECT_EQ(CountNaN(decode_out), good.q_size());
  for (float x : states) ASSERT_EQ(x, 0.0f);
}

}  // namespace
}  // namespace ferry::kernels
