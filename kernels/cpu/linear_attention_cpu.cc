// CPU causal linear attention: the recurrence of linear_attention.h, one task per
// (sequence, kv head).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/cpu_linear_attention.h"
#include "ferry/status.h"

// The hot loops are rank-1 updates and dot products of length d; an AVX2 copy doubles their
// vector width over the x86-64 baseline, picked at load time. Both copies sum in the same order
// (fixed partial sums, no FMA contraction under -std=c++20), so they agree bit for bit.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FERRY_LINEAR_CLONES __attribute__((target_clones("avx2", "default")))
#define FERRY_LINEAR_INLINE inline __attribute__((always_inline))
#else
#define FERRY_LINEAR_CLONES
#define FERRY_LINEAR_INLINE inline
#endif

namespace ferry::kernels {
namespace {

struct Problem {
  int d = 0;
  int group = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  LinearFeatureMap feature_map = LinearFeatureMap::kOnePlusXMaxNorm;
  bool normalize = true;
  DType dtype = DType::kFloat32;
  LinearStateLayout layout;

  bool lifted() const { return feature_map == LinearFeatureMap::kOnePlusXMaxNorm; }
};

Problem MakeProblem(const LinearAttentionConfig& config) {
  Problem p;
  p.d = config.head_dim;
  p.num_q_heads = config.num_q_heads;
  p.num_kv_heads = config.num_kv_heads;
  p.group = config.num_q_heads / config.num_kv_heads;
  p.feature_map = config.feature_map;
  p.normalize = config.normalize;
  p.dtype = config.dtype;
  p.layout = MakeLinearStateLayout(p.d, p.group);
  return p;
}

float EluPlusOne(float x) { return x > 0.0f ? x + 1.0f : std::exp(x); }
float EluPlusOneDerivative(float x) { return x > 0.0f ? 1.0f : std::exp(x); }

// Eight partial sums in a fixed order: the compiler vectorises them (a single running sum cannot
// be reordered without -ffast-math), and the result stays deterministic.
// Inlined so that each copy of the callers vectorises it for its own instruction set.
FERRY_LINEAR_INLINE float Dot(const float* a, const float* b, int d) {
  float partial[8] = {};
  int i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int l = 0; l < 8; ++l) partial[l] += a[i + l] * b[i + l];
  }
  float sum = 0.0f;
  for (; i < d; ++i) sum += a[i] * b[i];
  for (int l = 0; l < 8; ++l) sum += partial[l];
  return sum;
}

FERRY_LINEAR_INLINE float Norm(const float* x, int d) { return std::sqrt(Dot(x, x, d)); }

FERRY_LINEAR_INLINE void Axpy(float alpha, const float* x, float* y, int d) {
  for (int i = 0; i < d; ++i) y[i] += alpha * x[i];
}

// phi(k): raw k for kOnePlusXMaxNorm (its 1 lives in V and n) and kIdentity.
void KeyFeatures(const Problem& p, const float* k, float* out) {
  if (p.feature_map == LinearFeatureMap::kEluPlusOne) {
    for (int i = 0; i < p.d; ++i) out[i] = EluPlusOne(k[i]);
  } else {
    std::memcpy(out, k, sizeof(float) * p.d);
  }
}

// The effective query u: phi(q), or q / (a b) for kOnePlusXMaxNorm with a, b the floored running
// max norms. Dividing by a then by b keeps every intermediate within float range.
void QueryFeatures(const Problem& p, const float* q, float q_max_norm, float k_max_norm, float* u) {
  switch (p.feature_map) {
    case LinearFeatureMap::kOnePlusXMaxNorm: {
      const float inv_a = 1.0f / std::max(kLinearNormFloor, q_max_norm);
      const float inv_b = 1.0f / std::max(kLinearNormFloor, k_max_norm);
      for (int i = 0; i < p.d; ++i) u[i] = (q[i] * inv_a) * inv_b;
      break;
    }
    case LinearFeatureMap::kEluPlusOne:
      for (int i = 0; i < p.d; ++i) u[i] = EluPlusOne(q[i]);
      break;
    case LinearFeatureMap::kIdentity:
      std::memcpy(u, q, sizeof(float) * p.d);
      break;
  }
}

// Views into one (sequence, kv head) state record.
struct StateView {
  float* s;
  float* z;
  float* v_sum;
  float* count;
  float* k_norm;
  float* q_norm;  // (group)
};

StateView View(const Problem& p, float* state) {
  const LinearStateLayout& l = p.layout;
  return {state + l.s_offset,     state + l.z_offset,      state + l.v_sum_offset,
          state + l.count_offset, state + l.k_norm_offset, state + l.q_norm_offset};
}

// Appends token (k, v) to the state (S_i, z_i, V_i, n_i and the k norm).
void AppendKv(const Problem& p, const StateView& st, const float* k, const float* v, float* kf) {
  const int d = p.d;
  KeyFeatures(p, k, kf);
  *st.k_norm = std::max(*st.k_norm, Norm(k, d));
  for (int a = 0; a < d; ++a) Axpy(kf[a], v, st.s + int64_t{a} * d, d);
  for (int i = 0; i < d; ++i) {
    st.z[i] += kf[i];
    st.v_sum[i] += v[i];
  }
  *st.count += 1.0f;
}

// num = S^T u (+ V when lifted); returns den (1 when unnormalised).
float Numerator(const Problem& p, const StateView& st, const float* u, float* num) {
  const int d = p.d;
  if (p.lifted()) {
    std::memcpy(num, st.v_sum, sizeof(float) * d);
  } else {
    std::fill(num, num + d, 0.0f);
  }
  for (int a = 0; a < d; ++a) Axpy(u[a], st.s + int64_t{a} * d, num, d);
  if (!p.normalize) return 1.0f;
  return Dot(u, st.z, d) + (p.lifted() ? *st.count : 0.0f);
}

// One token: appends (k, v), then writes the outputs of the group's q heads (adjacent rows).
// The forward and decode both run it, so their outputs agree bit for bit.
FERRY_LINEAR_CLONES void Step(const Problem& p, const StateView& st, const float* q_rows,
                              const float* k, const float* v, float* out_rows, float* scratch) {
  const int d = p.d;
  float* kf = scratch;
  float* u = scratch + d;
  float* num = scratch + 2 * d;
  AppendKv(p, st, k, v, kf);
  for (int g = 0; g < p.group; ++g) {
    const float* q = q_rows + int64_t{g} * d;
    st.q_norm[g] = std::max(st.q_norm[g], Norm(q, d));
    QueryFeatures(p, q, st.q_norm[g], *st.k_norm, u);
    const float den = Numerator(p, st, u, num);
    float* out = out_rows + int64_t{g} * d;
    if (p.normalize) {
      for (int i = 0; i < d; ++i) out[i] = num[i] / den;
    } else {
      std::memcpy(out, num, sizeof(float) * d);
    }
  }
}

// Per-task buffers for one token's rows widened to float32 (bf16 / fp16 inputs) and Step's scratch.
struct TokenBuffers {
  explicit TokenBuffers(const Problem& p)
      : q(int64_t{p.group} * p.d), k(p.d), v(p.d), out(int64_t{p.group} * p.d), scratch(3 * p.d) {}
  std::vector<float> q, k, v, out, scratch;
};

struct TokenIo {
  DType dtype;
  const void* q;
  const void* k;
  const void* v;
  void* out;
};

// n elements from element `offset` of `base` as float32: fp32 is read in place.
const float* LoadRow(const void* base, DType dtype, int64_t offset, int64_t n, float* buffer) {
  if (dtype == DType::kFloat32) return static_cast<const float*>(base) + offset;
  const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
  if (dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < n; ++i) buffer[i] = BFloat16BitsToFloat(src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) buffer[i] = Float16BitsToFloat(src[i]);
  }
  return buffer;
}

// Runs Step for one token whose q / out rows start at element q_offset and k / v rows at
// kv_offset; fp32 outputs are written in place, others rounded from a float32 row.
void Token(const Problem& p, const StateView& st, const TokenIo& io, int64_t q_offset,
           int64_t kv_offset, TokenBuffers& buf) {
  const int64_t q_elems = int64_t{p.group} * p.d;
  const float* q = LoadRow(io.q, io.dtype, q_offset, q_elems, buf.q.data());
  const float* k = LoadRow(io.k, io.dtype, kv_offset, p.d, buf.k.data());
  const float* v = LoadRow(io.v, io.dtype, kv_offset, p.d, buf.v.data());
  if (io.dtype == DType::kFloat32) {
    Step(p, st, q, k, v, static_cast<float*>(io.out) + q_offset, buf.scratch.data());
    return;
  }
  Step(p, st, q, k, v, buf.out.data(), buf.scratch.data());
  uint16_t* out = static_cast<uint16_t*>(io.out) + q_offset;
  if (io.dtype == DType::kBFloat16) {
    for (int64_t i = 0; i < q_elems; ++i) out[i] = FloatToBFloat16Bits(buf.out[i]);
  } else {
    for (int64_t i = 0; i < q_elems; ++i) out[i] = FloatToFloat16Bits(buf.out[i]);
  }
}

absl::Status CheckCuSeqlens(int num_seqs, const int32_t* cu_seqlens, int64_t total_tokens) {
  if (cu_seqlens == nullptr) return absl::InvalidArgumentError("cu_seqlens is null");
  if (cu_seqlens[0] != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cu_seqlens[0] is ", cu_seqlens[0], ", must be 0"));
  }
  for (int s = 0; s < num_seqs; ++s) {
    if (cu_seqlens[s + 1] < cu_seqlens[s]) {
      return absl::InvalidArgumentError(absl::StrCat("cu_seqlens decreases at sequence ", s, ": ",
                                                     cu_seqlens[s], " then ", cu_seqlens[s + 1]));
    }
  }
  if (total_tokens != cu_seqlens[num_seqs]) {
    return absl::InvalidArgumentError(absl::StrCat("total_tokens (", total_tokens,
                                                   ") must equal cu_seqlens[num_seqs] (",
                                                   cu_seqlens[num_seqs], ")"));
  }
  return absl::OkStatus();
}

absl::Status CheckTensor(const void* ptr, const char* name, int64_t elements) {
  if (elements > 0 && ptr == nullptr) {
    return absl::InvalidArgumentError(absl::StrCat(name, " is null"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateLinearAttentionConfig(const LinearAttentionConfig& config) {
  if (config.num_seqs < 0) return absl::InvalidArgumentError("num_seqs must be >= 0");
  if (config.num_kv_heads <= 0) return absl::InvalidArgumentError("num_kv_heads must be > 0");
  if (config.num_q_heads <= 0 || config.num_q_heads % config.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("num_q_heads (", config.num_q_heads,
                                                   ") must be a positive multiple of ",
                                                   "num_kv_heads (", config.num_kv_heads, ")"));
  }
  if (config.head_dim < 1 || config.head_dim > kMaxLinearHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "head_dim ", config.head_dim, " is not supported (1 to ", kMaxLinearHeadDim, ")"));
  }
  switch (config.feature_map) {
    case LinearFeatureMap::kOnePlusXMaxNorm:
    case LinearFeatureMap::kEluPlusOne:
      break;
    case LinearFeatureMap::kIdentity:
      if (config.normalize) {
        return absl::InvalidArgumentError(
            "normalize: the identity feature map is unnormalised only (q . z may be 0)");
      }
      break;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("feature_map ", static_cast<int>(config.feature_map), " is unknown"));
  }
  if (config.dtype != DType::kFloat32 && config.dtype != DType::kBFloat16 &&
      config.dtype != DType::kFloat16) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype ", static_cast<int>(config.dtype), " is not fp32, bf16 or fp16"));
  }
  return absl::OkStatus();
}

// The checks forward and backward share: offsets and the q, k, v inputs of a varlen batch.
absl::Status CheckVarlenInputs(const LinearAttentionConfig& c, const int32_t* cu_seqlens,
                               int64_t total_tokens, const void* q, const void* k,
                               const void* v) {
  FERRY_RETURN_IF_ERROR(CheckCuSeqlens(c.num_seqs, cu_seqlens, total_tokens));
  FERRY_RETURN_IF_ERROR(CheckTensor(q, "q", total_tokens * c.num_q_heads * c.head_dim));
  FERRY_RETURN_IF_ERROR(CheckTensor(k, "k", total_tokens * c.num_kv_heads * c.head_dim));
  FERRY_RETURN_IF_ERROR(CheckTensor(v, "v", total_tokens * c.num_kv_heads * c.head_dim));
  return absl::OkStatus();
}

absl::Status ValidateLinearAttentionForwardArgs(const LinearAttentionForwardArgs& args) {
  const LinearAttentionConfig& c = args.config;
  FERRY_RETURN_IF_ERROR(ValidateLinearAttentionConfig(c));
  FERRY_RETURN_IF_ERROR(CheckVarlenInputs(c, args.cu_seqlens, args.total_tokens, args.q, args.k,
                                          args.v));
  return CheckTensor(args.out, "out", args.total_tokens * c.num_q_heads * c.head_dim);
}

absl::Status ValidateLinearAttentionBackwardArgs(const LinearAttentionBackwardArgs& args) {
  const LinearAttentionConfig& c = args.config;
  FERRY_RETURN_IF_ERROR(ValidateLinearAttentionConfig(c));
  if (c.dtype != DType::kFloat32) {
    return absl::InvalidArgumentError("dtype: the backward takes fp32 only");
  }
  FERRY_RETURN_IF_ERROR(CheckVarlenInputs(c, args.cu_seqlens, args.total_tokens, args.q, args.k,
                                          args.v));
  const int64_t q_elems = args.total_tokens * c.num_q_heads * c.head_dim;
  const int64_t kv_elems = args.total_tokens * c.num_kv_heads * c.head_dim;
  FERRY_RETURN_IF_ERROR(CheckTensor(args.dout, "dout", q_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.dq, "dq", q_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.dk, "dk", kv_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.dv, "dv", kv_elems));
  return absl::OkStatus();
}

absl::Status ValidateLinearAttentionDecodeArgs(const LinearAttentionDecodeArgs& args) {
  const LinearAttentionConfig& c = args.config;
  FERRY_RETURN_IF_ERROR(ValidateLinearAttentionConfig(c));
  const int64_t q_elems = int64_t{c.num_seqs} * c.num_q_heads * c.head_dim;
  const int64_t kv_elems = int64_t{c.num_seqs} * c.num_kv_heads * c.head_dim;
  FERRY_RETURN_IF_ERROR(CheckTensor(args.q, "q", q_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.k, "k", kv_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.v, "v", kv_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.out, "out", q_elems));
  FERRY_RETURN_IF_ERROR(CheckTensor(args.states, "states", c.num_seqs));
  if (args.num_state_slots < 0) return absl::InvalidArgumentError("num_state_slots must be >= 0");
  if (args.state_slots == nullptr) {
    if (args.num_state_slots < c.num_seqs) {
      return absl::InvalidArgumentError(
          absl::StrCat("num_state_slots (", args.num_state_slots,
                       ") must be >= num_seqs when state_slots is null"));
    }
    return absl::OkStatus();
  }
  // Two sequences on one slot would race and lose a token: reject.
  std::vector<bool> used(args.num_state_slots, false);
  for (int s = 0; s < c.num_seqs; ++s) {
    const int32_t slot = args.state_slots[s];
    if (slot < 0 || slot >= args.num_state_slots) {
      return absl::InvalidArgumentError(
          absl::StrCat("state_slots[", s, "] = ", slot,
                       " is outside [0, num_state_slots = ", args.num_state_slots, ")"));
    }
    if (used[slot]) {
      return absl::InvalidArgumentError(
          absl::StrCat("state_slots[", s, "] = ", slot, " is used by an earlier sequence"));
    }
    used[slot] = true;
  }
  return absl::OkStatus();
}

absl::Status LinearAttentionForwardCpu(const LinearAttentionForwardArgs& args, ThreadPool& pool) {
  FERRY_RETURN_IF_ERROR(ValidateLinearAttentionForwardArgs(args));
  const Problem p = MakeProblem(args.config);
  const int d = p.d;
  const int64_t stride = p.layout.stride;
  const TokenIo io{p.dtype, args.q, args.k, args.v, args.out};
  const int64_t num_tasks = int64_t{args.config.num_seqs} * p.num_kv_heads;
  pool.ParallelFor(num_tasks, [&](int64_t task) {
    const int64_t seq = task / p.num_kv_heads;
    const int kv_head = static_cast<int>(task % p.num_kv_heads);
    // A private copy, so final_state may alias initial_state.
    std::vector<float> state(stride, 0.0f);
    if (args.initial_state != nullptr) {
      std::memcpy(state.data(), args.initial_state + task * stride, sizeof(float) * stride);
    }
    const StateView st = View(p, state.data());
    TokenBuffers buffers(p);
    for (int64_t t = args.cu_seqlens[seq]; t < args.cu_seqlens[seq + 1]; ++t) {
      const int64_t q_row = t * p.num_q_heads + int64_t{kv_head} * p.group;
      const int64_t kv_row = t * p.num_kv_heads + kv_head;
      Token(p, st, io, q_row * d, kv_row * d, buffers);
    }
    if (args.final_state != nullptr) {
      std::memcpy(args.final_state + task * stride, state.data(), sizeof(float) * stride);
    }
  });
  return absl::OkStatus();
}

absl::Status LinearAttentionDecodeCpu(const LinearAttentionDecodeArgs& args, ThreadPool& pool) {
  FERRY_RETURN_IF_ERROR(ValidateLinearAttentionDecodeArgs(args));
  const Problem p = MakeProblem(args.config);
  const TokenIo io{p.dtype, args.q, args.k, args.v, args.out};
  const int d = p.d;
  const int64_t num_tasks = int64_t{args.config.num_seqs} * p.num_kv_heads;
  pool.ParallelFor(num_tasks, [&](int64_t task) {
    const int64_t seq = task / p.num_kv_heads;
    const int kv_head = static_cast<int>(task % p.num_kv_heads);
    const int64_t slot = args.state_slots != nullptr ? args.state_slots[seq] : seq;
    const StateView st = View(p, args.states + (slot * p.num_kv_heads + kv_head) * p.layout.stride);
    TokenBuffers buffers(p);
    const int64_t q_row = seq * p.num_q_heads + int64_t{kv_head} * p.group;
    const int64_t kv_row = seq * p.num_kv_heads + kv_head;
    Token(p, st, io, q_row * d, kv_row * d, buffers);
  });
  return absl::OkStatus();
}

namespace {

// Backward of one (sequence, kv head), from the empty state. With u_i the effective query of a q
// head, dnum_i = dout_i / den_i and dden_i = -(dout_i . o_i) / den_i (unnormalised: dnum_i =
// dout_i, dden_i = 0):
//   du_i  = S_i dnum_i + z_i dden_i                        (forward pass, S_i at hand)
//   dphi(k_j) = R_j v_j + r_j,  dv_j = R_j^T phi(k_j) + W_j  (reverse pass) where
//   R_j = sum_{i>=j} u_i dnum_i^T, r_j = sum_{i>=j} u_i dden_i, W_j = sum_{i>=j} dnum_i (lifted),
// summed over the group's q heads. For kOnePlusXMaxNorm u_i = c_i q_i with c_i = 1 / (a_i b_i):
// dq_i += c_i du_i, and dc_i = q_i . du_i reaches the q and k that attain the running maxima
// through da_i = -dc_i c_i / a_i and db_i = -dc_i c_i / b_i (d||x|| / dx = x / ||x||).
FERRY_LINEAR_CLONES void BackwardTask(const LinearAttentionBackwardArgs& args, const Problem& p,
                                      int64_t task) {
  const int d = p.d;
  const int group = p.group;
  const int64_t seq = task / p.num_kv_heads;
  const int kv_head = static_cast<int>(task % p.num_kv_heads);
  const int64_t first = args.cu_seqlens[seq];
  const int64_t len = args.cu_seqlens[seq + 1] - first;
  if (len == 0) return;
  auto q_at = [&](int64_t i, int g) {
    return ((first + i) * p.num_q_heads + int64_t{kv_head} * group + g) * d;
  };
  auto kv_at = [&](int64_t i) { return ((first + i) * p.num_kv_heads + kv_head) * d; };

  std::vector<float> state(p.layout.stride, 0.0f);
  const StateView st = View(p, state.data());
  std::vector<float> kf(d), num(d), o(d), du(d);
  // Per (position, q head of the group): u, dnum and dden, kept for the reverse pass.
  std::vector<float> us(len * group * d), dnums(len * group * d), ddens(len * group);
  // Max-norm gradients: da / db summed onto the position that attains the running maximum.
  std::vector<float> q_norm_grad, k_norm_grad, q_norms, k_norms;
  std::vector<int64_t> q_argmax(group, -1);
  int64_t k_argmax = -1;
  if (p.lifted()) {
    q_norm_grad.assign(len * group, 0.0f);
    k_norm_grad.assign(len, 0.0f);
    q_norms.assign(len * group, 0.0f);
    k_norms.assign(len, 0.0f);
  }

  for (int64_t i = 0; i < len; ++i) {
    const float* k = args.k + kv_at(i);
    const float prev_k_norm = *st.k_norm;
    AppendKv(p, st, k, args.v + kv_at(i), kf.data());
    if (p.lifted()) {
      k_norms[i] = Norm(k, d);
      // Strictly greater: the first position attaining the maximum keeps it, as documented.
      if (k_argmax < 0 || *st.k_norm > prev_k_norm) k_argmax = i;
    }
    for (int g = 0; g < group; ++g) {
      const float* q = args.q + q_at(i, g);
      const float* dout = args.dout + q_at(i, g);
      const float q_norm = Norm(q, d);
      const float prev_q_norm = st.q_norm[g];
      st.q_norm[g] = std::max(st.q_norm[g], q_norm);
      if (p.lifted()) {
        q_norms[i * group + g] = q_norm;
        if (q_argmax[g] < 0 || st.q_norm[g] > prev_q_norm) q_argmax[g] = i;
      }
      float* u = &us[(i * group + g) * d];
      float* dnum = &dnums[(i * group + g) * d];
      QueryFeatures(p, q, st.q_norm[g], *st.k_norm, u);
      const float den = Numerator(p, st, u, num.data());
      float dden = 0.0f;
      if (p.normalize) {
        for (int c = 0; c < d; ++c) o[c] = num[c] / den;
        dden = -Dot(dout, o.data(), d) / den;
        for (int c = 0; c < d; ++c) dnum[c] = dout[c] / den;
      } else {
        std::memcpy(dnum, dout, sizeof(float) * d);
      }
      ddens[i * group + g] = dden;
      for (int a = 0; a < d; ++a) {
        du[a] = Dot(st.s + int64_t{a} * d, dnum, d) + st.z[a] * dden;
      }
      float* dq = args.dq + q_at(i, g);
      switch (p.feature_map) {
        case LinearFeatureMap::kOnePlusXMaxNorm: {
          const float a_norm = std::max(kLinearNormFloor, st.q_norm[g]);
          const float b_norm = std::max(kLinearNormFloor, *st.k_norm);
          const float inv_a = 1.0f / a_norm;
          const float inv_b = 1.0f / b_norm;
          for (int c = 0; c < d; ++c) dq[c] = (du[c] * inv_a) * inv_b;
          // dc c = dc / (a b); da = -dc c / a, db = -dc c / b. The floor has no gradient.
          const float dc_c = ((Dot(q, du.data(), d) * inv_a) * inv_b);
          if (st.q_norm[g] > kLinearNormFloor) {
            q_norm_grad[q_argmax[g] * group + g] -= dc_c * inv_a;
          }
          if (*st.k_norm > kLinearNormFloor) k_norm_grad[k_argmax] -= dc_c * inv_b;
          break;
        }
        case LinearFeatureMap::kEluPlusOne:
          for (int c = 0; c < d; ++c) dq[c] = du[c] * EluPlusOneDerivative(q[c]);
          break;
        case LinearFeatureMap::kIdentity:
          std::memcpy(dq, du.data(), sizeof(float) * d);
          break;
      }
    }
  }
  if (p.lifted()) {
    for (int64_t i = 0; i < len; ++i) {
      for (int g = 0; g < group; ++g) {
        const float grad = q_norm_grad[i * group + g];
        if (grad == 0.0f) continue;
        const float* q = args.q + q_at(i, g);
        Axpy(grad / q_norms[i * group + g], q, args.dq + q_at(i, g), d);
      }
    }
  }

  // Reverse pass: R, r, W accumulate the suffix sums.
  std::vector<float> r_mat(int64_t{d} * d, 0.0f), r_vec(d, 0.0f), w_vec(d, 0.0f);
  for (int64_t j = len - 1; j >= 0; --j) {
    for (int g = 0; g < group; ++g) {
      const float* u = &us[(j * group + g) * d];
      const float* dnum = &dnums[(j * group + g) * d];
      const float dden = ddens[j * group + g];
      for (int a = 0; a < d; ++a) Axpy(u[a], dnum, r_mat.data() + int64_t{a} * d, d);
      Axpy(dden, u, r_vec.data(), d);
      if (p.lifted()) Axpy(1.0f, dnum, w_vec.data(), d);
    }
    const float* k = args.k + kv_at(j);
    const float* v = args.v + kv_at(j);
    float* dk = args.dk + kv_at(j);
    float* dv = args.dv + kv_at(j);
    KeyFeatures(p, k, kf.data());
    if (p.lifted()) {
      std::memcpy(dv, w_vec.data(), sizeof(float) * d);
    } else {
      std::fill(dv, dv + d, 0.0f);
    }
    for (int a = 0; a < d; ++a) {
      const float* row = r_mat.data() + int64_t{a} * d;
      const float dphi = Dot(row, v, d) + r_vec[a];
      dk[a] =
          p.feature_map == LinearFeatureMap::kEluPlusOne ? dphi * EluPlusOneDerivative(k[a]) : dphi;
      Axpy(kf[a], row, dv, d);
    }
    if (p.lifted() && k_norm_grad[j] != 0.0f) Axpy(k_norm_grad[j] / k_norms[j], k, dk, d);
  }
}

}  // namespace

absl::Status LinearAttentionBackwardCpu(const LinearAttentionBackwardArgs& args, ThreadPool& pool) {
  FERRY_RETURN_IF_ERROR(ValidateLinearAttentionBackwardArgs(args));
  const Problem p = MakeProblem(args.config);
  pool.ParallelFor(int64_t{args.config.num_seqs} * p.num_kv_heads,
                   [&](int64_t task) { BackwardTask(args, p, task); });
  return absl::OkStatus();
}

}  // namespace ferry::kernels
