// Causal prefill attention on tensor cores (contract: ferry/kernels/prefill_attention.h).
// Design notes for readers of the code:
//
// * FlashAttention-2's shape on mma.sync m16n8k16: a block of 4 warps owns 64 query rows of one
//   q head (16 rows per warp, so the softmax statistics of a row stay in one quad of lanes and
//   never cross warps); it walks the KV positions in tiles, S = Q K^T into registers, an online
//   softmax in base 2 (q is pre-scaled by softmax_scale * log2 e), then O += P V with P taken
//   straight from S's accumulators (mma_sm80.cuh: C fragments of two n8 tiles are the A fragment
//   of the next product). Each thread sums its own columns of a row and the quad adds them once
//   at the end.
// * K/V tiles come from the paged pools through a two-stage cp.async ring (16-byte copies,
//   zero-filled past the visible positions so no garbage reaches the tensor cores, rows XOR-
//   swizzled so ldmatrix is conflict-free). Q is staged in shared memory once and, for head dims
//   up to 128, kept as A fragments in registers (d = 256 reads them from shared memory each
//   k-step, which keeps the accumulators out of local memory).
// * Causality: a block stops after the tile holding its last row's last visible position; tiles
//   every row of the block sees in full skip the mask. Blocks are launched heaviest (latest rows)
//   first so the long diagonal blocks do not form the tail.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

#include "ferry/kernels/attention_state.h"
#include "ferry/kernels/lean_attention.h"  // the error bits
#include "ferry/kernels/mma_sm80.cuh"
#include "ferry/kernels/prefill_attention.h"

namespace ferry::kernels {
namespace {

using mma::CpAsync16;
using mma::CpAsyncCommit;
using mma::CpAsyncWait;
using mma::LdMatrixX4;
using mma::LdMatrixX4Trans;
using mma::SmemAddr;
using mma::SwizzledOffset;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDim>
struct PrefillConfig {
  static constexpr int kThreads = 128;                     // 4 warps
  static constexpr int kRows = 64;                         // query rows per block, 16 per warp
  static constexpr int kCols = kHeadDim == 256 ? 32 : 64;  // KV positions per tile
  static constexpr bool kQInRegs = kHeadDim <= 128;
  static constexpr int kChunks = kHeadDim / 8;  // 16-byte chunks of a 16-bit row
  static constexpr int kKSteps = kHeadDim / 16;
  static constexpr int kNTiles = kCols / 8;    // n8 tiles of scores
  static constexpr int kDTiles = kHeadDim / 8;  // n8 tiles of the output
  static constexpr int kTileBytes = kCols * kHeadDim * 2;  // one K or V tile
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kQBytes = kRows * kHeadDim * 2;
  // Q in registers is staged through stage 1 before the pipeline needs it; else it has its own.
  static constexpr int kSmemBytes = 2 * kStageBytes + (kQInRegs ? 0 : kQBytes);
  static_assert(!kQInRegs || kQBytes <= kStageBytes, "q staging must fit a stage");
  static_assert(kCols * kChunks % kThreads == 0, "a tile is whole 16-byte copies per thread");
  static_assert(kRows == 64 && kThreads == 128, "the launcher assumes one block shape");
};

struct PrefillParams {
  PrefillAttentionArgs args;
  float q_scale;    // softmax_scale * log2(e): scores in base 2
  int block_shift;  // log2(block_size) when a power of two, else -1
};

template <int kHeadDim, typename Traits>
__global__ void __launch_bounds__(PrefillConfig<kHeadDim>::kThreads)
    PrefillAttentionKernel(const PrefillParams p) {
  using Config = PrefillConfig<kHeadDim>;
  using T = typename Traits::T;
  constexpr int kThreads = Config::kThreads;
  constexpr int kRows = Config::kRows;
  constexpr int kCols = Config::kCols;
  constexpr int kChunks = Config::kChunks;
  constexpr int kKSteps = Config::kKSteps;
  constexpr int kNTiles = Config::kNTiles;
  constexpr int kDTiles = Config::kDTiles;

  extern __shared__ __align__(128) uint8_t smem[];
  const PrefillAttentionArgs& a = p.args;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int s = blockIdx.z;
  const int q_head = blockIdx.y;
  const int row0 = (gridDim.x - 1 - blockIdx.x) * kRows;  // heaviest tiles first
  const int num_q_heads = a.num_q_heads;
  const int num_kv_heads = a.kv.num_kv_heads;
  const int block_size = a.kv.block_size;

  // --- The chunk: its rows, its blocks, what its rows see. ----------------------------------
  const int64_t q_begin = a.q_indptr[s];
  const int64_t q_len = int64_t{a.q_indptr[s + 1]} - q_begin;
  const int64_t table_first = a.block_table_indptr[s];
  const int64_t table_len = int64_t{a.block_table_indptr[s + 1]} - table_first;
  const int64_t kv_len = a.kv_lens[s];
  const int64_t offset = a.causal_offset[s];
  const bool valid = q_len >= 0 && q_len <= a.max_q_len && table_len >= 0 && kv_len >= 0 &&
                     kv_len <= table_len * block_size;
  if (!valid) {
    // Every block of the chunk marks the rows it covers as unusable.
    const int64_t rows = q_len > row0 ? std::min<int64_t>(kRows, q_len - row0) : 0;
    const float nan = __int_as_float(0x7fc00000);
    for (int64_t e = tid; e < rows * kHeadDim; e += kThreads) {
      const int64_t row = q_begin + row0 + e / kHeadDim;
      a.state_o[(row * num_q_heads + q_head) * kHeadDim + e % kHeadDim] = nan;
    }
    for (int64_t r = tid; r < rows; r += kThreads) {
      a.state_lse[(q_begin + row0 + r) * num_q_heads + q_head] = nan;
    }
    if (tid == 0 && a.error_word != nullptr) atomicOr(a.error_word, kLeanErrorBadRange);
    return;
  }
  if (row0 >= q_len) return;
  const int rows = static_cast<int>(std::min<int64_t>(kRows, q_len - row0));
  const int kv_head = q_head / (num_q_heads / num_kv_heads);
  // Positions a row sees: [0, visible), visible = min(kv_len, offset + row + 1), at most kv_len.
  auto visible_of = [&](int64_t row) {
    return std::max<int64_t>(0, std::min<int64_t>(kv_len, offset + row + 1));
  };
  const int64_t block_visible = visible_of(row0 + rows - 1);  // the block's last row sees most
  const int64_t all_rows_visible = visible_of(row0);          // every row sees at least these
  const int num_tiles = static_cast<int>((block_visible + kCols - 1) / kCols);

  // --- K/V producer. ------------------------------------------------------------------------
  const T* k_pool = static_cast<const T*>(a.kv.k_pool);
  const T* v_pool = static_cast<const T*>(a.kv.v_pool);
  const int32_t* blocks = a.block_table + table_first;
  auto load_tile = [&](int tile, int stage) {
    const uint32_t k_dst = SmemAddr(smem + stage * Config::kStageBytes);
    const uint32_t v_dst = k_dst + Config::kTileBytes;
#pragma unroll
    for (int i = 0; i < kCols * kChunks / kThreads; ++i) {
      const int chunk = tid + i * kThreads;
      const int row = chunk / kChunks;
      const int col = chunk % kChunks;
      const int64_t pos = int64_t{tile} * kCols + row;
      bool live = pos < block_visible;
      int64_t src = 0;
      if (live) {
        const int64_t block_index =
            p.block_shift >= 0 ? pos >> p.block_shift : pos / block_size;
        const int block = blocks[block_index];
        if (block < 0 || block >= a.kv.num_blocks) {
          live = false;
          if (a.error_word != nullptr) atomicOr(a.error_word, kLeanErrorBadBlock);
        } else {
          src = ((int64_t{block} * num_kv_heads + kv_head) * block_size +
                 (pos - block_index * block_size)) *
                    kHeadDim +
                col * 8;
        }
      }
      const uint32_t dst = SwizzledOffset<kHeadDim>(row, col);
      CpAsync16(k_dst + dst, k_pool + src, live);
      CpAsync16(v_dst + dst, v_pool + src, live);
    }
  };
  if (num_tiles > 0) load_tile(0, 0);
  CpAsyncCommit();

  // --- Q: float32 rows, scaled, rounded to 16 bits, swizzled; rows past the chunk are zero. --
  uint8_t* q_smem = smem + (Config::kQInRegs ? Config::kStageBytes : 2 * Config::kStageBytes);
  for (int chunk = tid; chunk < kRows * kChunks; chunk += kThreads) {
    const int row = chunk / kChunks;
    const int col = chunk % kChunks;
    float4 lo = make_float4(0.0f, 0.0f, 0.0f, 0.0f), hi = lo;
    if (row < rows) {
      const float4* src = reinterpret_cast<const float4*>(
          a.q + ((q_begin + row0 + row) * num_q_heads + q_head) * kHeadDim + col * 8);
      lo = __ldg(src);
      hi = __ldg(src + 1);
    }
    uint4 packed;
    packed.x = Traits::Pack(lo.x * p.q_scale, lo.y * p.q_scale);
    packed.y = Traits::Pack(lo.z * p.q_scale, lo.w * p.q_scale);
    packed.z = Traits::Pack(hi.x * p.q_scale, hi.y * p.q_scale);
    packed.w = Traits::Pack(hi.z * p.q_scale, hi.w * p.q_scale);
    *reinterpret_cast<uint4*>(q_smem + SwizzledOffset<kHeadDim>(row, col)) = packed;
  }
  __syncthreads();
  const uint32_t q_base = SmemAddr(q_smem);
  // A fragment of this warp's 16 rows for k-step ks (mma_sm80.cuh's layout).
  const int q_frag_row = warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
  const int q_frag_chunk = lane >> 4;
  uint32_t q_frag[Config::kQInRegs ? kKSteps : 1][4];
  if constexpr (Config::kQInRegs) {
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      LdMatrixX4(q_frag[ks], q_base + SwizzledOffset<kHeadDim>(q_frag_row, 2 * ks + q_frag_chunk));
    }
    __syncthreads();  // stage 1 is free for tile 1
  }

  // --- Consumer. ----------------------------------------------------------------------------
  float o_acc[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) o_acc[dt][0] = o_acc[dt][1] = o_acc[dt][2] = o_acc[dt][3] = 0;
  float row_max[2] = {FERRY_EMPTY_LSE, FERRY_EMPTY_LSE};
  float row_sum[2] = {0.0f, 0.0f};  // this thread's columns only; the quad adds them at the end
  const int my_row[2] = {warp * 16 + lane / 4, warp * 16 + lane / 4 + 8};
  const int64_t my_visible[2] = {visible_of(row0 + my_row[0]), visible_of(row0 + my_row[1])};
  // ldmatrix lane addressing of K (non-transposed: B of S) and V (transposed: B of P V).
  const int k_row = (lane & 7) + ((lane >> 4) << 3);
  const int k_chunk = (lane >> 3) & 1;
  const int v_row = (lane & 7) + (((lane >> 3) & 1) << 3);
  const int v_chunk = lane >> 4;

  for (int tile = 0; tile < num_tiles; ++tile) {
    if (tile + 1 < num_tiles) load_tile(tile + 1, (tile + 1) & 1);
    CpAsyncCommit();
    CpAsyncWait<1>();  // this tile's copies have landed
    __syncthreads();
    const uint32_t k_base = SmemAddr(smem + (tile & 1) * Config::kStageBytes);
    const uint32_t v_base = k_base + Config::kTileBytes;

    // S = Q K^T for this warp's 16 rows and the tile's kCols positions.
    float s_acc[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) s_acc[nt][0] = s_acc[nt][1] = s_acc[nt][2] = s_acc[nt][3] = 0;
#pragma unroll
    for (int ks = 0; ks < kKSteps; ++ks) {
      uint32_t q_step[4];
      const uint32_t* qa;
      if constexpr (Config::kQInRegs) {
        qa = q_frag[ks];
      } else {
        LdMatrixX4(q_step, q_base + SwizzledOffset<kHeadDim>(q_frag_row, 2 * ks + q_frag_chunk));
        qa = q_step;
      }
#pragma unroll
      for (int p16 = 0; p16 < kCols / 16; ++p16) {
        uint32_t b[4];
        LdMatrixX4(b, k_base + SwizzledOffset<kHeadDim>(p16 * 16 + k_row, 2 * ks + k_chunk));
        Traits::Mma(s_acc[2 * p16], qa, b[0], b[1]);
        Traits::Mma(s_acc[2 * p16 + 1], qa, b[2], b[3]);
      }
    }
    // Positions a row does not see drop out. Only tiles past what every row sees need this.
    if (int64_t{tile + 1} * kCols > all_rows_visible) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int64_t pos = int64_t{tile} * kCols + nt * 8 + 2 * (lane % 4) + (i & 1);
          if (pos >= my_visible[i >> 1]) s_acc[nt][i] = FERRY_EMPTY_LSE;
        }
      }
    }
    // Online softmax, rows g (elements 0, 1) and g + 8 (elements 2, 3) of each n8 tile.
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = FERRY_EMPTY_LSE;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) m = fmaxf(m, fmaxf(s_acc[nt][2 * h], s_acc[nt][2 * h + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const float new_max = fmaxf(row_max[h], m);
      // Nothing seen yet: subtract 0 rather than -inf (no NaN from -inf - -inf).
      const float base = new_max == FERRY_EMPTY_LSE ? 0.0f : new_max;
      alpha[h] = exp2f(row_max[h] - base);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
        s_acc[nt][2 * h] = exp2f(s_acc[nt][2 * h] - base);
        s_acc[nt][2 * h + 1] = exp2f(s_acc[nt][2 * h + 1] - base);
        sum += s_acc[nt][2 * h] + s_acc[nt][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
      row_max[h] = new_max;
    }
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      o_acc[dt][0] *= alpha[0];
      o_acc[dt][1] *= alpha[0];
      o_acc[dt][2] *= alpha[1];
      o_acc[dt][3] *= alpha[1];
    }
    // O += P V, 16 positions per k-step; P's A fragment is two n8 tiles of S.
#pragma unroll
    for (int kk = 0; kk < kCols / 16; ++kk) {
      const uint32_t p_frag[4] = {Traits::Pack(s_acc[2 * kk][0], s_acc[2 * kk][1]),
                                  Traits::Pack(s_acc[2 * kk][2], s_acc[2 * kk][3]),
                                  Traits::Pack(s_acc[2 * kk + 1][0], s_acc[2 * kk + 1][1]),
                                  Traits::Pack(s_acc[2 * kk + 1][2], s_acc[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < kDTiles / 2; ++dp) {
        uint32_t vb[4];
        LdMatrixX4Trans(vb, v_base + SwizzledOffset<kHeadDim>(kk * 16 + v_row, 2 * dp + v_chunk));
        Traits::Mma(o_acc[2 * dp], p_frag, vb[0], vb[1]);
        Traits::Mma(o_acc[2 * dp + 1], p_frag, vb[2], vb[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's copy of tile + 2
  }
  CpAsyncWait<0>();

  // --- States: o = O / l, lse = (m + log2 l) ln 2; rows that saw nothing get the identity. ---
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float l = row_sum[h];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    if (my_row[h] >= rows) continue;
    const int64_t state = (q_begin + row0 + my_row[h]) * num_q_heads + q_head;
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    float* o = a.state_o + state * kHeadDim + 2 * (lane % 4);
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      *reinterpret_cast<float2*>(o + dt * 8) =
          make_float2(o_acc[dt][2 * h] * inv, o_acc[dt][2 * h + 1] * inv);
    }
    if (lane % 4 == 0) {
      a.state_lse[state] = l > 0.0f ? (row_max[h] + log2f(l)) * kLn2 : FERRY_EMPTY_LSE;
    }
  }
}

// --- Host side. ----------------------------------------------------------------------------

constexpr int kMaxDevices = 64;

// The kernel for (head_dim, dtype) with its shared-memory limit raised on `device` (once).
template <int kHeadDim, typename Traits>
cudaError_t PreparedKernel(int device, const void** kernel) {
  static std::mutex mutex;
  static bool ready[kMaxDevices] = {};
  auto function = PrefillAttentionKernel<kHeadDim, Traits>;
  *kernel = reinterpret_cast<const void*>(function);
  std::lock_guard<std::mutex> lock(mutex);
  if (!ready[device]) {
    const cudaError_t error =
        cudaFuncSetAttribute(function, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             PrefillConfig<kHeadDim>::kSmemBytes);
    if (error != cudaSuccess) return error;
    ready[device] = true;
  }
  return cudaSuccess;
}

cudaError_t FindKernel(int head_dim, DType dtype, int device, const void** kernel,
                       int* smem_bytes) {
  if (device < 0 || device >= kMaxDevices) return cudaErrorNotSupported;
  const bool bf16 = dtype == DType::kBFloat16;
  switch (head_dim) {
#ifdef FERRY_LEAN_HEAD_DIM_64
    case 64:
      *smem_bytes = PrefillConfig<64>::kSmemBytes;
      return bf16 ? PreparedKernel<64, mma::Bf16>(device, kernel)
                  : PreparedKernel<64, mma::Fp16>(device, kernel);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_128
    case 128:
      *smem_bytes = PrefillConfig<128>::kSmemBytes;
      return bf16 ? PreparedKernel<128, mma::Bf16>(device, kernel)
                  : PreparedKernel<128, mma::Fp16>(device, kernel);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_256
    case 256:
      *smem_bytes = PrefillConfig<256>::kSmemBytes;
      return bf16 ? PreparedKernel<256, mma::Bf16>(device, kernel)
                  : PreparedKernel<256, mma::Fp16>(device, kernel);
#endif
    default:
      return cudaErrorNotSupported;
  }
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool PrefillAttentionServes(int head_dim, DType dtype) {
  if (dtype != DType::kBFloat16 && dtype != DType::kFloat16) return false;
  switch (head_dim) {
#ifdef FERRY_LEAN_HEAD_DIM_64
    case 64:
      return true;
#endif
#ifdef FERRY_LEAN_HEAD_DIM_128
    case 128:
      return true;
#endif
#ifdef FERRY_LEAN_HEAD_DIM_256
    case 256:
      return true;
#endif
    default:
      return false;
  }
}

cudaError_t PrefillAttention(const PrefillAttentionArgs& args, cudaStream_t stream) {
  const PagedKvView& kv = args.kv;
  if (args.num_seqs < 0 || args.max_q_len < 0 || args.num_q_heads <= 0 ||
      kv.num_kv_heads <= 0 || args.num_q_heads % kv.num_kv_heads != 0 ||
      !IsSupportedHeadDim(kv.head_dim) || kv.block_size <= 0 || kv.num_blocks < 0) {
    return cudaErrorInvalidValue;
  }
  if (kv.dtype != DType::kBFloat16 && kv.dtype != DType::kFloat16) {
    return kv.dtype == DType::kFloat32 ? cudaErrorNotSupported : cudaErrorInvalidValue;
  }
  if (!(std::isfinite(args.softmax_scale) && args.softmax_scale > 0.0f)) {
    return cudaErrorInvalidValue;
  }
  if (args.num_seqs == 0 || args.max_q_len == 0) return cudaSuccess;
  // Grid limits: y and z are 16-bit.
  if (args.num_q_heads > 65535 || args.num_seqs > 65535) return cudaErrorInvalidValue;
  if (args.q == nullptr || args.state_o == nullptr || args.state_lse == nullptr ||
      args.q_indptr == nullptr || args.block_table_indptr == nullptr ||
      args.block_table == nullptr || args.kv_lens == nullptr || args.causal_offset == nullptr) {
    return cudaErrorInvalidValue;
  }
  if (kv.num_blocks > 0 && (kv.k_pool == nullptr || kv.v_pool == nullptr)) {
    return cudaErrorInvalidValue;
  }
  // 16-byte copies of K/V rows and q; float2 stores of o need 8 bytes.
  if (!Aligned16(kv.k_pool) || !Aligned16(kv.v_pool) || !Aligned16(args.q) ||
      reinterpret_cast<uintptr_t>(args.state_o) % 8 != 0) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  const void* kernel = nullptr;
  int smem_bytes = 0;
  if ((error = FindKernel(kv.head_dim, kv.dtype, device, &kernel, &smem_bytes)) != cudaSuccess) {
    return error;
  }
  PrefillParams params;
  params.args = args;
  params.q_scale = args.softmax_scale * kLog2e;
  params.block_shift = -1;
  if ((kv.block_size & (kv.block_size - 1)) == 0) {
    params.block_shift = 0;
    while ((1 << params.block_shift) < kv.block_size) ++params.block_shift;
  }
  // Every head dim's config has the same rows and threads per block.
  constexpr int kRows = PrefillConfig<128>::kRows;
  const dim3 grid((args.max_q_len + kRows - 1) / kRows, args.num_q_heads, args.num_seqs);
  void* kernel_args[] = {&params};
  return cudaLaunchKernel(kernel, grid, dim3(PrefillConfig<128>::kThreads), kernel_args,
                          smem_bytes, stream);
}

}  // namespace ferry::kernels
