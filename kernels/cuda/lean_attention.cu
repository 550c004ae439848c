// LeanAttention decode kernel (stream-K over the batch's KV tiles), its launcher and workspace.
// Contract and schedule: ferry/kernels/lean_attention.h. Design notes for readers of the code:
//
// * One block = kGroups position groups of kDSplit warps; a tile is kGroups * 16 consecutive KV
//   positions of one (sequence, KV head); group g owns positions [16g, 16g + 16) of each tile
//   and keeps its own online-softmax state over them; the groups' states are merged through
//   shared memory once per head segment.
// * The GQA group is the M dimension of mma.sync m16n8k16: one K/V load serves every q head of
//   the group. Groups of <= 8 use rows r and r + 8 for the hi and lo halves of q (and of the
//   softmax weights), so the tensor cores see ~16 mantissa bits where a plain 16-bit q would see
//   8 (bf16); the two rows' accumulators sit in the same thread, so the sum is free.
// * K/V tiles stream through a multi-stage cp.async ring (16-byte copies, zero-fill past the
//   range so no garbage reaches the tensor cores, XOR-swizzled rows so ldmatrix is
//   conflict-free). The pipeline runs across head boundaries: a block's loads never stall on
//   the end of a head.
// * q is float32 in global memory; the next head's q is prefetched into registers while the
//   current head streams, so the head switch costs two barriers and no global-latency stall.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>

#include <cub/block/block_scan.cuh>

#include "ferry/kernels/attention_state.h"
#include "ferry/kernels/lean_attention.h"
#include "ferry/kernels/lean_schedule.h"
#include "ferry/kernels/mma_sm80.cuh"

namespace ferry::kernels {
namespace {

using mma::CpAsync16;
using mma::CpAsyncCommit;
using mma::LdMatrixX4;
using mma::LdMatrixX4Trans;
using mma::SmemAddr;
using mma::SwizzledOffset;

constexpr int kMaxGroup = 16;  // one m16 MMA tile of q rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kHeadDim>
struct LeanConfig {
  // Warps come in position groups of kDSplit warps: a group owns 16 positions of a tile and
  // each of its warps accumulates head_dim / kDSplit output columns (both compute the group's
  // scores; the duplicated q.K MMAs are cheap next to the latency they hide).
  // d <= 128: 4 warps, no split: stages small enough that two blocks share an SM (independent
  // barriers). d = 256: 128 accumulators per thread and 64 KB stages allow one block of 4 warps,
  // too few to hide latency (0.67 of read bandwidth); splitting the columns over warp pairs
  // gives 8 warps with 64 accumulators each.
  // (Measured on the H100: d=256 went from 0.67 to 0.95 of read bandwidth with the split;
  // d=128 with the split and two blocks per SM was capped at 128 registers, spilled, and fell
  // from 0.91 to 0.65.)
  static constexpr int kDSplit = kHeadDim == 256 ? 2 : 1;
  static constexpr int kGroups = 4;  // position groups
  static constexpr int kWarps = kGroups * kDSplit;
  static constexpr int kMinBlocks = 1;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kTile = kGroups * 16;  // KV positions per tile
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of a K or V row
  static constexpr int kStageBytes = 2 * kTile * kHeadDim * 2;  // K tile + V tile
  static constexpr int kQfragBytes = kHeadDim / 16 * 32 * 16;  // one uint4 per (k-step, lane)
  // q's A-operand fragments (one uint4 per (k-step, lane)) each thread builds per head.
  static constexpr int kQFragsPerThread = (kHeadDim / 16 * 32 + kThreads - 1) / kThreads;
  // d = 64 streams best with 3 stages: against 3, 6 stages ran 2-3.5% slower on the H100, 4
  // about 0.7% slower and 2 about 5% slower (one-page tiles; bench/RESULTS.md).
  static constexpr int kMaxStages = kHeadDim == 64 ? 3 : 4;
  static_assert(kChunksPerRow >= 8, "swizzle needs 8 chunks per row");
  // The end-of-head merge of the warps' states reuses a consumed stage as scratch.
  static_assert(kGroups * 16 * kHeadDim * 4 <= kStageBytes, "scratch must fit a stage");
};

// Waits until at most n groups are pending. n is a run-time value (the stage count is picked
// per device), the instruction needs an immediate.
__device__ __forceinline__ void CpAsyncWaitPending(int n) {
  switch (n) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
  }
}

__device__ __forceinline__ void FenceAcqRelGpu() {
  asm volatile("fence.acq_rel.gpu;\n" ::: "memory");
}

struct LeanParams {
  DecodeAttentionArgs args;
  int32_t* error_word;
  int32_t* counters;  // (num_seqs * num_kv_heads): arrivals per split head, zero between launches
  float* part_o;      // (grid, 2, group, head_dim)
  float* part_lse;    // (grid, 2, group)
  int group;
  int stages;
  int block_shift;  // log2(block_size) when a power of two, else -1
  float q_scale;  // softmax_scale * log2(e): scores are kept in base 2
};

struct SeqRange {
  int64_t begin;
  int64_t end;
  bool valid;
};

// The one place the kernel interprets a sequence's lengths; an inconsistent sequence is invalid
// and gets no tiles (its state is NaN, see WriteEmptySequence).
__device__ __forceinline__ SeqRange LoadSeqRange(const DecodeAttentionArgs& a, int s) {
  const int64_t first = a.block_table_indptr[s];
  const int64_t last = a.block_table_indptr[s + 1];
  const int64_t len = a.seq_lens[s];
  const int64_t begin = a.kv_begin != nullptr ? a.kv_begin[s] : 0;
  const int64_t end = a.kv_end != nullptr ? a.kv_end[s] : len;
  const bool valid = last >= first && len >= 0 && len <= (last - first) * a.kv.block_size &&
                     begin >= 0 && end >= begin && end <= len;
  return {begin, end, valid};
}

// Walks the flat tile order forwards one tile at a time: (sequence, KV head, tile in head).
// Stepping is incremental so the per-tile cost is a few integer adds (a 64-bit division per
// tile was a measurable share of the instruction budget); a block divides once, at its start.
struct TileCursor {
  int s;
  int kv_head;
  int j;                   // tile within the head
  int tiles_per_head;
  int begin;               // positions, int32 like seq_lens
  int end;
  int64_t seq_first_tile;  // flat index of the sequence's first tile
  const int32_t* blocks;   // the sequence's block table row

  __device__ __forceinline__ void Load(const DecodeAttentionArgs& a, int tile_size) {
    const SeqRange r = LoadSeqRange(a, s);
    begin = static_cast<int>(r.begin);
    end = static_cast<int>(r.end);
    tiles_per_head = r.valid ? static_cast<int>(NumKvTiles(r.begin, r.end, tile_size)) : 0;
    blocks = a.block_table + a.block_table_indptr[s];
  }
  // Positions onto flat tile `tile` of sequence s (found by the block's scan).
  __device__ __forceinline__ void Start(const DecodeAttentionArgs& a, int tile_size, int seq,
                                        int64_t first_tile, int64_t tile) {
    s = seq;
    seq_first_tile = first_tile;
    Load(a, tile_size);
    const int64_t offset = tile - first_tile;
    kv_head = static_cast<int>(offset / tiles_per_head);
    j = static_cast<int>(offset - int64_t{kv_head} * tiles_per_head);
  }
  // Moves to the next tile; only called when one exists, so it never reads past the batch.
  __device__ __forceinline__ void Advance(const DecodeAttentionArgs& a, int tile_size) {
    if (++j < tiles_per_head) return;
    j = 0;
    if (++kv_head < a.kv.num_kv_heads) return;
    kv_head = 0;
    do {
      seq_first_tile += int64_t{a.kv.num_kv_heads} * tiles_per_head;
      ++s;
      Load(a, tile_size);
    } while (tiles_per_head == 0);  // sequences with empty or invalid ranges have no tiles
  }
};

// Identity state for every q head of a sequence with an empty range, NaN for an invalid one.
template <int kHeadDim, typename Traits>
__device__ void WriteEmptySequence(const LeanParams& p, int s, bool valid) {
  const DecodeAttentionArgs& a = p.args;
  using T = typename Traits::T;
  const float o = valid ? 0.0f : __int_as_float(0x7fc00000);
  const float lse = valid ? FERRY_EMPTY_LSE : __int_as_float(0x7fc00000);
  const int64_t n = int64_t{a.num_q_heads} * kHeadDim;
  const int64_t first = int64_t{s} * n;
  for (int64_t e = threadIdx.x; e < n; e += blockDim.x) {
    a.state_o[first + e] = o;
    if (a.out != nullptr) static_cast<T*>(a.out)[first + e] = Traits::FromFloat(o);
  }
  for (int h = threadIdx.x; h < a.num_q_heads; h += blockDim.x) {
    a.state_lse[int64_t{s} * a.num_q_heads + h] = lse;
  }
  if (!valid && threadIdx.x == 0) atomicOr(p.error_word, kLeanErrorBadRange);
}

// Worker that owns flat tile t when total tiles are dealt to num_workers (lean_schedule.h):
// the largest w with FirstTileOfWorker(total, num_workers, w) <= t.
__device__ __forceinline__ int64_t OwnerOfTile(int64_t t, int64_t total, int64_t num_workers) {
  return ((t + 1) * num_workers - 1) / total;
}

template <int kHeadDim, typename Traits>
__global__ void __launch_bounds__(LeanConfig<kHeadDim>::kThreads,
                                  LeanConfig<kHeadDim>::kMinBlocks)
    LeanDecodeKernel(const LeanParams p) {
  using Config = LeanConfig<kHeadDim>;
  using T = typename Traits::T;
  constexpr int kThreads = Config::kThreads;
  constexpr int kTile = Config::kTile;
  constexpr int kKSteps = kHeadDim / 16;
  constexpr int kGroups = Config::kGroups;
  constexpr int kDSplit = Config::kDSplit;
  constexpr int kDTiles = kHeadDim / 8 / kDSplit;  // n8 output tiles of this warp

  extern __shared__ __align__(128) uint8_t smem[];
  uint4* qfrag = reinterpret_cast<uint4*>(smem + p.stages * Config::kStageBytes);
  __shared__ float warp_max[kGroups][16];
  __shared__ float warp_sum[kGroups][16];
  __shared__ float row_lse[16];
  __shared__ int64_t found_seq_and_tile[2];
  __shared__ int is_last_arrival;
  using BlockScan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;

  const DecodeAttentionArgs& a = p.args;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int pgroup = warp / kDSplit;  // this warp's 16 positions of each tile
  const int dpart = warp % kDSplit;   // and its share of the output columns
  const int num_seqs = a.num_seqs;
  const int num_kv_heads = a.kv.num_kv_heads;
  const int group = p.group;
  const bool hi_lo = group <= 8;

  // --- Plan, on the GPU: total tiles, this block's range, the sequence it starts in. ---------
  int64_t total_tiles = 0;
  int64_t my_tiles = 0;       // tiles of this thread's sequence in the last chunk scanned
  int64_t my_first_tile = 0;  // and the flat index of its first tile
  for (int base = 0; base < num_seqs; base += kThreads) {
    const int s = base + tid;
    int64_t tiles = 0;
    if (s < num_seqs) {
      const SeqRange r = LoadSeqRange(a, s);
      tiles = r.valid ? num_kv_heads * NumKvTiles(r.begin, r.end, kTile) : 0;
    }
    int64_t exclusive, aggregate;
    BlockScan(scan_storage).ExclusiveSum(tiles, exclusive, aggregate);
    __syncthreads();
    my_tiles = tiles;
    my_first_tile = total_tiles + exclusive;
    total_tiles += aggregate;
  }
  // Sequences with no tiles are written here, spread over the blocks.
  for (int s = blockIdx.x; s < num_seqs; s += gridDim.x) {
    const SeqRange r = LoadSeqRange(a, s);
    if (!r.valid || r.end == r.begin) WriteEmptySequence<kHeadDim, Traits>(p, s, r.valid);
  }
  // Fewer tiles than blocks: the surplus blocks sit out, so every worker owns at least one tile
  // and the workers sharing a head are exactly owner(first tile) .. owner(last tile).
  const int64_t num_workers = total_tiles < gridDim.x ? total_tiles : int64_t{gridDim.x};
  if (blockIdx.x >= num_workers) return;
  const int64_t t0 = FirstTileOfWorker(total_tiles, num_workers, blockIdx.x);
  const int64_t t1 = FirstTileOfWorker(total_tiles, num_workers, blockIdx.x + 1);
  if (num_seqs <= kThreads) {
    // One chunk: each thread still holds its sequence's tiles, so the start needs no second
    // pass over the batch (on the launch's critical path: nothing streams before it).
    if (my_tiles > 0 && my_first_tile <= t0 && t0 < my_first_tile + my_tiles) {
      found_seq_and_tile[0] = tid;
      found_seq_and_tile[1] = my_first_tile;
    }
    __syncthreads();
  } else {
    int64_t running = 0;
    if (tid == 0) found_seq_and_tile[0] = -1;
    __syncthreads();
    for (int base = 0; base < num_seqs; base += kThreads) {
      const int s = base + tid;
      int64_t tiles = 0;
      if (s < num_seqs) {
        const SeqRange r = LoadSeqRange(a, s);
        tiles = r.valid ? num_kv_heads * NumKvTiles(r.begin, r.end, kTile) : 0;
      }
      int64_t exclusive, aggregate;
      BlockScan(scan_storage).ExclusiveSum(tiles, exclusive, aggregate);
      exclusive += running;
      if (tiles > 0 && exclusive <= t0 && t0 < exclusive + tiles) {
        found_seq_and_tile[0] = s;
        found_seq_and_tile[1] = exclusive;
      }
      running += aggregate;
      __syncthreads();
      if (found_seq_and_tile[0] >= 0) break;
    }
  }
  TileCursor start;
  start.Start(a, kTile, static_cast<int>(found_seq_and_tile[0]), found_seq_and_tile[1], t0);

  // q of the first head is loaded now, so its global latency overlaps the block-table read and
  // the first tile's copies instead of following them; later heads' q are loaded one segment
  // ahead (below). Each thread loads exactly the elements of the fragments it builds (fragment
  // e = (k-step e / 32, lane e % 32): rows r and r + 8, columns c, c + 1, c + 8, c + 9), so a
  // head switch builds them from registers with no staging through shared memory.
  // q_prefetch[i] = {row r cols c, c + 1; row r cols c + 8, c + 9; row r + 8 the same}; rows
  // past the group are zero (their scores are 0 and their outputs are dropped).
  float2 q_prefetch[Config::kQFragsPerThread][4];
  int64_t prefetched_head = -1;
  auto prefetch_q = [&](int64_t flat_head) {
    const float* src = a.q + flat_head * group * kHeadDim;
    const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < Config::kQFragsPerThread; ++i) {
      const int e = i * kThreads + tid;
      const int ln = e % 32;
      const int r = ln / 4;
      const float* row = src + r * kHeadDim + (e / 32) * 16 + 2 * (ln % 4);
      const bool live = e < kKSteps * 32 && r < group;
      const bool live8 = e < kKSteps * 32 && r + 8 < group;
      q_prefetch[i][0] = live ? __ldg(reinterpret_cast<const float2*>(row)) : zero;
      q_prefetch[i][1] = live ? __ldg(reinterpret_cast<const float2*>(row + 8)) : zero;
      q_prefetch[i][2] = live8 ? __ldg(reinterpret_cast<const float2*>(row + 8 * kHeadDim)) : zero;
      q_prefetch[i][3] =
          live8 ? __ldg(reinterpret_cast<const float2*>(row + 8 * kHeadDim + 8)) : zero;
    }
    prefetched_head = flat_head;
  };
  prefetch_q(int64_t{start.s} * num_kv_heads + start.kv_head);

  // --- K/V producer. -------------------------------------------------------------------------
  const T* k_pool = static_cast<const T*>(a.kv.k_pool);
  const T* v_pool = static_cast<const T*>(a.kv.v_pool);
  const int block_size = a.kv.block_size;
  const int num_blocks = a.kv.num_blocks;
  TileCursor producer = start;
  // Loads the producer cursor's tile; the caller advances the cursor.
  auto load_tile = [&](int stage) {
    const int kv_head = producer.kv_head;
    const int pos0 = producer.begin + producer.j * kTile;
    const int pos_end = producer.end;
    uint8_t* k_stage = smem + stage * Config::kStageBytes;
    const uint32_t k_dst = SmemAddr(k_stage);
    const uint32_t v_dst = k_dst + Config::kStageBytes / 2;
    auto block_index_of = [&](int pos) {
      return p.block_shift >= 0 ? pos >> p.block_shift
                                : static_cast<int>(static_cast<unsigned>(pos) /
                                                   static_cast<unsigned>(block_size));
    };
    const int first_page = block_index_of(pos0);
    const int last_pos = (pos0 + kTile < pos_end ? pos0 + kTile : pos_end) - 1;
    if (first_page == block_index_of(last_pos)) {
      // The tile lies in one page (pages of >= 64 positions and tile-aligned ranges: the common
      // case): one block-table read for the tile, and each thread's rows a fixed stride apart
      // (constant offsets from one address), instead of a lookup and a 64-bit address per row
      // (at d = 64 a third of the kernel's instructions). Measured on the H100: 1-2% faster.
      const int block = producer.blocks[first_page];
      const bool block_ok = block >= 0 && block < num_blocks;
      if (!block_ok && tid == 0) atomicOr(p.error_word, kLeanErrorBadBlock);
      constexpr int kRowStep = kThreads / Config::kChunksPerRow;  // rows between a thread's chunks
      static_assert(kThreads % Config::kChunksPerRow == 0 && kTile % kRowStep == 0);
      const int row0 = tid / Config::kChunksPerRow;
      const int col = tid % Config::kChunksPerRow;
      const int64_t offset =
          ((int64_t{block_ok ? block : 0} * num_kv_heads + kv_head) * block_size +
           (pos0 - first_page * block_size) + row0) * kHeadDim + col * 8;
      const T* k_src = k_pool + offset;
      const T* v_src = v_pool + offset;
      const int rows_valid = block_ok ? pos_end - pos0 : 0;
      if (rows_valid >= kTile) {  // every row: constant offsets, nothing to select
#pragma unroll
        for (int i = 0; i < kTile / kRowStep; ++i) {
          const uint32_t dst = SwizzledOffset<kHeadDim>(row0 + i * kRowStep, col);
          CpAsync16(k_dst + dst, k_src + i * kRowStep * kHeadDim, true);
          CpAsync16(v_dst + dst, v_src + i * kRowStep * kHeadDim, true);
        }
      } else {  // a head's last tile: rows past the range are zero-filled, never read
#pragma unroll
        for (int i = 0; i < kTile / kRowStep; ++i) {
          const bool valid = row0 + i * kRowStep < rows_valid;
          const uint32_t dst = SwizzledOffset<kHeadDim>(row0 + i * kRowStep, col);
          CpAsync16(k_dst + dst, valid ? k_src + i * kRowStep * kHeadDim : k_pool, valid);
          CpAsync16(v_dst + dst, valid ? v_src + i * kRowStep * kHeadDim : v_pool, valid);
        }
      }
      return;
    }
#pragma unroll
    for (int i = 0; i < kTile * Config::kChunksPerRow / kThreads; ++i) {
      const int chunk = tid + i * kThreads;
      const int row = chunk / Config::kChunksPerRow;
      const int col = chunk % Config::kChunksPerRow;
      const int pos = pos0 + row;
      bool valid = pos < pos_end;
      int64_t src = 0;
      if (valid) {
        const int block_index = block_index_of(pos);
        const int block = producer.blocks[block_index];
        if (block < 0 || block >= num_blocks) {
          valid = false;
          atomicOr(p.error_word, kLeanErrorBadBlock);
        } else {
          src = ((int64_t{block} * num_kv_heads + kv_head) * block_size +
                 (pos - block_index * block_size)) *
                    kHeadDim +
                col * 8;
        }
      }
      const uint32_t dst = SwizzledOffset<kHeadDim>(row, col);
      CpAsync16(k_dst + dst, k_pool + src, valid);
      CpAsync16(v_dst + dst, v_pool + src, valid);
    }
  };

  const int stages = p.stages;
  for (int i = 0; i < stages - 1; ++i) {
    if (t0 + i < t1) {
      if (i > 0) producer.Advance(a, kTile);
      load_tile(i);
    }
    CpAsyncCommit();
  }

  // --- Consumer state. -----------------------------------------------------------------------
  TileCursor consumer = start;
  float o_acc[kDTiles][4];
  float row_max[2];
  float row_sum[2];

  int stage_use = 0;
  int stage_load = stages - 1;
  for (int64_t t = t0; t < t1; ++t) {
    CpAsyncWaitPending(stages - 2);
    __syncthreads();

    if (t > t0) consumer.Advance(a, kTile);
    const int kv_head = consumer.kv_head;
    const int j = consumer.j;
    const int64_t flat_head = int64_t{consumer.s} * num_kv_heads + kv_head;
    const int64_t head_first_tile =
        consumer.seq_first_tile + int64_t{kv_head} * consumer.tiles_per_head;
    const int64_t head_last_tile = head_first_tile + consumer.tiles_per_head - 1;
    const bool segment_start = t == t0 || j == 0;
    const bool segment_end = t == t1 - 1 || t == head_last_tile;

    if (segment_start) {
      // Fragments of q (scaled) as the A operand (row-major m16 x k16 per k-step). Every warp
      // has passed this iteration's barrier, so none still reads the previous head's.
      if (prefetched_head != flat_head) prefetch_q(flat_head);
#pragma unroll
      for (int i = 0; i < Config::kQFragsPerThread; ++i) {
        const int e = i * kThreads + tid;
        if (e < kKSteps * 32) {
          const float x0 = q_prefetch[i][0].x * p.q_scale, x1 = q_prefetch[i][0].y * p.q_scale;
          const float x2 = q_prefetch[i][1].x * p.q_scale, x3 = q_prefetch[i][1].y * p.q_scale;
          uint4 frag;
          frag.x = Traits::Pack(x0, x1);
          frag.z = Traits::Pack(x2, x3);
          if (hi_lo) {
            frag.y = Traits::Pack(x0 - Traits::Rounded(x0), x1 - Traits::Rounded(x1));
            frag.w = Traits::Pack(x2 - Traits::Rounded(x2), x3 - Traits::Rounded(x3));
          } else {
            frag.y = Traits::Pack(q_prefetch[i][2].x * p.q_scale, q_prefetch[i][2].y * p.q_scale);
            frag.w = Traits::Pack(q_prefetch[i][3].x * p.q_scale, q_prefetch[i][3].y * p.q_scale);
          }
          qfrag[e] = frag;
        }
      }
      __syncthreads();
      if (head_last_tile < t1 - 1 && flat_head + 1 < int64_t{num_seqs} * num_kv_heads) {
        prefetch_q(flat_head + 1);
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o_acc[dt][0] = o_acc[dt][1] = o_acc[dt][2] = o_acc[dt][3] = 0.0f;
      }
      row_max[0] = row_max[1] = FERRY_EMPTY_LSE;
      row_sum[0] = row_sum[1] = 0.0f;
    }
    if (t + stages - 1 < t1) {
      producer.Advance(a, kTile);
      load_tile(stage_load);
    }
    CpAsyncCommit();
    if (++stage_load == stages) stage_load = 0;

    // --- S = q K^T over this warp's 16 positions. ---
    const uint8_t* k_stage = smem + stage_use * Config::kStageBytes;
    const uint32_t k_base = SmemAddr(k_stage);
    const uint32_t v_base = k_base + Config::kStageBytes / 2;
    // ldmatrix and mma are volatile asm, so they issue in program order: each fragment is
    // loaded one step ahead of its MMA (issue never waits on a load just made), and even and
    // odd k-steps accumulate separately (two dependent MMA chains of kKSteps / 2, not one).
    float s_acc[2][4];
    {
      float s_odd[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      float s_even[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
      const int row = pgroup * 16 + (lane & 7) + ((lane >> 4) << 3);
      const int chunk_half = (lane >> 3) & 1;
      uint32_t b[2][4];
      LdMatrixX4(b[0], k_base + SwizzledOffset<kHeadDim>(row, chunk_half));
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        if (ks + 1 < kKSteps) {
          LdMatrixX4(b[(ks + 1) & 1],
                     k_base + SwizzledOffset<kHeadDim>(row, 2 * (ks + 1) + chunk_half));
        }
        const uint4 qa = qfrag[ks * 32 + lane];
        const uint32_t a_frag[4] = {qa.x, qa.y, qa.z, qa.w};
        float (*acc)[4] = (ks & 1) ? s_odd : s_even;
        Traits::Mma(acc[0], a_frag, b[ks & 1][0], b[ks & 1][1]);
        Traits::Mma(acc[1], a_frag, b[ks & 1][2], b[ks & 1][3]);
      }
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s_acc[nt][i] = s_even[nt][i] + s_odd[nt][i];
      }
    }
    // The first V fragment loads while the softmax runs.
    const int v_row = pgroup * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
    const int v_chunk0 = 2 * dpart * (kDTiles / 2) + (lane >> 4);
    uint32_t vb[2][4];
    LdMatrixX4Trans(vb[0], v_base + SwizzledOffset<kHeadDim>(v_row, v_chunk0));
    if (hi_lo) {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        s_acc[nt][0] += s_acc[nt][2];
        s_acc[nt][1] += s_acc[nt][3];
        s_acc[nt][2] = s_acc[nt][0];
        s_acc[nt][3] = s_acc[nt][1];
      }
    }
    // Positions past the range (the tail of a head's last tile) drop out of the softmax. Only
    // the last tile can have them: the test is block-uniform and skips the masking elsewhere.
    if (j == consumer.tiles_per_head - 1) {
      const int tile_pos0 = consumer.begin + j * kTile + pgroup * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (tile_pos0 + nt * 8 + 2 * (lane % 4) + (i & 1) >= consumer.end) {
            s_acc[nt][i] = FERRY_EMPTY_LSE;
          }
        }
      }
    }
    // --- Online softmax per row (h = 0: row lane/4, h = 1: row lane/4 + 8). In hi/lo mode
    // both rows hold the same scores, so row h = 1 copies row 0's statistics. ---
    float probs[2][4];
    float alpha[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (h == 1 && hi_lo) {
        alpha[1] = alpha[0];
        row_sum[1] = row_sum[0];
        row_max[1] = row_max[0];
        break;
      }
      float m = fmaxf(fmaxf(s_acc[0][2 * h], s_acc[0][2 * h + 1]),
                      fmaxf(s_acc[1][2 * h], s_acc[1][2 * h + 1]));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
      const float new_max = fmaxf(row_max[h], m);
      // All positions so far masked: subtract 0 instead of -inf (no NaN from -inf - -inf).
      const float base = new_max == FERRY_EMPTY_LSE ? 0.0f : new_max;
      alpha[h] = exp2f(row_max[h] - base);
      float sum = 0.0f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        probs[nt][2 * h] = exp2f(s_acc[nt][2 * h] - base);
        probs[nt][2 * h + 1] = exp2f(s_acc[nt][2 * h + 1] - base);
        sum += probs[nt][2 * h] + probs[nt][2 * h + 1];
      }
      row_sum[h] = row_sum[h] * alpha[h] + sum;
      row_max[h] = new_max;
    }
    // Once the running max settles, alpha is 1 for every row of the warp: skip the rescale of
    // the D/2 accumulators (a sixth of the instructions of a tile).
    if (__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) {
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o_acc[dt][0] *= alpha[0];
        o_acc[dt][1] *= alpha[0];
        o_acc[dt][2] *= alpha[1];
        o_acc[dt][3] *= alpha[1];
      }
    }
    // --- O += P V. P as the A operand: k = this warp's 16 positions. ---
    uint32_t p_frag[4];
    p_frag[0] = Traits::Pack(probs[0][0], probs[0][1]);
    p_frag[2] = Traits::Pack(probs[1][0], probs[1][1]);
    if (hi_lo) {
      p_frag[1] = Traits::Pack(probs[0][0] - Traits::Rounded(probs[0][0]),
                               probs[0][1] - Traits::Rounded(probs[0][1]));
      p_frag[3] = Traits::Pack(probs[1][0] - Traits::Rounded(probs[1][0]),
                               probs[1][1] - Traits::Rounded(probs[1][1]));
    } else {
      p_frag[1] = Traits::Pack(probs[0][2], probs[0][3]);
      p_frag[3] = Traits::Pack(probs[1][2], probs[1][3]);
    }
#pragma unroll
    for (int dp = 0; dp < kDTiles / 2; ++dp) {
      if (dp + 1 < kDTiles / 2) {
        LdMatrixX4Trans(vb[(dp + 1) & 1],
                        v_base + SwizzledOffset<kHeadDim>(v_row, v_chunk0 + 2 * (dp + 1)));
      }
      Traits::Mma(o_acc[2 * dp], p_frag, vb[dp & 1][0], vb[dp & 1][1]);
      Traits::Mma(o_acc[2 * dp + 1], p_frag, vb[dp & 1][2], vb[dp & 1][3]);
    }

    if (segment_end) {
      // --- Merge the warps' states for this head segment. ---
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      }
      if (lane % 4 == 0 && dpart == 0) {  // a group's warps hold the same statistics
        warp_max[pgroup][lane / 4] = row_max[0];
        warp_max[pgroup][lane / 4 + 8] = row_max[1];
        warp_sum[pgroup][lane / 4] = row_sum[0];
        warp_sum[pgroup][lane / 4 + 8] = row_sum[1];
      }
      __syncthreads();
      float factor[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = lane / 4 + 8 * h;
        float block_max = FERRY_EMPTY_LSE;
#pragma unroll
        for (int w = 0; w < kGroups; ++w) block_max = fmaxf(block_max, warp_max[w][r]);
        float block_sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kGroups; ++w) {
          const float wm = warp_max[w][r];
          if (wm != FERRY_EMPTY_LSE) block_sum += warp_sum[w][r] * exp2f(wm - block_max);
        }
        factor[h] = row_max[h] == FERRY_EMPTY_LSE ? 0.0f
                                                  : exp2f(row_max[h] - block_max) / block_sum;
        if (warp == 0 && lane % 4 == 0) {
          row_lse[r] = block_sum > 0.0f ? (block_max + log2f(block_sum)) * kLn2
                                        : FERRY_EMPTY_LSE;
        }
      }
      // The stage just consumed is scratch until the next iteration's barrier: no copy in
      // flight targets it.
      float* scratch = reinterpret_cast<float*>(smem + stage_use * Config::kStageBytes);
      {
        const int r = lane / 4;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          const int col = (dpart * kDTiles + dt) * 8 + 2 * (lane % 4);
          float2* row0 = reinterpret_cast<float2*>(scratch + (pgroup * 16 + r) * kHeadDim + col);
          if (hi_lo) {
            *row0 = make_float2((o_acc[dt][0] + o_acc[dt][2]) * factor[0],
                                (o_acc[dt][1] + o_acc[dt][3]) * factor[0]);
          } else {
            *row0 = make_float2(o_acc[dt][0] * factor[0], o_acc[dt][1] * factor[0]);
            *reinterpret_cast<float2*>(scratch + (pgroup * 16 + r + 8) * kHeadDim + col) =
                make_float2(o_acc[dt][2] * factor[1], o_acc[dt][3] * factor[1]);
          }
        }
      }
      __syncthreads();

      const int64_t owner_first = OwnerOfTile(head_first_tile, total_tiles, num_workers);
      const int64_t owner_last = OwnerOfTile(head_last_tile, total_tiles, num_workers);
      const int64_t first_row = flat_head * group;  // == s * num_q_heads + kv_head * group
      T* out = static_cast<T*>(a.out);
      if (owner_first == owner_last) {
        for (int e = tid; e < group * kHeadDim; e += kThreads) {
          const int r = e / kHeadDim;
          const int d = e % kHeadDim;
          float v = 0.0f;
#pragma unroll
          for (int w = 0; w < kGroups; ++w) v += scratch[(w * 16 + r) * kHeadDim + d];
          a.state_o[first_row * kHeadDim + e] = v;
          if (out != nullptr) out[first_row * kHeadDim + e] = Traits::FromFloat(v);
        }
        if (tid < group) a.state_lse[first_row + tid] = row_lse[tid];
      } else {
        // Split head: publish this block's partial, then the last arrival merges all of them.
        const int slot = head_first_tile < t0 ? 0 : 1;
        const int64_t part = int64_t{blockIdx.x} * 2 + slot;
        for (int e = tid; e < group * kHeadDim; e += kThreads) {
          const int r = e / kHeadDim;
          const int d = e % kHeadDim;
          float v = 0.0f;
#pragma unroll
          for (int w = 0; w < kGroups; ++w) v += scratch[(w * 16 + r) * kHeadDim + d];
          p.part_o[part * group * kHeadDim + e] = v;
        }
        if (tid < group) p.part_lse[part * group + tid] = row_lse[tid];
        // The barrier makes the block's stores precede thread 0's release fence, and thread 0's
        // acquire fence precedes the merge's loads (a cooperative grid barrier's pattern); an
        // acquire-release fence suffices, a sequentially consistent one per thread
        // (__threadfence) is not needed.
        __syncthreads();
        if (tid == 0) {
          FenceAcqRelGpu();
          const int arrived = atomicAdd(p.counters + flat_head, 1);
          is_last_arrival = arrived == owner_last - owner_first;
          if (is_last_arrival) FenceAcqRelGpu();
        }
        __syncthreads();
        if (is_last_arrival) {
          // Merge the partials in block order (deterministic whichever block arrives last) with
          // attention_state.h's rule. Every part's lse and o are requested at once: the o with
          // cp.async into shared memory that no copy targets (the whole ring when this block
          // has no tile left to stream, else the stage just consumed), the lse with loads; the
          // rule's lse chain then runs while the o copies land. (Issuing the o loads a few parts
          // at a time after the chain cost an L2 round trip per few parts: a head split over 33
          // blocks, b1 hkv8, ended its launch 13-14 us after its last tile.)
          const bool ring_free = t == t1 - 1;
          float* buffer = ring_free ? reinterpret_cast<float*>(smem) : scratch;
          const int part_floats = group * kHeadDim;
          const int batch = (ring_free ? stages : 1) * Config::kStageBytes /
                            (4 * (part_floats + 2 * group));
          float* batch_o = buffer;                        // (batch, group, head_dim)
          float* scale_b = buffer + batch * part_floats;  // (batch, group): lse, then scale
          float* scale_a = scale_b + batch * group;       // (batch, group)
          const int num_vecs = part_floats / 4;
          const int num_parts = static_cast<int>(owner_last - owner_first + 1);
          // Workspace slot of part i: the first owner's partial is its second segment.
          auto part_slot = [&](int i) {
            const int64_t w = owner_first + i;
            return w * 2 + (w == owner_first ? 1 : 0);
          };
          constexpr int kLseLoads = 4;  // per thread in flight
          constexpr int kVecsPerThread = (kMaxGroup * kHeadDim / 4 + kThreads - 1) / kThreads;
          float4 o[kVecsPerThread];
#pragma unroll
          for (int k = 0; k < kVecsPerThread; ++k) o[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
          float lse = FERRY_EMPTY_LSE;  // row tid's running lse (tid < group)
          for (int base = 0; base < num_parts; base += batch) {
            const int n = num_parts - base < batch ? num_parts - base : batch;
            const int num_lse = n * group;
            auto load_lse = [&](int x) {
              return __ldcg(p.part_lse + part_slot(base + x / group) * group + x % group);
            };
            float lse_in[kLseLoads];
#pragma unroll
            for (int k = 0; k < kLseLoads; ++k) {
              const int x = k * kThreads + tid;
              lse_in[k] = x < num_lse ? load_lse(x) : FERRY_EMPTY_LSE;
            }
            {
              int i = 0, vec = tid;  // chunk tid + c * kThreads is (part i, vec), stepped
              while (vec >= num_vecs && i < n) vec -= num_vecs, ++i;
              for (; i < n;) {
                CpAsync16(SmemAddr(batch_o + i * part_floats + vec * 4),
                          p.part_o + part_slot(base + i) * part_floats + vec * 4, true);
                vec += kThreads;
                while (vec >= num_vecs && i < n) vec -= num_vecs, ++i;
              }
            }
            CpAsyncCommit();
#pragma unroll
            for (int k = 0; k < kLseLoads; ++k) {
              const int x = k * kThreads + tid;
              if (x < num_lse) scale_b[x] = lse_in[k];
            }
            for (int x = kLseLoads * kThreads + tid; x < num_lse; x += kThreads) {
              scale_b[x] = load_lse(x);
            }
            __syncthreads();
            // The rule's lse chain is sequential per row: only it runs on one thread per row
            // (the running lse before each part), and every (part, row)'s scales are then
            // computed in parallel from the same two inputs, so the bits are the rule's.
            if (tid < group) {
#pragma unroll 4
              for (int i = 0; i < n; ++i) {
                const float part_lse = scale_b[i * group + tid];
                scale_a[i * group + tid] = lse;
                lse = ComputeMergeWeights(lse, part_lse).lse;
              }
            }
            __syncthreads();
            for (int x = tid; x < num_lse; x += kThreads) {
              const MergeWeights mw = ComputeMergeWeights(scale_a[x], scale_b[x]);
              scale_a[x] = mw.scale_a;
              scale_b[x] = mw.scale_b;
            }
            CpAsyncWaitPending(0);
            __syncthreads();
#pragma unroll
            for (int k = 0; k < kVecsPerThread; ++k) {
              const int vec = k * kThreads + tid;
              if (vec < num_vecs) {
                const int r = vec * 4 / kHeadDim;
                for (int i = 0; i < n; ++i) {
                  const float4 part =
                      reinterpret_cast<const float4*>(batch_o + i * part_floats)[vec];
                  const float sa = scale_a[i * group + r];
                  const float sb = scale_b[i * group + r];
                  // Spelled out so the rounding is fixed: fma(scale_a, o, scale_b * part).
                  o[k].x = __fmaf_rn(sa, o[k].x, sb * part.x);
                  o[k].y = __fmaf_rn(sa, o[k].y, sb * part.y);
                  o[k].z = __fmaf_rn(sa, o[k].z, sb * part.z);
                  o[k].w = __fmaf_rn(sa, o[k].w, sb * part.w);
                }
              }
            }
            __syncthreads();  // the batch consumed before the next one overwrites it
          }
#pragma unroll
          for (int k = 0; k < kVecsPerThread; ++k) {
            const int vec = k * kThreads + tid;
            if (vec < num_vecs) {
              float* dst = a.state_o + first_row * kHeadDim + vec * 4;
              dst[0] = o[k].x;
              dst[1] = o[k].y;
              dst[2] = o[k].z;
              dst[3] = o[k].w;
              if (out != nullptr) {
                T* out_dst = out + first_row * kHeadDim + vec * 4;
                out_dst[0] = Traits::FromFloat(o[k].x);
                out_dst[1] = Traits::FromFloat(o[k].y);
                out_dst[2] = Traits::FromFloat(o[k].z);
                out_dst[3] = Traits::FromFloat(o[k].w);
              }
            }
          }
          if (tid < group) a.state_lse[first_row + tid] = lse;
          if (tid == 0) p.counters[flat_head] = 0;  // ready for the next launch
        }
      }
    }
    if (++stage_use == stages) stage_use = 0;
  }
  CpAsyncWaitPending(0);
}

// --- Host side. ----------------------------------------------------------------------------

struct LaunchPlan {
  const void* kernel = nullptr;
  int threads = 0;
  int stages = 0;
  size_t smem_bytes = 0;
  int grid = 0;
  cudaError_t error = cudaSuccess;
};

constexpr int kMaxDevices = 64;

template <int kHeadDim, typename Traits>
LaunchPlan MakeLaunchPlan(int device) {
  using Config = LeanConfig<kHeadDim>;
  LaunchPlan plan;
  auto kernel = LeanDecodeKernel<kHeadDim, Traits>;
  plan.kernel = reinterpret_cast<const void*>(kernel);
  plan.threads = Config::kThreads;
  int optin = 0, sms = 0, per_sm_smem = 0;
  cudaFuncAttributes attrs;
  if ((plan.error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           device)) != cudaSuccess ||
      (plan.error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) !=
          cudaSuccess ||
      (plan.error = cudaDeviceGetAttribute(
           &per_sm_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)) != cudaSuccess ||
      (plan.error = cudaFuncGetAttributes(&attrs, kernel)) != cudaSuccess) {
    return plan;
  }
  // The most blocks per SM (up to kMaxResidency, and as registers allow) that still get at
  // least 3 stages each, else one block with as many stages as fit. 1 KB per block is the
  // driver's. Independent blocks overlap each other's barriers and head switches. (Three d=64
  // blocks of 4 stages measured the same as two of 6.)
  constexpr int kMaxResidency = 2;
  const int64_t fixed = Config::kQfragBytes + int64_t(attrs.sharedSizeBytes) + 1024;
  const int regs_per_block = std::max(attrs.numRegs, 1) * Config::kThreads;
  plan.stages = 0;
  for (int residency = kMaxResidency; residency >= 2 && plan.stages < 3;
       --residency) {
    if (int64_t{regs_per_block} * residency > 65536) continue;
    const int64_t room = std::min<int64_t>(optin, per_sm_smem / residency) - fixed;
    plan.stages = static_cast<int>(std::min<int64_t>(Config::kMaxStages,
                                                     room / Config::kStageBytes));
  }
  if (plan.stages < 3) {
    const int64_t room_one = int64_t{optin} - fixed + 1024;
    plan.stages = static_cast<int>(std::min<int64_t>(Config::kMaxStages,
                                                     room_one / Config::kStageBytes));
  }
  if (plan.stages < 2) {
    plan.error = cudaErrorNotSupported;
    return plan;
  }
  plan.smem_bytes = Config::kQfragBytes + int64_t{plan.stages} * Config::kStageBytes;
  if ((plan.error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(plan.smem_bytes))) != cudaSuccess) {
    return plan;
  }
  int per_sm = 0;
  if ((plan.error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
           &per_sm, kernel, plan.threads, plan.smem_bytes)) != cudaSuccess) {
    return plan;
  }
  if (per_sm < 1) {
    plan.error = cudaErrorNotSupported;
    return plan;
  }
  plan.grid = per_sm * sms;
  return plan;
}

// Plans are per (device, kernel): computed once, under a lock (it sets a function attribute).
template <int kHeadDim, typename Traits>
const LaunchPlan& CachedLaunchPlan(int device) {
  static std::mutex mutex;
  static LaunchPlan plans[kMaxDevices];
  static bool ready[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mutex);
  if (!ready[device]) {
    plans[device] = MakeLaunchPlan<kHeadDim, Traits>(device);
    ready[device] = plans[device].error == cudaSuccess;
  }
  return plans[device];
}

// The plan for a (head_dim, dtype), or an error when this build or device does not serve it.
LaunchPlan FindLaunchPlan(int head_dim, DType dtype, int device) {
  LaunchPlan none;
  none.error = cudaErrorNotSupported;
  if (device < 0 || device >= kMaxDevices) return none;
  const bool bf16 = dtype == DType::kBFloat16;
  if (!bf16 && dtype != DType::kFloat16) return none;
  switch (head_dim) {
#ifdef FERRY_LEAN_HEAD_DIM_64
    case 64:
      return bf16 ? CachedLaunchPlan<64, mma::Bf16>(device)
                  : CachedLaunchPlan<64, mma::Fp16>(device);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_128
    case 128:
      return bf16 ? CachedLaunchPlan<128, mma::Bf16>(device)
                  : CachedLaunchPlan<128, mma::Fp16>(device);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_256
    case 256:
      return bf16 ? CachedLaunchPlan<256, mma::Bf16>(device)
                  : CachedLaunchPlan<256, mma::Fp16>(device);
#endif
    default:
      return none;
  }
}

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct WorkspaceLayout {
  size_t counters = 0;
  size_t part_o = 0;
  size_t part_lse = 0;
  size_t total = 0;
};

WorkspaceLayout LayoutWorkspace(int num_seqs, int num_kv_heads, int group, int head_dim,
                                int grid) {
  WorkspaceLayout layout;
  layout.counters = kAlign;  // the error word sits at offset 0
  layout.part_o = layout.counters + AlignUp(sizeof(int32_t) * size_t(num_seqs) * num_kv_heads);
  layout.part_lse = layout.part_o + AlignUp(sizeof(float) * size_t(grid) * 2 * group * head_dim);
  layout.total = layout.part_lse + AlignUp(sizeof(float) * size_t(grid) * 2 * group);
  return layout;
}

bool ShapeIsServed(int num_q_heads, int num_kv_heads, int head_dim, cudaError_t* error) {
  if (num_kv_heads <= 0 || num_q_heads <= 0 || num_q_heads % num_kv_heads != 0 ||
      !IsSupportedHeadDim(head_dim)) {
    *error = cudaErrorInvalidValue;
    return false;
  }
  if (num_q_heads / num_kv_heads > kMaxGroup) {
    *error = cudaErrorNotSupported;
    return false;
  }
  return true;
}

bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

int LeanDecodeGridSize(int num_q_heads, int num_kv_heads, int head_dim, DType dtype,
                       int device) {
  cudaError_t error = cudaSuccess;
  if (!ShapeIsServed(num_q_heads, num_kv_heads, head_dim, &error)) return 0;
  const LaunchPlan plan = FindLaunchPlan(head_dim, dtype, device);
  return plan.error == cudaSuccess ? plan.grid : 0;
}

size_t LeanDecodeWorkspaceSize(int max_num_seqs, int num_q_heads, int num_kv_heads,
                               int head_dim, DType dtype, int device, cudaError_t* error) {
  cudaError_t local = cudaSuccess;
  if (error == nullptr) error = &local;
  *error = cudaSuccess;
  if (max_num_seqs < 0) {
    *error = cudaErrorInvalidValue;
    return 0;
  }
  if (!ShapeIsServed(num_q_heads, num_kv_heads, head_dim, error)) return 0;
  const LaunchPlan plan = FindLaunchPlan(head_dim, dtype, device);
  if (plan.error != cudaSuccess) {
    *error = plan.error;
    return 0;
  }
  return LayoutWorkspace(max_num_seqs, num_kv_heads, num_q_heads / num_kv_heads, head_dim,
                         plan.grid)
      .total;
}

cudaError_t LeanDecode(const DecodeAttentionArgs& args, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream) {
  const PagedKvView& kv = args.kv;
  if (args.num_seqs < 0) return cudaErrorInvalidValue;
  cudaError_t error = cudaSuccess;
  if (!ShapeIsServed(args.num_q_heads, kv.num_kv_heads, kv.head_dim, &error)) return error;
  if (kv.dtype != DType::kBFloat16 && kv.dtype != DType::kFloat16) {
    return kv.dtype == DType::kFloat32 ? cudaErrorNotSupported : cudaErrorInvalidValue;
  }
  if (kv.block_size <= 0 || kv.num_blocks < 0) return cudaErrorInvalidValue;
  if (!(std::isfinite(args.softmax_scale) && args.softmax_scale > 0.0f)) {
    return cudaErrorInvalidValue;
  }
  if (args.num_seqs == 0) return cudaSuccess;
  if (args.q == nullptr || args.state_o == nullptr || args.state_lse == nullptr ||
      args.block_table_indptr == nullptr || args.seq_lens == nullptr ||
      args.block_table == nullptr || workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  if ((args.kv_begin == nullptr) != (args.kv_end == nullptr)) return cudaErrorInvalidValue;
  if (kv.num_blocks > 0 && (kv.k_pool == nullptr || kv.v_pool == nullptr)) {
    return cudaErrorInvalidValue;
  }
  // 16-byte copies of K/V rows and of q; per-element stores need only natural alignment.
  if (!Aligned16(kv.k_pool) || !Aligned16(kv.v_pool) || !Aligned16(args.q) ||
      !Aligned16(workspace)) {
    return cudaErrorInvalidValue;
  }
  // Pool offsets are computed in int64 but positions in int32 (seq_lens are int32).
  int device = 0;
  if ((error = cudaGetDevice(&device)) != cudaSuccess) return error;
  const LaunchPlan plan = FindLaunchPlan(kv.head_dim, kv.dtype, device);
  if (plan.error != cudaSuccess) return plan.error;
  const int group = args.num_q_heads / kv.num_kv_heads;
  const WorkspaceLayout layout =
      LayoutWorkspace(args.num_seqs, kv.num_kv_heads, group, kv.head_dim, plan.grid);
  if (workspace_bytes < layout.total) return cudaErrorInvalidValue;

  uint8_t* base = static_cast<uint8_t*>(workspace);
  LeanParams params;
  params.args = args;
  params.error_word = reinterpret_cast<int32_t*>(base);
  params.counters = reinterpret_cast<int32_t*>(base + layout.counters);
  params.part_o = reinterpret_cast<float*>(base + layout.part_o);
  params.part_lse = reinterpret_cast<float*>(base + layout.part_lse);
  params.group = group;
  params.stages = plan.stages;
  params.q_scale = args.softmax_scale * kLog2e;
  params.block_shift = -1;
  if ((kv.block_size & (kv.block_size - 1)) == 0) {
    params.block_shift = 0;
    while ((1 << params.block_shift) < kv.block_size) ++params.block_shift;
  }
  void* kernel_args[] = {&params};
  return cudaLaunchKernel(plan.kernel, dim3(plan.grid), dim3(plan.threads), kernel_args,
                          plan.smem_bytes, stream);
}

}  // namespace ferry::kernels
