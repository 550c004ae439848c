// KvAppend: new K/V rows into the paged pools (contract: ferry/kernels/kv_append.h).
// One thread moves 8 elements of one (row, KV head) of K or V: 16-byte stores for 16-bit pools.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "ferry/kernels/kv_append.h"

namespace ferry::kernels {
namespace {

struct Pack8 {
  float v[8];
};

template <typename T>
__device__ __forceinline__ Pack8 Load8(const T* src);

template <>
__device__ __forceinline__ Pack8 Load8<float>(const float* src) {
  const float4 a = reinterpret_cast<const float4*>(src)[0];
  const float4 b = reinterpret_cast<const float4*>(src)[1];
  return Pack8{{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w}};
}

template <typename T>
__device__ __forceinline__ void Store8(T* dst, const Pack8& p);

template <>
__device__ __forceinline__ void Store8<__nv_bfloat16>(__nv_bfloat16* dst, const Pack8& p) {
  __nv_bfloat162 h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(p.v[2 * i], p.v[2 * i + 1]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(h);
}

template <>
__device__ __forceinline__ void Store8<__half>(__half* dst, const Pack8& p) {
  __half2 h[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(p.v[2 * i], p.v[2 * i + 1]);
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(h);
}

// Src == Dst copies 16-bit rows bit for bit; otherwise Src is float and converts.
template <typename Src, typename Dst>
__global__ void KvAppendKernel(KvAppendArgs a) {
  const int chunks = a.head_dim / 8;
  const int64_t item = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  const int64_t items = int64_t{a.num_rows} * a.num_kv_heads * chunks;
  if (item >= items) return;
  const int c = static_cast<int>(item % chunks);
  const int64_t row_head = item / chunks;
  const int h = static_cast<int>(row_head % a.num_kv_heads);
  const int64_t r = row_head / a.num_kv_heads;
  const int64_t slot = a.row_slots[r];
  if (slot < 0 || slot >= int64_t{a.num_blocks} * a.block_size) return;
  const int64_t block = slot / a.block_size;
  const int64_t in_block = slot % a.block_size;
  const int64_t dst_elem =
      ((block * a.num_kv_heads + h) * a.block_size + in_block) * a.head_dim + c * 8;
  const int64_t src_elem = row_head * a.head_dim + c * 8;
  const bool is_v = blockIdx.y == 1;
  const Src* src = static_cast<const Src*>(is_v ? a.v : a.k) + src_elem;
  Dst* dst = static_cast<Dst*>(is_v ? a.v_pool : a.k_pool) + dst_elem;
  if constexpr (sizeof(Src) == sizeof(Dst)) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    if constexpr (sizeof(Src) == 4) {
      reinterpret_cast<uint4*>(dst)[1] = reinterpret_cast<const uint4*>(src)[1];
    }
  } else {
    Store8<Dst>(dst, Load8<Src>(src));
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t KvAppend(const KvAppendArgs& a, cudaStream_t stream) {
  if (a.num_rows < 0 || a.num_blocks < 0 || a.num_kv_heads <= 0 || a.block_size <= 0 ||
      a.head_dim <= 0 || a.head_dim % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  if (a.src_dtype != DType::kFloat32 && a.src_dtype != a.dtype) return cudaErrorInvalidValue;
  if (a.num_rows == 0) return cudaSuccess;
  if (a.k_pool == nullptr || a.v_pool == nullptr || a.k == nullptr || a.v == nullptr ||
      a.row_slots == nullptr || !Aligned16(a.k_pool) || !Aligned16(a.v_pool) ||
      !Aligned16(a.k) || !Aligned16(a.v)) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;
  const int64_t items = int64_t{a.num_rows} * a.num_kv_heads * (a.head_dim / 8);
  const dim3 grid(static_cast<unsigned>((items + kThreads - 1) / kThreads), 2);
  switch (a.dtype) {
    case DType::kFloat32:
      KvAppendKernel<float, float><<<grid, kThreads, 0, stream>>>(a);
      break;
    case DType::kBFloat16:
      if (a.src_dtype == DType::kFloat32) {
        KvAppendKernel<float, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(a);
      } else {
        KvAppendKernel<__nv_bfloat16, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(a);
      }
      break;
    case DType::kFloat16:
      if (a.src_dtype == DType::kFloat32) {
        KvAppendKernel<float, __half><<<grid, kThreads, 0, stream>>>(a);
      } else {
        KvAppendKernel<__half, __half><<<grid, kThreads, 0, stream>>>(a);
      }
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace ferry::kernels
