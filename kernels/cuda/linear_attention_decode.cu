// Causal linear attention decode on CUDA: one token per sequence appended to its state, and the
// token's output (the recurrence of linear_attention.h, as LinearAttentionDecodeCpu).
// Contract: ferry/kernels/cuda_linear_attention.h.
//
// One block per (sequence, kv head), one thread per column b of S: the thread streams S's
// column b once (read, add phi(k)_a v_b, write back) while accumulating the group's numerators
// S^T u from the updated values, so S is read and written once per step (memory-bound: 8 d^2
// bytes per (sequence, kv head)). Norms and denominators are block reductions.
#include <cmath>
#include <cstdint>
#include <limits>

#include "ferry/kernels/cuda_linear_attention.h"
#include "linear_attention_core.cuh"

namespace ferry::kernels {
namespace {

using linear_cuda::BitsToFloat;
using linear_cuda::EluPlusOne;
using linear_cuda::FloatToBits;

constexpr int kHeadsPerPass = 8;  // numerators held in registers per pass over S
constexpr int kMaxDecodeSmem = 48 * 1024;

struct DecodeParams {
  const uint16_t* q = nullptr;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  float* states = nullptr;
  const int32_t* state_slots = nullptr;
  int num_state_slots = 0;
  uint16_t* out = nullptr;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int group = 1;
  int feature_map = 0;
  bool normalize = true;
  bool fp16 = false;
  LinearStateLayout layout;
};

// Sum over the block (kD threads); every thread gets the total. `red` holds kD / 32 floats.
template <int kD>
__device__ __forceinline__ float BlockSum(float x, float* red) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  __syncthreads();  // red may still be read by the previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  __syncthreads();
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kD / 32; ++w) total += red[w];
  return total;
}

template <int kD>
__global__ void __launch_bounds__(kD) LinearDecodeKernel(const DecodeParams p) {
  extern __shared__ float smem[];
  float* kf_s = smem;           // phi(k), kD
  float* u_s = kf_s + kD;       // effective queries, (group, kD)
  float* red = u_s + p.group * kD;  // kD / 32
  const int seq = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int b = threadIdx.x;
  const int group = p.group;
  const bool lifted = p.feature_map == static_cast<int>(LinearFeatureMap::kOnePlusXMaxNorm);
  const bool elu = p.feature_map == static_cast<int>(LinearFeatureMap::kEluPlusOne);
  const int64_t q_row0 = int64_t{seq} * p.num_q_heads + int64_t{kv_head} * group;
  const int slot = p.state_slots != nullptr ? p.state_slots[seq] : seq;
  if (slot < 0 || slot >= p.num_state_slots) {
    for (int g = 0; g < group; ++g) {
      p.out[(q_row0 + g) * kD + b] = FloatToBits(std::numeric_limits<float>::quiet_NaN(), p.fp16);
    }
    return;
  }
  const LinearStateLayout& l = p.layout;
  float* st = p.states + (int64_t{slot} * p.num_kv_heads + kv_head) * l.stride;
  // Every thread reads the scalars before the first barrier; thread 0 writes them at the end.
  const float old_k_norm = st[l.k_norm_offset];
  const float count = st[l.count_offset] + 1.0f;
  const int64_t kv_row = int64_t{seq} * p.num_kv_heads + kv_head;
  const float k_raw = BitsToFloat(p.k[kv_row * kD + b], p.fp16);
  const float v_b = BitsToFloat(p.v[kv_row * kD + b], p.fp16);
  const float kf = elu ? EluPlusOne(k_raw) : k_raw;
  kf_s[b] = kf;
  const float k_norm = fmaxf(old_k_norm, sqrtf(BlockSum<kD>(k_raw * k_raw, red)));
  const float z_b = st[l.z_offset + b] + kf;
  const float v_sum_b = st[l.v_sum_offset + b] + v_b;
  float q_norm_mine = 0.0f;  // thread g < group: the new max norm of q head g
  for (int g = 0; g < group; ++g) {
    const float x = BitsToFloat(p.q[(q_row0 + g) * kD + b], p.fp16);
    const float old = st[l.q_norm_offset + g];
    const float q_norm = fmaxf(old, sqrtf(BlockSum<kD>(x * x, red)));
    if (b == g) q_norm_mine = q_norm;
    float u = x;
    if (lifted) {
      u = (x * (1.0f / fmaxf(kLinearNormFloor, q_norm))) * (1.0f / fmaxf(kLinearNormFloor, k_norm));
    } else if (elu) {
      u = EluPlusOne(x);
    }
    u_s[g * kD + b] = u;
  }
  __syncthreads();
  float* s_col = st + l.s_offset + b;
  for (int g0 = 0; g0 < group; g0 += kHeadsPerPass) {
    float num[kHeadsPerPass] = {};
    for (int a = 0; a < kD; ++a) {
      float s = s_col[int64_t{a} * kD];
      if (g0 == 0) {
        s += kf_s[a] * v_b;
        s_col[int64_t{a} * kD] = s;
      }
#pragma unroll
      for (int i = 0; i < kHeadsPerPass; ++i) {
        if (g0 + i < group) num[i] += u_s[(g0 + i) * kD + a] * s;
      }
    }
#pragma unroll
    for (int i = 0; i < kHeadsPerPass; ++i) {
      const int g = g0 + i;
      if (g >= group) break;
      float numerator = lifted ? v_sum_b + num[i] : num[i];
      if (p.normalize) {
        const float den = BlockSum<kD>(u_s[g * kD + b] * z_b, red) + (lifted ? count : 0.0f);
        numerator /= den;
      }
      p.out[(q_row0 + g) * kD + b] = FloatToBits(numerator, p.fp16);
    }
  }
  st[l.z_offset + b] = z_b;
  st[l.v_sum_offset + b] = v_sum_b;
  if (b < group) st[l.q_norm_offset + b] = q_norm_mine;
  if (b == 0) {
    st[l.count_offset] = count;
    st[l.k_norm_offset] = k_norm;
  }
}

template <int kD>
cudaError_t LaunchDecode(const DecodeParams& params, int num_seqs, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (size_t{1} + params.group) * kD + sizeof(float) * kD / 32;
  if (smem > kMaxDecodeSmem) return cudaErrorNotSupported;
  DecodeParams copy = params;
  void* args[] = {&copy};
  return cudaLaunchKernel(reinterpret_cast<const void*>(LinearDecodeKernel<kD>),
                          dim3(num_seqs, params.num_kv_heads), dim3(kD), args, smem, stream);
}

}  // namespace

cudaError_t LinearAttentionDecodeCuda(const LinearAttentionDecodeArgs& args, cudaStream_t stream) {
  using namespace linear_cuda;
  const LinearAttentionConfig& c = args.config;
  cudaError_t error = CheckConfig(c);
  if (error != cudaSuccess) return error;
  if (c.num_seqs == 0) return cudaSuccess;
  if (args.q == nullptr || args.k == nullptr || args.v == nullptr || args.out == nullptr ||
      args.states == nullptr || args.num_state_slots < 0) {
    return cudaErrorInvalidValue;
  }
  if (args.state_slots == nullptr && args.num_state_slots < c.num_seqs) {
    return cudaErrorInvalidValue;
  }
  DecodeParams p;
  p.q = static_cast<const uint16_t*>(args.q);
  p.k = static_cast<const uint16_t*>(args.k);
  p.v = static_cast<const uint16_t*>(args.v);
  p.states = args.states;
  p.state_slots = args.state_slots;
  p.num_state_slots = args.num_state_slots;
  p.out = static_cast<uint16_t*>(args.out);
  p.num_q_heads = c.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.group = c.num_q_heads / c.num_kv_heads;
  p.feature_map = static_cast<int>(c.feature_map);
  p.normalize = c.normalize;
  p.fp16 = c.dtype == DType::kFloat16;
  p.layout = MakeLinearStateLayout(c.head_dim, p.group);
  switch (c.head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return LaunchDecode<64>(p, c.num_seqs, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return LaunchDecode<128>(p, c.num_seqs, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_256
    case 256:
      return LaunchDecode<256>(p, c.num_seqs, stream);
#endif
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace ferry::kernels
