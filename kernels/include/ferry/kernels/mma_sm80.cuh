// Device helpers for tensor-core attention kernels on sm_80 and later (sm_90 runs them too):
// mma.sync m16n8k16 with float32 accumulators for bf16 and fp16 operands, cp.async 16-byte
// global -> shared copies, ldmatrix and movmatrix, L2 cache policies (evict-first reads,
// evict-last stores), and the XOR swizzle of 16-bit [rows][head_dim] tiles.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, c = 2 * (lane % 4)):
//   A (16 x 16, row-major)  a[0] = (g, c..c+1)  a[1] = (g+8, c..c+1)  a[2] = (g, c+8..c+9)
//                           a[3] = (g+8, c+8..c+9), each register two 16-bit values
//   B (16 x 8, k x n)       b0 = (k c..c+1, n g)  b1 = (k c+8..c+9, n g)
//   C (16 x 8, float32)     c[0..1] = (g, c..c+1)  c[2..3] = (g+8, c..c+1)
// so the C fragments of two adjacent n8 tiles, packed to 16 bits, are the A fragment of the
// next product over those 16 columns (the softmax weights of attention feed P V that way).
// Header-only, device code; include from .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace ferry::kernels::mma {

struct Bf16 {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float Rounded(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ T FromFloat(float x) { return __float2bfloat16_rn(x); }
  // c += a b (m16n8k16, float32 accumulators).
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

struct Fp16 {
  using T = __half;
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float Rounded(float x) {
    return __half2float(__float2half_rn(x));
  }
  static __device__ __forceinline__ T FromFloat(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; valid == false writes zeros and reads nothing.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}
// An L2 cache policy marking lines evict-first (data read once, streamed past the cache).
__device__ __forceinline__ uint64_t L2EvictFirstPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// An L2 cache policy marking lines evict-last (small outputs read back soon, or rewritten by
// the next launch: kept out of DRAM while a read stream passes).
__device__ __forceinline__ uint64_t L2EvictLastPolicy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
// Global stores with an L2 cache policy: 4 bytes, 16 bytes (16-byte aligned), 2 bytes.
__device__ __forceinline__ void StoreWithPolicy(float* dst, float v, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.f32 [%0], %1, %2;\n" ::"l"(dst), "f"(v), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void StoreWithPolicy(float* dst, float4 v, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.v4.f32 [%0], {%1, %2, %3, %4}, %5;\n" ::"l"(dst),
               "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w), "l"(policy)
               : "memory");
}
__device__ __forceinline__ void StoreWithPolicy(void* dst, uint16_t bits, uint64_t policy) {
  asm volatile("st.global.L2::cache_hint.b16 [%0], %1, %2;\n" ::"l"(dst), "h"(bits),
               "l"(policy)
               : "memory");
}
// CpAsync16 with an L2 cache policy (L2EvictFirstPolicy).
__device__ __forceinline__ void CpAsync16Stream(uint32_t dst, const void* src, bool valid,
                                                uint64_t policy) {
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst),
               "l"(src), "r"(valid ? 16 : 0), "l"(policy));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int kPending>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The transpose of an 8 x 8 16-bit matrix held one register per lane in the C / ldmatrix layout
// (lane holds row lane / 4, columns 2 (lane % 4) + {0, 1}): turns an accumulator, packed to
// 16 bits, into a B operand of the next product (sm_75 and later).
__device__ __forceinline__ uint32_t MovMatrixTrans(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][kHeadDim] 16-bit tile:
// the XOR spreads the 8 rows one ldmatrix reads over all 32 banks (needs kHeadDim >= 64).
template <int kHeadDim>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  static_assert(kHeadDim >= 64, "the swizzle needs 8 chunks per row");
  return row * (kHeadDim * 2) + ((chunk ^ (row & 7)) << 4);
}

}  // namespace ferry::kernels::mma
