// Causal linear attention on CUDA (cuda_linear_attention.h) against the float64 quadratic
// definition (kernels/reference) and the CPU backend. Skips (SetUp) without a CUDA device; head
// dims this build does not serve (FERRY_HEAD_DIMS) are skipped case by case.
//
// Inputs are fresh random normals (the seed is printed) rounded to the tested dtype; references
// see the rounded values, so each error measured is the kernels' own. Outputs are poisoned (NaN)
// before every launch, so an unwritten element fails.
// Tolerances (relative 2-norm error per sequence; each check prints what it measured):
//  * out vs float64: 1e-2. The output's own rounding is ~1.1e-3 (bf16) / 1.4e-4 (fp16) RMS; the
//    tensor cores see phi(q), phi(k) (kEluPlusOne) and fp16 inputs rounded to bf16 (2^-9),
//    ~1e-3 more. Score weights and the state are hi + lo bf16 pairs (~2^-17): negligible.
//  * final state vs the CPU backend's float32 state from the same rounded inputs: 1e-4 where the
//    tensor cores see the inputs exactly (bf16 with kOnePlusXMaxNorm or kIdentity: float32 sums
//    in another order), 1e-2 otherwise (bf16 features, as above).
//  * dq, dk, dv vs the CPU backend's float32 backward (checked against float64 central
//    differences in tests/unit/linear_attention_cpu_test.cc): 1e-2. The backward feeds bf16
//    operands scaled per row (dout / den, c q) to the tensor cores and rounds its outputs
//    (measured ~2e-3 to 4e-3).
//    Except dq of normalised elu + 1: 6e-2 (measured 1.2e-2 to 4.7e-2, growing with d). Its
//    features phi(x) = 1 + x + ... of small x reach the tensor cores as bf16, whose spacing near
//    1 is 2^-7: the small part that the q gradient depends on keeps only a few bits (the weights
//    are nearly uniform, so du is a small difference of large sums). The forward and dk, dv do
//    not suffer it (~2e-3). Keeping phi - 1 instead of phi would fix it; not done yet.
//  * the initial-state gradient pulled back to the inputs of a prefix that made the state,
//    against the CPU backward over the whole sequence: 1e-2.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "device_buffer.h"
#include "ferry/kernels/cpu_linear_attention.h"
#include "ferry/kernels/cuda_linear_attention.h"
#include "ferry/kernels/thread_pool.h"
#include "gtest/gtest.h"
#include "linear_attention_reference.h"

namespace ferry::kernels {
namespace {

constexpr double kOutTolerance = 1e-2;
constexpr double kExactStateTolerance = 1e-4;
constexpr double kStateTolerance = 1e-2;
constexpr double kGradientTolerance = 1e-2;
// dq of normalised elu + 1 (see the header comment).
constexpr double kEluNormalisedDqTolerance = 6e-2;
constexpr uint16_t kPoisonBits = 0x7fff;  // NaN in bf16 and fp16

using Variant = reference::LinearAttentionVariant;
constexpr const auto& kVariants = reference::kLinearAttentionVariants;

uint16_t ToBits(float x, DType dtype) {
  return dtype == DType::kBFloat16 ? FloatToBFloat16Bits(x) : FloatToFloat16Bits(x);
}

float FromBits(uint16_t bits, DType dtype) {
  return dtype == DType::kBFloat16 ? BFloat16BitsToFloat(bits) : Float16BitsToFloat(bits);
}

uint64_t FreshSeed() {
  static const uint64_t seed = [] {
    const uint64_t s = (uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
    std::printf("linear attention test seed: %llu\n", static_cast<unsigned long long>(s));
    return s;
  }();
  static uint64_t calls = 0;
  return seed + 7919 * calls++;
}

// A problem in a 16-bit dtype: the bits the kernels read and the same values as float.
struct Problem {
  LinearAttentionConfig config;
  std::vector<int32_t> cu_seqlens;
  std::vector<uint16_t> q, k, v;
  std::vector<float> qf, kf, vf;

  int64_t total_tokens() const { return cu_seqlens.back(); }
  int64_t q_size() const { return total_tokens() * config.num_q_heads * config.head_dim; }
  int64_t kv_size() const { return total_tokens() * config.num_kv_heads * config.head_dim; }
  int group() const { return config.num_q_heads / config.num_kv_heads; }
  int64_t stride() const { return MakeLinearStateLayout(config.head_dim, group()).stride; }
  int64_t state_size() const { return int64_t{config.num_seqs} * config.num_kv_heads * stride(); }
};

void Fill(std::vector<uint16_t>& bits, std::vector<float>& values, int64_t n, DType dtype,
          std::mt19937_64& rng, float scale, float shift = 0.0f) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  bits.resize(n);
  values.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    bits[i] = ToBits(normal(rng) * scale + shift, dtype);
    values[i] = FromBits(bits[i], dtype);
  }
}

Problem MakeProblem(const Variant& variant, DType dtype, const std::vector<int32_t>& lengths,
                    int num_q_heads, int num_kv_heads, int head_dim, std::mt19937_64& rng,
                    float qk_scale = 1.0f, float v_scale = 1.0f) {
  Problem p;
  p.config.num_seqs = static_cast<int>(lengths.size());
  p.config.num_q_heads = num_q_heads;
  p.config.num_kv_heads = num_kv_heads;
  p.config.head_dim = head_dim;
  p.config.feature_map = variant.feature_map;
  p.config.normalize = variant.normalize;
  p.config.dtype = dtype;
  p.cu_seqlens.assign(1, 0);
  for (int32_t len : lengths) p.cu_seqlens.push_back(p.cu_seqlens.back() + len);
  // Elu and identity sums grow with d; keep their weights O(1) (as the CPU tests do).
  const float feature_scale = variant.feature_map == LinearFeatureMap::kOnePlusXMaxNorm
                                  ? 1.0f
                                  : 1.0f / std::sqrt(float(head_dim));
  Fill(p.q, p.qf, p.q_size(), dtype, rng, qk_scale * feature_scale);
  Fill(p.k, p.kf, p.kv_size(), dtype, rng, qk_scale * feature_scale);
  Fill(p.v, p.vf, p.kv_size(), dtype, rng, v_scale);
  return p;
}

std::string Describe(const Problem& p, const std::string& what) {
  std::string lens;
  for (int s = 0; s < p.config.num_seqs && s < 8; ++s) {
    lens += std::to_string(p.cu_seqlens[s + 1] - p.cu_seqlens[s]) + ",";
  }
  return what + " " + std::string(DTypeName(p.config.dtype)) + " d=" +
         std::to_string(p.config.head_dim) + " hq=" + std::to_string(p.config.num_q_heads) +
         " hkv=" + std::to_string(p.config.num_kv_heads) + " lens=" + lens;
}

std::vector<double> ToDouble(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// Relative 2-norm error over [begin, end) (the whole vectors by default), relative to `scale`
// (default: expected itself).
double RelativeError(const std::vector<float>& actual, const std::vector<double>& expected,
                     int64_t begin = 0, int64_t end = -1,
                     const std::vector<double>* scale = nullptr) {
  if (end < 0) end = static_cast<int64_t>(expected.size());
  const std::vector<double>& s = scale != nullptr ? *scale : expected;
  double diff = 0.0, norm = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double d = double{actual[i]} - expected[i];
    diff += d * d;
    norm += s[i] * s[i];
  }
  if (!std::isfinite(diff)) return std::numeric_limits<double>::infinity();
  return norm == 0.0 ? std::sqrt(diff) : std::sqrt(diff / norm);
}

int64_t CountNonFinite(const std::vector<float>& x) {
  return std::count_if(x.begin(), x.end(), [](float e) { return !std::isfinite(e); });
}

std::vector<float> BitsToFloats(const std::vector<uint16_t>& bits, DType dtype) {
  std::vector<float> out(bits.size());
  for (size_t i = 0; i < bits.size(); ++i) out[i] = FromBits(bits[i], dtype);
  return out;
}

// The problem as float32 (the CPU backend's input): the same rounded values.
LinearAttentionConfig Float32Config(const Problem& p) {
  LinearAttentionConfig c = p.config;
  c.dtype = DType::kFloat32;
  return c;
}

bool InputsExact(const Problem& p) {
  return p.config.dtype == DType::kBFloat16 &&
         p.config.feature_map != LinearFeatureMap::kEluPlusOne;
}

// Chunks per sequence segment the CUDA calls use (cuda_linear_attention.h): 1 splits every
// sequence at every chunk, the most segment boundaries a test can cross; some tests also run the
// unsplit walk (-1) and the automatic choice (0).
int g_segment_chunks = 1;

const char* SegmentName() {
  return g_segment_chunks < 0 ? "unsplit" : g_segment_chunks == 0 ? "auto split" : "split";
}

struct ForwardResult {
  cudaError_t error = cudaSuccess;
  std::vector<float> out, final_state, stats;
};

// CUDA forward from `initial_state` (null: empty), with the row stats and, if asked, the final
// state.
ForwardResult CudaForward(const Problem& p, const std::vector<float>* initial_state = nullptr,
                          bool with_final_state = true) {
  ForwardResult r;
  DeviceBuffer cu, q, k, v, out, stats, init, fin, workspace;
  cu.Upload(p.cu_seqlens);
  q.Upload(p.q);
  k.Upload(p.k);
  v.Upload(p.v);
  out.Upload(std::vector<uint16_t>(p.q_size(), kPoisonBits));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  stats.Upload(std::vector<float>(p.total_tokens() * p.config.num_q_heads * kLinearRowStats, nan));
  fin.Upload(std::vector<float>(p.state_size(), nan));
  if (initial_state != nullptr) init.Upload(*initial_state);
  LinearAttentionForwardArgs args;
  args.config = p.config;
  args.cu_seqlens = cu.get<int32_t>();
  args.total_tokens = p.total_tokens();
  args.q = q.get();
  args.k = k.get();
  args.v = v.get();
  args.out = out.get();
  args.initial_state = initial_state != nullptr ? init.get<float>() : nullptr;
  args.final_state = with_final_state ? fin.get<float>() : nullptr;
  const size_t ws_bytes =
      LinearAttentionForwardWorkspaceSize(p.config, p.total_tokens(), g_segment_chunks);
  workspace.Resize(ws_bytes);
  cudaMemset(workspace.get(), 0xff, ws_bytes);  // poisoned: the forward must write what it reads
  r.error = LinearAttentionForwardCuda(args, stats.get<float>(), nullptr, workspace.get(),
                                       ws_bytes, nullptr, g_segment_chunks);
  if (r.error != cudaSuccess) return r;
  r.error = cudaDeviceSynchronize();
  if (r.error != cudaSuccess) return r;
  std::vector<uint16_t> out_bits;
  out.Download(out_bits);
  r.out = BitsToFloats(out_bits, p.config.dtype);
  fin.Download(r.final_state);
  stats.Download(r.stats);
  return r;
}

// CPU forward (float32) of the same rounded inputs: out and the final state.
ForwardResult CpuForward(const Problem& p, const std::vector<float>* initial_state = nullptr) {
  ThreadPool pool(2);
  ForwardResult r;
  r.out.assign(p.q_size(), std::numeric_limits<float>::quiet_NaN());
  r.final_state.assign(p.state_size(), std::numeric_limits<float>::quiet_NaN());
  LinearAttentionForwardArgs args;
  args.config = Float32Config(p);
  args.cu_seqlens = p.cu_seqlens.data();
  args.total_tokens = p.total_tokens();
  args.q = p.qf.data();
  args.k = p.kf.data();
  args.v = p.vf.data();
  args.out = r.out.data();
  args.initial_state = initial_state != nullptr ? initial_state->data() : nullptr;
  args.final_state = r.final_state.data();
  const absl::Status status = LinearAttentionForwardCpu(args, pool);
  EXPECT_TRUE(status.ok()) << status;
  return r;
}

struct Gradients {
  cudaError_t error = cudaSuccess;
  std::vector<float> dq, dk, dv, d_state;
};

// CUDA forward then backward of sum(dout * out); d_state when `want_d_state`.
Gradients CudaBackward(const Problem& p, const std::vector<uint16_t>& dout,
                       const std::vector<float>* initial_state, bool want_d_state) {
  Gradients g;
  DeviceBuffer cu, q, k, v, out, residual, stats, init, dout_d, dq, dk, dv, d_state, workspace,
      fwd_workspace;
  cu.Upload(p.cu_seqlens);
  q.Upload(p.q);
  k.Upload(p.k);
  v.Upload(p.v);
  out.Upload(std::vector<uint16_t>(p.q_size(), kPoisonBits));
  residual.Upload(std::vector<uint16_t>(p.q_size(), kPoisonBits));
  const float nan = std::numeric_limits<float>::quiet_NaN();
  stats.Upload(std::vector<float>(p.total_tokens() * p.config.num_q_heads * kLinearRowStats, nan));
  if (initial_state != nullptr) init.Upload(*initial_state);
  LinearAttentionForwardArgs fwd;
  fwd.config = p.config;
  fwd.cu_seqlens = cu.get<int32_t>();
  fwd.total_tokens = p.total_tokens();
  fwd.q = q.get();
  fwd.k = k.get();
  fwd.v = v.get();
  fwd.out = out.get();
  fwd.initial_state = initial_state != nullptr ? init.get<float>() : nullptr;
  const size_t fwd_ws_bytes =
      LinearAttentionForwardWorkspaceSize(p.config, p.total_tokens(), g_segment_chunks);
  fwd_workspace.Resize(fwd_ws_bytes);
  g.error = LinearAttentionForwardCuda(fwd, stats.get<float>(), residual.get(),
                                       fwd_workspace.get(), fwd_ws_bytes, nullptr,
                                       g_segment_chunks);
  if (g.error != cudaSuccess) return g;

  dout_d.Upload(dout);
  dq.Upload(std::vector<uint16_t>(p.q_size(), kPoisonBits));
  dk.Upload(std::vector<uint16_t>(p.kv_size(), kPoisonBits));
  dv.Upload(std::vector<uint16_t>(p.kv_size(), kPoisonBits));
  d_state.Upload(std::vector<float>(p.state_size(), nan));
  const size_t ws_bytes =
      LinearAttentionBackwardWorkspaceSize(p.config, p.total_tokens(), g_segment_chunks);
  workspace.Resize(ws_bytes);
  // Poison the workspace too: the backward must initialise what it reads.
  cudaMemset(workspace.get(), 0xff, ws_bytes);
  LinearAttentionBackwardCudaArgs args;
  args.config = p.config;
  args.cu_seqlens = cu.get<int32_t>();
  args.total_tokens = p.total_tokens();
  args.q = q.get();
  args.k = k.get();
  args.v = v.get();
  args.initial_state = fwd.initial_state;
  args.out = out.get();
  args.out_residual = residual.get();
  args.row_stats = stats.get<float>();
  args.dout = dout_d.get();
  args.dq = dq.get();
  args.dk = dk.get();
  args.dv = dv.get();
  args.d_initial_state = want_d_state ? d_state.get<float>() : nullptr;
  g.error = LinearAttentionBackwardCuda(args, workspace.get(), ws_bytes, nullptr, g_segment_chunks);
  if (g.error != cudaSuccess) return g;
  g.error = cudaDeviceSynchronize();
  if (g.error != cudaSuccess) return g;
  std::vector<uint16_t> bits;
  dq.Download(bits);
  g.dq = BitsToFloats(bits, p.config.dtype);
  dk.Download(bits);
  g.dk = BitsToFloats(bits, p.config.dtype);
  dv.Download(bits);
  g.dv = BitsToFloats(bits, p.config.dtype);
  if (want_d_state) d_state.Download(g.d_state);
  return g;
}

// CPU float32 backward of the same rounded inputs (no initial state).
Gradients CpuBackward(const Problem& p, const std::vector<float>& dout) {
  ThreadPool pool(2);
  Gradients g;
  g.dq.assign(p.q_size(), std::numeric_limits<float>::quiet_NaN());
  g.dk.assign(p.kv_size(), std::numeric_limits<float>::quiet_NaN());
  g.dv.assign(p.kv_size(), std::numeric_limits<float>::quiet_NaN());
  LinearAttentionBackwardArgs args;
  args.config = Float32Config(p);
  args.cu_seqlens = p.cu_seqlens.data();
  args.total_tokens = p.total_tokens();
  args.q = p.qf.data();
  args.k = p.kf.data();
  args.v = p.vf.data();
  args.dout = dout.data();
  args.dq = g.dq.data();
  args.dk = g.dk.data();
  args.dv = g.dv.data();
  const absl::Status status = LinearAttentionBackwardCpu(args, pool);
  EXPECT_TRUE(status.ok()) << status;
  return g;
}

// Out vs the float64 definition, sequence by sequence. Returns false when the head dim is not
// served by this build (nothing checked).
bool CheckForward(const Problem& p, const std::string& what) {
  const ForwardResult got = CudaForward(p);
  if (got.error == cudaErrorNotSupported) return false;
  EXPECT_EQ(got.error, cudaSuccess) << cudaGetErrorString(got.error);
  if (got.error != cudaSuccess) return true;
  const std::string name = Describe(p, what) + " " + SegmentName();
  EXPECT_EQ(CountNonFinite(got.out), 0) << name;
  const std::vector<double> want = reference::LinearAttentionReference(
      p.config, p.cu_seqlens.data(), ToDouble(p.qf).data(), ToDouble(p.kf).data(),
      ToDouble(p.vf).data());
  // The identity map's weights q . k can cancel (a one-token sequence's out is (q . k) v), so its
  // error is measured against the size of the terms, sum_j (|q| . |k_j|) |v_j|: the kernel's
  // bf16 rounding of fp16 q, k, v (2^-9 each) and of out bound it by about 7e-3 of that, on any
  // input (against out itself it measured 1.1e-2 on one such sequence at d = 256).
  std::vector<double> magnitude;
  if (p.config.feature_map == LinearFeatureMap::kIdentity) {
    auto abs = [](const std::vector<float>& x) {
      std::vector<double> y(x.size());
      for (size_t i = 0; i < x.size(); ++i) y[i] = std::fabs(double{x[i]});
      return y;
    };
    magnitude = reference::LinearAttentionReference(p.config, p.cu_seqlens.data(),
                                                    abs(p.qf).data(), abs(p.kf).data(),
                                                    abs(p.vf).data());
  }
  const int64_t width = int64_t{p.config.num_q_heads} * p.config.head_dim;
  double worst = 0.0;
  for (int s = 0; s < p.config.num_seqs; ++s) {
    const double error =
        RelativeError(got.out, want, p.cu_seqlens[s] * width, p.cu_seqlens[s + 1] * width,
                      magnitude.empty() ? nullptr : &magnitude);
    worst = std::max(worst, error);
    EXPECT_LT(error, kOutTolerance) << name << ": sequence " << s;
  }
  const ForwardResult cpu = CpuForward(p);
  const double state_error = RelativeError(got.final_state, ToDouble(cpu.final_state));
  EXPECT_EQ(CountNonFinite(got.final_state), 0) << name;
  EXPECT_LT(state_error, InputsExact(p) ? kExactStateTolerance : kStateTolerance) << name;
  // Without a final state the kernels skip the norms the other maps keep only for it: out and
  // the row stats must not change by a bit.
  const ForwardResult bare = CudaForward(p, nullptr, false);
  EXPECT_EQ(bare.error, cudaSuccess) << cudaGetErrorString(bare.error);
  if (bare.error != cudaSuccess) return true;
  EXPECT_EQ(std::memcmp(bare.out.data(), got.out.data(), sizeof(float) * got.out.size()), 0)
      << name << ": out without a final state";
  EXPECT_EQ(std::memcmp(bare.stats.data(), got.stats.data(), sizeof(float) * got.stats.size()), 0)
      << name << ": row stats without a final state";
  std::printf("  %-72s out %.2e  state %.2e\n", name.c_str(), worst, state_error);
  return true;
}

void CheckGradients(const Gradients& got, const Gradients& want, const std::string& name,
                    double dq_tolerance, int64_t q_begin = 0, int64_t kv_begin = 0) {
  ASSERT_EQ(got.error, cudaSuccess) << cudaGetErrorString(got.error);
  EXPECT_EQ(CountNonFinite(got.dq) + CountNonFinite(got.dk) + CountNonFinite(got.dv), 0) << name;
  // want may cover a longer sequence (a prefix before `begin`): compare the tail.
  auto tail = [](const std::vector<float>& x, int64_t begin) {
    return std::vector<double>(x.begin() + begin, x.end());
  };
  const std::string where = name + " " + SegmentName();
  const double eq = RelativeError(got.dq, tail(want.dq, q_begin));
  const double ek = RelativeError(got.dk, tail(want.dk, kv_begin));
  const double ev = RelativeError(got.dv, tail(want.dv, kv_begin));
  EXPECT_LT(eq, dq_tolerance) << where << ": dq";
  EXPECT_LT(ek, kGradientTolerance) << where << ": dk";
  EXPECT_LT(ev, kGradientTolerance) << where << ": dv";
  std::printf("  %-72s dq %.2e  dk %.2e  dv %.2e\n", where.c_str(), eq, ek, ev);
}

std::vector<int> HeadDims() { return {64, 128, 256}; }

double DqTolerance(const Variant& variant) {
  return variant.feature_map == LinearFeatureMap::kEluPlusOne && variant.normalize
             ? kEluNormalisedDqTolerance
             : kGradientTolerance;
}

class LinearAttentionCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      GTEST_SKIP() << "No CUDA-capable GPU";
    }
  }
};

TEST_F(LinearAttentionCudaTest, ForwardMatchesFloat64ReferenceForEveryVariant) {
  std::mt19937_64 rng(FreshSeed());
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    for (int d : HeadDims()) {
      for (const Variant& variant : kVariants) {
        // Lengths around the 64-token chunk, an empty sequence, GQA group 2.
        const Problem p = MakeProblem(variant, dtype, {1, 63, 0, 64, 65, 150}, 4, 2, d, rng);
        g_segment_chunks = -1;
        const bool served = CheckForward(p, variant.name);
        g_segment_chunks = 1;
        if (!served || !CheckForward(p, variant.name)) {
          std::printf("  d=%d is not served by this build: skipped\n", d);
          break;
        }
      }
    }
  }
}

TEST_F(LinearAttentionCudaTest, GqaGroupsAndALongSequence) {
  std::mt19937_64 rng(FreshSeed());
  for (const Variant& variant : {kVariants[0], kVariants[2]}) {
    for (auto [hq, hkv] : {std::pair{8, 1}, std::pair{3, 3}, std::pair{6, 2}}) {
      const Problem p = MakeProblem(variant, DType::kBFloat16, {130, 7}, hq, hkv, 128, rng);
      if (!CheckForward(p, variant.name)) GTEST_SKIP() << "d=128 not served";
    }
    // 47 chunks: unsplit, split at every chunk, every 3 chunks, and as the device picks.
    const Problem long_seq = MakeProblem(variant, DType::kBFloat16, {3000}, 1, 1, 128, rng);
    for (int chunks : {-1, 1, 3, 0}) {
      g_segment_chunks = chunks;
      CheckForward(long_seq, std::string(variant.name) + " long");
    }
    g_segment_chunks = 1;
  }
}

// Extreme magnitudes in bf16: 1 + x with max-norm is scale-free in q and k (and linear in v);
// elu + 1 is exercised deep in its exponential branch and far in its linear one.
TEST_F(LinearAttentionCudaTest, ExtremeMagnitudesInBf16) {
  std::mt19937_64 rng(FreshSeed());
  // Split at every chunk, and unsplit (on Hopper the unsplit forward is another kernel).
  for (int chunks : {1, -1}) {
    g_segment_chunks = chunks;
    for (float qk_scale : {1e-15f, 1e15f}) {
      for (float v_scale : {1e-10f, 1e10f}) {
        const Problem p = MakeProblem(kVariants[0], DType::kBFloat16, {5, 200}, 2, 1, 128, rng,
                                      qk_scale, v_scale);
        if (!CheckForward(p, "one_plus_x_max_norm qk*" + std::to_string(qk_scale) + " v*" +
                                 std::to_string(v_scale))) {
          GTEST_SKIP() << "d=128 not served";
        }
        const Problem u = MakeProblem(kVariants[1], DType::kBFloat16, {200}, 2, 1, 128, rng,
                                      qk_scale, v_scale);
        CheckForward(u, "one_plus_x_max_norm_unnormalised qk*" + std::to_string(qk_scale));
      }
    }
    for (float shift : {-30.0f, 30.0f}) {
      Problem p = MakeProblem(kVariants[2], DType::kBFloat16, {150}, 2, 2, 128, rng);
      Fill(p.q, p.qf, p.q_size(), DType::kBFloat16, rng, 1.0f, shift);
      Fill(p.k, p.kf, p.kv_size(), DType::kBFloat16, rng, 1.0f, shift);
      CheckForward(p, "elu_plus_one shift " + std::to_string(shift));
    }
  }
  g_segment_chunks = 1;
}

// Splits a problem's every sequence at the same offsets [0, a) [a, b) [b, len).
Problem Slice(const Problem& p, int32_t from, int32_t to) {
  Problem s;
  s.config = p.config;
  s.cu_seqlens.assign(1, 0);
  const int64_t qw = int64_t{p.config.num_q_heads} * p.config.head_dim;
  const int64_t kvw = int64_t{p.config.num_kv_heads} * p.config.head_dim;
  for (int seq = 0; seq < p.config.num_seqs; ++seq) {
    const int64_t begin = p.cu_seqlens[seq] + from;
    const int64_t end = p.cu_seqlens[seq] + to;
    s.cu_seqlens.push_back(s.cu_seqlens.back() + static_cast<int32_t>(end - begin));
    s.q.insert(s.q.end(), p.q.begin() + begin * qw, p.q.begin() + end * qw);
    s.qf.insert(s.qf.end(), p.qf.begin() + begin * qw, p.qf.begin() + end * qw);
    s.k.insert(s.k.end(), p.k.begin() + begin * kvw, p.k.begin() + end * kvw);
    s.kf.insert(s.kf.end(), p.kf.begin() + begin * kvw, p.kf.begin() + end * kvw);
    s.v.insert(s.v.end(), p.v.begin() + begin * kvw, p.v.begin() + end * kvw);
    s.vf.insert(s.vf.end(), p.vf.begin() + begin * kvw, p.vf.begin() + end * kvw);
  }
  return s;
}

// Chunked prefill ([0, 70), then [70, 130) from its state) and 20 decode steps (slots in reverse
// order) give what one forward over [0, 150) gives, and its final state.
TEST_F(LinearAttentionCudaTest, ChunkedPrefillThenDecodeEqualsOneForward) {
  std::mt19937_64 rng(FreshSeed());
  constexpr int32_t kLen = 150, kA = 70, kB = 130;
  // Split at every chunk, and unsplit (on Hopper the unsplit forward is another kernel).
  for (int chunks : {1, -1}) {
    g_segment_chunks = chunks;
    for (int d : HeadDims()) {
      for (const Variant& variant : kVariants) {
        const Problem whole = MakeProblem(variant, DType::kBFloat16, {kLen, kLen}, 4, 2, d, rng);
        const ForwardResult one = CudaForward(whole);
        if (one.error == cudaErrorNotSupported) break;
        ASSERT_EQ(one.error, cudaSuccess) << cudaGetErrorString(one.error);
        const std::string name =
            Describe(whole, std::string(variant.name) + " hand-off " + SegmentName());
        const ForwardResult head = CudaForward(Slice(whole, 0, kA));
        ASSERT_EQ(head.error, cudaSuccess);
        const ForwardResult mid = CudaForward(Slice(whole, kA, kB), &head.final_state);
        ASSERT_EQ(mid.error, cudaSuccess);

        // Decode: the state of sequence s lives in slot 1 - s.
        const int64_t stride = whole.stride();
        const int64_t per_seq = int64_t{whole.config.num_kv_heads} * stride;
        std::vector<float> slots_host(2 * per_seq);
        for (int s = 0; s < 2; ++s) {
          std::copy(mid.final_state.begin() + s * per_seq,
                    mid.final_state.begin() + (s + 1) * per_seq,
                    slots_host.begin() + (1 - s) * per_seq);
        }
        DeviceBuffer states, slot_ids, q, k, v, out;
        states.Upload(slots_host);
        slot_ids.Upload(std::vector<int32_t>{1, 0});
        const int64_t qw = int64_t{whole.config.num_q_heads} * d;
        const int64_t kvw = int64_t{whole.config.num_kv_heads} * d;
        std::vector<float> decoded(2 * (kLen - kB) * qw);
        for (int32_t t = kB; t < kLen; ++t) {
          std::vector<uint16_t> qs, ks, vs;
          for (int s = 0; s < 2; ++s) {
            const int64_t row = whole.cu_seqlens[s] + t;
            qs.insert(qs.end(), whole.q.begin() + row * qw, whole.q.begin() + (row + 1) * qw);
            ks.insert(ks.end(), whole.k.begin() + row * kvw, whole.k.begin() + (row + 1) * kvw);
            vs.insert(vs.end(), whole.v.begin() + row * kvw, whole.v.begin() + (row + 1) * kvw);
          }
          q.Upload(qs);
          k.Upload(ks);
          v.Upload(vs);
          out.Upload(std::vector<uint16_t>(2 * qw, kPoisonBits));
          LinearAttentionDecodeArgs args;
          args.config = whole.config;
          args.config.num_seqs = 2;
          args.q = q.get();
          args.k = k.get();
          args.v = v.get();
          args.states = states.get<float>();
          args.state_slots = slot_ids.get<int32_t>();
          args.num_state_slots = 2;
          args.out = out.get();
          CUDA_ASSERT(LinearAttentionDecodeCuda(args, nullptr));
          std::vector<uint16_t> bits;
          out.Download(bits);
          for (int s = 0; s < 2; ++s) {
            for (int64_t i = 0; i < qw; ++i) {
              decoded[(s * (kLen - kB) + (t - kB)) * qw + i] =
                  FromBits(bits[s * qw + i], DType::kBFloat16);
            }
          }
        }
        CUDA_ASSERT(cudaDeviceSynchronize());
        // Reassemble the pieces in the whole problem's order.
        std::vector<float> pieces(whole.q_size());
        for (int s = 0; s < 2; ++s) {
          for (int32_t t = 0; t < kLen; ++t) {
            const float* src = t < kA   ? &head.out[(s * kA + t) * qw]
                               : t < kB ? &mid.out[(s * (kB - kA) + t - kA) * qw]
                                        : &decoded[(s * (kLen - kB) + t - kB) * qw];
            std::copy(src, src + qw, pieces.begin() + (whole.cu_seqlens[s] + t) * qw);
          }
        }
        EXPECT_EQ(CountNonFinite(pieces), 0) << name;
        const std::vector<double> want = reference::LinearAttentionReference(
            whole.config, whole.cu_seqlens.data(), ToDouble(whole.qf).data(),
            ToDouble(whole.kf).data(), ToDouble(whole.vf).data());
        const double vs_reference = RelativeError(pieces, want);
        const double vs_one = RelativeError(pieces, ToDouble(one.out));
        EXPECT_LT(vs_reference, kOutTolerance) << name;
        EXPECT_LT(vs_one, kOutTolerance) << name;
        std::vector<float> final_slots;
        states.Download(final_slots);
        std::vector<float> final_states(final_slots.size());
        for (int s = 0; s < 2; ++s) {
          std::copy(final_slots.begin() + (1 - s) * per_seq,
                    final_slots.begin() + (2 - s) * per_seq,
                    final_states.begin() + s * per_seq);
        }
        const double state_error = RelativeError(final_states, ToDouble(one.final_state));
        EXPECT_LT(state_error, InputsExact(whole) ? kExactStateTolerance : kStateTolerance) << name;
        std::printf("  %-72s vs float64 %.2e  vs one forward %.2e  state %.2e\n", name.c_str(),
                    vs_reference, vs_one, state_error);
      }
    }
  }
  g_segment_chunks = 1;
}

// CUDA decode matches the CPU decode from the same state, directly and replayed from a graph.
TEST_F(LinearAttentionCudaTest, DecodeMatchesCpuDecodeAndReplaysFromAGraph) {
  std::mt19937_64 rng(FreshSeed());
  for (const Variant& variant : kVariants) {
    const Problem prefix = MakeProblem(variant, DType::kBFloat16, {40, 90, 0}, 8, 2, 128, rng);
    const ForwardResult cpu_prefix = CpuForward(prefix);
    const Problem step = MakeProblem(variant, DType::kBFloat16, {1, 1, 1}, 8, 2, 128, rng);
    // CPU decode of the float32 view.
    ThreadPool pool(2);
    std::vector<float> cpu_states = cpu_prefix.final_state;
    std::vector<float> cpu_out(step.q_size());
    LinearAttentionDecodeArgs cpu_args;
    cpu_args.config = Float32Config(step);
    cpu_args.q = step.qf.data();
    cpu_args.k = step.kf.data();
    cpu_args.v = step.vf.data();
    cpu_args.states = cpu_states.data();
    cpu_args.num_state_slots = 3;
    cpu_args.out = cpu_out.data();
    ASSERT_TRUE(LinearAttentionDecodeCpu(cpu_args, pool).ok());

    DeviceBuffer states, q, k, v, out;
    q.Upload(step.q);
    k.Upload(step.k);
    v.Upload(step.v);
    LinearAttentionDecodeArgs args;
    args.config = step.config;
    args.num_state_slots = 3;
    cudaStream_t stream;
    CUDA_ASSERT(cudaStreamCreate(&stream));
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    for (int replay = 0; replay < 2; ++replay) {
      states.Upload(cpu_prefix.final_state);
      out.Upload(std::vector<uint16_t>(step.q_size(), kPoisonBits));
      args.q = q.get();
      args.k = k.get();
      args.v = v.get();
      args.states = states.get<float>();
      args.out = out.get();
      if (replay == 0) {
        CUDA_ASSERT(LinearAttentionDecodeCuda(args, stream));
      } else {
        CUDA_ASSERT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
        CUDA_ASSERT(LinearAttentionDecodeCuda(args, stream));
        CUDA_ASSERT(cudaStreamEndCapture(stream, &graph));
        CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));
        CUDA_ASSERT(cudaGraphLaunch(exec, stream));
      }
      CUDA_ASSERT(cudaStreamSynchronize(stream));
      std::vector<uint16_t> bits;
      out.Download(bits);
      const std::vector<float> got = BitsToFloats(bits, DType::kBFloat16);
      std::vector<float> got_states;
      states.Download(got_states);
      const std::string name = Describe(step, std::string(variant.name) + (replay ? " graph" : ""));
      EXPECT_EQ(CountNonFinite(got), 0) << name;
      const double out_error = RelativeError(got, ToDouble(cpu_out));
      const double state_error = RelativeError(got_states, ToDouble(cpu_states));
      EXPECT_LT(out_error, kOutTolerance) << name;
      EXPECT_LT(state_error, kExactStateTolerance) << name;
      std::printf("  %-72s out %.2e  state %.2e\n", name.c_str(), out_error, state_error);
    }
    CUDA_ASSERT(cudaGraphExecDestroy(exec));
    CUDA_ASSERT(cudaGraphDestroy(graph));
    CUDA_ASSERT(cudaStreamDestroy(stream));
  }
}

TEST_F(LinearAttentionCudaTest, GradientsMatchTheCpuBackward) {
  std::mt19937_64 rng(FreshSeed());
  for (int d : HeadDims()) {
    for (const Variant& variant : kVariants) {
      for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
        if (dtype == DType::kFloat16 && variant.feature_map != LinearFeatureMap::kEluPlusOne) {
          continue;
        }
        const Problem p = MakeProblem(variant, dtype, {1, 64, 100, 0, 130}, 4, 2, d, rng);
        std::vector<uint16_t> dout;
        std::vector<float> doutf;
        Fill(dout, doutf, p.q_size(), dtype, rng, 1.0f);
        g_segment_chunks = -1;
        const Gradients unsplit = CudaBackward(p, dout, nullptr, false);
        g_segment_chunks = 1;
        if (unsplit.error == cudaErrorNotSupported) break;
        const Gradients want = CpuBackward(p, doutf);
        const std::string name = Describe(p, std::string(variant.name) + " grad");
        g_segment_chunks = -1;
        CheckGradients(unsplit, want, name, DqTolerance(variant));
        g_segment_chunks = 1;
        CheckGradients(CudaBackward(p, dout, nullptr, false), want, name, DqTolerance(variant));
      }
    }
  }
}

// With an initial state made by a prefix P of the sequence, the suffix's gradients equal the
// whole sequence's (the CPU backward with zero dout on P), and the state's gradient d_state,
// pulled back to P's inputs through the state's definition (J^T d_state, J the state's
// derivative by P's inputs), equals the whole sequence's gradients of P's inputs.
void CheckInitialStateGradient(const Variant& variant, int d, bool prefix_holds_max,
                               std::mt19937_64& rng) {
  constexpr int32_t kPrefix = 70, kSuffix = 90;
  Problem whole = MakeProblem(variant, DType::kBFloat16, {kPrefix + kSuffix}, 4, 2, d, rng);
  const int64_t qw = int64_t{whole.config.num_q_heads} * d;
  const int64_t kvw = int64_t{whole.config.num_kv_heads} * d;
  if (prefix_holds_max) {
    // Token 5 of the prefix holds the largest q and k norms of the whole sequence.
    for (int64_t i = 5 * qw; i < 6 * qw; ++i) {
      whole.q[i] = ToBits(whole.qf[i] * 4.0f, DType::kBFloat16);
      whole.qf[i] = FromBits(whole.q[i], DType::kBFloat16);
    }
    for (int64_t i = 5 * kvw; i < 6 * kvw; ++i) {
      whole.k[i] = ToBits(whole.kf[i] * 4.0f, DType::kBFloat16);
      whole.kf[i] = FromBits(whole.k[i], DType::kBFloat16);
    }
  }
  const Problem prefix = Slice(whole, 0, kPrefix);
  const Problem suffix = Slice(whole, kPrefix, kPrefix + kSuffix);
  const std::vector<float> state = CpuForward(prefix).final_state;
  std::vector<uint16_t> dout_suffix;
  std::vector<float> doutf_suffix;
  Fill(dout_suffix, doutf_suffix, suffix.q_size(), DType::kBFloat16, rng, 1.0f);
  const Gradients got = CudaBackward(suffix, dout_suffix, &state, true);
  if (got.error == cudaErrorNotSupported) return;
  std::vector<float> doutf_whole(whole.q_size(), 0.0f);
  std::copy(doutf_suffix.begin(), doutf_suffix.end(), doutf_whole.begin() + kPrefix * qw);
  const Gradients want = CpuBackward(whole, doutf_whole);
  const std::string name =
      Describe(whole, std::string(variant.name) + (prefix_holds_max ? " state max" : " state"));
  CheckGradients(got, want, name, DqTolerance(variant), kPrefix * qw, kPrefix * kvw);
  ASSERT_EQ(CountNonFinite(got.d_state), 0) << name;

  // d_state pulled back to P's inputs through the state's definition, in float64:
  //   S = sum_t phi(k_t) v_t^T, z = sum_t phi(k_t), V = sum_t v_t, k_norm = max_t ||k_t||,
  //   q_norm[g] = max_t ||q_t,g|| (to the first token attaining it),
  // must equal the whole sequence's gradients of P's inputs.
  const LinearStateLayout l = MakeLinearStateLayout(d, whole.group());
  const bool elu = variant.feature_map == LinearFeatureMap::kEluPlusOne;
  const int hkv = whole.config.num_kv_heads;
  std::vector<double> pulled_q(kPrefix * qw, 0.0), pulled_k(kPrefix * kvw, 0.0),
      pulled_v(kPrefix * kvw, 0.0);
  auto first_argmax = [&](const std::vector<float>& x, int64_t width, int64_t offset) {
    int argmax = 0;
    double best = -1.0;
    for (int t = 0; t < kPrefix; ++t) {
      double n = 0.0;
      for (int c = 0; c < d; ++c) n += double{x[t * width + offset + c]} * x[t * width + offset + c];
      if (std::sqrt(n) > best) {
        best = std::sqrt(n);
        argmax = t;
      }
    }
    return std::pair<int, double>{argmax, best};
  };
  for (int h = 0; h < hkv; ++h) {
    const float* ds = got.d_state.data() + h * l.stride;
    for (int t = 0; t < kPrefix; ++t) {
      const float* k = &whole.kf[(t * hkv + h) * d];
      const float* v = &whole.vf[(t * hkv + h) * d];
      double* pk = &pulled_k[(t * hkv + h) * d];
      double* pv = &pulled_v[(t * hkv + h) * d];
      for (int a = 0; a < d; ++a) {
        const double phi = elu ? (k[a] > 0 ? k[a] + 1.0 : std::exp(double{k[a]})) : k[a];
        const double dphi = elu ? (k[a] > 0 ? 1.0 : std::exp(double{k[a]})) : 1.0;
        double row = ds[l.z_offset + a];
        for (int b = 0; b < d; ++b) {
          const double s_ab = ds[l.s_offset + int64_t{a} * d + b];
          row += s_ab * v[b];
          pv[b] += s_ab * phi;
        }
        pk[a] = row * dphi;
      }
      for (int b = 0; b < d; ++b) pv[b] += ds[l.v_sum_offset + b];
    }
    const auto [k_arg, k_best] = first_argmax(whole.kf, kvw, int64_t{h} * d);
    for (int c = 0; c < d; ++c) {
      pulled_k[(k_arg * hkv + h) * d + c] +=
          ds[l.k_norm_offset] * whole.kf[(k_arg * hkv + h) * d + c] / k_best;
    }
    for (int g = 0; g < whole.group(); ++g) {
      const int64_t qh = int64_t{h} * whole.group() + g;
      const auto [q_arg, q_best] = first_argmax(whole.qf, qw, qh * d);
      for (int c = 0; c < d; ++c) {
        pulled_q[q_arg * qw + qh * d + c] +=
            ds[l.q_norm_offset + g] * whole.qf[q_arg * qw + qh * d + c] / q_best;
      }
    }
  }
  auto prefix_error = [&](const std::vector<double>& pulled, const std::vector<float>& grad) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < pulled.size(); ++i) {
      diff += (pulled[i] - grad[i]) * (pulled[i] - grad[i]);
      norm += double{grad[i]} * grad[i];
    }
    return norm == 0.0 ? std::sqrt(diff) : std::sqrt(diff / norm);
  };
  const double eq = prefix_error(pulled_q, want.dq);
  const double ek = prefix_error(pulled_k, want.dk);
  const double ev = prefix_error(pulled_v, want.dv);
  EXPECT_LT(eq, kGradientTolerance) << name << ": d_state pulled back to q";
  EXPECT_LT(ek, kGradientTolerance) << name << ": d_state pulled back to k";
  EXPECT_LT(ev, kGradientTolerance) << name << ": d_state pulled back to v";
  std::printf("  %-72s d_state -> dq %.2e  dk %.2e  dv %.2e\n", name.c_str(), eq, ek, ev);
}

TEST_F(LinearAttentionCudaTest, GradientsWithAnInitialStateMatchTheWholeSequence) {
  std::mt19937_64 rng(FreshSeed());
  for (const Variant& variant : kVariants) {
    CheckInitialStateGradient(variant, 128, false, rng);
    if (variant.feature_map == LinearFeatureMap::kOnePlusXMaxNorm) {
      CheckInitialStateGradient(variant, 128, true, rng);
      CheckInitialStateGradient(variant, 64, true, rng);
    }
  }
}

// A sequence of 40 chunks whose q and k norms grow with the position (new running maxima in
// every segment), so the max-norm gradients cross segment boundaries; split as the device picks,
// every 3 chunks and unsplit.
TEST_F(LinearAttentionCudaTest, LongSequenceGradientsAcrossSegments) {
  std::mt19937_64 rng(FreshSeed());
  for (const Variant& variant : {kVariants[0], kVariants[1]}) {
    Problem p = MakeProblem(variant, DType::kBFloat16, {2560}, 2, 1, 64, rng);
    const int64_t qw = int64_t{p.config.num_q_heads} * 64, kvw = int64_t{p.config.num_kv_heads} * 64;
    for (int64_t t = 0; t < p.total_tokens(); t += 97) {  // a growing spike every 97 tokens
      const float scale = 1.0f + 0.02f * static_cast<float>(t / 97);
      for (int64_t i = t * qw; i < (t + 1) * qw; ++i) {
        p.q[i] = ToBits(p.qf[i] * scale, DType::kBFloat16);
        p.qf[i] = FromBits(p.q[i], DType::kBFloat16);
      }
      for (int64_t i = t * kvw; i < (t + 1) * kvw; ++i) {
        p.k[i] = ToBits(p.kf[i] * scale, DType::kBFloat16);
        p.kf[i] = FromBits(p.k[i], DType::kBFloat16);
      }
    }
    std::vector<uint16_t> dout;
    std::vector<float> doutf;
    Fill(dout, doutf, p.q_size(), DType::kBFloat16, rng, 1.0f);
    const Gradients want = CpuBackward(p, doutf);
    for (int chunks : {0, 3, -1}) {
      g_segment_chunks = chunks;
      const Gradients got = CudaBackward(p, dout, nullptr, false);
      if (got.error == cudaErrorNotSupported) {
        g_segment_chunks = 1;
        GTEST_SKIP() << "d=64 not served";
      }
      CheckGradients(got, want, Describe(p, std::string(variant.name) + " long grad"),
                     DqTolerance(variant));
    }
    g_segment_chunks = 1;
  }
}

TEST_F(LinearAttentionCudaTest, ExtremeMagnitudeGradientsInBf16) {
  std::mt19937_64 rng(FreshSeed());
  for (float scale : {1e-8f, 1e8f}) {
    const Problem p = MakeProblem(kVariants[0], DType::kBFloat16, {150, 20}, 2, 1, 128, rng,
                                  scale, scale);
    std::vector<uint16_t> dout;
    std::vector<float> doutf;
    Fill(dout, doutf, p.q_size(), DType::kBFloat16, rng, 1.0f);
    const Gradients got = CudaBackward(p, dout, nullptr, false);
    if (got.error == cudaErrorNotSupported) GTEST_SKIP() << "d=128 not served";
    CheckGradients(got, CpuBackward(p, doutf),
                   Describe(p, "one_plus_x_max_norm grad scale " + std::to_string(scale)),
                   kGradientTolerance);
  }
}

TEST_F(LinearAttentionCudaTest, BadArgumentsAreRejectedBeforeAnyLaunch) {
  std::mt19937_64 rng(FreshSeed());
  const Problem p = MakeProblem(kVariants[0], DType::kBFloat16, {10}, 2, 1, 128, rng);
  DeviceBuffer cu, q, k, v, out, state;
  cu.Upload(p.cu_seqlens);
  q.Upload(p.q);
  k.Upload(p.k);
  v.Upload(p.v);
  out.Upload(std::vector<uint16_t>(p.q_size(), kPoisonBits));
  state.Upload(std::vector<float>(p.state_size(), 0.0f));
  LinearAttentionForwardArgs args;
  args.config = p.config;
  args.cu_seqlens = cu.get<int32_t>();
  args.total_tokens = p.total_tokens();
  args.q = q.get();
  args.k = k.get();
  args.v = v.get();
  args.out = out.get();
  auto expect = [&](LinearAttentionForwardArgs a, cudaError_t want, const char* what) {
    EXPECT_EQ(LinearAttentionForwardCuda(a, nullptr, nullptr, nullptr, 0, nullptr, -1), want)
        << what;
  };
  LinearAttentionForwardArgs bad = args;
  bad.config.dtype = DType::kFloat32;
  expect(bad, cudaErrorNotSupported, "fp32");
  bad = args;
  bad.config.head_dim = 96;
  expect(bad, cudaErrorNotSupported, "head_dim 96");
  bad = args;
  bad.config.head_dim = 0;
  expect(bad, cudaErrorInvalidValue, "head_dim 0");
  bad = args;
  bad.config.feature_map = LinearFeatureMap::kIdentity;
  expect(bad, cudaErrorInvalidValue, "identity normalised");
  bad = args;
  bad.config.num_q_heads = 3;
  bad.config.num_kv_heads = 2;
  expect(bad, cudaErrorInvalidValue, "3 q heads over 2 kv heads");
  bad = args;
  bad.q = static_cast<const uint8_t*>(args.q) + 2;
  expect(bad, cudaErrorInvalidValue, "misaligned q");
  bad = args;
  bad.out = nullptr;
  expect(bad, cudaErrorInvalidValue, "null out");
  bad = args;
  bad.initial_state = state.get<float>();
  bad.final_state = state.get<float>() + 1;
  expect(bad, cudaErrorInvalidValue, "overlapping states");
  // Split at every chunk (as if the batch held 1000 tokens; nothing is launched), the forward
  // needs a workspace.
  bad = args;
  bad.total_tokens = 1000;
  EXPECT_GT(LinearAttentionForwardWorkspaceSize(p.config, bad.total_tokens, 1), 0u);
  EXPECT_EQ(LinearAttentionForwardCuda(bad, nullptr, nullptr, nullptr, 0, nullptr, 1),
            cudaErrorInvalidValue)
      << "split forward without a workspace";
  CUDA_ASSERT(cudaDeviceSynchronize());
  std::vector<uint16_t> bits;
  out.Download(bits);
  EXPECT_TRUE(std::all_of(bits.begin(), bits.end(), [](uint16_t b) { return b == kPoisonBits; }))
      << "a rejected call wrote its output";

  LinearAttentionBackwardCudaArgs bwd;
  bwd.config = p.config;
  bwd.cu_seqlens = cu.get<int32_t>();
  bwd.total_tokens = p.total_tokens();
  bwd.q = q.get();
  bwd.k = k.get();
  bwd.v = v.get();
  bwd.out = out.get();
  bwd.row_stats = state.get<float>();
  bwd.dout = out.get();
  bwd.dq = q.get();
  bwd.dk = k.get();
  bwd.dv = v.get();
  const size_t ws = LinearAttentionBackwardWorkspaceSize(p.config, p.total_tokens());
  DeviceBuffer workspace(ws);
  EXPECT_EQ(LinearAttentionBackwardCuda(bwd, workspace.get(), ws - 1, nullptr),
            cudaErrorInvalidValue);
  bwd.row_stats = nullptr;
  EXPECT_EQ(LinearAttentionBackwardCuda(bwd, workspace.get(), ws, nullptr),
            cudaErrorInvalidValue);

  LinearAttentionDecodeArgs decode;
  decode.config = p.config;
  decode.config.num_seqs = 1;
  decode.q = q.get();
  decode.k = k.get();
  decode.v = v.get();
  decode.out = out.get();
  decode.states = state.get<float>();
  decode.num_state_slots = 0;
  EXPECT_EQ(LinearAttentionDecodeCuda(decode, nullptr), cudaErrorInvalidValue);
}

}  // namespace
}  // namespace ferry::kernels
