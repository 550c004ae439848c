// PagedPrefillAttention (contract: ferry/kernels/paged_prefill_attention.h).
//
// One block per (row, KV head), one warp per q head of the GQA group. The group's q rows sit in
// shared memory (pre-scaled by the softmax scale); each 32-position tile has every lane score one
// position (a whole K row against q from shared memory, 16-byte K loads), then the warp updates
// its online softmax and every lane accumulates its head_dim / 32 output columns over the tile's
// V rows (coalesced across the warp), the weights broadcast by shuffles.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "ferry/kernels/paged_prefill_attention.h"

namespace ferry::kernels {
namespace {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxPerLane = kMaxHeadDim / 32;
constexpr int kMaxGroup = 32;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ void Load8(const float* p, float* out) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
  out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}

__device__ __forceinline__ void Load8(const __nv_bfloat16* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ void Load8(const __half* p, float* out) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

__device__ __forceinline__ float WarpMax(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

__device__ __forceinline__ float WarpSum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

template <typename T>
__global__ void PagedPrefillAttentionKernel(PagedPrefillAttentionArgs a) {
  extern __shared__ float q_smem[];  // (group, head_dim)
  const int kvh = a.kv.num_kv_heads;
  const int hd = a.kv.head_dim;
  const int bs = a.kv.block_size;
  const int group = a.num_q_heads / kvh;
  const int row = blockIdx.x / kvh;
  const int kv_head = blockIdx.x % kvh;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int per_lane = hd / 32;

  const float* q_src = a.q + (int64_t{row} * a.num_q_heads + int64_t{kv_head} * group) * hd;
  for (int i = threadIdx.x; i < group * hd; i += blockDim.x) {
    q_smem[i] = q_src[i] * a.softmax_scale;
  }
  __syncthreads();
  const float* q = q_smem + warp * hd;
  const int32_t* blocks = a.block_table + a.block_table_indptr[a.row_run[row]];
  const int pos = a.row_pos[row];
  const T* k_pool = static_cast<const T*>(a.kv.k_pool);
  const T* v_pool = static_cast<const T*>(a.kv.v_pool);
  // Element offset of position t's row for this KV head, or -1 for a block outside the pool.
  auto row_offset = [&](int t) -> int64_t {
    const int block = blocks[t / bs];
    if (block < 0 || block >= a.kv.num_blocks) return -1;
    return ((int64_t{block} * kvh + kv_head) * bs + t % bs) * hd;
  };

  float m = -INFINITY;
  float l = 0.0f;
  float acc[kMaxPerLane];
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) acc[i] = 0.0f;

  for (int t0 = 0; t0 <= pos; t0 += 32) {
    const int t = t0 + lane;
    float s = -INFINITY;
    if (t <= pos) {
      const int64_t off = row_offset(t);
      float dot = 0.0f;
      if (off >= 0) {
        const T* k = k_pool + off;
        for (int d = 0; d < hd; d += 8) {
          float kv[8];
          Load8(k + d, kv);
#pragma unroll
          for (int i = 0; i < 8; ++i) dot += q[d + i] * kv[i];
        }
      }
      s = dot;
    }
    // Lane 0's position (t0) is always in range, so m_new is finite.
    const float m_new = fmaxf(m, WarpMax(s));
    const float alpha = expf(m - m_new);  // 0 on the first tile (m = -inf)
    const float p = t <= pos ? expf(s - m_new) : 0.0f;
    l = l * alpha + WarpSum(p);
#pragma unroll
    for (int i = 0; i < kMaxPerLane; ++i) acc[i] *= alpha;
    const int valid = min(32, pos - t0 + 1);
    for (int j = 0; j < valid; ++j) {
      const float pj = __shfl_sync(kFullMask, p, j);
      const int64_t off = row_offset(t0 + j);
      if (off < 0) continue;
      const T* v = v_pool + off;
#pragma unroll
      for (int i = 0; i < kMaxPerLane; ++i) {
        if (i < per_lane) acc[i] += pj * ToFloat(v[lane + 32 * i]);
      }
    }
    m = m_new;
  }
  const int q_head = kv_head * group + warp;
  float* out = a.out + (int64_t{row} * a.num_q_heads + q_head) * hd;
  const float inv_l = 1.0f / l;
#pragma unroll
  for (int i = 0; i < kMaxPerLane; ++i) {
    if (i < per_lane) out[lane + 32 * i] = acc[i] * inv_l;
  }
  if (a.lse != nullptr && lane == 0) {
    a.lse[int64_t{row} * a.num_q_heads + q_head] = m + logf(l);
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t PagedPrefillAttention(const PagedPrefillAttentionArgs& a, cudaStream_t stream) {
  const PagedKvView& kv = a.kv;
  if (a.num_rows < 0 || kv.num_kv_heads <= 0 || a.num_q_heads <= 0 ||
      a.num_q_heads % kv.num_kv_heads != 0 || a.num_q_heads / kv.num_kv_heads > kMaxGroup ||
      kv.head_dim <= 0 || kv.head_dim % 32 != 0 || kv.head_dim > kMaxHeadDim ||
      kv.block_size <= 0 || kv.num_blocks < 0 ||
      !(std::isfinite(a.softmax_scale) && a.softmax_scale > 0.0f)) {
    return cudaErrorInvalidValue;
  }
  if (a.num_rows == 0) return cudaSuccess;
  if (a.q == nullptr || a.out == nullptr || kv.k_pool == nullptr || kv.v_pool == nullptr ||
      a.block_table_indptr == nullptr || a.block_table == nullptr || a.row_run == nullptr ||
      a.row_pos == nullptr || !Aligned16(kv.k_pool) || !Aligned16(kv.v_pool)) {
    return cudaErrorInvalidValue;
  }
  const int group = a.num_q_heads / kv.num_kv_heads;
  const dim3 grid(static_cast<unsigned>(int64_t{a.num_rows} * kv.num_kv_heads));
  const int threads = 32 * group;
  const size_t smem = sizeof(float) * group * kv.head_dim;
  switch (kv.dtype) {
    case DType::kFloat32:
      PagedPrefillAttentionKernel<float><<<grid, threads, smem, stream>>>(a);
      break;
    case DType::kBFloat16:
      PagedPrefillAttentionKernel<__nv_bfloat16><<<grid, threads, smem, stream>>>(a);
      break;
    case DType::kFloat16:
      PagedPrefillAttentionKernel<__half><<<grid, threads, smem, stream>>>(a);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace ferry::kernels
