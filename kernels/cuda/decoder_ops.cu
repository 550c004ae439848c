// The decoder's small ops on CUDA (contract: ferry/kernels/decoder_ops.h). Memory-bound and
// small next to the GEMMs: plain grid-stride kernels, one block per row where a row reduces.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "ferry/kernels/decoder_ops.h"

namespace ferry::kernels {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
__device__ __forceinline__ void Store(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void Store(__nv_bfloat16* p, int64_t i, float x) {
  p[i] = __float2bfloat16_rn(x);
}
__device__ __forceinline__ void Store(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }

unsigned Blocks(int64_t items, int threads) {
  return static_cast<unsigned>((items + threads - 1) / threads);
}

bool IsActDtype(DType d) { return d == DType::kFloat32 || d == DType::kBFloat16; }

template <typename T>
__global__ void EmbeddingGatherKernel(const int32_t* tokens, const T* table, int vocab,
                                      int hidden, float* x) {
  const int r = blockIdx.x;
  const int32_t token = tokens[r];
  float* dst = x + int64_t{r} * hidden;
  if (token < 0 || token >= vocab) {
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = NAN;
    return;
  }
  const T* src = table + int64_t{token} * hidden;
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) dst[i] = Load(src, i);
}

// One block of kNormThreads per output row.
constexpr int kNormThreads = 256;

template <typename Out>
__global__ void RmsNormKernel(const float* x, const int32_t* row_index, int dim,
                              const float* weight, double eps, Out* out) {
  const int r = blockIdx.x;
  const int src_row = row_index != nullptr ? row_index[r] : r;
  const float* xr = x + int64_t{src_row} * dim;
  double ss = 0.0;
  for (int i = threadIdx.x; i < dim; i += kNormThreads) {
    const double v = xr[i];
    ss += v * v;
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) ss += __shfl_xor_sync(kFullMask, ss, o);
  __shared__ double warp_sums[kNormThreads / 32];
  __shared__ float scale;
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kNormThreads / 32; ++w) total += warp_sums[w];
    scale = static_cast<float>(1.0 / sqrt(total / dim + eps));
  }
  __syncthreads();
  const float s = scale;
  for (int i = threadIdx.x; i < dim; i += kNormThreads) {
    Store(out, int64_t{r} * dim + i, weight[i] * (xr[i] * s));
  }
}

__global__ void RopeCosSinKernel(const int32_t* positions, const float* inv_freq, int head_dim,
                                 float* cos_sin) {
  const int r = blockIdx.x;
  const int half = head_dim / 2;
  const float position = static_cast<float>(positions[r]);
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const float angle = __fmul_rn(position, inv_freq[i]);
    cos_sin[int64_t{r} * head_dim + i] = static_cast<float>(cos(static_cast<double>(angle)));
    cos_sin[int64_t{r} * head_dim + half + i] =
        static_cast<float>(sin(static_cast<double>(angle)));
  }
}

// Grid (items / threads, rows); an item is a rotated pair of q or k, or one element of v.
__global__ void RopeSplitQkvKernel(const float* qkv, const float* bias, const float* cos_sin,
                                   int num_heads, int num_kv_heads, int head_dim, float* q,
                                   float* k, float* v) {
  const int r = blockIdx.y;
  const int item = blockIdx.x * blockDim.x + threadIdx.x;
  const int half = head_dim / 2;
  const int q_pairs = num_heads * half;
  const int k_pairs = num_kv_heads * half;
  const int v_elems = num_kv_heads * head_dim;
  if (item >= q_pairs + k_pairs + v_elems) return;
  const int width = (num_heads + 2 * num_kv_heads) * head_dim;
  const float* row = qkv + int64_t{r} * width;
  auto in = [&](int col) { return bias != nullptr ? row[col] + bias[col] : row[col]; };
  if (item >= q_pairs + k_pairs) {
    const int e = item - q_pairs - k_pairs;
    v[int64_t{r} * v_elems + e] = in((num_heads + num_kv_heads) * head_dim + e);
    return;
  }
  const bool is_q = item < q_pairs;
  const int pair = is_q ? item : item - q_pairs;
  const int head = pair / half;
  const int i = pair % half;
  const int col = (is_q ? 0 : num_heads * head_dim) + head * head_dim + i;
  const float x1 = in(col);
  const float x2 = in(col + half);
  const float c = cos_sin[int64_t{r} * head_dim + i];
  const float s = cos_sin[int64_t{r} * head_dim + half + i];
  // Separate roundings, as the CPU backend's x1 * c - x2 * s (no fused multiply-add).
  float* dst = is_q ? q + (int64_t{r} * num_heads + head) * head_dim
                    : k + (int64_t{r} * num_kv_heads + head) * head_dim;
  dst[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
  dst[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
}

template <typename Out>
__global__ void SwiGluKernel(const float* gate_up, int rows, int inter, Out* act) {
  const int64_t n = int64_t{rows} * inter;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = e / inter;
    const int64_t i = e % inter;
    const float g = gate_up[r * 2 * inter + i];
    const float u = gate_up[r * 2 * inter + inter + i];
    Store(act, e, g / (1.0f + expf(-g)) * u);
  }
}

template <typename Out>
__global__ void ConvertFloatKernel(const float* in, int64_t n, Out* out) {
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    Store(out, e, in[e]);
  }
}

__global__ void AddBiasKernel(float* x, int64_t n, int dim, const float* bias) {
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    x[e] += bias[e % dim];
  }
}

// (value, index) pairs under the greedy order: larger value first, then lower index; NaN is
// treated as -inf so it never wins.
__device__ __forceinline__ bool Better(float va, int ia, float vb, int ib) {
  return va != vb ? va > vb : ia < ib;
}

constexpr int kArgmaxThreads = 1024;

__global__ void ArgmaxRowsKernel(const float* logits, int vocab, int32_t* out) {
  const float* row = logits + int64_t{blockIdx.x} * vocab;
  float best = -INFINITY;
  int best_index = vocab;  // loses to any real index of equal value
  for (int i = threadIdx.x; i < vocab; i += kArgmaxThreads) {
    float v = row[i];
    if (isnan(v)) v = -INFINITY;
    if (Better(v, i, best, best_index)) {
      best = v;
      best_index = i;
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const float v = __shfl_xor_sync(kFullMask, best, o);
    const int i = __shfl_xor_sync(kFullMask, best_index, o);
    if (Better(v, i, best, best_index)) {
      best = v;
      best_index = i;
    }
  }
  __shared__ float warp_best[kArgmaxThreads / 32];
  __shared__ int warp_index[kArgmaxThreads / 32];
  if (threadIdx.x % 32 == 0) {
    warp_best[threadIdx.x / 32] = best;
    warp_index[threadIdx.x / 32] = best_index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kArgmaxThreads / 32; ++w) {
      if (Better(warp_best[w], warp_index[w], best, best_index)) {
        best = warp_best[w];
        best_index = warp_index[w];
      }
    }
    out[blockIdx.x] = best_index < vocab ? best_index : 0;
  }
}

constexpr int kThreads = 256;
constexpr unsigned kMaxStrideBlocks = 4096;

unsigned StrideBlocks(int64_t n) {
  const unsigned blocks = Blocks(n, kThreads);
  return blocks < kMaxStrideBlocks ? blocks : kMaxStrideBlocks;
}

}  // namespace

cudaError_t EmbeddingGather(const int32_t* tokens, int rows, const void* table, DType table_dtype,
                            int vocab, int hidden, float* x, cudaStream_t stream) {
  if (rows < 0 || vocab <= 0 || hidden <= 0 || !IsActDtype(table_dtype)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  if (tokens == nullptr || table == nullptr || x == nullptr) return cudaErrorInvalidValue;
  if (table_dtype == DType::kFloat32) {
    EmbeddingGatherKernel<<<rows, kThreads, 0, stream>>>(
        tokens, static_cast<const float*>(table), vocab, hidden, x);
  } else {
    EmbeddingGatherKernel<<<rows, kThreads, 0, stream>>>(
        tokens, static_cast<const __nv_bfloat16*>(table), vocab, hidden, x);
  }
  return cudaGetLastError();
}

cudaError_t RmsNorm(const float* x, const int32_t* row_index, int rows, int dim,
                    const float* weight, double eps, void* out, DType act_dtype,
                    cudaStream_t stream) {
  if (rows < 0 || dim <= 0 || !(eps >= 0) || !IsActDtype(act_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (x == nullptr || weight == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (act_dtype == DType::kFloat32) {
    RmsNormKernel<<<rows, kNormThreads, 0, stream>>>(x, row_index, dim, weight, eps,
                                                     static_cast<float*>(out));
  } else {
    RmsNormKernel<<<rows, kNormThreads, 0, stream>>>(x, row_index, dim, weight, eps,
                                                     static_cast<__nv_bfloat16*>(out));
  }
  return cudaGetLastError();
}

cudaError_t RopeCosSin(const int32_t* positions, int rows, const float* inv_freq, int head_dim,
                       float* cos_sin, cudaStream_t stream) {
  if (rows < 0 || head_dim <= 0 || head_dim % 2 != 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (positions == nullptr || inv_freq == nullptr || cos_sin == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int threads = head_dim / 2 < kThreads ? head_dim / 2 : kThreads;
  RopeCosSinKernel<<<rows, threads, 0, stream>>>(positions, inv_freq, head_dim, cos_sin);
  return cudaGetLastError();
}

cudaError_t RopeSplitQkv(const float* qkv, const float* bias, const float* cos_sin, int rows,
                         int num_heads, int num_kv_heads, int head_dim, float* q, float* k,
                         float* v, cudaStream_t stream) {
  if (rows < 0 || num_heads <= 0 || num_kv_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      rows > 65535) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  if (qkv == nullptr || cos_sin == nullptr || q == nullptr || k == nullptr || v == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int items = (num_heads + num_kv_heads) * (head_dim / 2) + num_kv_heads * head_dim;
  const dim3 grid(Blocks(items, kThreads), static_cast<unsigned>(rows));
  RopeSplitQkvKernel<<<grid, kThreads, 0, stream>>>(qkv, bias, cos_sin, num_heads, num_kv_heads,
                                                    head_dim, q, k, v);
  return cudaGetLastError();
}

cudaError_t SwiGlu(const float* gate_up, int rows, int inter, void* act, DType act_dtype,
                   cudaStream_t stream) {
  if (rows < 0 || inter <= 0 || !IsActDtype(act_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (gate_up == nullptr || act == nullptr) return cudaErrorInvalidValue;
  const unsigned blocks = StrideBlocks(int64_t{rows} * inter);
  if (act_dtype == DType::kFloat32) {
    SwiGluKernel<<<blocks, kThreads, 0, stream>>>(gate_up, rows, inter, static_cast<float*>(act));
  } else {
    SwiGluKernel<<<blocks, kThreads, 0, stream>>>(gate_up, rows, inter,
                                                  static_cast<__nv_bfloat16*>(act));
  }
  return cudaGetLastError();
}

cudaError_t ConvertFloat(const float* in, int64_t n, void* out, DType out_dtype,
                         cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (in == nullptr || out == nullptr) return cudaErrorInvalidValue;
  const unsigned blocks = StrideBlocks(n);
  switch (out_dtype) {
    case DType::kFloat32:
      ConvertFloatKernel<<<blocks, kThreads, 0, stream>>>(in, n, static_cast<float*>(out));
      break;
    case DType::kBFloat16:
      ConvertFloatKernel<<<blocks, kThreads, 0, stream>>>(in, n, static_cast<__nv_bfloat16*>(out));
      break;
    case DType::kFloat16:
      ConvertFloatKernel<<<blocks, kThreads, 0, stream>>>(in, n, static_cast<__half*>(out));
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t AddBias(float* x, int rows, int dim, const float* bias, cudaStream_t stream) {
  if (rows < 0 || dim <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (x == nullptr || bias == nullptr) return cudaErrorInvalidValue;
  const int64_t n = int64_t{rows} * dim;
  AddBiasKernel<<<StrideBlocks(n), kThreads, 0, stream>>>(x, n, dim, bias);
  return cudaGetLastError();
}

cudaError_t ArgmaxRows(const float* logits, int rows, int vocab, int32_t* out,
                       cudaStream_t stream) {
  if (rows < 0 || vocab <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  if (logits == nullptr || out == nullptr) return cudaErrorInvalidValue;
  ArgmaxRowsKernel<<<rows, kArgmaxThreads, 0, stream>>>(logits, vocab, out);
  return cudaGetLastError();
}

}  // namespace ferry::kernels
