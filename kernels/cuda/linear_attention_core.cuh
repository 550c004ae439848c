// The chunkwise causal linear-attention core shared by the forward and the three backward passes
// (private to kernels/cuda; contract of the public functions: cuda_linear_attention.h).
//
// One kernel template computes, for every query' row i of a sequence and every column c of a
// slice of the value' columns,
//   acc[i][c] = alpha_i (Q'_i . S[:, c]) + beta_i B[c]
//             + sum_{keys j on i's side of the mask} (alpha_i (Q'_i . K'_j) + beta_i w_j) V'[j][c]
// with S = sum K'^T V' and B = sum_j w_j V'_j over all earlier chunks (the running state, float32
// on chip), the mask j <= i (forward direction) or j >= i (reverse direction) inside a chunk.
// The four passes are instances of it (u_i is the effective query, dnum_i = dout_i / den_i,
// dden_i = -(dout_i . o_i) / den_i; see linear_attention_cpu.cc for the derivation):
//   kForward: Q' = phi(q), K' = phi(k) (kOnePlusXMaxNorm: q_i 2^-e_i with a_i = m 2^e_i, an exact
//             scaling that keeps Q' . S in float range, raw k, alpha = c_i 2^e_i, beta = 1),
//             V' = [v slice, 1, 0...]: the extra ones column makes S's last column z and B's n,
//             so acc's last column is den_i.
//   kGradQ:   Q' = dout, K' = v, V' = phi(k) slice, alpha = 1 / den_i, beta = dden_i: acc = du_i.
//   kGradK:   reverse, Q' = v, K' = dnum, V' = u slice, w_j = dden_j: acc = dphi(k).
//   kGradV:   reverse, Q' = phi(k), K' = u, V' = dnum slice, beta = 1 (kOnePlusXMaxNorm): acc = dv.
// In the reverse passes the keys' of a chunk are the GQA group's q heads, one after another (key
// blocks); so dk and dv sum the group on chip.
//
// Layout of the work: one block of 4 warps per (value' column slice, head, sequence), walking
// the sequence's 64-token chunks in order (or in reverse); warp w owns query' rows
// [16w, 16w + 16) of a chunk and rows [w d/4, (w + 1) d/4) of S. A chunk's tiles arrive by
// cp.async (16-byte copies, zero-filled past the sequence) into one of two stages while the
// previous chunk computes; elementwise transforms (feature map, per-row scales, fp16 -> bf16)
// run in place in shared memory. Score weights and S reach the tensor cores as bf16 hi + lo pairs.
// The walk is CoreWalk; LinearCoreKernel runs one pass, LinearBackwardMergedKernel the three
// backward passes in one grid (when they are independent; see there).
//
// Segments. A block per (slice, head, sequence) walking all chunks leaves SMs idle when the batch
// has few sequences or heads, so a call may split each sequence into segments of
// segment_chunks chunks (SegmentChunks picks the count), walked by separate blocks in three steps:
//   pass A (kStateOnly): each segment's own S and B (from a zero state) and, forward, its q / k
//          norm maxima, dq pass, its last record position, to a record in the workspace;
//   pass B (LinearSegmentPrefixKernel): per sequence, each record becomes the sum (maximum) of
//          the earlier segments' in walk order (reverse passes: the later segments');
//   pass C: the usual walk over the segment's chunks starting from initial state + prefix. The
//          dq pass takes the running floored maxima from the forward's row_stats of the row
//          before the segment. Only the block walking the sequence's last chunk (in its
//          direction) writes the final state / the state gradient.
// The records hold O(N d^2 / (64 segment_chunks)) floats per head; the per-token memory stays
// O(N d).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <mutex>

#include "ferry/kernels/cuda_linear_attention.h"

namespace ferry::kernels::linear_cuda {

enum class Op : int { kForward = 0, kGradQ = 1, kGradK = 2, kGradV = 3 };

constexpr int kChunk = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxSharedBytes = 227 * 1024;
constexpr int kMaxDevices = 64;

// Row stride in elements: a multiple of 8 (16-byte rows) with an odd count of 16-byte units, so
// the 8 rows one ldmatrix reads land in distinct bank groups.
constexpr int PadStride(int cols) {
  const int s = (cols + 7) / 8 * 8;
  return (s / 8) % 2 == 0 ? s + 8 : s;
}

// Value' columns per block: 32, so two slices at d = 64, four at d = 128, eight at d = 256. The
// state slice lives in registers (d / 4 rows per warp). The work of a block is a serial walk over
// chunks and latency-bound, so more, narrower blocks per head beat fewer wide ones even though
// each recomputes the chunk's scores: at d = 128, 64 columns gave one block of 4 warps per SM and
// ran 17 us per chunk on the H100 (ncu: 6% occupancy, 20% SM throughput); 32 columns fit two
// and the elu + 1 forward at N = 8192 went from 2.17 to 1.82 ms (37% SM throughput). Narrower
// still loses to the grid's waves: d = 64 with 16 columns (four slices) put 512 blocks on 396
// resident slots at B = 8, H = 16, and forward + backward ran 1.7x slower than with 32 (3 blocks
// per SM either way; bench/RESULTS.md).
constexpr int kSliceWidth = 32;

struct TileSource {
  const uint16_t* base = nullptr;  // element (token t, column c) at base[t * row_stride + offset + c]
  int64_t row_stride = 0;
  int64_t offset = 0;
};

struct CoreParams {
  const int32_t* cu_seqlens = nullptr;
  int64_t total_tokens = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int group = 1;
  int feature_map = 0;  // LinearFeatureMap
  bool normalize = true;
  bool fp16 = false;
  LinearStateLayout layout;
  const uint16_t* q = nullptr;
  const uint16_t* k = nullptr;
  const uint16_t* v = nullptr;
  const uint16_t* dout = nullptr;
  uint16_t* out = nullptr;  // kForward: out, kGradQ: dq, kGradK: dk, kGradV: dv
  uint16_t* out_residual = nullptr;  // kForward (optional): out - round(out)
  float* stats = nullptr;   // kForward writes (optional); the backward reads
  const float* initial_state = nullptr;
  float* final_state = nullptr;
  float* d_initial_state = nullptr;
  float* ws_dden = nullptr;      // (total_tokens, num_q_heads): dden, from the pre-pass
  float* ws_gq = nullptr;        // (total_tokens, num_q_heads): d loss / d a at record positions
  float* ws_gk = nullptr;        // (total_tokens, num_kv_heads): d loss / d b
  float* ws_state_gq = nullptr;  // (num_seqs, num_q_heads): ... when the state holds the max
  float* ws_state_gk = nullptr;  // (num_seqs, num_kv_heads)
  // kGradK of kOnePlusXMaxNorm: leave dk's k-norm term (ws_gk / b times k at the rows that set a
  // running maximum) to LinearNormFixupKernel after the passes, so dk does not wait for the dq
  // pass that sums ws_gk (the merged backward).
  bool k_norm_by_fixup = false;
  // Sequence segments (see "Segments" above). seg_first null: one block walks a whole sequence
  // (grid z = sequence).
  int num_seqs = 0;
  int segment_chunks = 0;                // chunks per segment
  const int32_t* seg_first = nullptr;    // (num_seqs + 1): first global segment of each sequence
  float* seg_states = nullptr;           // (segments, grid heads, slices, record floats)
  int grid_heads = 0;
};

// kLean: the shape of the merged backward launch (LinearBackwardMergedKernel), whose grid holds
// the three passes' blocks at once: at d = 128 one pipeline stage and <= 168 registers, so that
// three blocks share an SM instead of two (the separate passes have only about two blocks per SM
// to run, and keep two stages).
template <Op kOp, int kD, bool kLean = false>
struct CoreShape {
  static constexpr int kDv = kSliceWidth;
  static constexpr int kSlices = kD / kDv;
  static constexpr bool kOnes = kOp == Op::kForward;
  static constexpr int kCols = kDv + (kOnes ? 8 : 0);
  static constexpr int kNt = kCols / 8;  // output n-tiles of 8 columns
  static constexpr int kMt = kD / 64;    // m-tiles of 16 state rows per warp
  static constexpr int kStrideD = PadStride(kD);
  static constexpr int kStrideV = PadStride(kCols);
  // The raw q (kGradQ) or k (kGradK) slice the epilogue needs, prefetched into registers.
  static constexpr bool kHasX = kOp == Op::kGradQ || kOp == Op::kGradK;
  // One pipeline stage (bytes).
  static constexpr int kQTile = 0;
  static constexpr int kKTile = kQTile + kChunk * kStrideD * 2;
  static constexpr int kVTile = kKTile + kChunk * kStrideD * 2;
  static constexpr int kQStats = kVTile + kChunk * kStrideV * 2;                    // float4[64]
  static constexpr int kKStats = kQStats + kChunk * 16;                             // float4[64]
  static constexpr int kKW = kKStats + kChunk * 16;                                 // float[64]
  static constexpr int kQX = kKW + kChunk * 4;                                      // float[64]
  static constexpr int kStageBytes = kQX + kChunk * 4;
  // Persistent: S as bf16 hi and lo tiles (kD x kCols), then float arrays.
  static constexpr int kStateBytes = 2 * kD * kStrideV * 2;
  static constexpr int kScalarFloats = kStrideV + 12 * kChunk + 2 * kChunk;
  static constexpr int kFixedBytes = kStateBytes + kScalarFloats * 4;
  static constexpr int kStages =
      (kLean && kD == 128) || 2 * kStageBytes + kFixedBytes > kMaxSharedBytes ? 1 : 2;
  // Blocks per SM the shared memory allows (228 KB per SM, 1 KB of it per block for the driver).
  static constexpr int kBlocksPerSm = (228 * 1024) / (kStages * kStageBytes + kFixedBytes + 1024);
  // Register budget: at d = 64 the small state lets three blocks share an SM (<= 168 registers).
  static constexpr int kMinBlocks =
      (kD == 64 || (kLean && kD == 128)) && kBlocksPerSm >= 3 ? 3 : 1;
  static constexpr int kSmemBytes = kStages * kStageBytes + kFixedBytes;
  static_assert(kSmemBytes <= kMaxSharedBytes, "shared memory");
  static_assert(kCols < kThreads, "one thread per column keeps B");
  static_assert(kD % 64 == 0 && kDv % 16 == 0, "tile shapes");
  // A segment's state record (pass A writes, pass B prefixes, pass C reads), in the order the
  // threads hold it: S fragments (element i of thread t at i * kThreads + t), B per thread, then
  // kSegmentScalars int-ordered maxima (the forward's running norms as float bits, the dq pass's
  // record positions), padded to 4 floats.
  static constexpr int kSegmentSumFloats = (kMt * kNt * 4 + 1) * kThreads;
  static constexpr int kSegmentRecordFloats = kSegmentSumFloats + 4;
  // Where a slice's record holds S[f][col] (col < kDv; col == kDv: the ones column, z[f] in
  // kForward) and B[col]: the fragment layout of CoreWalk's sacc and bsum (readers other than
  // CoreWalk, the Hopper forward's pass C, go through these).
  static __host__ __device__ constexpr int RecordIndexOfState(int f, int col) {
    const int rem = f % (kD / kWarps);
    const int r16 = rem % 16;
    const int thread = f / (kD / kWarps) * 32 + (r16 % 8) * 4 + (col % 8) / 2;
    const int element = ((rem / 16) * kNt + col / 8) * 4 + (r16 / 8) * 2 + col % 2;
    return element * kThreads + thread;
  }
  static __host__ __device__ constexpr int RecordIndexOfB(int col) {
    return kMt * kNt * 4 * kThreads + col;
  }
};

// ---- small device helpers ----

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void CpAsync4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(SmemAddr(smem)),
               "l"(gmem), "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void CpAsyncCommit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ void CpAsyncWaitAll() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p))
               : "memory");
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddr(p))
               : "memory");
}

__device__ __forceinline__ void LdMatrixX2Trans(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(SmemAddr(p))
               : "memory");
}

// c += a b on the tensor cores: a (16x16 bf16, row), b (16x8 bf16, col), c (16x8 float32).
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// (x0, x1) as bf16 pairs hi + lo with hi + lo = x to about 16 mantissa bits.
__device__ __forceinline__ void SplitBf16(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  __nv_bfloat162 h = __floats2bfloat162_rn(x0, x1);
  const float2 hf = __bfloat1622float2(h);
  __nv_bfloat162 l = __floats2bfloat162_rn(x0 - hf.x, x1 - hf.y);
  hi = *reinterpret_cast<uint32_t*>(&h);
  lo = *reinterpret_cast<uint32_t*>(&l);
}

__device__ __forceinline__ float BitsToFloat(uint16_t bits, bool fp16) {
  return fp16 ? __half2float(__ushort_as_half(bits)) : __bfloat162float(__ushort_as_bfloat16(bits));
}

__device__ __forceinline__ uint16_t FloatToBits(float x, bool fp16) {
  return fp16 ? __half_as_ushort(__float2half_rn(x)) : __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// elu(x) + 1 with expf, as the CPU backend computes it (the decode kernel, whose state must
// match the CPU's).
__device__ __forceinline__ float EluPlusOne(float x) { return x > 0.0f ? x + 1.0f : expf(x); }

// exp(x) by one ex2.approx.ftz (relative error ~2^-22; subnormal results flush to zero): for
// values that are rounded to bf16 next (2^-9), where expf's exactness and __expf's subnormal
// handling cost instructions and buy nothing. The elementwise transforms were about half of the
// instructions the core kernels issued (ncu, bench/RESULTS.md).
__device__ __forceinline__ float ExpFast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}
// Selects (not min / max) so that a NaN input stays NaN.
__device__ __forceinline__ float EluPlusOneFast(float x) { return x > 0.0f ? x + 1.0f : ExpFast(x); }
__device__ __forceinline__ float EluPlusOneDerivativeFast(float x) {
  return x > 0.0f ? 1.0f : ExpFast(x);
}

// The two 16-bit values of a word as floats: bf16 by shifts, fp16 by conversion.
template <bool kFp16>
__device__ __forceinline__ float2 UnpackPair(uint32_t w) {
  if constexpr (kFp16) {
    return __half22float2(*reinterpret_cast<const __half2*>(&w));
  } else {
    return make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
  }
}

template <bool kFp16>
__device__ __forceinline__ void Unpack8(const uint4& raw, float (&x)[8]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = UnpackPair<kFp16>(words[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

__device__ __forceinline__ uint4 PackBf16x8(const float (&x)[8]) {
  return make_uint4(PackBf16(x[0], x[1]), PackBf16(x[2], x[3]), PackBf16(x[4], x[5]),
                    PackBf16(x[6], x[7]));
}

// Thread t's 16-byte vectors of a 64-row tile of kCols columns: column vector t % kVecs of rows
// t / kVecs + i kRowStep, i < kIters (a fixed column per thread, so addresses advance by a
// constant).
template <int kCols>
struct TileWalk {
  static constexpr int kVecs = kCols / 8;
  static constexpr int kRowStep = kThreads / kVecs;
  static constexpr int kIters = kChunk / kRowStep;
  static_assert(kThreads % kVecs == 0 && kChunk % kRowStep == 0, "tile walk");
};

template <int kCols, bool kFp16, bool kPhi, bool kScale>
__device__ __forceinline__ void TransformTileImpl(uint16_t* tile, int stride, int valid_rows,
                                                  const float* row_scale) {
  using W = TileWalk<kCols>;
  const int r0 = threadIdx.x / W::kVecs;
  uint16_t* base = tile + r0 * stride + (threadIdx.x % W::kVecs) * 8;
#pragma unroll 2
  for (int i = 0; i < W::kIters; ++i) {
    const int r = r0 + i * W::kRowStep;
    uint4* ptr = reinterpret_cast<uint4*>(base + i * W::kRowStep * stride);
    float x[8];
    Unpack8<kFp16>(*ptr, x);
    const float scale = kScale ? row_scale[r] : 1.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const float y = kPhi ? EluPlusOneFast(x[e]) : x[e];
      x[e] = kScale ? y * scale : y;
    }
    *ptr = r < valid_rows ? PackBf16x8(x) : make_uint4(0, 0, 0, 0);
  }
}

// sum_c x[c]^2 over one row of kCols 16-bit values, in the one order every forward kernel uses
// (the max-norm map's running maxima must agree to the bit between the core's segment sums and
// the Hopper kernel's walk, or the backward finds a new maximum where there is none): a chain of
// fmas over each 16-byte chunk's 8 values, then a balanced tree over the chunks, pairing
// neighbours first (what a butterfly of xor shuffles over the chunks' lanes computes).
template <int kCols, bool kFp16>
__device__ __forceinline__ float RowSumSquares(const uint16_t* row) {
  constexpr int kChunks = kCols / 8;
  float part[kChunks];
#pragma unroll
  for (int cv = 0; cv < kChunks; ++cv) {
    float x[8];
    Unpack8<kFp16>(*reinterpret_cast<const uint4*>(row + cv * 8), x);
    part[cv] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) part[cv] = fmaf(x[e], x[e], part[cv]);
  }
#pragma unroll
  for (int width = 1; width < kChunks; width *= 2) {
#pragma unroll
    for (int i = 0; i < kChunks; i += 2 * width) part[i] += part[i + width];
  }
  return part[0];
}

// The running maxima of the raw q and k row norms through a 64-row chunk, in row order, from the
// carried maxima run_q, run_k (updated to the chunk's last). Warp-wide: lane l passes the norms of
// rows 2l, 2l + 1 and gets the maxima at those rows.
struct RunningNorms {
  float q0, q1, k0, k1;
};
__device__ __forceinline__ RunningNorms ScanRunningNorms(float qn0, float qn1, float kn0, float kn1,
                                                         float& run_q, float& run_k) {
  const int lane = threadIdx.x % 32;
  float mq = fmaxf(qn0, qn1), mk = fmaxf(kn0, kn1);
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const float oq = __shfl_up_sync(0xffffffffu, mq, off);
    const float ok = __shfl_up_sync(0xffffffffu, mk, off);
    if (lane >= off) {
      mq = fmaxf(mq, oq);
      mk = fmaxf(mk, ok);
    }
  }
  float eq = __shfl_up_sync(0xffffffffu, mq, 1);
  float ek = __shfl_up_sync(0xffffffffu, mk, 1);
  if (lane == 0) eq = ek = 0.0f;
  RunningNorms m;
  m.q0 = fmaxf(fmaxf(run_q, eq), qn0);
  m.q1 = fmaxf(m.q0, qn1);
  m.k0 = fmaxf(fmaxf(run_k, ek), kn0);
  m.k1 = fmaxf(m.k0, kn1);
  run_q = __shfl_sync(0xffffffffu, m.q1, 31);
  run_k = __shfl_sync(0xffffffffu, m.k1, 31);
  return m;
}

// A row's scalars from its running maxima: kOnePlusXMaxNorm's floored a, b and c = 1 / (a b)
// (all 1 for the other maps, `lifted` false), and the exact rescaling its features take into the
// tensor cores: q_r divided by 2^e (a = m 2^e, m in [0.5, 1), exact in bf16, so q . S stays in
// float range however large q and S are), alpha = c 2^e carrying it back.
struct RowScalars {
  float a, b, c, alpha, q_scale;
};
__device__ __forceinline__ RowScalars MaxNormRowScalars(float q_max, float k_max, bool lifted) {
  RowScalars r;
  r.a = lifted ? fmaxf(kLinearNormFloor, q_max) : 1.0f;
  r.b = lifted ? fmaxf(kLinearNormFloor, k_max) : 1.0f;
  r.c = lifted ? (1.0f / r.a) * (1.0f / r.b) : 1.0f;
  int e = 0;
  if (lifted) frexpf(r.a, &e);
  r.alpha = ldexpf(r.c, e);
  r.q_scale = ldexpf(1.0f, -e);
  return r;
}

// In place over a 64-row tile of `kCols` columns: phi (optional), times a per-row scale
// (optional), stored as bf16; rows >= valid_rows become zero (phi(0) would not be). The options
// are block-uniform: each combination is its own branch-free loop.
template <int kCols>
__device__ __forceinline__ void TransformTile(uint16_t* tile, int stride, int valid_rows, bool phi,
                                              const float* row_scale, bool fp16) {
  const bool scale = row_scale != nullptr;
  if (fp16) {
    if (phi) {
      if (scale) {
        TransformTileImpl<kCols, true, true, true>(tile, stride, valid_rows, row_scale);
      } else {
        TransformTileImpl<kCols, true, true, false>(tile, stride, valid_rows, row_scale);
      }
    } else if (scale) {
      TransformTileImpl<kCols, true, false, true>(tile, stride, valid_rows, row_scale);
    } else {
      TransformTileImpl<kCols, true, false, false>(tile, stride, valid_rows, row_scale);
    }
  } else if (phi) {
    if (scale) {
      TransformTileImpl<kCols, false, true, true>(tile, stride, valid_rows, row_scale);
    } else {
      TransformTileImpl<kCols, false, true, false>(tile, stride, valid_rows, row_scale);
    }
  } else if (scale) {
    TransformTileImpl<kCols, false, false, true>(tile, stride, valid_rows, row_scale);
  } else {
    TransformTileImpl<kCols, false, false, false>(tile, stride, valid_rows, row_scale);
  }
}

// Copies a 64-row tile of kCols columns (rows past the sequence zero-filled). One 64-bit
// address per thread, advanced by a constant: the per-copy index arithmetic was a tenth to a
// quarter of the core kernels' instructions.
template <int kCols>
__device__ __forceinline__ void LoadTile(uint16_t* dst, int stride, const TileSource& src,
                                         int64_t first_token, int valid_rows) {
  using W = TileWalk<kCols>;
  const int r0 = threadIdx.x / W::kVecs;
  const int c = (threadIdx.x % W::kVecs) * 8;
  const uint16_t* g = src.base + (first_token + r0) * src.row_stride + src.offset + c;
  const int64_t step = src.row_stride * W::kRowStep;
  uint16_t* s = dst + r0 * stride + c;
#pragma unroll
  for (int i = 0; i < W::kIters; ++i) {
    const bool valid = r0 + i * W::kRowStep < valid_rows;
    CpAsync16(s + i * W::kRowStep * stride, valid ? g : src.base, valid);
    g += step;
  }
}

// ---- the kernel ----

// kStateOnly: pass A of a segmented walk (see "Segments"): only the segment's own sum S, B and
// scalars, written to its record; no outputs.
// The walk of one block: value' column slice `slice`, head `head` of the pass, grid z `zblock`
// (the sequence, or the global segment).
template <Op kOp, int kD, bool kStateOnly, bool kLean>
__device__ __forceinline__ void CoreWalk(const CoreParams& p, const int slice, const int head,
                                         const int zblock) {
  using Shape = CoreShape<kOp, kD, kLean>;
  constexpr int kDv = Shape::kDv;
  constexpr int kCols = Shape::kCols;
  constexpr int kNt = Shape::kNt;
  constexpr int kMt = Shape::kMt;
  constexpr int kSD = Shape::kStrideD;
  constexpr int kSV = Shape::kStrideV;
  constexpr bool kReverse = kOp == Op::kGradK || kOp == Op::kGradV;
  constexpr int kRowsPerWarp = kD / kWarps;

  extern __shared__ __align__(128) uint8_t smem[];
  uint16_t* s_hi = reinterpret_cast<uint16_t*>(smem + Shape::kStages * Shape::kStageBytes);
  uint16_t* s_lo = s_hi + kD * kSV;
  float* bsum_s = reinterpret_cast<float*>(s_lo + kD * kSV);
  float* alpha_s = bsum_s + kSV;
  float* beta_s = alpha_s + kChunk;
  float* w_s = beta_s + kChunk;
  float* kscale_s = w_s + kChunk;
  float* vscale_s = kscale_s + kChunk;
  float* post_s = vscale_s + kChunk;
  float* ga_s = post_s + kChunk;
  float* gb_s = ga_s + kChunk;
  float* a_s = gb_s + kChunk;
  float* b_s = a_s + kChunk;
  int* argq_s = reinterpret_cast<int*>(b_s + kChunk);
  int* argk_s = argq_s + kChunk;
  float* c_s = kscale_s;      // kForward: c_r (the kscale array is free there)
  float* qscale_s = vscale_s;  // kForward: 2^-e_r scaling q_r (the vscale array is free there)
  float* scratch_s = reinterpret_cast<float*>(argk_s + kChunk);  // 2 * kChunk

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  // The sequence and segment of this block (grid z: the global segment, or the sequence).
  int seq = zblock, seg_local = 0, seg_count = 1;
  if (p.seg_first != nullptr) {
    const int gseg = zblock;
    if (gseg >= p.seg_first[p.num_seqs]) return;
    int lo = 0, hi = p.num_seqs - 1;  // the last sequence whose first segment is <= gseg
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (p.seg_first[mid] <= gseg) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    seq = lo;
    seg_local = gseg - p.seg_first[seq];
    seg_count = p.seg_first[seq + 1] - p.seg_first[seq];
  }
  const int group = p.group;
  const int hq = p.num_q_heads;
  const int hkv = p.num_kv_heads;
  const int kv_head = kReverse ? head : head / group;
  const int q_head0 = kv_head * group;       // first q head of the group
  const int g_in_group = kReverse ? 0 : head - q_head0;
  const int64_t first = p.cu_seqlens[seq];
  const int64_t last = p.cu_seqlens[seq + 1];
  if (first < 0 || last < first || last > p.total_tokens) return;
  const int64_t len = last - first;
  const int num_chunks = static_cast<int>((len + kChunk - 1) / kChunk);
  // This block's chunks [c_begin, c_end); it writes the final state (forward) or the initial
  // state's gradient (reverse) when it walks the sequence's last chunk in its direction.
  const int c_begin = p.seg_first != nullptr ? min(num_chunks, seg_local * p.segment_chunks) : 0;
  const int c_end =
      p.seg_first != nullptr ? min(num_chunks, c_begin + p.segment_chunks) : num_chunks;
  const bool writes_final = kReverse ? seg_local == 0 : seg_local == seg_count - 1;
  float* seg_rec = p.seg_first != nullptr
                       ? p.seg_states + ((int64_t{zblock} * p.grid_heads + head) *
                                             Shape::kSlices + slice) *
                                            Shape::kSegmentRecordFloats
                       : nullptr;
  const int key_blocks = kReverse ? group : 1;
  const int64_t steps = int64_t{c_end - c_begin} * key_blocks;
  const bool lifted = p.feature_map == static_cast<int>(LinearFeatureMap::kOnePlusXMaxNorm);
  const bool elu = p.feature_map == static_cast<int>(LinearFeatureMap::kEluPlusOne);
  const bool fp16 = p.fp16;
  const LinearStateLayout& layout = p.layout;
  const int64_t record = (int64_t{seq} * hkv + kv_head) * layout.stride;
  const float* init = p.initial_state != nullptr ? p.initial_state + record : nullptr;
  const int64_t qd = int64_t{hq} * kD;   // row strides
  const int64_t kvd = int64_t{hkv} * kD;
  const int col0 = slice * kDv;

  // Tile sources of step (chunk, key block g).
  auto sources = [&](int g, TileSource& qs, TileSource& ks, TileSource& vs) {
    if constexpr (kOp == Op::kForward) {
      qs = {p.q, qd, int64_t{head} * kD};
      ks = {p.k, kvd, int64_t{kv_head} * kD};
      vs = {p.v, kvd, int64_t{kv_head} * kD + col0};
    } else if constexpr (kOp == Op::kGradQ) {
      qs = {p.dout, qd, int64_t{head} * kD};
      ks = {p.v, kvd, int64_t{kv_head} * kD};
      vs = {p.k, kvd, int64_t{kv_head} * kD + col0};
    } else if constexpr (kOp == Op::kGradK) {
      qs = {p.v, kvd, int64_t{kv_head} * kD};
      ks = {p.dout, qd, int64_t{q_head0 + g} * kD};
      vs = {p.q, qd, int64_t{q_head0 + g} * kD + col0};
    } else {
      qs = {p.k, kvd, int64_t{kv_head} * kD};
      ks = {p.q, qd, int64_t{q_head0 + g} * kD};
      vs = {p.dout, qd, int64_t{q_head0 + g} * kD + col0};
    }
  };
  auto step_chunk = [&](int64_t n) {
    const int c = static_cast<int>(n / key_blocks);
    return kReverse ? c_end - 1 - c : c_begin + c;
  };

  auto issue_loads = [&](int64_t n, int stage) {
    uint8_t* base = smem + stage * Shape::kStageBytes;
    const int c = step_chunk(n);
    const int g = static_cast<int>(n % key_blocks);
    const int64_t t0 = first + int64_t{c} * kChunk;
    const int valid_rows = static_cast<int>(len - int64_t{c} * kChunk < kChunk ? len - int64_t{c} * kChunk : kChunk);
    TileSource qs, ks, vs;
    sources(g, qs, ks, vs);
    // Pass A needs no query' rows, except the forward's q for its running norms.
    if (!kStateOnly || kOp == Op::kForward) {
      LoadTile<kD>(reinterpret_cast<uint16_t*>(base + Shape::kQTile), kSD, qs, t0, valid_rows);
    }
    LoadTile<kD>(reinterpret_cast<uint16_t*>(base + Shape::kKTile), kSD, ks, t0, valid_rows);
    LoadTile<kDv>(reinterpret_cast<uint16_t*>(base + Shape::kVTile), kSV, vs, t0, valid_rows);
    // Per-row inputs: threads 0..63 the query' rows, 64..127 the key' rows.
    const int r = tid % kChunk;
    const bool valid = r < valid_rows;
    const int64_t t = t0 + r;
    float4* q_stats = reinterpret_cast<float4*>(base + Shape::kQStats);
    float4* k_stats = reinterpret_cast<float4*>(base + Shape::kKStats);
    float* k_w = reinterpret_cast<float*>(base + Shape::kKW);
    float* q_x = reinterpret_cast<float*>(base + Shape::kQX);
    if constexpr (kOp == Op::kGradQ) {
      if (tid < kChunk) {
        CpAsync16(q_stats + r, valid ? p.stats + (t * hq + head) * kLinearRowStats : p.stats,
                  valid);
        CpAsync4(q_x + r, valid ? p.ws_dden + t * hq + head : p.ws_dden, valid);
      }
    } else if constexpr (kOp == Op::kGradK) {
      if (tid < kChunk) {
        CpAsync16(q_stats + r, valid ? p.stats + (t * hq + q_head0) * kLinearRowStats : p.stats,
                  valid);
        CpAsync4(q_x + r, valid ? p.ws_gk + t * hkv + kv_head : p.ws_gk, valid);
      } else {
        CpAsync16(k_stats + r,
                  valid ? p.stats + (t * hq + q_head0 + g) * kLinearRowStats : p.stats, valid);
        CpAsync4(k_w + r, valid ? p.ws_dden + t * hq + q_head0 + g : p.ws_dden, valid);
      }
    } else if constexpr (kOp == Op::kGradV) {
      if (tid >= kChunk) {
        CpAsync16(k_stats + r,
                  valid ? p.stats + (t * hq + q_head0 + g) * kLinearRowStats : p.stats, valid);
      }
    }
  };

  // ---- state: S in registers (warp w: rows [w d/4, (w+1) d/4)), B per column thread ----
  float sacc[kMt][kNt][4];
  const int f_base = warp * kRowsPerWarp;
#pragma unroll
  for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int f = f_base + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
        const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
        float x = 0.0f;
        if (!kStateOnly && init != nullptr) {
          if constexpr (kOp == Op::kForward) {
            if (col < kDv) {
              x = init[layout.s_offset + int64_t{f} * kD + col0 + col];
            } else if (col == kDv) {
              x = init[layout.z_offset + f];
            }
          } else if constexpr (kOp == Op::kGradQ) {
            // The dq pass's state is sum_j v_j phi(k_j)^T: the forward's S transposed.
            x = init[layout.s_offset + int64_t{col0 + col} * kD + f];
          }
        }
        sacc[mt][nt][e] = x;
      }
    }
  }
  float bsum = 0.0f;  // thread t < kCols: B[t]; thread kCols: sum of w (the dcount of kGradK)
  if (!kStateOnly && init != nullptr && tid < kCols) {
    if constexpr (kOp == Op::kForward) {
      bsum = tid < kDv ? init[layout.v_sum_offset + col0 + tid]
                       : (tid == kDv ? init[layout.count_offset] : 0.0f);
    } else if constexpr (kOp == Op::kGradQ) {
      bsum = init[layout.z_offset + col0 + tid];
    }
  }
  // Running maxima (kForward, warp 0: raw norms) and records (kGradQ, warp 0: floored norms).
  float run_q = 0.0f, run_k = 0.0f;
  int arg_q = -1, arg_k = -1;
  if constexpr (kOp == Op::kForward) {
    if (init != nullptr) {
      run_q = init[layout.q_norm_offset + g_in_group];
      run_k = init[layout.k_norm_offset];
    }
  } else if constexpr (kOp == Op::kGradQ) {
    run_q = fmaxf(kLinearNormFloor, init != nullptr ? init[layout.q_norm_offset + g_in_group] : 0.0f);
    run_k = fmaxf(kLinearNormFloor, init != nullptr ? init[layout.k_norm_offset] : 0.0f);
    if (seg_local > 0 && c_begin < c_end) {
      // The floored maxima so far are the previous row's a and b.
      const float4 prev = reinterpret_cast<const float4*>(
          p.stats)[(first + int64_t{c_begin} * kChunk - 1) * hq + head];
      run_q = prev.y;
      run_k = prev.z;
    }
  }
  if constexpr (!kStateOnly) {
    if (seg_rec != nullptr) {
      // Pass C: add the earlier segments' sums (pass B's exclusive prefix).
      int i = 0;
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) sacc[mt][nt][e] += seg_rec[(i++) * kThreads + tid];
        }
      }
      bsum += seg_rec[kMt * kNt * 4 * kThreads + tid];
      const int* scalars = reinterpret_cast<const int*>(seg_rec + Shape::kSegmentSumFloats);
      if constexpr (kOp == Op::kForward) {
        // Non-negative floats order as their bits; INT_MIN (no earlier segment) becomes 0.
        run_q = fmaxf(run_q, __int_as_float(max(scalars[0], 0)));
        run_k = fmaxf(run_k, __int_as_float(max(scalars[1], 0)));
      } else if constexpr (kOp == Op::kGradQ) {
        arg_q = max(arg_q, scalars[0]);
        arg_k = max(arg_k, scalars[1]);
      }
    }
  }

  auto store_state_smem = [&]() {
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int f = f_base + mt * 16 + lane / 4 + h * 8;
          const int col = nt * 8 + 2 * (lane % 4);
          uint32_t hi, lo;
          SplitBf16(sacc[mt][nt][2 * h], sacc[mt][nt][2 * h + 1], hi, lo);
          *reinterpret_cast<uint32_t*>(s_hi + f * kSV + col) = hi;
          *reinterpret_cast<uint32_t*>(s_lo + f * kSV + col) = lo;
        }
      }
    }
    if (tid < kCols) bsum_s[tid] = bsum;
  };
  store_state_smem();

  const int row0 = warp * 16;
  const int r_lo = row0 + lane / 4;  // this thread's two query' rows of the chunk
  const int r_hi = r_lo + 8;

  if (steps > 0) issue_loads(0, 0);
  CpAsyncCommit();
  float acc[kNt][4];

  for (int64_t n = 0; n < steps; ++n) {
    const int stage = Shape::kStages == 2 ? static_cast<int>(n & 1) : 0;
    uint8_t* base = smem + stage * Shape::kStageBytes;
    uint16_t* q_tile = reinterpret_cast<uint16_t*>(base + Shape::kQTile);
    uint16_t* k_tile = reinterpret_cast<uint16_t*>(base + Shape::kKTile);
    uint16_t* v_tile = reinterpret_cast<uint16_t*>(base + Shape::kVTile);
    const float4* q_stats = reinterpret_cast<const float4*>(base + Shape::kQStats);
    const float4* k_stats = reinterpret_cast<const float4*>(base + Shape::kKStats);
    const float* k_w = reinterpret_cast<const float*>(base + Shape::kKW);
    const float* q_x = reinterpret_cast<const float*>(base + Shape::kQX);
    const int c = step_chunk(n);
    const int g = static_cast<int>(n % key_blocks);
    const int64_t t0 = first + int64_t{c} * kChunk;
    const int valid_rows =
        static_cast<int>(len - int64_t{c} * kChunk < kChunk ? len - int64_t{c} * kChunk : kChunk);

    CpAsyncWaitAll();
    __syncthreads();  // (A) this step's tiles are in; the other stage is free
    if (Shape::kStages == 2 && n + 1 < steps) issue_loads(n + 1, stage ^ 1);
    CpAsyncCommit();
    // The raw q (kGradQ) or k (kGradK) values of this thread's output elements, for the
    // epilogue: issued now, used after the step's matrix work.
    uint32_t xr[kDv / 8][2] = {};
    if constexpr (Shape::kHasX && !kStateOnly) {
      if (g == key_blocks - 1) {
        const uint16_t* xb = kOp == Op::kGradQ ? p.q + int64_t{head} * kD + col0
                                               : p.k + int64_t{kv_head} * kD + col0;
        const int64_t xs = kOp == Op::kGradQ ? qd : kvd;
#pragma unroll
        for (int nt = 0; nt < kDv / 8; ++nt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = h ? r_hi : r_lo;
            if (r < valid_rows) {
              xr[nt][h] = *reinterpret_cast<const uint32_t*>(xb + (t0 + r) * xs + nt * 8 +
                                                             2 * (lane % 4));
            }
          }
        }
      }
    }

    // ---- prologue: per-row scalars, then in-place transforms ----
    if constexpr (kOp == Op::kForward) {
      if (tid < kChunk) {
        const int r = tid;
        const bool valid = r < valid_rows;
        // The ones column (column kDv) and its zero padding.
        float ones[8] = {valid ? 1.0f : 0.0f, 0, 0, 0, 0, 0, 0, 0};
        *reinterpret_cast<uint4*>(v_tile + r * kSV + kDv) = PackBf16x8(ones);
        w_s[r] = valid ? 1.0f : 0.0f;
      }
      {
        // ||q_r|| (threads 0..63) and ||k_r|| (64..127) of the raw rows: the state keeps the
        // running maxima for every feature map; kOnePlusXMaxNorm also scales by them. The other
        // maps need them only for the final state (a tenth of the forward's instructions).
        const bool need_norms = lifted || p.final_state != nullptr;
        const int r = tid % kChunk;
        const uint16_t* row = (tid < kChunk ? q_tile : k_tile) + r * kSD;
        float sum = 0.0f;
        if (need_norms && r < valid_rows) {
          sum = fp16 ? RowSumSquares<kD, true>(row) : RowSumSquares<kD, false>(row);
        }
        scratch_s[tid] = sqrtf(sum);
      }
      __syncthreads();
      if (warp == 0) {
        // Running maxima over the chunk's rows (2 per lane), continuing the carried ones.
        const RunningNorms m = ScanRunningNorms(
            scratch_s[2 * lane], scratch_s[2 * lane + 1], scratch_s[kChunk + 2 * lane],
            scratch_s[kChunk + 2 * lane + 1], run_q, run_k);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = 2 * lane + h;
          const RowScalars rs = MaxNormRowScalars(h ? m.q1 : m.q0, h ? m.k1 : m.k0, lifted);
          qscale_s[r] = rs.q_scale;
          alpha_s[r] = rs.alpha;
          c_s[r] = rs.c;
          beta_s[r] = lifted ? 1.0f : 0.0f;
          a_s[r] = rs.a;
          b_s[r] = rs.b;
        }
      }
      if (fp16 || elu || lifted) {
        __syncthreads();  // the norms read the raw tiles; qscale is ready
        if (!kStateOnly) {
          TransformTile<kD>(q_tile, kSD, valid_rows, elu, lifted ? qscale_s : nullptr, fp16);
        }
        if (fp16 || elu) TransformTile<kD>(k_tile, kSD, valid_rows, elu, nullptr, fp16);
        if (fp16) TransformTile<kDv>(v_tile, kSV, valid_rows, false, nullptr, fp16);
      }
    } else if constexpr (kOp == Op::kGradQ) {
      if (tid < kChunk) {
        const int r = tid;
        const float4 st = q_stats[r];  // {den, a, b, c}
        const bool valid = r < valid_rows;
        alpha_s[r] = p.normalize && valid ? 1.0f / st.x : 1.0f;
        beta_s[r] = p.normalize && valid ? q_x[r] : 0.0f;  // dden_r
        w_s[r] = valid ? 1.0f : 0.0f;
        post_s[r] = lifted ? st.w : 1.0f;
      }
      if (lifted && warp == 0) {
        // Records: row r starts a new running maximum when its floored max norm exceeds the
        // previous row's; the argmax of row r is the last record at or before it (-1: the state).
        const int r0 = 2 * lane, r1 = r0 + 1;
        const float a0 = q_stats[r0].y, a1 = q_stats[r1].y;
        const float b0 = q_stats[r0].z, b1 = q_stats[r1].z;
        float pa = __shfl_up_sync(0xffffffffu, a1, 1);
        float pb = __shfl_up_sync(0xffffffffu, b1, 1);
        if (lane == 0) {
          pa = run_q;
          pb = run_k;
        }
        const int t_r0 = static_cast<int>(t0 + r0);
        const int kq0 = a0 > pa ? t_r0 : -1, kq1 = a1 > a0 ? t_r0 + 1 : -1;
        const int kk0 = b0 > pb ? t_r0 : -1, kk1 = b1 > b0 ? t_r0 + 1 : -1;
        int mq = max(kq0, kq1), mk = max(kk0, kk1);
#pragma unroll
        for (int off = 1; off < 32; off *= 2) {
          const int oq = __shfl_up_sync(0xffffffffu, mq, off);
          const int ok = __shfl_up_sync(0xffffffffu, mk, off);
          if (lane >= off) {
            mq = max(mq, oq);
            mk = max(mk, ok);
          }
        }
        int eq = __shfl_up_sync(0xffffffffu, mq, 1);
        int ek = __shfl_up_sync(0xffffffffu, mk, 1);
        if (lane == 0) eq = ek = -1;
        const int q0 = max(max(arg_q, eq), kq0), q1 = max(q0, kq1);
        const int k0 = max(max(arg_k, ek), kk0), k1 = max(k0, kk1);
        argq_s[r0] = q0;
        argq_s[r1] = q1;
        argk_s[r0] = k0;
        argk_s[r1] = k1;
        arg_q = __shfl_sync(0xffffffffu, q1, 31);
        arg_k = __shfl_sync(0xffffffffu, k1, 31);
        run_q = __shfl_sync(0xffffffffu, a1, 31);
        run_k = __shfl_sync(0xffffffffu, b1, 31);
      }
      if (fp16 || elu) {
        if (fp16) {
          if (!kStateOnly) TransformTile<kD>(q_tile, kSD, valid_rows, false, nullptr, fp16);
          TransformTile<kD>(k_tile, kSD, valid_rows, false, nullptr, fp16);
        }
        TransformTile<kDv>(v_tile, kSV, valid_rows, elu, nullptr, fp16);
      }
    } else if constexpr (kOp == Op::kGradK) {
      const int r = tid % kChunk;
      const bool valid = r < valid_rows;
      if (tid < kChunk) {
        // Query' rows (tokens of this kv head): the k max-norm gradient, applied in the epilogue.
        alpha_s[r] = 1.0f;
        beta_s[r] = 1.0f;
        post_s[r] = lifted && valid && !p.k_norm_by_fixup ? q_x[r] / q_stats[r].z : 0.0f;
      } else {
        // Key' rows (group head g): dnum = dout / den, u = c q or phi(q), w = dden.
        const float4 st = k_stats[r];
        kscale_s[r] = p.normalize && valid ? 1.0f / st.x : 1.0f;
        vscale_s[r] = lifted && valid ? st.w : 1.0f;
        w_s[r] = p.normalize && valid ? k_w[r] : 0.0f;
      }
      __syncthreads();
      if (!kStateOnly && fp16) TransformTile<kD>(q_tile, kSD, valid_rows, false, nullptr, fp16);
      if (fp16 || p.normalize) {
        TransformTile<kD>(k_tile, kSD, valid_rows, false, p.normalize ? kscale_s : nullptr, fp16);
      }
      if (fp16 || elu || lifted) {
        TransformTile<kDv>(v_tile, kSV, valid_rows, elu, lifted ? vscale_s : nullptr, fp16);
      }
    } else {  // kGradV
      const int r = tid % kChunk;
      const bool valid = r < valid_rows;
      if (tid < kChunk) {
        alpha_s[r] = 1.0f;
        beta_s[r] = lifted ? 1.0f : 0.0f;
        w_s[r] = valid ? 1.0f : 0.0f;
      } else {
        const float4 st = k_stats[r];
        kscale_s[r] = lifted && valid ? st.w : 1.0f;
        vscale_s[r] = p.normalize && valid ? 1.0f / st.x : 1.0f;
      }
      __syncthreads();
      if (!kStateOnly && (fp16 || elu)) {
        TransformTile<kD>(q_tile, kSD, valid_rows, elu, nullptr, fp16);
      }
      if (fp16 || elu || lifted) {
        TransformTile<kD>(k_tile, kSD, valid_rows, elu, lifted ? kscale_s : nullptr, fp16);
      }
      if (fp16 || p.normalize) {
        TransformTile<kDv>(v_tile, kSV, valid_rows, false, p.normalize ? vscale_s : nullptr, fp16);
      }
    }
    __syncthreads();  // (B) scalars and tiles ready

    const float alpha_lo = alpha_s[r_lo], alpha_hi = alpha_s[r_hi];
    const float beta_lo = beta_s[r_lo], beta_hi = beta_s[r_hi];

    // ---- inter-chunk term: acc = alpha (Q' S) + beta B, once per chunk ----
    if (!kStateOnly && g == 0) {
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[nt][e] = 0.0f;
      }
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[4];
        LdMatrixX4(a, q_tile + (row0 + lane % 16) * kSD + kk * 16 + (lane / 16) * 8);
        const int s_row = kk * 16 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
        for (int vp = 0; vp < kNt / 2; ++vp) {
          uint32_t bh[4], bl[4];
          LdMatrixX4Trans(bh, s_hi + s_row * kSV + vp * 16 + (lane / 16) * 8);
          LdMatrixX4Trans(bl, s_lo + s_row * kSV + vp * 16 + (lane / 16) * 8);
          Mma(acc[2 * vp], a, bh[0], bh[1]);
          Mma(acc[2 * vp + 1], a, bh[2], bh[3]);
          Mma(acc[2 * vp], a, bl[0], bl[1]);
          Mma(acc[2 * vp + 1], a, bl[2], bl[3]);
        }
        if constexpr (kNt % 2 == 1) {
          uint32_t bh[2], bl[2];
          LdMatrixX2Trans(bh, s_hi + s_row * kSV + (kNt - 1) * 8);
          LdMatrixX2Trans(bl, s_lo + s_row * kSV + (kNt - 1) * 8);
          Mma(acc[kNt - 1], a, bh[0], bh[1]);
          Mma(acc[kNt - 1], a, bl[0], bl[1]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
        const float b0 = bsum_s[col], b1 = bsum_s[col + 1];
        acc[nt][0] = alpha_lo * acc[nt][0] + beta_lo * b0;
        acc[nt][1] = alpha_lo * acc[nt][1] + beta_lo * b1;
        acc[nt][2] = alpha_hi * acc[nt][2] + beta_hi * b0;
        acc[nt][3] = alpha_hi * acc[nt][3] + beta_hi * b1;
      }
    }

    // ---- intra-chunk scores (only the 16-key blocks on this warp's side of the mask) ----
    auto key_block_needed = [&](int kb) { return kReverse ? kb >= warp : kb <= warp; };
    float s[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < (kStateOnly ? 0 : kD / 16); ++kk) {
      uint32_t a[4];
      LdMatrixX4(a, q_tile + (row0 + lane % 16) * kSD + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int kb = 0; kb < 4; ++kb) {
        if (!key_block_needed(kb)) continue;
        uint32_t b[4];
        LdMatrixX4(b, k_tile + (kb * 16 + (lane / 16) * 8 + lane % 8) * kSD + kk * 16 +
                          ((lane / 8) % 2) * 8);
        Mma(s[2 * kb], a, b[0], b[1]);
        Mma(s[2 * kb + 1], a, b[2], b[3]);
      }
    }

    // ---- P = alpha s + beta w (masked) as hi + lo; acc += P V'; S += K'^T V' ----
#pragma unroll
    for (int kb = 0; kb < 4; ++kb) {
      const bool needed = !kStateOnly && key_block_needed(kb);
      uint32_t ph[4], pl[4];
      if (needed) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int nt = 2 * kb + h;
          const int j = nt * 8 + 2 * (lane % 4);
          const float w0 = w_s[j], w1 = w_s[j + 1];
          float x[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int r = e >= 2 ? r_hi : r_lo;
            const int jj = j + (e & 1);
            const bool in = kReverse ? jj >= r : jj <= r;
            const float al = e >= 2 ? alpha_hi : alpha_lo;
            const float be = e >= 2 ? beta_hi : beta_lo;
            x[e] = in ? al * s[nt][e] + be * ((e & 1) ? w1 : w0) : 0.0f;
          }
          SplitBf16(x[0], x[1], ph[2 * h], pl[2 * h]);
          SplitBf16(x[2], x[3], ph[2 * h + 1], pl[2 * h + 1]);
        }
      }
      // A fragments of K'^T for this warp's state rows: key block kb is the k dimension.
      uint32_t ka[kMt][4];
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        LdMatrixX4Trans(ka[mt], k_tile + (kb * 16 + (lane / 16) * 8 + lane % 8) * kSD + f_base +
                                    mt * 16 + ((lane / 8) % 2) * 8);
      }
      const int v_row = kb * 16 + ((lane / 8) % 2) * 8 + lane % 8;
#pragma unroll
      for (int vp = 0; vp < kNt / 2; ++vp) {
        uint32_t b[4];
        LdMatrixX4Trans(b, v_tile + v_row * kSV + vp * 16 + (lane / 16) * 8);
        if (needed) {
          Mma(acc[2 * vp], ph, b[0], b[1]);
          Mma(acc[2 * vp + 1], ph, b[2], b[3]);
          Mma(acc[2 * vp], pl, b[0], b[1]);
          Mma(acc[2 * vp + 1], pl, b[2], b[3]);
        }
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) {
          Mma(sacc[mt][2 * vp], ka[mt], b[0], b[1]);
          Mma(sacc[mt][2 * vp + 1], ka[mt], b[2], b[3]);
        }
      }
      if constexpr (kNt % 2 == 1) {
        uint32_t b[2];
        LdMatrixX2Trans(b, v_tile + v_row * kSV + (kNt - 1) * 8);
        if (needed) {
          Mma(acc[kNt - 1], ph, b[0], b[1]);
          Mma(acc[kNt - 1], pl, b[0], b[1]);
        }
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) Mma(sacc[mt][kNt - 1], ka[mt], b[0], b[1]);
      }
    }

    // B += w^T V' (and the sum of w) from this step's tiles.
    if (tid <= kCols) {
      // Eight independent partial sums: the 64 shared loads overlap instead of chaining.
      float part[8] = {};
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        const float x = tid < kCols ? __bfloat162float(__ushort_as_bfloat16(v_tile[j * kSV + tid]))
                                    : 1.0f;  // thread kCols: the sum of w
        part[j % 8] += w_s[j] * x;
      }
      bsum += ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }

    if (!kStateOnly && g == key_blocks - 1) {
      __syncthreads();  // (C) every warp is done reading S and B of the previous chunk
      store_state_smem();

      // ---- epilogue: outputs of this chunk's query' rows ----
      float den_lo = 1.0f, den_hi = 1.0f;
      if constexpr (kOp == Op::kForward) {
        den_lo = __shfl_sync(0xffffffffu, acc[kNt - 1][0], lane & ~3);
        den_hi = __shfl_sync(0xffffffffu, acc[kNt - 1][2], lane & ~3);
        if (p.stats != nullptr && slice == 0 && lane % 4 == 0) {
          if (r_lo < valid_rows) {
            reinterpret_cast<float4*>(p.stats)[(t0 + r_lo) * hq + head] =
                make_float4(den_lo, a_s[r_lo], b_s[r_lo], c_s[r_lo]);
          }
          if (r_hi < valid_rows) {
            reinterpret_cast<float4*>(p.stats)[(t0 + r_hi) * hq + head] =
                make_float4(den_hi, a_s[r_hi], b_s[r_hi], c_s[r_hi]);
          }
        }
        if (!p.normalize) den_lo = den_hi = 1.0f;
      }
      float post_lo = 1.0f, post_hi = 1.0f;
      if constexpr (kOp == Op::kGradQ || kOp == Op::kGradK) {
        post_lo = post_s[r_lo];
        post_hi = post_s[r_hi];
      }
      float dot_lo = 0.0f, dot_hi = 0.0f;  // kGradQ: q . du over this slice
#pragma unroll
      for (int nt = 0; nt < kDv / 8; ++nt) {
        const int col = nt * 8 + 2 * (lane % 4);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = h ? r_hi : r_lo;
          float y[2];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float a = acc[nt][2 * h + e];
            if constexpr (kOp == Op::kForward) {
              y[e] = a / (h ? den_hi : den_lo);
            } else if constexpr (kOp == Op::kGradQ) {
              const float xq =
                  BitsToFloat(static_cast<uint16_t>(xr[nt][h] >> (16 * e)), fp16);
              if (lifted) {
                y[e] = (h ? post_hi : post_lo) * a;
                if (h) {
                  dot_hi += xq * a;
                } else {
                  dot_lo += xq * a;
                }
              } else {
                y[e] = elu ? a * EluPlusOneDerivativeFast(xq) : a;
              }
            } else if constexpr (kOp == Op::kGradK) {
              const float xk =
                  BitsToFloat(static_cast<uint16_t>(xr[nt][h] >> (16 * e)), fp16);
              y[e] = (elu ? a * EluPlusOneDerivativeFast(xk) : a) + (h ? post_hi : post_lo) * xk;
            } else {
              y[e] = a;
            }
          }
          const uint16_t b0 = FloatToBits(y[0], fp16), b1 = FloatToBits(y[1], fp16);
          const uint32_t packed = static_cast<uint32_t>(b0) | (static_cast<uint32_t>(b1) << 16);
          // Staged in this warp's own rows of the Q' tile (no other warp reads them).
          *reinterpret_cast<uint32_t*>(q_tile + r * kSD + col) = packed;
          if constexpr (kOp == Op::kForward) {
            // What rounding dropped, for the backward's dout . out (see the header).
            if (p.out_residual != nullptr && r < valid_rows) {
              const uint32_t lo =
                  static_cast<uint32_t>(FloatToBits(y[0] - BitsToFloat(b0, fp16), fp16)) |
                  (static_cast<uint32_t>(FloatToBits(y[1] - BitsToFloat(b1, fp16), fp16)) << 16);
              *reinterpret_cast<uint32_t*>(p.out_residual + (t0 + r) * qd +
                                           int64_t{head} * kD + col0 + col) = lo;
            }
          }
        }
      }
      __syncwarp();
      {
        constexpr bool kPerQHead = kOp == Op::kForward || kOp == Op::kGradQ;
        const int64_t out_stride = kPerQHead ? qd : kvd;
        uint16_t* out_base = p.out + int64_t{kPerQHead ? head : kv_head} * kD + col0;
        constexpr int kVecs = kDv / 8;
        for (int i = lane; i < 16 * kVecs; i += 32) {
          const int r = row0 + i / kVecs;
          const int cv = i % kVecs;
          if (r < valid_rows) {
            *reinterpret_cast<uint4*>(out_base + (t0 + r) * out_stride + cv * 8) =
                *reinterpret_cast<const uint4*>(q_tile + r * kSD + cv * 8);
          }
        }
      }
      if constexpr (kOp == Op::kGradQ) {
        if (lifted) {
          // d loss / d a_r and d b_r of this slice's share, summed per argmax (contiguous runs
          // of rows share one) and added to the workspace.
          dot_lo += __shfl_xor_sync(0xffffffffu, dot_lo, 1);
          dot_lo += __shfl_xor_sync(0xffffffffu, dot_lo, 2);
          dot_hi += __shfl_xor_sync(0xffffffffu, dot_hi, 1);
          dot_hi += __shfl_xor_sync(0xffffffffu, dot_hi, 2);
          if (lane % 4 == 0) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const int r = h ? r_hi : r_lo;
              const float4 st = q_stats[r];  // {den, a, b, c}
              const float dc_c = (h ? dot_hi : dot_lo) * st.w;
              const bool valid = r < valid_rows;
              ga_s[r] = valid && st.y > kLinearNormFloor ? -dc_c / st.y : 0.0f;
              gb_s[r] = valid && st.z > kLinearNormFloor ? -dc_c / st.z : 0.0f;
            }
          }
          __syncthreads();
          if (warp == 0) {
#pragma unroll
            for (int pass = 0; pass < 2; ++pass) {
              const int r = pass * 32 + lane;
              float va = ga_s[r], vb = gb_s[r];
              const int ka = argq_s[r], kb = argk_s[r];
#pragma unroll
              for (int off = 1; off < 32; off *= 2) {
                const float oa = __shfl_down_sync(0xffffffffu, va, off);
                const float ob = __shfl_down_sync(0xffffffffu, vb, off);
                const int oka = __shfl_down_sync(0xffffffffu, ka, off);
                const int okb = __shfl_down_sync(0xffffffffu, kb, off);
                if (lane + off < 32 && oka == ka) va += oa;
                if (lane + off < 32 && okb == kb) vb += ob;
              }
              const int pka = __shfl_up_sync(0xffffffffu, ka, 1);
              const int pkb = __shfl_up_sync(0xffffffffu, kb, 1);
              if ((lane == 0 || pka != ka) && va != 0.0f) {
                atomicAdd(ka >= 0 ? p.ws_gq + int64_t{ka} * hq + head
                                  : p.ws_state_gq + int64_t{seq} * hq + head,
                          va);
              }
              if ((lane == 0 || pkb != kb) && vb != 0.0f) {
                atomicAdd(kb >= 0 ? p.ws_gk + int64_t{kb} * hkv + kv_head
                                  : p.ws_state_gk + int64_t{seq} * hkv + kv_head,
                          vb);
              }
            }
          }
        }
      }
    }

    if (Shape::kStages == 1 && n + 1 < steps) {
      __syncthreads();  // every warp is done with the only stage
      issue_loads(n + 1, 0);
      CpAsyncCommit();
    }
  }
  CpAsyncWaitAll();

  if constexpr (kStateOnly) {
    int i = 0;
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) seg_rec[(i++) * kThreads + tid] = sacc[mt][nt][e];
      }
    }
    seg_rec[kMt * kNt * 4 * kThreads + tid] = bsum;
    if (tid == 0) {
      int* scalars = reinterpret_cast<int*>(seg_rec + Shape::kSegmentSumFloats);
      int s0 = INT_MIN, s1 = INT_MIN;
      if constexpr (kOp == Op::kForward) {
        s0 = __float_as_int(run_q);
        s1 = __float_as_int(run_k);
      } else if constexpr (kOp == Op::kGradQ) {
        s0 = arg_q;
        s1 = arg_k;
      }
      scalars[0] = s0;
      scalars[1] = s1;
      scalars[2] = scalars[3] = INT_MIN;
    }
    return;
  }

  // ---- final state / state gradient ----
  if constexpr (kOp == Op::kForward) {
    float* fin = p.final_state != nullptr && writes_final ? p.final_state + record : nullptr;
    if (fin != nullptr) {
      const bool kv_writer = g_in_group == 0;
      if (kv_writer) {
#pragma unroll
        for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
          for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int f = f_base + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
              const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
              if (col < kDv) {
                fin[layout.s_offset + int64_t{f} * kD + col0 + col] = sacc[mt][nt][e];
              } else if (col == kDv && slice == 0) {
                fin[layout.z_offset + f] = sacc[mt][nt][e];
              }
            }
          }
        }
        if (tid < kDv) fin[layout.v_sum_offset + col0 + tid] = bsum;
        if (slice == 0) {
          if (tid == kDv) fin[layout.count_offset] = bsum;
          if (tid == 0) fin[layout.k_norm_offset] = run_k;
          // Padding is copied through.
          for (int64_t i = layout.q_norm_offset + group + tid; i < layout.stride; i += kThreads) {
            fin[i] = init != nullptr ? init[i] : 0.0f;
          }
        }
      }
      if (slice == 0 && tid == 0) fin[layout.q_norm_offset + g_in_group] = run_q;
    }
  } else if constexpr (kOp == Op::kGradK) {
    float* dst =
        p.d_initial_state != nullptr && writes_final ? p.d_initial_state + record : nullptr;
    if (dst != nullptr) {
      if (tid < kDv) dst[layout.z_offset + col0 + tid] = bsum;
      if (slice == 0) {
        if (tid == kDv) dst[layout.count_offset] = lifted && p.normalize ? bsum : 0.0f;
        if (tid == 0) {
          dst[layout.k_norm_offset] =
              lifted ? p.ws_state_gk[int64_t{seq} * hkv + kv_head] : 0.0f;
        }
        for (int i = tid; i < group; i += kThreads) {
          dst[layout.q_norm_offset + i] =
              lifted ? p.ws_state_gq[int64_t{seq} * hq + q_head0 + i] : 0.0f;
        }
        for (int64_t i = layout.q_norm_offset + group + tid; i < layout.stride; i += kThreads) {
          dst[i] = 0.0f;
        }
      }
    }
  } else if constexpr (kOp == Op::kGradV) {
    float* dst =
        p.d_initial_state != nullptr && writes_final ? p.d_initial_state + record : nullptr;
    if (dst != nullptr) {
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
#pragma unroll
        for (int nt = 0; nt < kNt; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int f = f_base + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
            const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
            dst[layout.s_offset + int64_t{f} * kD + col0 + col] = sacc[mt][nt][e];
          }
        }
      }
      if (tid < kDv) dst[layout.v_sum_offset + col0 + tid] = lifted ? bsum : 0.0f;
    }
  }
}

template <Op kOp, int kD, bool kStateOnly>
__global__ void __launch_bounds__(kThreads, CoreShape<kOp, kD>::kMinBlocks)
    LinearCoreKernel(const CoreParams p) {
  CoreWalk<kOp, kD, kStateOnly, false>(p, blockIdx.x, blockIdx.y, blockIdx.z);
}

// The dq, dk and dv passes of an unsplit backward in one launch, when they are independent (the
// max-norm map's dk term from the dq pass's sums is then added by LinearNormFixupKernel after
// the launch, and the state gradient is not asked for). Grid (slices, q heads + 2 kv heads,
// sequences): y < q heads walks dq, then dk, then dv. At B = 4, H = 16, d = 128 each pass has
// 256 blocks, about two per SM (the grid, not the SM, caps the warps: 12% occupancy); together
// 768 blocks run three per SM (lean shape) in two waves. Which calls use it: BackwardMerged.
struct MergedBackwardParams {
  CoreParams dq, dk, dv;
};

template <int kD>
struct MergedBackwardShape {
  static constexpr int kSmemBytes = std::max({CoreShape<Op::kGradQ, kD, true>::kSmemBytes,
                                               CoreShape<Op::kGradK, kD, true>::kSmemBytes,
                                               CoreShape<Op::kGradV, kD, true>::kSmemBytes});
  static constexpr int kMinBlocks = CoreShape<Op::kGradQ, kD, true>::kMinBlocks;
  static_assert(kMinBlocks == CoreShape<Op::kGradK, kD, true>::kMinBlocks &&
                    kMinBlocks == CoreShape<Op::kGradV, kD, true>::kMinBlocks,
                "one register budget");
};

template <int kD>
__global__ void __launch_bounds__(kThreads, MergedBackwardShape<kD>::kMinBlocks)
    LinearBackwardMergedKernel(const MergedBackwardParams m) {
  const int y = blockIdx.y;
  const int hq = m.dq.grid_heads, hkv = m.dk.grid_heads;
  if (y < hq) {
    CoreWalk<Op::kGradQ, kD, false, true>(m.dq, blockIdx.x, y, blockIdx.z);
  } else if (y < hq + hkv) {
    CoreWalk<Op::kGradK, kD, false, true>(m.dk, blockIdx.x, y - hq, blockIdx.z);
  } else {
    CoreWalk<Op::kGradV, kD, false, true>(m.dv, blockIdx.x, y - hq - hkv, blockIdx.z);
  }
}

// ---- host helpers shared by the launchers ----

inline bool HeadDimServed(int head_dim) {
  switch (head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return true;
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return true;
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_256
    case 256:
      return true;
#endif
    default:
      return false;
  }
}

inline cudaError_t CheckConfig(const LinearAttentionConfig& c) {
  if (c.num_seqs < 0 || c.num_kv_heads <= 0 || c.num_q_heads <= 0 ||
      c.num_q_heads % c.num_kv_heads != 0) {
    return cudaErrorInvalidValue;
  }
  if (c.head_dim < 1 || c.head_dim > kMaxLinearHeadDim) return cudaErrorInvalidValue;
  switch (c.feature_map) {
    case LinearFeatureMap::kOnePlusXMaxNorm:
    case LinearFeatureMap::kEluPlusOne:
      break;
    case LinearFeatureMap::kIdentity:
      if (c.normalize) return cudaErrorInvalidValue;
      break;
    default:
      return cudaErrorInvalidValue;
  }
  if (c.dtype == DType::kFloat32) return cudaErrorNotSupported;
  if (c.dtype != DType::kBFloat16 && c.dtype != DType::kFloat16) return cudaErrorInvalidValue;
  if (!HeadDimServed(c.head_dim)) return cudaErrorNotSupported;
  // Grid limits: sequences and heads are grid dimensions.
  if (c.num_seqs > 65535 || c.num_q_heads > 65535) return cudaErrorNotSupported;
  return cudaSuccess;
}

inline bool Aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

inline CoreParams MakeCoreParams(const LinearAttentionConfig& c, const int32_t* cu_seqlens,
                                 int64_t total_tokens) {
  CoreParams p;
  p.cu_seqlens = cu_seqlens;
  p.total_tokens = total_tokens;
  p.num_seqs = c.num_seqs;
  p.num_q_heads = c.num_q_heads;
  p.num_kv_heads = c.num_kv_heads;
  p.group = c.num_q_heads / c.num_kv_heads;
  p.feature_map = static_cast<int>(c.feature_map);
  p.normalize = c.normalize;
  p.fp16 = c.dtype == DType::kFloat16;
  p.layout = MakeLinearStateLayout(c.head_dim, p.group);
  return p;
}

// ---- segments: the table, pass B and the host plan ----

// seg_first[s] = the first global segment of sequence s: a sequence in range gets
// max(1, ceil(chunks / segment_chunks)) segments (an empty one passes its state through), one out
// of range none. Clamped to max_segments, which holds for non-decreasing cu_seqlens (the
// contract); otherwise later sequences lose segments but nothing is accessed out of bounds.
template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    LinearSegmentTableKernel(const int32_t* cu_seqlens, int num_seqs, int64_t total_tokens,
                             int segment_chunks, int max_segments, int32_t* seg_first) {
  __shared__ int64_t partial[kBlock];
  const int per_thread = (num_seqs + kBlock - 1) / kBlock;
  const int begin = min(num_seqs, static_cast<int>(threadIdx.x) * per_thread);
  const int end = min(num_seqs, begin + per_thread);
  auto count = [&](int s) -> int64_t {
    const int64_t first = cu_seqlens[s], last = cu_seqlens[s + 1];
    if (first < 0 || last < first || last > total_tokens) return 0;
    const int64_t chunks = (last - first + kChunk - 1) / kChunk;
    return chunks == 0 ? 1 : (chunks + segment_chunks - 1) / segment_chunks;
  };
  int64_t sum = 0;
  for (int s = begin; s < end; ++s) sum += count(s);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int off = 1; off < kBlock; off *= 2) {  // inclusive scan
    const int64_t x = threadIdx.x >= off ? partial[threadIdx.x - off] : 0;
    __syncthreads();
    partial[threadIdx.x] += x;
    __syncthreads();
  }
  int64_t run = partial[threadIdx.x] - sum;
  for (int s = begin; s < end; ++s) {
    seg_first[s] = static_cast<int32_t>(min(run, int64_t{max_segments}));
    run += count(s);
  }
  if (threadIdx.x == kBlock - 1) {
    seg_first[num_seqs] = static_cast<int32_t>(min(partial[kBlock - 1], int64_t{max_segments}));
  }
}

// Pass B: over each sequence's segments (in walk order), every record element becomes the
// combination of the earlier segments' values: a sum for the first sum_floats of each record, an
// int maximum for the scalars. Grid: x over the slices' records of one (segment, head), y the
// grid heads, z the sequences.
template <bool kReverse>
__global__ void __launch_bounds__(256)
    LinearSegmentPrefixKernel(float* seg_states, const int32_t* seg_first, int record_floats,
                              int sum_floats, int head_floats) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= head_floats) return;
  const int begin = seg_first[blockIdx.z], end = seg_first[blockIdx.z + 1];
  const int64_t segment_floats = int64_t{gridDim.y} * head_floats;
  float* base = seg_states + int64_t{blockIdx.y} * head_floats + e;
  if (e % record_floats < sum_floats) {
    float run = 0.0f;
    for (int i = 0; i < end - begin; ++i) {
      float* x = base + (kReverse ? end - 1 - i : begin + i) * segment_floats;
      const float t = *x;
      *x = run;
      run += t;
    }
  } else {
    int run = INT_MIN;
    for (int i = 0; i < end - begin; ++i) {
      int* x = reinterpret_cast<int*>(base + (kReverse ? end - 1 - i : begin + i) * segment_floats);
      const int t = *x;
      *x = run;
      run = max(run, t);
    }
  }
}

// Upper bound on the global segments of a call (see LinearSegmentTableKernel).
inline int64_t MaxSegments(int num_seqs, int64_t total_tokens, int segment_chunks) {
  const int64_t chunk_bound = (total_tokens + kChunk - 1) / kChunk + num_seqs;
  return num_seqs + (chunk_bound + segment_chunks - 1) / segment_chunks;
}

// Blocks of a pass resident per SM: the register budget (three at d = 64), else what shared
// memory and the ~255 registers of the other shapes allow (two at d = 128, one at d = 256).
inline int ResidentBlocksPerSm(int head_dim) {
  switch (head_dim) {
    case 64:
      return CoreShape<Op::kForward, 64>::kMinBlocks;
    case 128:
      return std::min(2, CoreShape<Op::kForward, 128>::kBlocksPerSm);
    default:
      return std::min(2, CoreShape<Op::kForward, 256>::kBlocksPerSm);
  }
}

// Chunks per segment of a call: 0 = one block walks a whole sequence. `requested`: < 0 whole
// sequences, > 0 that many chunks, 0 automatic: unsplit when the unsplit grid (slices x heads x
// sequences) has more than one block per SM (measured on the H100, B = 4, H = 16, d = 128: 256
// blocks, splitting only adds pass A's work: fwd + bwd 5.67 ms unsplit against 8.0 to 10.7 ms
// split at N = 8k). Otherwise the segment count s per sequence minimises the modelled time
//   (s > 1 ? 1.4 : 1) x waves(s) x (chunks per segment + 2),
// waves(s) = ceil(grid x s / resident slots): the walk's length per wave, pass A's extra ~0.4 of
// a walk, and a fixed cost per block of about two chunks. The model ranks the H100's B = 1,
// N = 8k segment sweep (bench/RESULTS.md) in its measured order at d = 64 and 128; the rule it
// replaced (always 32 chunks) put the 128-block grid of d = 64, B = 4 into 1.3 waves.
inline int SegmentChunks(const LinearAttentionConfig& c, int64_t total_tokens, int requested) {
  if (requested < 0 || total_tokens <= 0 || c.num_seqs <= 0) return 0;
  const int64_t chunks = (total_tokens + kChunk - 1) / kChunk;
  int64_t s = requested;
  if (requested == 0) {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 0;
    }
    const int64_t grid = c.head_dim / kSliceWidth * int64_t{c.num_kv_heads} * c.num_seqs;
    if (grid > sms) return 0;
    const int64_t slots = int64_t{sms} * ResidentBlocksPerSm(c.head_dim);
    const int64_t per_seq = (chunks + c.num_seqs - 1) / c.num_seqs;
    double best_cost = 0.0;
    int64_t best_segments = 1;
    // Past eight waves the fixed cost per block only grows.
    const int64_t most = std::min<int64_t>(per_seq, 8 * slots / grid + 1);
    for (int64_t segments = 1; segments <= most; ++segments) {
      const int64_t waves = (grid * segments + slots - 1) / slots;
      const int64_t length = (per_seq + segments - 1) / segments;
      const double cost = (segments > 1 ? 1.4 : 1.0) * double(waves) * double(length + 2);
      if (segments == 1 || cost < best_cost) {
        best_cost = cost;
        best_segments = segments;
      }
    }
    if (best_segments == 1) return 0;
    s = (per_seq + best_segments - 1) / best_segments;
  }
  while (MaxSegments(c.num_seqs, total_tokens, static_cast<int>(s)) > 65535) s *= 2;
  return s >= chunks ? 0 : static_cast<int>(s);
}

// Floats of one (segment, grid head) across its slices, for a pass of head dim d.
template <Op kOp>
inline int64_t SegmentHeadFloats(int head_dim) {
  switch (head_dim) {
    case 64:
      return int64_t{CoreShape<kOp, 64>::kSlices} * CoreShape<kOp, 64>::kSegmentRecordFloats;
    case 128:
      return int64_t{CoreShape<kOp, 128>::kSlices} * CoreShape<kOp, 128>::kSegmentRecordFloats;
    default:
      return int64_t{CoreShape<kOp, 256>::kSlices} * CoreShape<kOp, 256>::kSegmentRecordFloats;
  }
}

// Workspace of a segmented call: seg_first, then the records of the pass with the most
// (segment_chunks from SegmentChunks; 0 needs none).
struct SegmentWorkspace {
  size_t seg_first = 0, states = 0, total = 0;
};

inline SegmentWorkspace LayoutSegmentWorkspace(const LinearAttentionConfig& c, int64_t total_tokens,
                                               int segment_chunks, int64_t head_floats_max,
                                               size_t offset) {
  SegmentWorkspace w;
  w.seg_first = w.states = w.total = offset;
  if (segment_chunks == 0) return w;
  constexpr size_t kAlign = 256;
  auto align = [](size_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  w.seg_first = align(offset);
  w.states = w.seg_first + align(sizeof(int32_t) * (static_cast<size_t>(c.num_seqs) + 1));
  w.total = w.states + sizeof(float) *
                           static_cast<size_t>(MaxSegments(c.num_seqs, total_tokens, segment_chunks)) *
                           static_cast<size_t>(head_floats_max);
  return w;
}

// Sets a kernel's dynamic shared-memory limit on the current device once (`ready` is the
// kernel's own per-device flag array), then launches it.
template <typename Kernel>
cudaError_t LaunchWithSmem(Kernel kernel, std::mutex& mutex, bool (&ready)[kMaxDevices],
                           dim3 grid, dim3 block, int smem_bytes, cudaStream_t stream,
                           void** args) {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  if (device < 0 || device >= kMaxDevices) return cudaErrorNotSupported;
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!ready[device]) {
      error = cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
      if (error != cudaSuccess) return error;
      ready[device] = true;
    }
  }
  return cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, args,
                          static_cast<size_t>(smem_bytes), stream);
}

template <Op kOp, int kD, bool kStateOnly>
cudaError_t LaunchCore(const CoreParams& params, int grid_z, cudaStream_t stream) {
  using Shape = CoreShape<kOp, kD>;
  static std::mutex mutex;
  static bool ready[kMaxDevices] = {};
  CoreParams copy = params;
  void* args[] = {&copy};
  return LaunchWithSmem(LinearCoreKernel<kOp, kD, kStateOnly>, mutex, ready,
                        dim3(Shape::kSlices, params.grid_heads, grid_z), dim3(kThreads),
                        Shape::kSmemBytes, stream, args);
}

// Passes A and B of a segmented walk (params.seg_first set, its table built): every segment's
// record holds the earlier segments' sums when they end.
template <Op kOp, int kD>
cudaError_t RunSegmentSums(const CoreParams& params, int64_t total_tokens, cudaStream_t stream) {
  using Shape = CoreShape<kOp, kD>;
  const int grid_z =
      static_cast<int>(MaxSegments(params.num_seqs, total_tokens, params.segment_chunks));
  cudaError_t error = LaunchCore<kOp, kD, true>(params, grid_z, stream);
  if (error != cudaSuccess) return error;
  constexpr bool kReverse = kOp == Op::kGradK || kOp == Op::kGradV;
  float* states = params.seg_states;
  const int32_t* seg_first = params.seg_first;
  int record_floats = Shape::kSegmentRecordFloats;
  int sum_floats = Shape::kSegmentSumFloats;
  int head_floats = Shape::kSlices * Shape::kSegmentRecordFloats;
  void* args[] = {&states, &seg_first, &record_floats, &sum_floats, &head_floats};
  return cudaLaunchKernel(reinterpret_cast<const void*>(LinearSegmentPrefixKernel<kReverse>),
                          dim3((head_floats + 255) / 256, params.grid_heads, params.num_seqs),
                          dim3(256), args, 0, stream);
}

// One pass over every sequence: unsplit (grid z = sequences), or, when params.seg_first is set
// (its table already built), pass A, pass B and pass C over the segments.
template <Op kOp, int kD>
cudaError_t RunCore(const CoreParams& params, int64_t total_tokens, cudaStream_t stream) {
  if (params.num_seqs == 0 || params.grid_heads == 0) return cudaSuccess;
  if (params.seg_first == nullptr) {
    return LaunchCore<kOp, kD, false>(params, params.num_seqs, stream);
  }
  cudaError_t error = RunSegmentSums<kOp, kD>(params, total_tokens, stream);
  if (error != cudaSuccess) return error;
  const int grid_z =
      static_cast<int>(MaxSegments(params.num_seqs, total_tokens, params.segment_chunks));
  return LaunchCore<kOp, kD, false>(params, grid_z, stream);
}

template <Op kOp>
cudaError_t RunCoreForHeadDim(const CoreParams& params, int head_dim, int64_t total_tokens,
                              cudaStream_t stream) {
  switch (head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return RunCore<kOp, 64>(params, total_tokens, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return RunCore<kOp, 128>(params, total_tokens, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_256
    case 256:
      return RunCore<kOp, 256>(params, total_tokens, stream);
#endif
    default:
      return cudaErrorNotSupported;
  }
}

template <Op kOp>
cudaError_t RunSegmentSumsForHeadDim(const CoreParams& params, int head_dim, int64_t total_tokens,
                                     cudaStream_t stream) {
  switch (head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return RunSegmentSums<kOp, 64>(params, total_tokens, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return RunSegmentSums<kOp, 128>(params, total_tokens, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_256
    case 256:
      return RunSegmentSums<kOp, 256>(params, total_tokens, stream);
#endif
    default:
      return cudaErrorNotSupported;
  }
}

// The merged backward launch (see LinearBackwardMergedKernel): unsplit passes only.
template <int kD>
cudaError_t LaunchBackwardMerged(const MergedBackwardParams& m, cudaStream_t stream) {
  static std::mutex mutex;
  static bool ready[kMaxDevices] = {};
  MergedBackwardParams copy = m;
  void* args[] = {&copy};
  return LaunchWithSmem(LinearBackwardMergedKernel<kD>, mutex, ready,
                        dim3(CoreShape<Op::kGradQ, kD>::kSlices,
                             m.dq.grid_heads + 2 * m.dk.grid_heads, m.dq.num_seqs),
                        dim3(kThreads), MergedBackwardShape<kD>::kSmemBytes, stream, args);
}

// Whether a backward runs merged: unsplit d = 64 and 128. Measured on the H100 (H = 16, elu + 1):
// d = 128, B = 4, N = 8192 backward 2.66 -> 2.37 ms; d = 64 (32-column slices), B = 8, N = 8192
// 2.05 -> 1.92 ms and N = 32768 8.02 -> 7.56 ms (bench/RESULTS.md). The max-norm map merges
// unless the initial state's gradient is asked for (the dk pass writes its k-norm field from the
// dq pass's sums).
inline bool BackwardMerged(const LinearAttentionConfig& c, int segment_chunks,
                           bool wants_state_gradient) {
  return segment_chunks == 0 && (c.head_dim == 128 || c.head_dim == 64) &&
         !(c.feature_map == LinearFeatureMap::kOnePlusXMaxNorm && wants_state_gradient) &&
         c.num_q_heads + 2 * c.num_kv_heads <= 65535;
}

inline cudaError_t RunBackwardMergedForHeadDim(const MergedBackwardParams& m, int head_dim,
                                               cudaStream_t stream) {
  if (m.dq.num_seqs == 0 || m.dq.grid_heads == 0) return cudaSuccess;
  switch (head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return LaunchBackwardMerged<128>(m, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return LaunchBackwardMerged<64>(m, stream);
#endif
    default:
      return cudaErrorNotSupported;
  }
}

// Builds the segment table in the workspace and points params at it (segment_chunks > 0).
inline cudaError_t PrepareSegments(CoreParams& params, const SegmentWorkspace& w,
                                   uint8_t* workspace, int segment_chunks, int64_t total_tokens,
                                   cudaStream_t stream) {
  params.segment_chunks = segment_chunks;
  if (segment_chunks == 0) return cudaSuccess;
  params.seg_first = reinterpret_cast<int32_t*>(workspace + w.seg_first);
  params.seg_states = reinterpret_cast<float*>(workspace + w.states);
  const int32_t* cu = params.cu_seqlens;
  int num_seqs = params.num_seqs;
  int64_t tokens = total_tokens;
  int max_segments =
      static_cast<int>(MaxSegments(params.num_seqs, total_tokens, segment_chunks));
  int32_t* seg_first = const_cast<int32_t*>(params.seg_first);
  void* args[] = {&cu, &num_seqs, &tokens, &segment_chunks, &max_segments, &seg_first};
  return cudaLaunchKernel(reinterpret_cast<const void*>(LinearSegmentTableKernel<1024>), dim3(1),
                          dim3(1024), args, 0, stream);
}

}  // namespace ferry::kernels::linear_cuda
