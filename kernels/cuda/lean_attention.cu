// LeanAttention decode kernel (stream-K over the batch's KV tiles), its launcher and workspace.
// Contract and schedule: ferry/kernels/lean_attention.h. Design notes for readers of the code:
//
// * One block = kGroups position groups of kDSplit warps; a tile is kGroups * 16 consecutive KV
//   positions of one (sequence, KV head); group g owns positions [16g, 16g + 16) of each tile
//   and keeps its own online-softmax state over them; the groups' states are merged through
//   shared memory once per head segment.
// * The products are transposed, S^T = K q^T and O^T = V^T P^T on mma.sync m16n8k16, so the
//   positions and head dims are M and the GQA group is N: n8 tiles of q columns waste less than
//   an m16 tile of q rows would (group 4: one n8 tile, half the MMAs and accumulators of q as
//   M), and one K/V load serves every q head of the group. Groups of <= 8 use columns 2h and
//   2h + 1 for the hi and lo halves of head h's q (and of its softmax weights), so the tensor
//   cores see ~16 mantissa bits where a plain 16-bit q would see 8 (bf16); the two columns'
//   accumulators sit in the same thread, so the sum is free. Groups of 9-16 use one column per
//   head. The weights reach P V's B operand through movmatrix (an 8 x 8 transpose in registers).
// * K/V tiles stream through a multi-stage cp.async ring (16-byte copies, evict-first in L2,
//   zero-fill past the range so no garbage reaches the tensor cores, XOR-swizzled rows so
//   ldmatrix is conflict-free). The pipeline runs across head boundaries: a block's loads never
//   stall on the end of a head.
// * A block walks its range rotated: the head holding its last tile first, then from its first
//   tile on, so the (at most two) heads it shares with neighbouring blocks finish early and
//   their partials merge mid-stream. Work at the end of a head is on the stream's critical path
//   (skipping all of it measured 3-9% faster on the H100), so it is kept small, and the outputs
//   are stored evict-last in L2 (their write-back to DRAM inside the read stream was most of
//   what the stores cost).
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
using mma::CpAsync16Stream;
using mma::CpAsyncCommit;
using mma::LdMatrixX4;
using mma::LdMatrixX4Trans;
using mma::MovMatrixTrans;
using mma::SmemAddr;
using mma::StoreWithPolicy;
using mma::SwizzledOffset;

constexpr int kMaxGroup = 16;  // q heads per KV head
constexpr int kMaxQTiles = 2;  // n8 tiles of q columns: hi / lo pairs of 8 heads, or 16 heads
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
  // q's B-operand fragments: one uint2 per (n8 tile of q columns, k-step, lane), up to two
  // n8 tiles (kMaxQTiles).
  static constexpr int kQfragBytes = kMaxQTiles * kHeadDim / 16 * 32 * 8;
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

// kQTiles: n8 tiles of q columns, 1 for groups of <= 4, 2 for <= 16 (see the notes at the top).
template <int kHeadDim, typename Traits, int kQTiles>
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
  constexpr int kMTiles = kHeadDim / 16 / kDSplit;  // m16 tiles of head dims this warp outputs
  static_assert(kQTiles >= 1 && kQTiles <= kMaxQTiles);
  // q's B fragments each thread builds per head.
  constexpr int kQFragsPerThread = (kQTiles * kKSteps * 32 + kThreads - 1) / kThreads;

  extern __shared__ __align__(128) uint8_t smem[];
  uint2* qfrag = reinterpret_cast<uint2*>(smem + p.stages * Config::kStageBytes);
  __shared__ float warp_max[kGroups][16];
  __shared__ float warp_sum[kGroups][16];
  __shared__ float row_lse[16];
  // (sequence, its first flat tile) holding tile t0, then the same for tile t1 - 1.
  __shared__ int64_t found_seq_and_tile[4];
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
    if (my_tiles > 0 && my_first_tile <= t1 - 1 && t1 - 1 < my_first_tile + my_tiles) {
      found_seq_and_tile[2] = tid;
      found_seq_and_tile[3] = my_first_tile;
    }
    __syncthreads();
  } else {
    int64_t running = 0;
    if (tid == 0) found_seq_and_tile[0] = found_seq_and_tile[2] = -1;
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
      if (tiles > 0 && exclusive <= t1 - 1 && t1 - 1 < exclusive + tiles) {
        found_seq_and_tile[2] = s;
        found_seq_and_tile[3] = exclusive;
      }
      running += aggregate;
      __syncthreads();
      if (found_seq_and_tile[2] >= 0) break;
    }
  }
  TileCursor start;
  start.Start(a, kTile, static_cast<int>(found_seq_and_tile[0]), found_seq_and_tile[1], t0);
  // The order the block walks its range: the head holding its last tile first, from that
  // head's first tile (or t0) to t1 - 1, then from t0 on. Both heads the block may share with
  // its neighbours (its first and its last) then end early in the walk, so their partials meet
  // and merge while the blocks still stream, instead of at the launch's end, where the last
  // arrival's merge added to the launch (on the H100 the split heads cost short-head launches
  // 1.5-3%; the rotation recovered up to 0.7% of it).
  TileCursor first;
  first.Start(a, kTile, static_cast<int>(found_seq_and_tile[2]), found_seq_and_tile[3], t1 - 1);
  first.j = 0;
  const int64_t first_tile_of_last_head =
      first.seq_first_tile + int64_t{first.kv_head} * first.tiles_per_head;
  const int64_t walk_start = first_tile_of_last_head > t0 ? first_tile_of_last_head : t0;
  if (walk_start == t0) first = start;
  const int64_t walk_tiles = t1 - t0;
  const int64_t walk_last_tile = walk_start == t0 ? t1 - 1 : walk_start - 1;
  // The next tile of the walk (the caller knows one exists).
  auto step = [&](TileCursor& cursor, int64_t& t) {
    if (t == t1 - 1) {
      cursor = start;
      t = t0;
    } else {
      cursor.Advance(a, kTile);
      ++t;
    }
  };

  // q of the first head is loaded now, so its global latency overlaps the block-table read and
  // the first tile's copies instead of following them; later heads' q are loaded one segment
  // ahead (below). Each thread loads exactly the elements of the fragments it builds (fragment
  // e = (q tile, k-step, lane) = (e / 32 / kKSteps, e / 32 % kKSteps, e % 32): q column
  // n = 8 * tile + lane / 4, dims c, c + 1 and c + 8, c + 9 of the k-step), so a head switch
  // builds them from registers with no staging through shared memory. Column n is head n / 2
  // (hi / lo pairs) or head n; heads past the group are zero (scores 0, outputs dropped).
  float2 q_prefetch[kQFragsPerThread][2];
  int64_t prefetched_head = -1;
  auto q_column_head = [&](int n) { return hi_lo ? n / 2 : n; };
  auto prefetch_q = [&](int64_t flat_head) {
    const float* src = a.q + flat_head * group * kHeadDim;
    const float2 zero = make_float2(0.0f, 0.0f);
#pragma unroll
    for (int i = 0; i < kQFragsPerThread; ++i) {
      const int e = i * kThreads + tid;
      const int ln = e % 32;
      const int head = q_column_head((e / 32 / kKSteps) * 8 + ln / 4);
      const float* row = src + head * kHeadDim + (e / 32 % kKSteps) * 16 + 2 * (ln % 4);
      const bool live = e < kQTiles * kKSteps * 32 && head < group;
      q_prefetch[i][0] = live ? __ldg(reinterpret_cast<const float2*>(row)) : zero;
      q_prefetch[i][1] = live ? __ldg(reinterpret_cast<const float2*>(row + 8)) : zero;
    }
    prefetched_head = flat_head;
  };
  prefetch_q(int64_t{first.s} * num_kv_heads + first.kv_head);

  // --- K/V producer. -------------------------------------------------------------------------
  const T* k_pool = static_cast<const T*>(a.kv.k_pool);
  const T* v_pool = static_cast<const T*>(a.kv.v_pool);
  const int block_size = a.kv.block_size;
  const int num_blocks = a.kv.num_blocks;
  TileCursor producer = first;
  int64_t producer_tile = walk_start;
  // K and V are read once: evict-first in L2, so the stream does not push out what is read
  // again (block tables, q, the partial states). Measured on the H100: 0.2-1.3% faster.
  const uint64_t kv_policy = mma::L2EvictFirstPolicy();
  // The outputs (states, bf16 output, partials) evict-last: they are small, read back soon (the
  // split-head merge, the copy to the host, the next layer) or rewritten by the next launch, and
  // their write-back to DRAM in the middle of the read stream cost short-head launches up to
  // 2% (measured on the H100).
  const uint64_t out_policy = mma::L2EvictLastPolicy();
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
          CpAsync16Stream(k_dst + dst, k_src + i * kRowStep * kHeadDim, true, kv_policy);
          CpAsync16Stream(v_dst + dst, v_src + i * kRowStep * kHeadDim, true, kv_policy);
        }
      } else {  // a head's last tile: rows past the range are zero-filled, never read
#pragma unroll
        for (int i = 0; i < kTile / kRowStep; ++i) {
          const bool valid = row0 + i * kRowStep < rows_valid;
          const uint32_t dst = SwizzledOffset<kHeadDim>(row0 + i * kRowStep, col);
          CpAsync16Stream(k_dst + dst, valid ? k_src + i * kRowStep * kHeadDim : k_pool, valid,
                          kv_policy);
          CpAsync16Stream(v_dst + dst, valid ? v_src + i * kRowStep * kHeadDim : v_pool, valid,
                          kv_policy);
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
      CpAsync16Stream(k_dst + dst, k_pool + src, valid, kv_policy);
      CpAsync16Stream(v_dst + dst, v_pool + src, valid, kv_policy);
    }
  };

  const int stages = p.stages;
  for (int i = 0; i < stages - 1; ++i) {
    if (i < walk_tiles) {
      if (i > 0) step(producer, producer_tile);
      load_tile(i);
    }
    CpAsyncCommit();
  }

  // --- Consumer state. -----------------------------------------------------------------------
  TileCursor consumer = first;
  int64_t t = walk_start;
  // O^T (head dims x q columns) and the online-softmax state of this thread's two q columns
  // (2c, 2c + 1) of each q tile: running max (base 2) and this thread's share of the sum.
  float o_acc[kMTiles][kQTiles][4];
  float col_max[kQTiles][2];
  float col_sum[kQTiles][2];

  int stage_use = 0;
  int stage_load = stages - 1;
  for (int64_t n = 0; n < walk_tiles; ++n) {
    CpAsyncWaitPending(stages - 2);
    __syncthreads();

    if (n > 0) step(consumer, t);
    const int kv_head = consumer.kv_head;
    const int j = consumer.j;
    const int64_t flat_head = int64_t{consumer.s} * num_kv_heads + kv_head;
    const int64_t head_first_tile =
        consumer.seq_first_tile + int64_t{kv_head} * consumer.tiles_per_head;
    const int64_t head_last_tile = head_first_tile + consumer.tiles_per_head - 1;
    const bool segment_start = t == t0 || j == 0;
    const bool segment_end = t == t1 - 1 || t == head_last_tile;

    if (segment_start) {
      // Fragments of q^T (scaled) as the B operand (k16 x n8 per k-step and q tile); a lo
      // column holds x - round(x) of its hi neighbour. Every warp has passed this iteration's
      // barrier, so none still reads the previous head's.
      if (prefetched_head != flat_head) prefetch_q(flat_head);
#pragma unroll
      for (int i = 0; i < kQFragsPerThread; ++i) {
        const int e = i * kThreads + tid;
        if (e < kQTiles * kKSteps * 32) {
          const bool lo_column = hi_lo && ((e % 32) / 4) % 2 == 1;
          float x[4] = {q_prefetch[i][0].x * p.q_scale, q_prefetch[i][0].y * p.q_scale,
                        q_prefetch[i][1].x * p.q_scale, q_prefetch[i][1].y * p.q_scale};
          if (lo_column) {
#pragma unroll
            for (int k = 0; k < 4; ++k) x[k] -= Traits::Rounded(x[k]);
          }
          qfrag[e] = make_uint2(Traits::Pack(x[0], x[1]), Traits::Pack(x[2], x[3]));
        }
      }
      __syncthreads();
      if (n == 0 && walk_start > t0) {
        prefetch_q(int64_t{start.s} * num_kv_heads + start.kv_head);  // the walk wraps next
      } else if (head_last_tile < walk_last_tile &&
                 flat_head + 1 < int64_t{num_seqs} * num_kv_heads) {
        prefetch_q(flat_head + 1);
      }
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int qt = 0; qt < kQTiles; ++qt) {
          o_acc[mt][qt][0] = o_acc[mt][qt][1] = o_acc[mt][qt][2] = o_acc[mt][qt][3] = 0.0f;
        }
      }
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
        col_max[qt][0] = col_max[qt][1] = FERRY_EMPTY_LSE;
        col_sum[qt][0] = col_sum[qt][1] = 0.0f;
      }
    }
    if (n + stages - 1 < walk_tiles) {
      step(producer, producer_tile);
      load_tile(stage_load);
    }
    CpAsyncCommit();
    if (++stage_load == stages) stage_load = 0;

    // --- S^T = K q^T over this warp's 16 positions (M) and the q columns (N). ---
    const uint8_t* k_stage = smem + stage_use * Config::kStageBytes;
    const uint32_t k_base = SmemAddr(k_stage);
    const uint32_t v_base = k_base + Config::kStageBytes / 2;
    // ldmatrix and mma are volatile asm, so they issue in program order: each fragment is
    // loaded one step ahead of its MMA (issue never waits on a load just made), and even and
    // odd k-steps accumulate separately (two dependent MMA chains of kKSteps / 2, not one).
    // s_acc[qt] = (position g, columns 2c, 2c + 1; position g + 8, the same).
    float s_acc[kQTiles][4];
    {
      float s_odd[kQTiles][4], s_even[kQTiles][4];
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s_odd[qt][i] = s_even[qt][i] = 0.0f;
      }
      // A = K rows as m16 x k16: matrices (positions 0-7 | 8-15) x (dims 0-7 | 8-15).
      const int row = pgroup * 16 + (lane & 7) + (((lane >> 3) & 1) << 3);
      const int chunk_half = lane >> 4;
      uint32_t ka[2][4];
      LdMatrixX4(ka[0], k_base + SwizzledOffset<kHeadDim>(row, chunk_half));
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        if (ks + 1 < kKSteps) {
          LdMatrixX4(ka[(ks + 1) & 1],
                     k_base + SwizzledOffset<kHeadDim>(row, 2 * (ks + 1) + chunk_half));
        }
        float (*acc)[4] = (ks & 1) ? s_odd : s_even;
#pragma unroll
        for (int qt = 0; qt < kQTiles; ++qt) {
          const uint2 qb = qfrag[(qt * kKSteps + ks) * 32 + lane];
          Traits::Mma(acc[qt], ka[ks & 1], qb.x, qb.y);
        }
      }
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) s_acc[qt][i] = s_even[qt][i] + s_odd[qt][i];
      }
    }
    // The first V fragment loads while the softmax runs. A = V^T as m16 (dims) x k16
    // (positions), ldmatrix.trans of matrices (positions 0-7 | 8-15) x (dims 0-7 | 8-15).
    const int v_row = pgroup * 16 + (lane & 7) + ((lane >> 4) << 3);
    const int v_chunk0 = 2 * dpart * kMTiles + ((lane >> 3) & 1);
    uint32_t va[2][4];
    LdMatrixX4Trans(va[0], v_base + SwizzledOffset<kHeadDim>(v_row, v_chunk0));
    if (hi_lo) {  // hi + lo columns: both hold the full score
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
        s_acc[qt][0] = s_acc[qt][1] = s_acc[qt][0] + s_acc[qt][1];
        s_acc[qt][2] = s_acc[qt][3] = s_acc[qt][2] + s_acc[qt][3];
      }
    }
    // Positions past the range (the tail of a head's last tile) drop out of the softmax. Only
    // the last tile can have them: the test is block-uniform and skips the masking elsewhere.
    if (j == consumer.tiles_per_head - 1) {
      const int pos = consumer.begin + j * kTile + pgroup * 16 + lane / 4;
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (pos + (i >> 1) * 8 >= consumer.end) s_acc[qt][i] = FERRY_EMPTY_LSE;
        }
      }
    }
    // --- Online softmax per q column over the warp's positions (the 8 lanes sharing lane % 4
    // hold them). In hi/lo mode a column pair holds one head: the lo column copies the
    // hi column's statistics. ---
    float probs[kQTiles][4];
    float alpha[kQTiles][2];
#pragma unroll
    for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (h == 1 && hi_lo) {
          alpha[qt][1] = alpha[qt][0];
          col_sum[qt][1] = col_sum[qt][0];
          col_max[qt][1] = col_max[qt][0];
          break;
        }
        float m = fmaxf(s_acc[qt][h], s_acc[qt][2 + h]);
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
        const float new_max = fmaxf(col_max[qt][h], m);
        // All positions so far masked: subtract 0 instead of -inf (no NaN from -inf - -inf).
        const float base = new_max == FERRY_EMPTY_LSE ? 0.0f : new_max;
        alpha[qt][h] = exp2f(col_max[qt][h] - base);
        probs[qt][h] = exp2f(s_acc[qt][h] - base);
        probs[qt][2 + h] = exp2f(s_acc[qt][2 + h] - base);
        col_sum[qt][h] = col_sum[qt][h] * alpha[qt][h] + (probs[qt][h] + probs[qt][2 + h]);
        col_max[qt][h] = new_max;
      }
    }
    // Once the running max settles, alpha is 1 for every column of the warp: skip the rescale
    // of the accumulators.
    bool rescale = false;
#pragma unroll
    for (int qt = 0; qt < kQTiles; ++qt) {
      rescale = rescale || alpha[qt][0] != 1.0f || alpha[qt][1] != 1.0f;
    }
    if (__any_sync(0xffffffffu, rescale)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int qt = 0; qt < kQTiles; ++qt) {
          o_acc[mt][qt][0] *= alpha[qt][0];
          o_acc[mt][qt][1] *= alpha[qt][1];
          o_acc[mt][qt][2] *= alpha[qt][0];
          o_acc[mt][qt][3] *= alpha[qt][1];
        }
      }
    }
    // --- O^T += V^T P^T. P^T as the B operand (k = the warp's 16 positions): the weights in
    // S^T's accumulator layout, packed to 16 bits, transposed by movmatrix per 8 x 8 half. ---
    uint32_t pb[kQTiles][2];
#pragma unroll
    for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float x = probs[qt][2 * half];
        const uint32_t packed =
            hi_lo ? Traits::Pack(x, x - Traits::Rounded(x))
                  : Traits::Pack(x, probs[qt][2 * half + 1]);
        pb[qt][half] = MovMatrixTrans(packed);
      }
    }
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      if (mt + 1 < kMTiles) {
        LdMatrixX4Trans(va[(mt + 1) & 1],
                        v_base + SwizzledOffset<kHeadDim>(v_row, v_chunk0 + 2 * (mt + 1)));
      }
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
        Traits::Mma(o_acc[mt][qt], va[mt & 1], pb[qt][0], pb[qt][1]);
      }
    }

    if (segment_end) {
      // --- Merge the warps' states for this head segment. Statistics and scratch rows are
      // per q head (slot): column n serves head q_column_head(n); in hi/lo mode the lo column
      // repeats the hi column's statistics. ---
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (h == 1 && hi_lo) break;  // the lo column's sum is never read
          col_sum[qt][h] += __shfl_xor_sync(0xffffffffu, col_sum[qt][h], 4);
          col_sum[qt][h] += __shfl_xor_sync(0xffffffffu, col_sum[qt][h], 8);
          col_sum[qt][h] += __shfl_xor_sync(0xffffffffu, col_sum[qt][h], 16);
        }
      }
      if (lane < 4 && dpart == 0) {  // a group's warps hold the same statistics
#pragma unroll
        for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            if (h == 1 && hi_lo) break;
            const int slot = q_column_head(qt * 8 + 2 * lane + h);
            warp_max[pgroup][slot] = col_max[qt][h];
            warp_sum[pgroup][slot] = col_sum[qt][h];
          }
        }
      }
      __syncthreads();
      float factor[kQTiles][2];
#pragma unroll
      for (int qt = 0; qt < kQTiles; ++qt) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          if (h == 1 && hi_lo) {  // the lo column: the hi column's statistics
            factor[qt][1] = factor[qt][0];
            break;
          }
          const int slot = q_column_head(qt * 8 + 2 * (lane % 4) + h);
          float block_max = FERRY_EMPTY_LSE;
#pragma unroll
          for (int w = 0; w < kGroups; ++w) block_max = fmaxf(block_max, warp_max[w][slot]);
          float block_sum = 0.0f;
#pragma unroll
          for (int w = 0; w < kGroups; ++w) {
            const float wm = warp_max[w][slot];
            if (wm != FERRY_EMPTY_LSE) block_sum += warp_sum[w][slot] * exp2f(wm - block_max);
          }
          factor[qt][h] = col_max[qt][h] == FERRY_EMPTY_LSE
                              ? 0.0f
                              : exp2f(col_max[qt][h] - block_max) / block_sum;
          if (warp == 0 && lane < 4) {
            row_lse[slot] = block_sum > 0.0f ? (block_max + log2f(block_sum)) * kLn2
                                             : FERRY_EMPTY_LSE;
          }
        }
      }
      // The stage just consumed is scratch until the next iteration's barrier: no copy in
      // flight targets it. Rows (position group, slot), head_dim floats each.
      float* scratch = reinterpret_cast<float*>(smem + stage_use * Config::kStageBytes);
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        const int d = (dpart * kMTiles + mt) * 16 + lane / 4;
#pragma unroll
        for (int qt = 0; qt < kQTiles; ++qt) {
          const int slot = q_column_head(qt * 8 + 2 * (lane % 4));
          float* row = scratch + (pgroup * 16 + slot) * kHeadDim + d;
          const float* o = o_acc[mt][qt];
          if (hi_lo) {
            row[0] = (o[0] + o[1]) * factor[qt][0];
            row[8] = (o[2] + o[3]) * factor[qt][0];
          } else {
            row[0] = o[0] * factor[qt][0];
            row[8] = o[2] * factor[qt][0];
            row[kHeadDim] = o[1] * factor[qt][1];
            row[kHeadDim + 8] = o[3] * factor[qt][1];
          }
        }
      }
      __syncthreads();

      // A head is split when other blocks own some of its tiles (then its owners are
      // computed: two 64-bit divisions, which every head end paid before, a measurable share
      // of short heads' time).
      const bool whole_head = head_first_tile >= t0 && head_last_tile < t1;
      const int64_t first_row = flat_head * group;  // == s * num_q_heads + kv_head * group
      T* out = static_cast<T*>(a.out);
      // Element e of the head's (group, head_dim) output: the position groups' rows summed in
      // group order.
      auto sum_groups = [&](int e) {
        const int r = e / kHeadDim;
        const int d = e % kHeadDim;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int w = 0; w < kGroups; ++w) {
          const float4 x =
              *reinterpret_cast<const float4*>(scratch + (w * 16 + r) * kHeadDim + d);
          v.x += x.x;
          v.y += x.y;
          v.z += x.z;
          v.w += x.w;
        }
        return v;
      };
      if (whole_head) {
        // Element-wise stores: the outputs need only natural alignment (16-byte stores
        // measured no faster on the H100).
        for (int e = 4 * tid; e < group * kHeadDim; e += 4 * kThreads) {
          const float4 v = sum_groups(e);
          const float x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            StoreWithPolicy(a.state_o + first_row * kHeadDim + e + i, x[i], out_policy);
            if (out != nullptr) {
              const T y = Traits::FromFloat(x[i]);
              StoreWithPolicy(out + first_row * kHeadDim + e + i,
                              *reinterpret_cast<const uint16_t*>(&y), out_policy);
            }
          }
        }
        if (tid < group) StoreWithPolicy(a.state_lse + first_row + tid, row_lse[tid], out_policy);
      } else {
        // Split head: publish this block's partial, then the last arrival merges all of them.
        const int64_t owner_first = OwnerOfTile(head_first_tile, total_tiles, num_workers);
        const int64_t owner_last = OwnerOfTile(head_last_tile, total_tiles, num_workers);
        const int slot = head_first_tile < t0 ? 0 : 1;
        const int64_t part = int64_t{blockIdx.x} * 2 + slot;
        for (int e = 4 * tid; e < group * kHeadDim; e += 4 * kThreads) {
          StoreWithPolicy(p.part_o + part * group * kHeadDim + e, sum_groups(e), out_policy);
        }
        if (tid < group) StoreWithPolicy(p.part_lse + part * group + tid, row_lse[tid], out_policy);
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
          const bool ring_free = n == walk_tiles - 1;
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

template <int kHeadDim, typename Traits, int kQTiles>
LaunchPlan MakeLaunchPlan(int device) {
  using Config = LeanConfig<kHeadDim>;
  LaunchPlan plan;
  auto kernel = LeanDecodeKernel<kHeadDim, Traits, kQTiles>;
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
template <int kHeadDim, typename Traits, int kQTiles>
const LaunchPlan& CachedLaunchPlan(int device) {
  static std::mutex mutex;
  static LaunchPlan plans[kMaxDevices];
  static bool ready[kMaxDevices] = {};
  std::lock_guard<std::mutex> lock(mutex);
  if (!ready[device]) {
    plans[device] = MakeLaunchPlan<kHeadDim, Traits, kQTiles>(device);
    ready[device] = plans[device].error == cudaSuccess;
  }
  return plans[device];
}

template <int kHeadDim, typename Traits>
const LaunchPlan& CachedLaunchPlan(int group, int device) {
  return group <= 4 ? CachedLaunchPlan<kHeadDim, Traits, 1>(device)
                    : CachedLaunchPlan<kHeadDim, Traits, 2>(device);
}

// The plan for a (head_dim, dtype, GQA group), or an error when this build or device does not
// serve it.
LaunchPlan FindLaunchPlan(int head_dim, DType dtype, int group, int device) {
  LaunchPlan none;
  none.error = cudaErrorNotSupported;
  if (device < 0 || device >= kMaxDevices) return none;
  const bool bf16 = dtype == DType::kBFloat16;
  if (!bf16 && dtype != DType::kFloat16) return none;
  switch (head_dim) {
#ifdef FERRY_LEAN_HEAD_DIM_64
    case 64:
      return bf16 ? CachedLaunchPlan<64, mma::Bf16>(group, device)
                  : CachedLaunchPlan<64, mma::Fp16>(group, device);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_128
    case 128:
      return bf16 ? CachedLaunchPlan<128, mma::Bf16>(group, device)
                  : CachedLaunchPlan<128, mma::Fp16>(group, device);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_256
    case 256:
      return bf16 ? CachedLaunchPlan<256, mma::Bf16>(group, device)
                  : CachedLaunchPlan<256, mma::Fp16>(group, device);
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
  const LaunchPlan plan = FindLaunchPlan(head_dim, dtype, num_q_heads / num_kv_heads, device);
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
  const LaunchPlan plan = FindLaunchPlan(head_dim, dtype, num_q_heads / num_kv_heads, device);
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
  const int group = args.num_q_heads / kv.num_kv_heads;
  const LaunchPlan plan = FindLaunchPlan(kv.head_dim, kv.dtype, group, device);
  if (plan.error != cudaSuccess) return plan.error;
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
