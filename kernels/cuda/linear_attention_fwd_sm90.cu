// Causal linear attention forward on Hopper (wgmma): contract in linear_attention_sm90.h.
//
// One block of two warpgroups per (64 value columns, q head, sequence) walks the sequence's
// 64-token chunks; warpgroup w owns value columns [32w, 32w + 32) of the block's slice. With Q',
// K' the chunk's feature rows (phi(q), phi(k), bf16), V its value rows and S, z the state before
// the chunk (float32 in registers), each chunk is three batches of wgmma per warpgroup:
//   1. O = Q' S_hi + Q' S_lo       S as bf16 hi + lo pairs (~16 mantissa bits), B N-major
//      D = Q' [z_hi, z_lo, 0...]   the inter-chunk denominator, m64n8
//      P = Q' K'^T                 the scores (both warpgroups: cheaper than sharing them)
//   2. S += K'^T V, z += K'^T 1    M = key features in m64 blocks, A = K' read M-major
//   3. O += P_hi V + P_lo V        P masked to j <= i, from registers as hi + lo pairs
// then den = D[0] + D[1] + sum_j P and out = O / den. That is a few dozen warpgroup instructions
// per chunk where the mma.sync core (linear_attention_core.cuh) issued several hundred per warp,
// and the feature map runs once per tile and 64 columns instead of once per 32-column slice.
// While batches 1 and 2 run, the threads apply the feature map to the next chunk's tiles (copied
// one chunk ahead), so the elementwise work hides behind the tensor cores'. The state's shared
// copy (S hi / lo, [z_hi, z_lo]) is double-buffered: one barrier per chunk.
//
// kOnePlusXMaxNorm (linear_attention.h) enters as the core passes it: Q' = q 2^-e with a = m 2^e
// the running q-norm maximum, K' = raw k, and per row alpha = c 2^e, so that P = alpha s + 1 on
// the visible keys and the inter-chunk terms become alpha (Q' S) + B, alpha (Q' . z) + n (B, n:
// V's sum and the count before the chunk). Its running norms cost a barrier per chunk more.
// With sequence segments a block walks one segment (pass C), starting from the core's record of
// the earlier segments' sums (linear_attention_core.cuh, "Segments").
//
// Shared memory: two stages of tiles (cp.async, 16-byte chunks, in the swizzled layouts wgmma
// reads: Q and K 128-byte rows, V and S 64-byte rows so that each warpgroup's 32 columns are a
// panel of their own), transformed in place by the thread that copied each chunk; the state's
// two buffers; an output staging tile for 16-byte stores.
#include "linear_attention_sm90.h"

#include <mutex>

#include "ferry/kernels/wgmma_sm90.cuh"

namespace ferry::kernels::linear_cuda {
namespace {

constexpr int kSm90Cols = 64;          // value columns per block
constexpr int kSm90Threads = 256;      // two warpgroups

template <int kD>
struct Sm90Shape {
  static constexpr int kPanels = kD / 64;       // 64-column panels of a feature tile
  static constexpr int kPanel = kChunk * 128;   // bytes: 64 rows x 64 bf16 (128-byte swizzle)
  static constexpr int kVPanel = kChunk * 64;   // bytes: 64 rows x 32 bf16 (64-byte swizzle)
  static constexpr int kSPanel = kD * 64;       // bytes: kD rows x 32 bf16 (64-byte swizzle)
  static constexpr int kQTile = 0;
  static constexpr int kKTile = kQTile + kPanels * kPanel;
  static constexpr int kVTile = kKTile + kPanels * kPanel;  // one panel per warpgroup
  static constexpr int kStageBytes = kVTile + 2 * kVPanel;
  static constexpr int kStages = 2;
  // One buffer of the state's shared copy: S hi, S lo (a panel per warpgroup each), then
  // [z_hi, z_lo, 0 x 6] over kD (K-major, 1024 bytes per 64 features).
  static constexpr int kSHi = 0;
  static constexpr int kSLo = kSHi + 2 * kSPanel;
  static constexpr int kZ = kSLo + 2 * kSPanel;
  static constexpr int kB = kZ + kPanels * 1024;  // float[64]: V's sum (B of kOnePlusXMaxNorm)
  static constexpr int kStateBuffer = (kB + 64 * 4 + 1023) / 1024 * 1024;
  static constexpr int kState = kStages * kStageBytes;  // two buffers
  static constexpr int kOnes = kState + 2 * kStateBuffer;  // rows 1, 0 x 7 over 64 tokens
  static constexpr int kOutStride = kSm90Cols + 8;  // elements; 144-byte rows: no conflicts
  static constexpr int kOut = kOnes + 1024;
  // Per stage, float[kRowArrays][64] over the chunk's rows: raw q and k norms, then the running
  // maxima's a, b, c = 1 / (a b) and alpha = c 2^e (a = m 2^e) of kOnePlusXMaxNorm.
  static constexpr int kRowArrays = 6;
  static constexpr int kRows = kOut + kChunk * kOutStride * 2;
  static constexpr int kUsed = kRows + kStages * kRowArrays * kChunk * 4;
  static constexpr int kSmemBytes = kUsed + 1024;  // slack to align the base to 1024 bytes
  static_assert(kSmemBytes <= kMaxSharedBytes, "shared memory");
  static_assert(kStageBytes % 1024 == 0 && kStateBuffer % 1024 == 0, "atom alignment");
};

// Pass C reads the core's segment records through CoreShape::RecordIndexOfState / OfB; checked at
// compile time against the order CoreWalk writes them in (element (mt, nt, e) of thread
// (warp, lane) at ((mt kNt + nt) 4 + e) kThreads + warp 32 + lane, for S row
// warp kD / 4 + 16 mt + lane / 4 (+8 for e >= 2), column 8 nt + 2 (lane % 4) + e % 2).
template <int kD>
constexpr bool RecordLayoutMatchesCoreWalk() {
  using Record = CoreShape<Op::kForward, kD>;
  for (int warp = 0; warp < kWarps; ++warp) {
    for (int lane = 0; lane < 32; ++lane) {
      for (int mt = 0; mt < Record::kMt; ++mt) {
        for (int nt = 0; nt < Record::kNt; ++nt) {
          for (int e = 0; e < 4; ++e) {
            const int f = warp * (kD / kWarps) + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
            const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
            const int index = ((mt * Record::kNt + nt) * 4 + e) * kThreads + warp * 32 + lane;
            if (Record::RecordIndexOfState(f, col) != index) return false;
          }
        }
      }
    }
  }
  return Record::RecordIndexOfB(0) == Record::kMt * Record::kNt * 4 * kThreads;
}
static_assert(RecordLayoutMatchesCoreWalk<64>() && RecordLayoutMatchesCoreWalk<128>(),
              "segment record layout");

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kWgCols = kSm90Cols / 2;  // value columns per warpgroup

// Byte offset of 16-byte chunk c of row r in a tile of 128-byte (64-byte) swizzled rows.
__device__ __forceinline__ uint32_t Swizzled128(int r, int c) {
  return static_cast<uint32_t>(r * 128 + ((c ^ (r & 7)) << 4));
}
__device__ __forceinline__ uint32_t Swizzled64(int r, int c) {
  return static_cast<uint32_t>(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

// Descriptors. Tiles of 128-byte rows: Q', K', the z and ones rows as K-major operands, and K'
// as the M-major A of K'^T V (one 64-feature panel, so the panel stride is unused either way).
// Tiles of 64-byte rows: the S and V panels, N- or M-major (K steps of 16 rows are 1024 bytes;
// `panels` apart when M spans both).
__device__ __forceinline__ uint64_t Rows128(uint32_t addr) {
  return wgmma::MakeDescriptor(addr, 16, 1024, wgmma::Swizzle::k128);
}
__device__ __forceinline__ uint64_t MnMajor64(uint32_t addr, uint32_t panels) {
  return wgmma::MakeDescriptor(addr, panels, 512, wgmma::Swizzle::k64);
}
// The descriptor of the matrix `bytes` further on: the start address field is addr / 16 in the
// low 14 bits, and shared addresses stay below 2^18, so the sum never carries out of it. Built
// once per kernel and advanced by block-uniform offsets, descriptors cost a uniform add per
// product (building each from its address was a quarter of the kernel's instructions).
__device__ __forceinline__ uint64_t Advance(uint64_t descriptor, uint32_t bytes) {
  return descriptor + (bytes >> 4);
}

// The copy pattern: thread t copies the 16-byte column chunk t % (kD / 8) of Q and K rows
// t / (kD / 8) + i kQkStep, and chunk t % 8 of V rows t / 8 + i kVStep (steps that are multiples
// of 8 rows, so each thread's swizzle is the same for all of its rows).
template <int kD>
struct Sm90Copy {
  static constexpr int kCpr = kD / 8;
  static constexpr int kQkStep = kSm90Threads / kCpr;
  static constexpr int kVStep = kSm90Threads / 8;
};

// In place over this thread's chunks of a stage (the ones it copied: no barrier is needed after
// its own cp.async wait): phi (kElu) and bf16 for Q and K, Q's rows times q_scale[i] (kScaleQ;
// the thread's i-th row), bf16 for V (kFp16); feature rows past the sequence become zero (phi(0)
// would not be).
template <int kD, bool kFp16, bool kElu, bool kScaleQ>
__device__ __forceinline__ void TransformOwnChunks(uint8_t* stage, uint32_t qk_off, int qk_row0,
                                                   uint32_t v_off, int rows, const float* q_scale) {
  using Shape = Sm90Shape<kD>;
  using Copy = Sm90Copy<kD>;
#pragma unroll
  for (int i = 0; i < kChunk / Copy::kQkStep; ++i) {
    const int r = qk_row0 + i * Copy::kQkStep;
    const bool valid = r < rows;
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      if (tile == 1 && !kFp16 && !kElu) continue;  // raw bf16 k is K' (rows past: zero-filled)
      uint4* ptr = reinterpret_cast<uint4*>(stage + (tile ? Shape::kKTile : Shape::kQTile) +
                                            qk_off + i * Copy::kQkStep * 128);
      float x[8];
      Unpack8<kFp16>(*ptr, x);
      const float scale = kScaleQ && tile == 0 ? q_scale[i] : 1.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = (kElu ? EluPlusOneFast(x[e]) : x[e]) * scale;
      *ptr = valid ? PackBf16x8(x) : make_uint4(0, 0, 0, 0);
    }
  }
  if constexpr (kFp16) {
#pragma unroll
    for (int i = 0; i < kChunk / Copy::kVStep; ++i) {
      uint4* ptr = reinterpret_cast<uint4*>(stage + Shape::kVTile + v_off + i * Copy::kVStep * 64);
      float x[8];
      Unpack8<true>(*ptr, x);
      *ptr = PackBf16x8(x);
    }
  }
}

// The raw rows' L2 norms of this thread's rows into norm_q / norm_k (each row's kD / 8 chunks
// sit in kD / 8 consecutive lanes; the first of them writes), summed in RowSumSquares's order.
template <int kD, bool kFp16>
__device__ __forceinline__ void RowNorms(const uint8_t* stage, uint32_t qk_off, int qk_row0,
                                        bool leader, float* norm_q, float* norm_k) {
  using Shape = Sm90Shape<kD>;
  using Copy = Sm90Copy<kD>;
#pragma unroll
  for (int i = 0; i < kChunk / Copy::kQkStep; ++i) {
#pragma unroll
    for (int tile = 0; tile < 2; ++tile) {
      const uint4 raw = *reinterpret_cast<const uint4*>(
          stage + (tile ? Shape::kKTile : Shape::kQTile) + qk_off + i * Copy::kQkStep * 128);
      float x[8];
      Unpack8<kFp16>(raw, x);
      float sum = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) sum = fmaf(x[e], x[e], sum);
#pragma unroll
      for (int off = 1; off < Copy::kCpr; off *= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      // Rows past the sequence are zero-filled: norm 0.
      if (leader) (tile ? norm_k : norm_q)[qk_row0 + i * Copy::kQkStep] = sqrtf(sum);
    }
  }
}
#endif

template <int kD>
__global__ void __launch_bounds__(kSm90Threads, 1) LinearForwardSm90Kernel(const CoreParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Shape = Sm90Shape<kD>;
  using Copy = Sm90Copy<kD>;
  constexpr int kPanels = Shape::kPanels;
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw_addr = SmemAddr(smem_raw);
  uint8_t* smem = smem_raw + (((raw_addr + 1023u) & ~1023u) - raw_addr);
  const uint32_t base = SmemAddr(smem);

  const int slice = blockIdx.x, head = blockIdx.y;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // The warpgroup (broadcast from lane 0: the compiler then knows it is warp-uniform and keeps
  // what depends on it, the descriptors, in uniform registers) and the warp in it.
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0), wi = warp % 4;
  const int g = lane / 4, c2 = 2 * (lane % 4);
  const int hq = p.num_q_heads, hkv = p.num_kv_heads;
  const int kv_head = head / p.group;
  const int g_in_group = head - kv_head * p.group;
  // The sequence (grid z), or with segments (pass C of a segmented walk: the core's passes A and
  // B left each segment's record holding the earlier segments' sums) the global segment.
  int seq = blockIdx.z, seg_local = 0, seg_count = 1;
  if (p.seg_first != nullptr) {
    const int gseg = blockIdx.z;
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
  const int64_t first = p.cu_seqlens[seq], last = p.cu_seqlens[seq + 1];
  if (first < 0 || last < first || last > p.total_tokens) return;
  const int64_t len = last - first;
  const int num_chunks = static_cast<int>((len + kChunk - 1) / kChunk);
  // This block's chunks [c_begin, c_end); the last segment writes the final state.
  const int c_begin = p.seg_first != nullptr ? min(num_chunks, seg_local * p.segment_chunks) : 0;
  const int c_end =
      p.seg_first != nullptr ? min(num_chunks, c_begin + p.segment_chunks) : num_chunks;
  using CoreRecord = CoreShape<Op::kForward, kD>;  // the layout of a segment's record
  // The records of the core's 32-column slices 2 slice and 2 slice + 1 (warpgroup w's columns
  // are slice 2 slice + w).
  const float* records =
      p.seg_first != nullptr
          ? p.seg_states + (int64_t{blockIdx.z} * p.grid_heads + head) * CoreRecord::kSlices *
                               CoreRecord::kSegmentRecordFloats +
                (2 * slice) * CoreRecord::kSegmentRecordFloats
          : nullptr;
  const bool elu = p.feature_map == static_cast<int>(LinearFeatureMap::kEluPlusOne);
  const bool fp16 = p.fp16;
  const LinearStateLayout& layout = p.layout;
  const int64_t record = (int64_t{seq} * hkv + kv_head) * layout.stride;
  const float* init = p.initial_state != nullptr ? p.initial_state + record : nullptr;
  float* fin =
      p.final_state != nullptr && seg_local == seg_count - 1 ? p.final_state + record : nullptr;
  const bool kv_writer = fin != nullptr && g_in_group == 0;  // S, z, V: one q head per kv head
  const int64_t qd = int64_t{hq} * kD, kvd = int64_t{hkv} * kD;
  const int col0 = slice * kSm90Cols;    // the block's value columns
  const int wcol0 = col0 + wg * kWgCols;  // this warpgroup's

  // ---- copies ----
  const int qk_row0 = tid / Copy::kCpr, qk_cc = tid % Copy::kCpr;
  const uint32_t qk_off = (qk_cc / 8) * Shape::kPanel + Swizzled128(qk_row0, qk_cc % 8);
  const int v_row0 = tid / 8, v_cc = tid % 8;
  const uint32_t v_off = (v_cc / 4) * Shape::kVPanel + Swizzled64(v_row0, v_cc % 4);
  const uint16_t* q_src = p.q + (first + qk_row0) * qd + int64_t{head} * kD + qk_cc * 8;
  const uint16_t* k_src = p.k + (first + qk_row0) * kvd + int64_t{kv_head} * kD + qk_cc * 8;
  const uint16_t* v_src = p.v + (first + v_row0) * kvd + int64_t{kv_head} * kD + col0 + v_cc * 8;
  auto rows_of = [&](int chunk) {
    const int64_t left = len - int64_t{chunk} * kChunk;
    return static_cast<int>(left < kChunk ? left : kChunk);
  };
  // Sources step by constant strides (the 64-bit products per copy were a tenth of the
  // instructions).
  const int64_t q_step = Copy::kQkStep * qd, kv_step = Copy::kQkStep * kvd;
  const int64_t v_step = Copy::kVStep * kvd;
  auto issue_loads = [&](int chunk) {
    uint8_t* st = smem + (chunk & 1) * Shape::kStageBytes;
    const int rows = rows_of(chunk);
    const uint16_t* qp = q_src + int64_t{chunk} * kChunk * qd;
    const uint16_t* kp = k_src + int64_t{chunk} * kChunk * kvd;
    const uint16_t* vp = v_src + int64_t{chunk} * kChunk * kvd;
#pragma unroll
    for (int i = 0; i < kChunk / Copy::kQkStep; ++i) {
      const bool valid = qk_row0 + i * Copy::kQkStep < rows;
      const uint32_t dst = qk_off + i * Copy::kQkStep * 128;
      CpAsync16(st + Shape::kQTile + dst, valid ? qp : p.q, valid);
      CpAsync16(st + Shape::kKTile + dst, valid ? kp : p.k, valid);
      qp += q_step;
      kp += kv_step;
    }
#pragma unroll
    for (int i = 0; i < kChunk / Copy::kVStep; ++i) {
      const bool valid = v_row0 + i * Copy::kVStep < rows;
      CpAsync16(st + Shape::kVTile + v_off + i * Copy::kVStep * 64, valid ? vp : p.v, valid);
      vp += v_step;
    }
  };
  // Running maxima of the raw q and k norms (every warp keeps them), from the initial state's. They
  // scale kOnePlusXMaxNorm's features and go into the final state; without either use the
  // norms are not computed (out does not change by a bit).
  const bool lifted = p.feature_map == static_cast<int>(LinearFeatureMap::kOnePlusXMaxNorm);
  const bool norms = lifted || fin != nullptr;
  float run_q = init != nullptr ? init[layout.q_norm_offset + g_in_group] : 0.0f;
  float run_k = init != nullptr ? init[layout.k_norm_offset] : 0.0f;
  if (records != nullptr) {  // the earlier segments' maxima (int-ordered bits; INT_MIN: none)
    const int* scalars = reinterpret_cast<const int*>(records + CoreRecord::kSegmentSumFloats);
    run_q = fmaxf(run_q, __int_as_float(max(scalars[0], 0)));
    run_k = fmaxf(run_k, __int_as_float(max(scalars[1], 0)));
  }
  auto row_arrays = [&](int chunk) {
    return reinterpret_cast<float*>(smem + Shape::kRows) + (chunk & 1) * Shape::kRowArrays * kChunk;
  };
  // Norms, row scalars and feature map of a chunk whose copies this thread has waited for.
  auto prepare_chunk = [&](int chunk) {
    uint8_t* st = smem + (chunk & 1) * Shape::kStageBytes;
    float* rv = row_arrays(chunk);
    const int rows = rows_of(chunk);
    float q_scale[kChunk / Copy::kQkStep];  // kOnePlusXMaxNorm: 2^-e of this thread's rows
    if (norms) {
      if (fp16) {
        RowNorms<kD, true>(st, qk_off, qk_row0, qk_cc == 0, rv, rv + kChunk);
      } else {
        RowNorms<kD, false>(st, qk_off, qk_row0, qk_cc == 0, rv, rv + kChunk);
      }
      __syncthreads();
      // Every warp scans the chunk's norms (rows 2 lane, 2 lane + 1 per lane): inclusive running
      // maxima continuing the carried ones, and the row scalars they give; warp 0 stores them
      // for the epilogue, each thread takes the q scales of its own rows by shuffles (one barrier
      // per chunk, where a scan by one warp needed two).
      const RunningNorms m = ScanRunningNorms(rv[2 * lane], rv[2 * lane + 1],
                                              rv[kChunk + 2 * lane], rv[kChunk + 2 * lane + 1],
                                              run_q, run_k);
      float scale_pair[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 2 * lane + h;
        const RowScalars rs = MaxNormRowScalars(h ? m.q1 : m.q0, h ? m.k1 : m.k0, lifted);
        scale_pair[h] = rs.q_scale;
        if (warp == 0) {
          rv[2 * kChunk + r] = rs.a;
          rv[3 * kChunk + r] = rs.b;
          rv[4 * kChunk + r] = rs.c;
          rv[5 * kChunk + r] = rs.alpha;
        }
      }
#pragma unroll
      for (int i = 0; i < kChunk / Copy::kQkStep; ++i) {
        const int r = qk_row0 + i * Copy::kQkStep;
        const float s0 = __shfl_sync(0xffffffffu, scale_pair[0], r / 2);
        const float s1 = __shfl_sync(0xffffffffu, scale_pair[1], r / 2);
        q_scale[i] = r % 2 ? s1 : s0;
      }
    }
    if (lifted) {
      if (fp16) {
        TransformOwnChunks<kD, true, false, true>(st, qk_off, qk_row0, v_off, rows, q_scale);
      } else {
        TransformOwnChunks<kD, false, false, true>(st, qk_off, qk_row0, v_off, rows, q_scale);
      }
    } else if (fp16) {
      if (elu) {
        TransformOwnChunks<kD, true, true, false>(st, qk_off, qk_row0, v_off, rows, q_scale);
      } else {
        TransformOwnChunks<kD, true, false, false>(st, qk_off, qk_row0, v_off, rows, q_scale);
      }
    } else if (elu) {
      TransformOwnChunks<kD, false, true, false>(st, qk_off, qk_row0, v_off, rows, q_scale);
    }  // bf16 identity: the copies are the operands (rows past the sequence zero-filled)
  };
  if (c_begin < c_end) issue_loads(c_begin);
  CpAsyncCommit();
  if (c_begin + 1 < c_end) issue_loads(c_begin + 1);
  CpAsyncCommit();

  // ---- the state in registers, in the accumulator layouts of the products that update it ----
  // sacc[mb]: S rows 64 mb + 16 wi + g (+8) of this warpgroup's 32 columns; zacc[mb]: column 0 =
  // z of the same rows; vsum: column 0 = V's sum over block column 16 wi + g (+8). Both
  // warpgroups compute z and V's sum (a few m64n8 steps); warpgroup 0 keeps them.
  float sacc[kPanels][16], zacc[kPanels][4], vsum[4];
#pragma unroll
  for (int mb = 0; mb < kPanels; ++mb) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int f = 64 * mb + 16 * wi + g + ((i & 2) ? 8 : 0);
      const int col = 8 * (i / 4) + c2 + (i & 1);
      sacc[mb][i] = init != nullptr ? init[layout.s_offset + int64_t{f} * kD + wcol0 + col] : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int f = 64 * mb + 16 * wi + g + (e >= 2 ? 8 : 0);
      zacc[mb][e] = init != nullptr && c2 == 0 && (e & 1) == 0 ? init[layout.z_offset + f] : 0.0f;
    }
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int vc = 16 * wi + g + (e >= 2 ? 8 : 0);
    vsum[e] = init != nullptr && c2 == 0 && (e & 1) == 0
                  ? init[layout.v_sum_offset + col0 + vc]
                  : 0.0f;
  }
  if (records != nullptr) {  // plus the earlier segments' sums
    const float* own = records + wg * CoreRecord::kSegmentRecordFloats;
#pragma unroll
    for (int mb = 0; mb < kPanels; ++mb) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int f = 64 * mb + 16 * wi + g + ((i & 2) ? 8 : 0);
        sacc[mb][i] += own[CoreRecord::RecordIndexOfState(f, 8 * (i / 4) + c2 + (i & 1))];
      }
      if (c2 == 0) {
        const int f = 64 * mb + 16 * wi + g;
        zacc[mb][0] += own[CoreRecord::RecordIndexOfState(f, kWgCols)];
        zacc[mb][2] += own[CoreRecord::RecordIndexOfState(f + 8, kWgCols)];
      }
    }
    if (c2 == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int vc = 16 * wi + g + 8 * h;  // block column: the record of its slice
        vsum[2 * h] += records[(vc / kWgCols) * CoreRecord::kSegmentRecordFloats +
                               CoreRecord::RecordIndexOfB(vc % kWgCols)];
      }
    }
  }

  // Constant operands: [z_hi, z_lo] rows 2..7 of both buffers and the ones matrix's rows 1..7
  // are zero.
  for (int i = tid; i < (2 * Shape::kStateBuffer + 1024) / 16; i += kSm90Threads) {
    reinterpret_cast<uint4*>(smem + Shape::kState)[i] = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();
  if (tid < 8) {  // row 0 of the ones matrix: 64 bf16 ones (its 16-byte chunks unswizzled)
    reinterpret_cast<uint4*>(smem + Shape::kOnes)[tid] =
        make_uint4(0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u);
  }
  // The state's shared copy into buffer b (read by the next chunk's batch 1, and V's sum by its
  // epilogue).
  auto store_state = [&](int b) {
    uint8_t* buffer = smem + Shape::kState + b * Shape::kStateBuffer;
    if (lifted && wg == 0 && c2 == 0) {
      reinterpret_cast<float*>(buffer + Shape::kB)[16 * wi + g] = vsum[0];
      reinterpret_cast<float*>(buffer + Shape::kB)[16 * wi + g + 8] = vsum[2];
    }
#pragma unroll
    for (int mb = 0; mb < kPanels; ++mb) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int f = 64 * mb + 16 * wi + g + 8 * h;
          uint32_t hi, lo;
          SplitBf16(sacc[mb][4 * j + 2 * h], sacc[mb][4 * j + 2 * h + 1], hi, lo);
          const uint32_t off = wg * Shape::kSPanel + Swizzled64(f, j) + c2 * 2;
          *reinterpret_cast<uint32_t*>(buffer + Shape::kSHi + off) = hi;
          *reinterpret_cast<uint32_t*>(buffer + Shape::kSLo + off) = lo;
        }
      }
      if (wg == 0 && c2 == 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int f = 64 * mb + 16 * wi + g + 8 * h;
          const float z = zacc[mb][2 * h];
          const __nv_bfloat16 z_hi = __float2bfloat16_rn(z);
          const __nv_bfloat16 z_lo = __float2bfloat16_rn(z - __bfloat162float(z_hi));
          // Rows 0 and 1 of the K-major operand; feature f is column f % 64 of panel f / 64.
          uint8_t* zb = buffer + Shape::kZ + (f / 64) * 1024 + (f % 8) * 2;
          *reinterpret_cast<__nv_bfloat16*>(zb + Swizzled128(0, (f % 64) / 8)) = z_hi;
          *reinterpret_cast<__nv_bfloat16*>(zb + Swizzled128(1, (f % 64) / 8)) = z_lo;
        }
      }
    }
  };
  store_state(0);
  if (c_begin < c_end) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");  // the first chunk's copies
    prepare_chunk(c_begin);
  }
  wgmma::FenceSharedForAsyncProxy();
  __syncthreads();

  const int r_lo = 16 * wi + g, r_hi = r_lo + 8;  // this thread's rows of a chunk's outputs
  uint16_t* out_s = reinterpret_cast<uint16_t*>(smem + Shape::kOut);
  // Descriptors at stage 0 / state buffer 0; a chunk advances them by its uniform offsets.
  const uint64_t q_desc = Rows128(base + Shape::kQTile);
  const uint64_t k_desc = Rows128(base + Shape::kKTile);
  const uint64_t v_desc = MnMajor64(base + Shape::kVTile + wg * Shape::kVPanel, Shape::kVPanel);
  const uint64_t v_both_desc = MnMajor64(base + Shape::kVTile, Shape::kVPanel);  // A = V^T
  const uint64_t s_desc = MnMajor64(base + Shape::kState + wg * Shape::kSPanel, Shape::kSPanel);
  const uint64_t z_desc = Rows128(base + Shape::kState + Shape::kZ);
  const uint64_t ones_desc = Rows128(base + Shape::kOnes);
  float o[16], pacc[32], dacc[4];

  // c: the chunk in the sequence (its stage and row arrays by parity); n: the step of this walk
  // (the state buffer by parity).
  for (int c = c_begin, n = 0; c < c_end; ++c, ++n) {
    const int rows = rows_of(c);
    const uint32_t stage = (c & 1) * Shape::kStageBytes;
    const uint32_t state = (n & 1) * Shape::kStateBuffer;
#pragma unroll
    for (int mb = 0; mb < kPanels; ++mb) {
      wgmma::KeepOrder<16>(sacc[mb]);
      wgmma::KeepOrder<4>(zacc[mb]);
    }
    wgmma::KeepOrder<4>(vsum);
    wgmma::Fence();
    // Batch 1: O = Q' (S_hi + S_lo), D = Q' [z_hi, z_lo], P = Q' K'^T.
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      const uint32_t k_step = (kk / 4) * Shape::kPanel + (kk % 4) * 32;
      const uint64_t a = Advance(q_desc, stage + k_step);
      const uint64_t s_hi = Advance(s_desc, state + Shape::kSHi + kk * 1024);
      const uint64_t s_lo = Advance(s_desc, state + Shape::kSLo + kk * 1024);
      const uint64_t zb = Advance(z_desc, state + (kk / 4) * 1024 + (kk % 4) * 32);
      const uint64_t kb = Advance(k_desc, stage + k_step);
      if (kk == 0) {
        wgmma::Ss<32, 0, 1>::First(o, a, s_hi);
        wgmma::Ss<8, 0, 0>::First(dacc, a, zb);
        wgmma::Ss<64, 0, 0>::First(pacc, a, kb);
      } else {
        wgmma::Ss<32, 0, 1>::Next(o, a, s_hi);
        wgmma::Ss<8, 0, 0>::Next(dacc, a, zb);
        wgmma::Ss<64, 0, 0>::Next(pacc, a, kb);
      }
      wgmma::Ss<32, 0, 1>::Next(o, a, s_lo);
    }
    wgmma::Commit();
    // Batch 2: S += K'^T V, z += K'^T 1 and V's sum (the final state's).
#pragma unroll
    for (int kt = 0; kt < kChunk / 16; ++kt) {
      const uint64_t vb = Advance(v_desc, stage + kt * 1024);
      const uint64_t ones = Advance(ones_desc, kt * 32);
#pragma unroll
      for (int mb = 0; mb < kPanels; ++mb) {
        const uint64_t a = Advance(k_desc, stage + mb * Shape::kPanel + kt * 2048);
        wgmma::Ss<32, 1, 1>::Next(sacc[mb], a, vb);
        wgmma::Ss<8, 1, 0>::Next(zacc[mb], a, ones);
      }
      // A = V^T over the block's 64 columns: the two panels.
      wgmma::Ss<8, 1, 0>::Next(vsum, Advance(v_both_desc, stage + kt * 1024), ones);
    }
    wgmma::Commit();
    // The next chunk's feature map while the tensor cores work (its copies were issued a chunk
    // ago, into the other stage).
    if (c + 1 < c_end) {
      CpAsyncWaitAll();
      prepare_chunk(c + 1);
    }
    wgmma::Wait<1>();
    wgmma::KeepOrder<16>(o);
    wgmma::KeepOrder<32>(pacc);
    wgmma::KeepOrder<4>(dacc);

    // kOnePlusXMaxNorm: w_ij = alpha_i s_ij + 1 on the keys i sees (alpha = c 2^e, the features
    // being q 2^-e and raw k), and the inter-chunk terms alpha_i (Q' S) + B, alpha_i (Q' . z) + n
    // with B, n = V's sum and the count of the earlier tokens.
    const float* rv = row_arrays(c);
    float alpha_lo = 1.0f, alpha_hi = 1.0f, count_before = 0.0f;
    if (lifted) {
      alpha_lo = rv[5 * kChunk + r_lo];
      alpha_hi = rv[5 * kChunk + r_hi];
      count_before = (init != nullptr ? init[layout.count_offset] : 0.0f) +
                     static_cast<float>(int64_t{c} * kChunk);
      const float* b_sum = reinterpret_cast<const float*>(
          smem + Shape::kState + (n & 1) * Shape::kStateBuffer + Shape::kB) + wg * kWgCols;
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        o[i] = ((i & 2) ? alpha_hi : alpha_lo) * o[i] + b_sum[8 * (i / 4) + c2 + (i & 1)];
      }
#pragma unroll
      for (int i = 0; i < 32; ++i) {
        const int col = 8 * (i / 4) + c2 + (i & 1);
        const int row = (i & 2) ? r_hi : r_lo;
        pacc[i] = col <= row && col < rows ? ((i & 2) ? alpha_hi : alpha_lo) * pacc[i] + 1.0f
                                           : 0.0f;
      }
    }
    // Scores past the diagonal drop out; the intra-chunk denominator is the masked row sum. Warp
    // wi's rows are 16 wi..16 wi + 15: key step kt < wi lies below the diagonal (no mask), kt == wi
    // crosses it, kt > wi is above it (zero), a warp-uniform choice.
    float den_lo = 0.0f, den_hi = 0.0f;
    uint32_t ph[4][4], pl[4][4];  // A fragments of P per 16-key step, hi + lo
#pragma unroll
    for (int kt = 0; kt < 4; ++kt) {
      if (kt > wi) {
#pragma unroll
        for (int r = 0; r < 4; ++r) ph[kt][r] = pl[kt][r] = 0u;
        continue;
      }
      if (kt == wi) {
#pragma unroll
        for (int i = 8 * kt; i < 8 * kt + 8; ++i) {
          const int col = 8 * (i / 4) + c2 + (i & 1);
          if (col > ((i & 2) ? r_hi : r_lo)) pacc[i] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        // r: (row g, keys c2..), (row g + 8, keys c2..), (row g, keys 8 + c2..), (row g + 8, ...)
        const int i = 8 * kt + 4 * (r / 2) + 2 * (r % 2);
        if (r % 2) {
          den_hi += pacc[i] + pacc[i + 1];
        } else {
          den_lo += pacc[i] + pacc[i + 1];
        }
        SplitBf16(pacc[i], pacc[i + 1], ph[kt][r], pl[kt][r]);
      }
    }
    wgmma::Fence();
    // Batch 3: O += P V (hi + lo).
#pragma unroll
    for (int kt = 0; kt < kChunk / 16; ++kt) {
      const uint64_t vb = Advance(v_desc, stage + kt * 1024);
      wgmma::Rs<32>::Next(o, ph[kt], vb);
      wgmma::Rs<32>::Next(o, pl[kt], vb);
    }
    wgmma::Commit();
    den_lo += __shfl_xor_sync(0xffffffffu, den_lo, 1);
    den_lo += __shfl_xor_sync(0xffffffffu, den_lo, 2);
    den_hi += __shfl_xor_sync(0xffffffffu, den_hi, 1);
    den_hi += __shfl_xor_sync(0xffffffffu, den_hi, 2);
    den_lo += alpha_lo * __shfl_sync(0xffffffffu, dacc[0] + dacc[1], lane & ~3) + count_before;
    den_hi += alpha_hi * __shfl_sync(0xffffffffu, dacc[2] + dacc[3], lane & ~3) + count_before;
    wgmma::Wait<0>();
    wgmma::KeepOrder<16>(o);
#pragma unroll
    for (int mb = 0; mb < kPanels; ++mb) {
      wgmma::KeepOrder<16>(sacc[mb]);
      wgmma::KeepOrder<4>(zacc[mb]);
    }
    wgmma::KeepOrder<4>(vsum);

    // ---- epilogue: row stats, out (staged per warp for 16-byte stores), out's residual ----
    const int64_t t0 = first + int64_t{c} * kChunk;
    if (p.stats != nullptr && slice == 0 && wg == 0 && c2 == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = h ? r_hi : r_lo;
        if (r < rows) {  // {den, a, b, c}: a, b, c are 1 for the other maps
          reinterpret_cast<float4*>(p.stats)[(t0 + r) * hq + head] =
              lifted ? make_float4(h ? den_hi : den_lo, rv[2 * kChunk + r], rv[3 * kChunk + r],
                                   rv[4 * kChunk + r])
                     : make_float4(h ? den_hi : den_lo, 1.0f, 1.0f, 1.0f);
        }
      }
    }
    // One reciprocal per row instead of a division per element.
    const float inv_lo = p.normalize ? 1.0f / den_lo : 1.0f;
    const float inv_hi = p.normalize ? 1.0f / den_hi : 1.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = h ? r_hi : r_lo;
        const float inv = h ? inv_hi : inv_lo;
        const float y0 = o[4 * j + 2 * h] * inv, y1 = o[4 * j + 2 * h + 1] * inv;
        const uint16_t b0 = FloatToBits(y0, fp16), b1 = FloatToBits(y1, fp16);
        *reinterpret_cast<uint32_t*>(out_s + r * Shape::kOutStride + wg * kWgCols + 8 * j + c2) =
            static_cast<uint32_t>(b0) | (static_cast<uint32_t>(b1) << 16);
        if (p.out_residual != nullptr && r < rows) {
          const uint32_t res =
              static_cast<uint32_t>(FloatToBits(y0 - BitsToFloat(b0, fp16), fp16)) |
              (static_cast<uint32_t>(FloatToBits(y1 - BitsToFloat(b1, fp16), fp16)) << 16);
          *reinterpret_cast<uint32_t*>(p.out_residual + (t0 + r) * qd + int64_t{head} * kD +
                                       wcol0 + 8 * j + c2) = res;
        }
      }
    }
    __syncwarp();
    uint16_t* out_base = p.out + int64_t{head} * kD + wcol0;
#pragma unroll
    for (int i = lane; i < 16 * 4; i += 32) {  // this warp's 16 rows x 32 columns
      const int r = 16 * wi + i / 4;
      if (r < rows) {
        *reinterpret_cast<uint4*>(out_base + (t0 + r) * qd + (i % 4) * 8) =
            *reinterpret_cast<const uint4*>(out_s + r * Shape::kOutStride + wg * kWgCols +
                                            (i % 4) * 8);
      }
    }
    store_state((n + 1) & 1);  // its last reader, chunk n - 1's batch 1, finished before (A)
    wgmma::FenceSharedForAsyncProxy();
    __syncthreads();  // (A) the next chunk's tiles and state are ready; this chunk's stage is free
    if (c + 2 < c_end) issue_loads(c + 2);
    CpAsyncCommit();
  }

  // ---- the final state ----
  if (fin == nullptr) return;
  if (kv_writer) {
#pragma unroll
    for (int mb = 0; mb < kPanels; ++mb) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int f = 64 * mb + 16 * wi + g + ((i & 2) ? 8 : 0);
        const int col = 8 * (i / 4) + c2 + (i & 1);
        fin[layout.s_offset + int64_t{f} * kD + wcol0 + col] = sacc[mb][i];
      }
      if (slice == 0 && wg == 0 && c2 == 0) {
        fin[layout.z_offset + 64 * mb + 16 * wi + g] = zacc[mb][0];
        fin[layout.z_offset + 64 * mb + 16 * wi + g + 8] = zacc[mb][2];
      }
    }
    if (wg == 0 && c2 == 0) {
      fin[layout.v_sum_offset + col0 + 16 * wi + g] = vsum[0];
      fin[layout.v_sum_offset + col0 + 16 * wi + g + 8] = vsum[2];
    }
    if (slice == 0) {
      if (tid == 0) {
        fin[layout.count_offset] =
            (init != nullptr ? init[layout.count_offset] : 0.0f) + static_cast<float>(len);
        fin[layout.k_norm_offset] = run_k;  // warp 0's running maxima, from the initial state's
      }
      // Padding is copied through.
      for (int64_t i = layout.q_norm_offset + p.group + tid; i < layout.stride; i += kSm90Threads) {
        fin[i] = init != nullptr ? init[i] : 0.0f;
      }
    }
  }
  if (slice == 0 && tid == 0) fin[layout.q_norm_offset + g_in_group] = run_q;
#else
  __trap();  // never launched: Sm90ForwardServes requires the sm_90a code
#endif
}

template <int kD>
cudaError_t LaunchSm90Forward(const CoreParams& p, cudaStream_t stream) {
  static std::mutex mutex;
  static bool ready[kMaxDevices] = {};
  CoreParams copy = p;
  void* args[] = {&copy};
  const int grid_z =
      p.seg_first != nullptr
          ? static_cast<int>(MaxSegments(p.num_seqs, p.total_tokens, p.segment_chunks))
          : p.num_seqs;
  return LaunchWithSmem(LinearForwardSm90Kernel<kD>, mutex, ready,
                        dim3(kD / kSm90Cols, p.num_q_heads, grid_z), dim3(kSm90Threads),
                        Sm90Shape<kD>::kSmemBytes, stream, args);
}

// Whether the current device runs the kernel's sm_90a code (not another image of the build).
template <int kD>
bool Sm90CodeRuns() {
  static std::mutex mutex;
  static int state[kMaxDevices] = {};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return false;
  std::lock_guard<std::mutex> lock(mutex);
  if (state[device] == 0) {
    cudaFuncAttributes attrs;
    const bool runs =
        cudaFuncGetAttributes(&attrs, reinterpret_cast<const void*>(LinearForwardSm90Kernel<kD>)) ==
            cudaSuccess &&
        attrs.binaryVersion == 90;
    if (!runs) (void)cudaGetLastError();  // a missing image is an answer, not a sticky error
    state[device] = runs ? 1 : 2;
  }
  return state[device] == 1;
}

}  // namespace

// The max-norm map at d = 64 in segments stays on the core: there one block walks all 64 columns
// here against the core's two, and the running norms' barrier weighs more (H100, N = 8192, B = 1,
// 2, 4: forward 0.167 / 0.288 / 0.525 ms here against 0.135 / 0.233 / 0.426 ms on the core).
bool Sm90ForwardServes(const LinearAttentionConfig& c, bool segmented) {
  if (segmented && c.head_dim == 64 && c.feature_map == LinearFeatureMap::kOnePlusXMaxNorm) {
    return false;
  }
  switch (c.head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return Sm90CodeRuns<64>();
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return Sm90CodeRuns<128>();
#endif
    default:
      return false;
  }
}

// Measured on the H100 (N = 8192, H = 16, forward ms, bench/RESULTS.md): elu + 1 unsplit here
// against the core's segments with 64 blocks on 132 SMs: d = 128, B = 2 0.55 against 0.72, d = 64,
// B = 4 0.40 against 0.43; with 32 blocks the segments win (d = 128, B = 1: 0.56 against 0.38;
// d = 64, B = 2: 0.41 against 0.24), and for kOnePlusXMaxNorm, whose running norms cost a barrier
// per chunk here, at 64 blocks too (d = 128, B = 2: 0.77 against 0.69). So: a grid of at least a
// third of the SMs, maps without running norms.
bool Sm90ForwardOutrunsSegments(const LinearAttentionConfig& c, int64_t total_tokens) {
  if (c.feature_map == LinearFeatureMap::kOnePlusXMaxNorm || total_tokens <= 0) return false;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return false;
  }
  const int64_t grid = int64_t{c.head_dim / kSm90Cols} * c.num_q_heads * c.num_seqs;
  return 3 * grid >= sms;
}

cudaError_t RunSm90Forward(const CoreParams& p, int head_dim, cudaStream_t stream) {
  if (p.num_seqs == 0 || p.num_q_heads == 0) return cudaSuccess;
  switch (head_dim) {
#ifdef FERRY_LINEAR_HEAD_DIM_64
    case 64:
      return LaunchSm90Forward<64>(p, stream);
#endif
#ifdef FERRY_LINEAR_HEAD_DIM_128
    case 128:
      return LaunchSm90Forward<128>(p, stream);
#endif
    default:
      return cudaErrorNotSupported;
  }
}

}  // namespace ferry::kernels::linear_cuda
