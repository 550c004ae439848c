// LeanAttention decode kernel (stream-K over the batch's KV tiles), its launcher and workspace.
// Contract and schedule: ferry/kernels/lean_attention.h. Design notes for readers of the code:
//
// * One block per multiprocessor, warp-specialised: one producer warp streams K/V tiles into a
//   ring of shared-memory stages; kGroups * kDSplit consumer warps compute. A tile is
//   kGroups * 16 consecutive KV positions of one (sequence, KV head); consumer group g owns
//   positions [16g, 16g + 16) of each tile and keeps its own online-softmax state over them; the
//   groups' states are merged through shared memory once per head segment.
// * The ring is synchronised with mbarriers, not block barriers: a stage's "full" barrier
//   completes when the producer's 16-byte cp.async copies into it have landed (and its tile
//   metadata is written); its "empty" barrier when every consumer warp is done with it. So the
//   producer refills a stage the moment it is free, whatever the other warps are doing, and the
//   loads in flight per multiprocessor stay near the ring's depth (up to ~200 KB). (The previous
//   design, every thread issuing its share of each tile after a block barrier, kept 1-2 tiles of
//   32 KB in flight per block and reached 0.87-0.96 of the read bandwidth.)
// * The GQA group is the M dimension of mma.sync m16n8k16: one K/V load serves every q head of
//   the group. Groups of <= 8 use rows r and r + 8 for the hi and lo halves of q (and of the
//   softmax weights), so the tensor cores see ~16 mantissa bits where a plain 16-bit q would see
//   8 (bf16); the two rows' accumulators sit in the same thread, so the sum is free.
// * K/V copies zero-fill past the range (no garbage reaches the tensor cores) and XOR-swizzle
//   rows so ldmatrix is conflict-free. The producer also copies a head's q (float32) into the
//   stage of the head's first tile; the consumers keep it as MMA fragments in registers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include <cub/block/block_scan.cuh>

#include "ferry/kernels/attention_state.h"
#include "ferry/kernels/lean_attention.h"
#include "ferry/kernels/lean_schedule.h"

namespace ferry::kernels {
namespace {

constexpr int kMaxGroup = 16;  // one m16 MMA tile of q rows
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kStageAlign = 128;

template <int kHeadDim>
struct LeanConfig {
  // Consumer warps come in position groups of kDSplit warps: a group owns 16 positions of a
  // tile and each of its warps accumulates head_dim / kDSplit output columns (both compute the
  // group's scores). d = 256 splits its 128 accumulators per thread over warp pairs, and takes
  // 32-position tiles: 4 consumer warps, as for the smaller dims (ptxas sizes registers for
  // warps in fours, so a ninth warp would cap them at 168 and spill).
  static constexpr int kDSplit = kHeadDim == 256 ? 2 : 1;
  static constexpr int kGroups = kHeadDim == 256 ? 2 : 4;  // position groups
  static constexpr int kConsumerWarps = kGroups * kDSplit;
  static constexpr int kConsumerThreads = kConsumerWarps * 32;
  static constexpr int kProducerWarps = 1;
  static constexpr int kThreads = kConsumerThreads + kProducerWarps * 32;
  static constexpr int kTile = kGroups * 16;  // KV positions per tile
  static constexpr int kChunksPerRow = kHeadDim / 8;  // 16-byte chunks of a K or V row
  static constexpr int kKvBytes = 2 * kTile * kHeadDim * 2;  // K tile + V tile
  // Ring depth: ~200 KB of a multiprocessor's shared memory (~8 us of its share of HBM).
  static constexpr int kMaxStages = kHeadDim == 64 ? 12 : 6;
  static_assert(kChunksPerRow >= 8, "swizzle needs 8 chunks per row");
  // The end-of-segment merge of the groups' states reuses the stage's K/V area as scratch.
  static_assert(kGroups * 16 * kHeadDim * 4 <= kKvBytes, "scratch must fit a stage");
};

// Stage layout: K tile, V tile, then the q rows of the tile's head (float32, group x head_dim;
// written only for a segment's first tile).
template <int kHeadDim>
constexpr int StageBytes(int group) {
  return LeanConfig<kHeadDim>::kKvBytes +
         (group * kHeadDim * 4 + kStageAlign - 1) / kStageAlign * kStageAlign;
}

struct Bf16Traits {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ uint32_t Pack(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float Rounded(float x) {
    return __bfloat162float(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ T FromFloat(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ void Mma(float* c, const uint32_t* a, uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

struct Fp16Traits {
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

// 16-byte global -> shared copy; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0));
}

// mbarrier primitives (sm_80+; the wait uses try_wait where the chip has it).
__device__ __forceinline__ void MbarrierInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarrierArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on `bar` once every cp.async this thread issued so far has landed (counted in the
// barrier's expected arrivals).
__device__ __forceinline__ void MbarrierArriveOnCopies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Returns once the phase of `bar` with parity `parity` has completed.
__device__ __forceinline__ void MbarrierWait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#else
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n"
        " selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#endif
  } while (!done);
}

// Barrier over the consumer warps only (id 1; __syncthreads is id 0).
template <int kCount>
__device__ __forceinline__ void ConsumerSync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(kCount) : "memory");
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

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows][head_dim] 16-bit tile:
// the XOR spreads the 8 rows one ldmatrix reads over all 32 banks.
template <int kHeadDim>
__device__ __forceinline__ uint32_t SwizzledOffset(int row, int chunk) {
  return row * (kHeadDim * 2) + ((chunk ^ (row & 7)) << 4);
}

struct LeanParams {
  DecodeAttentionArgs args;
  int32_t* error_word;
  int32_t* counters;  // (num_seqs * num_kv_heads): arrivals per split head, zero between launches
  float* part_o;      // (grid, 2, group, head_dim)
  float* part_lse;    // (grid, 2, group)
  int group;
  int stages;
  int stage_bytes;
  int block_shift;  // log2(block_size) when a power of two, else -1
  float q_scale;  // softmax_scale * log2(e): scores are kept in base 2
};

struct SeqRange {
  int64_t begin;
  int64_t end;
  int64_t first_block;  // index of the sequence's first block-table entry
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
  return {begin, end, first, valid};
}

// Walks the flat tile order forwards one tile at a time: (sequence, KV head, tile in head).
// Stepping is incremental so the per-tile cost is a few integer adds; only the producer warp
// walks it (the consumers read each tile's position from the stage's TileMeta).
struct TileCursor {
  int s;
  int kv_head;
  int j;                   // tile within the head
  int tiles_per_head;
  int begin;               // positions, int32 like seq_lens
  int end;
  int64_t seq_first_tile;  // flat index of the sequence's first tile
  const int32_t* blocks;   // the sequence's block table row

  __device__ __forceinline__ void Set(const DecodeAttentionArgs& a, int tile_size,
                                      const SeqRange& r) {
    begin = static_cast<int>(r.begin);
    end = static_cast<int>(r.end);
    tiles_per_head = r.valid ? static_cast<int>(NumKvTiles(r.begin, r.end, tile_size)) : 0;
    blocks = a.block_table + r.first_block;
  }
  // Positions onto flat tile `tile` of sequence `seq` (range r), whose first tile is first_tile.
  __device__ __forceinline__ void Start(const DecodeAttentionArgs& a, int tile_size, int seq,
                                        const SeqRange& r, int64_t first_tile, int64_t tile) {
    s = seq;
    seq_first_tile = first_tile;
    Set(a, tile_size, r);
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
      Set(a, tile_size, LoadSeqRange(a, s));
    } while (tiles_per_head == 0);  // sequences with empty or invalid ranges have no tiles
  }
};

// What the consumers need to know about the tile in a stage (written by the producer).
struct TileMeta {
  int64_t flat_head;        // s * num_kv_heads + kv_head
  int64_t head_first_tile;  // flat index of the head's first tile
  int j;                    // tile within the head
  int tiles_per_head;
  int begin;
  int end;
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

// Shared state of a block besides the dynamic ring of stages.
template <int kHeadDim>
struct LeanShared {
  static constexpr int kMaxStages = LeanConfig<kHeadDim>::kMaxStages;
  static constexpr int kGroups = LeanConfig<kHeadDim>::kGroups;
  uint64_t full[kMaxStages];   // tile landed (the producer lanes' copies + the metadata)
  uint64_t empty[kMaxStages];  // stage consumed (one arrival per consumer warp)
  TileMeta meta[kMaxStages];
  float warp_max[kGroups][16];
  float warp_sum[kGroups][16];
  float row_lse[16];
  int64_t found_seq;
  int64_t found_first_tile;
  SeqRange found_range;
  int is_last_arrival;
};

__device__ __forceinline__ int PageOf(const LeanParams& p, int pos) {
  return p.block_shift >= 0
             ? pos >> p.block_shift
             : static_cast<int>(static_cast<unsigned>(pos) /
                                static_cast<unsigned>(p.args.kv.block_size));
}

// The pages one tile touches: lane l of a producer warp holds the block-table entry of the
// tile's l-th page (-1 past its last position), so a row finds its block with a shuffle instead
// of a dependent global load. Loaded one tile ahead of use; checked against the pool at use.
// A tile spans more than 32 pages only for block sizes 1 and 2: then rows look their blocks up.
struct TilePages {
  int first_page;
  int num_pages;
  int lane_block;
};

template <int kTile>
__device__ __forceinline__ TilePages LoadTilePages(const LeanParams& p, const TileCursor& c,
                                                   int lane) {
  const int pos0 = c.begin + c.j * kTile;
  const int last_pos = min(pos0 + kTile, c.end) - 1;
  TilePages pages;
  pages.first_page = PageOf(p, pos0);
  pages.num_pages = PageOf(p, last_pos) - pages.first_page + 1;
  pages.lane_block = lane < pages.num_pages ? c.blocks[pages.first_page + lane] : -1;
  return pages;
}

// Block id of a valid row's page, or -1 (and the error bit) when the id is outside the pool.
__device__ __forceinline__ int CheckedBlock(const LeanParams& p, int block) {
  if (block >= 0 && block < p.args.kv.num_blocks) return block;
  atomicOr(p.error_word, kLeanErrorBadBlock);
  return -1;
}

// The producer warps: walk this block's tiles [t0, t1) and copy each into the next free stage.
// Producer warp pw of kProducerWarps copies every kProducerWarps-th 32-chunk slice of a tile.
template <int kHeadDim, typename Traits>
__device__ __forceinline__ void ProduceTiles(const LeanParams& p, LeanShared<kHeadDim>& sh,
                                             uint8_t* ring, TileCursor cursor, int64_t t0,
                                             int64_t t1, int pw) {
  using Config = LeanConfig<kHeadDim>;
  using T = typename Traits::T;
  constexpr int kTile = Config::kTile;
  constexpr int kProducers = Config::kProducerWarps;
  constexpr int kChunksPerRow = Config::kChunksPerRow;
  static_assert(32 % kChunksPerRow == 0, "a lane copies one column of every row it touches");
  constexpr int kRowsPerSlice = 32 / kChunksPerRow;  // rows one warp-wide copy covers
  constexpr int kSlicesPerWarp = kTile / kRowsPerSlice / kProducers;
  const DecodeAttentionArgs& a = p.args;
  const int lane = threadIdx.x % 32;
  const int col = lane % kChunksPerRow;
  const T* k_pool = static_cast<const T*>(a.kv.k_pool) + col * 8;
  const T* v_pool = static_cast<const T*>(a.kv.v_pool) + col * 8;
  const int block_size = a.kv.block_size;
  const int num_kv_heads = a.kv.num_kv_heads;
  const int q_chunks = p.group * kHeadDim / 4;  // 16-byte chunks of a head's q rows

  // Issues the copies of tile `c` into the stage at k_dst; rows past the range or in a bad
  // block are zero-filled. kFit: the tile's pages sit one per lane (else rows look their
  // blocks up); kPow2: block_size is a power of two (shifts instead of divisions). The per-row
  // work is a shuffle of the page's 64-bit offset and a few adds: it is the producer's issue
  // cost, paid 2 * kSlicesPerWarp times per tile.
  auto issue_tile = [&](const TileCursor& c, const TilePages& pages, uint32_t k_dst, auto fit,
                        auto pow2) {
    constexpr bool kFit = decltype(fit)::value;
    constexpr bool kPow2 = decltype(pow2)::value;
    const uint32_t v_dst = k_dst + Config::kKvBytes / 2;
    const int pos0 = c.begin + c.j * kTile;
    const int rows = min(kTile, c.end - pos0);
    const int64_t page_elems = int64_t{block_size} * kHeadDim;
    // Element offset of (this lane's page, kv head, slot 0); -1 for a bad block.
    int64_t lane_base = -1;
    if (kFit && lane < pages.num_pages) {
      const int block = CheckedBlock(p, pages.lane_block);
      if (block >= 0) lane_base = (int64_t{block} * num_kv_heads + c.kv_head) * page_elems;
    }
#pragma unroll
    for (int i = 0; i < kSlicesPerWarp; ++i) {
      const int row = lane / kChunksPerRow + kRowsPerSlice * (pw + kProducers * i);
      const int pos = pos0 + row;
      const int page = kPow2 ? pos >> p.block_shift
                             : static_cast<int>(static_cast<unsigned>(pos) /
                                                static_cast<unsigned>(block_size));
      const int slot = kPow2 ? pos & (block_size - 1) : pos - page * block_size;
      int64_t base;
      if constexpr (kFit) {
        base = __shfl_sync(0xffffffffu, lane_base, (page - pages.first_page) & 31);
      } else {
        const int block = row < rows ? CheckedBlock(p, c.blocks[page]) : -1;
        base = block >= 0 ? (int64_t{block} * num_kv_heads + c.kv_head) * page_elems : -1;
      }
      const bool valid = row < rows && base >= 0;
      const int64_t src = valid ? base + slot * kHeadDim : 0;
      const uint32_t dst = SwizzledOffset<kHeadDim>(row, col);
      CpAsync16(k_dst + dst, k_pool + src, valid);
      CpAsync16(v_dst + dst, v_pool + src, valid);
    }
  };

  TileCursor next = cursor;
  TilePages pages = LoadTilePages<kTile>(p, cursor, lane);
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t t = t0; t < t1; ++t) {
    // Look one tile ahead: the next tile's page ids load while this one is issued.
    TilePages next_pages = pages;
    if (t + 1 < t1) {
      next.Advance(a, kTile);
      next_pages = LoadTilePages<kTile>(p, next, lane);
    }
    // A fresh barrier counts as having completed the phase before its first: the first pass
    // over the ring does not wait.
    MbarrierWait(SmemAddr(&sh.empty[stage]), phase ^ 1);
    const uint32_t k_dst = SmemAddr(ring + stage * p.stage_bytes);
    if (pages.num_pages > 32) {
      issue_tile(cursor, pages, k_dst, std::false_type{}, std::false_type{});
    } else if (p.block_shift >= 0) {
      issue_tile(cursor, pages, k_dst, std::true_type{}, std::true_type{});
    } else {
      issue_tile(cursor, pages, k_dst, std::true_type{}, std::false_type{});
    }
    const int64_t flat_head = int64_t{cursor.s} * num_kv_heads + cursor.kv_head;
    if (t == t0 || cursor.j == 0) {
      const float* q = a.q + flat_head * p.group * kHeadDim;
      for (int c = pw * 32 + lane; c < q_chunks; c += kProducers * 32) {
        CpAsync16(k_dst + Config::kKvBytes + c * 16, q + c * 4, true);
      }
    }
    MbarrierArriveOnCopies(SmemAddr(&sh.full[stage]));
    if (pw == 0 && lane == 0) {
      TileMeta& m = sh.meta[stage];
      m.flat_head = flat_head;
      m.head_first_tile = cursor.seq_first_tile + int64_t{cursor.kv_head} * cursor.tiles_per_head;
      m.j = cursor.j;
      m.tiles_per_head = cursor.tiles_per_head;
      m.begin = cursor.begin;
      m.end = cursor.end;
      MbarrierArrive(SmemAddr(&sh.full[stage]));  // releases the metadata
    }
    cursor = next;
    pages = next_pages;
    if (++stage == p.stages) {
      stage = 0;
      phase ^= 1;
    }
  }
  // Leave no copy in flight behind an exited warp.
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

template <int kHeadDim, typename Traits>
__global__ void __launch_bounds__(LeanConfig<kHeadDim>::kThreads, 1)
    LeanDecodeKernel(const LeanParams p) {
  using Config = LeanConfig<kHeadDim>;
  using T = typename Traits::T;
  constexpr int kThreads = Config::kThreads;
  constexpr int kConsumerThreads = Config::kConsumerThreads;
  constexpr int kTile = Config::kTile;
  constexpr int kKSteps = kHeadDim / 16;
  constexpr int kGroups = Config::kGroups;
  constexpr int kDSplit = Config::kDSplit;
  constexpr int kDTiles = kHeadDim / 8 / kDSplit;  // n8 output tiles of this warp

  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ LeanShared<kHeadDim> sh;
  using BlockScan = cub::BlockScan<int64_t, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ uint8_t first_seqs_have_no_tiles[kThreads];

  const DecodeAttentionArgs& a = p.args;
  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int num_seqs = a.num_seqs;
  const int num_kv_heads = a.kv.num_kv_heads;
  const int group = p.group;
  const bool hi_lo = group <= 8;

  // --- Plan, on the GPU: total tiles, this block's range, the sequence it starts in. ---------
  // The first kThreads sequences (all of them in most batches) are read once: their counts and
  // prefix sums stay in registers for the search below.
  int64_t total_tiles = 0;
  int64_t my_tiles = 0;
  int64_t my_exclusive = 0;
  SeqRange my_range = {0, 0, 0, false};
  for (int base = 0; base < num_seqs; base += kThreads) {
    const int s = base + tid;
    int64_t tiles = 0;
    SeqRange r = {0, 0, 0, false};
    if (s < num_seqs) {
      r = LoadSeqRange(a, s);
      tiles = r.valid ? num_kv_heads * NumKvTiles(r.begin, r.end, kTile) : 0;
    }
    int64_t exclusive, aggregate;
    BlockScan(scan_storage).ExclusiveSum(tiles, exclusive, aggregate);
    if (base == 0) {
      my_tiles = tiles;
      my_exclusive = exclusive;
      my_range = r;
      first_seqs_have_no_tiles[tid] = tiles == 0;
    }
    __syncthreads();
    total_tiles += aggregate;
  }
  // Sequences with no tiles are written here, spread over the blocks.
  for (int s = blockIdx.x; s < num_seqs; s += gridDim.x) {
    if (s < kThreads && !first_seqs_have_no_tiles[s]) continue;
    const SeqRange r = LoadSeqRange(a, s);
    if (!r.valid || r.end == r.begin) WriteEmptySequence<kHeadDim, Traits>(p, s, r.valid);
  }
  // Fewer tiles than blocks: the surplus blocks sit out, so every worker owns at least one tile
  // and the workers sharing a head are exactly owner(first tile) .. owner(last tile).
  const int64_t num_workers = total_tiles < gridDim.x ? total_tiles : int64_t{gridDim.x};
  if (blockIdx.x >= num_workers) return;
  const int64_t t0 = FirstTileOfWorker(total_tiles, num_workers, blockIdx.x);
  const int64_t t1 = FirstTileOfWorker(total_tiles, num_workers, blockIdx.x + 1);
  if (my_tiles > 0 && my_exclusive <= t0 && t0 < my_exclusive + my_tiles) {
    sh.found_seq = tid;
    sh.found_first_tile = my_exclusive;
    sh.found_range = my_range;
  }
  if (num_seqs > kThreads) {
    int64_t running = 0;
    for (int base = 0; base < num_seqs; base += kThreads) {
      const int s = base + tid;
      int64_t tiles = 0;
      SeqRange r = {0, 0, 0, false};
      if (s < num_seqs) {
        r = LoadSeqRange(a, s);
        tiles = r.valid ? num_kv_heads * NumKvTiles(r.begin, r.end, kTile) : 0;
      }
      int64_t exclusive, aggregate;
      BlockScan(scan_storage).ExclusiveSum(tiles, exclusive, aggregate);
      exclusive += running;
      const bool found_here = tiles > 0 && exclusive <= t0 && t0 < exclusive + tiles;
      if (found_here && base > 0) {
        sh.found_seq = s;
        sh.found_first_tile = exclusive;
        sh.found_range = r;
      }
      running += aggregate;
      if (__syncthreads_or(found_here)) break;
    }
  }
  if (tid == 0) {
    for (int i = 0; i < p.stages; ++i) {
      // Every producer lane's copies + the metadata arrival.
      MbarrierInit(SmemAddr(&sh.full[i]), Config::kProducerWarps * 32 + 1);
      MbarrierInit(SmemAddr(&sh.empty[i]), Config::kConsumerWarps);
    }
  }
  __syncthreads();

  // --- Producer warp. ------------------------------------------------------------------------
  if (warp >= Config::kConsumerWarps) {
    TileCursor cursor;
    cursor.Start(a, kTile, static_cast<int>(sh.found_seq), sh.found_range, sh.found_first_tile,
                 t0);
    ProduceTiles<kHeadDim, Traits>(p, sh, ring, cursor, t0, t1, warp - Config::kConsumerWarps);
    return;
  }

  // --- Consumer warps. From here on, barriers count the consumer threads only. ---------------
  const int pgroup = warp / kDSplit;  // this warp's 16 positions of each tile
  const int dpart = warp % kDSplit;   // and its share of the output columns
  float o_acc[kDTiles][4];
  float row_max[2];
  float row_sum[2];
  uint32_t q_frag[kKSteps][4];  // the head's q as MMA A fragments (row-major m16 x k16)
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t t = t0; t < t1; ++t) {
    MbarrierWait(SmemAddr(&sh.full[stage]), phase);
    const TileMeta m = sh.meta[stage];
    uint8_t* stage_base = ring + stage * p.stage_bytes;
    const int j = m.j;
    const int64_t flat_head = m.flat_head;
    const int64_t head_first_tile = m.head_first_tile;
    const int64_t head_last_tile = head_first_tile + m.tiles_per_head - 1;
    const bool segment_start = t == t0 || j == 0;
    const bool segment_end = t == t1 - 1 || t == head_last_tile;

    if (segment_start) {
      // Rows past the group are zero: their scores are 0 and their outputs are dropped.
      const float* q_rows = reinterpret_cast<const float*>(stage_base + Config::kKvBytes);
      const int r = lane / 4;
#pragma unroll
      for (int ks = 0; ks < kKSteps; ++ks) {
        const int c = ks * 16 + 2 * (lane % 4);
        float2 x01 = make_float2(0.0f, 0.0f), x89 = make_float2(0.0f, 0.0f);
        if (r < group) {
          x01 = *reinterpret_cast<const float2*>(q_rows + r * kHeadDim + c);
          x89 = *reinterpret_cast<const float2*>(q_rows + r * kHeadDim + c + 8);
        }
        const float x0 = x01.x * p.q_scale, x1 = x01.y * p.q_scale;
        const float x2 = x89.x * p.q_scale, x3 = x89.y * p.q_scale;
        q_frag[ks][0] = Traits::Pack(x0, x1);
        q_frag[ks][2] = Traits::Pack(x2, x3);
        if (hi_lo) {
          q_frag[ks][1] = Traits::Pack(x0 - Traits::Rounded(x0), x1 - Traits::Rounded(x1));
          q_frag[ks][3] = Traits::Pack(x2 - Traits::Rounded(x2), x3 - Traits::Rounded(x3));
        } else {
          float2 y01 = make_float2(0.0f, 0.0f), y89 = make_float2(0.0f, 0.0f);
          if (r + 8 < group) {
            y01 = *reinterpret_cast<const float2*>(q_rows + (r + 8) * kHeadDim + c);
            y89 = *reinterpret_cast<const float2*>(q_rows + (r + 8) * kHeadDim + c + 8);
          }
          q_frag[ks][1] = Traits::Pack(y01.x * p.q_scale, y01.y * p.q_scale);
          q_frag[ks][3] = Traits::Pack(y89.x * p.q_scale, y89.y * p.q_scale);
        }
      }
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o_acc[dt][0] = o_acc[dt][1] = o_acc[dt][2] = o_acc[dt][3] = 0.0f;
      }
      row_max[0] = row_max[1] = FERRY_EMPTY_LSE;
      row_sum[0] = row_sum[1] = 0.0f;
    }

    // --- S = q K^T over this warp's 16 positions. ---
    const uint32_t k_base = SmemAddr(stage_base);
    const uint32_t v_base = k_base + Config::kKvBytes / 2;
    // ldmatrix and mma are volatile asm, so they issue in program order: each fragment is
    // loaded one step ahead of its MMA, and even and odd k-steps accumulate separately (two
    // dependent MMA chains of kKSteps / 2, not one).
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
        float (*acc)[4] = (ks & 1) ? s_odd : s_even;
        Traits::Mma(acc[0], q_frag[ks], b[ks & 1][0], b[ks & 1][1]);
        Traits::Mma(acc[1], q_frag[ks], b[ks & 1][2], b[ks & 1][3]);
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
    // the last tile can have them: the test is warp-uniform and skips the masking elsewhere.
    if (j == m.tiles_per_head - 1) {
      const int tile_pos0 = m.begin + j * kTile + pgroup * 16;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          if (tile_pos0 + nt * 8 + 2 * (lane % 4) + (i & 1) >= m.end) {
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
      float mx = fmaxf(fmaxf(s_acc[0][2 * h], s_acc[0][2 * h + 1]),
                       fmaxf(s_acc[1][2 * h], s_acc[1][2 * h + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float new_max = fmaxf(row_max[h], mx);
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
    // the accumulators.
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
      // --- Merge the groups' states for this head segment. ---
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 1);
        row_sum[h] += __shfl_xor_sync(0xffffffffu, row_sum[h], 2);
      }
      if (lane % 4 == 0 && dpart == 0) {  // a group's warps hold the same statistics
        sh.warp_max[pgroup][lane / 4] = row_max[0];
        sh.warp_max[pgroup][lane / 4 + 8] = row_max[1];
        sh.warp_sum[pgroup][lane / 4] = row_sum[0];
        sh.warp_sum[pgroup][lane / 4 + 8] = row_sum[1];
      }
      // Also orders every warp's reads of this stage's K/V before its reuse as scratch.
      ConsumerSync<kConsumerThreads>();
      float factor[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = lane / 4 + 8 * h;
        float block_max = FERRY_EMPTY_LSE;
#pragma unroll
        for (int w = 0; w < kGroups; ++w) block_max = fmaxf(block_max, sh.warp_max[w][r]);
        float block_sum = 0.0f;
#pragma unroll
        for (int w = 0; w < kGroups; ++w) {
          const float wm = sh.warp_max[w][r];
          if (wm != FERRY_EMPTY_LSE) block_sum += sh.warp_sum[w][r] * exp2f(wm - block_max);
        }
        factor[h] = row_max[h] == FERRY_EMPTY_LSE ? 0.0f
                                                  : exp2f(row_max[h] - block_max) / block_sum;
        if (warp == 0 && lane % 4 == 0) {
          sh.row_lse[r] = block_sum > 0.0f ? (block_max + log2f(block_sum)) * kLn2
                                           : FERRY_EMPTY_LSE;
        }
      }
      // The stage stays ours until every consumer warp releases it below: scratch.
      float* scratch = reinterpret_cast<float*>(stage_base);
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
      ConsumerSync<kConsumerThreads>();

      const int64_t owner_first = OwnerOfTile(head_first_tile, total_tiles, num_workers);
      const int64_t owner_last = OwnerOfTile(head_last_tile, total_tiles, num_workers);
      const int64_t first_row = flat_head * group;  // == s * num_q_heads + kv_head * group
      T* out = static_cast<T*>(a.out);
      if (owner_first == owner_last) {
        for (int e = tid; e < group * kHeadDim; e += kConsumerThreads) {
          const int r = e / kHeadDim;
          const int d = e % kHeadDim;
          float v = 0.0f;
#pragma unroll
          for (int w = 0; w < kGroups; ++w) v += scratch[(w * 16 + r) * kHeadDim + d];
          a.state_o[first_row * kHeadDim + e] = v;
          if (out != nullptr) out[first_row * kHeadDim + e] = Traits::FromFloat(v);
        }
        if (tid < group) a.state_lse[first_row + tid] = sh.row_lse[tid];
      } else {
        // Split head: publish this block's partial, then the last arrival merges all of them.
        const int slot = head_first_tile < t0 ? 0 : 1;
        const int64_t part = int64_t{blockIdx.x} * 2 + slot;
        for (int e = tid; e < group * kHeadDim; e += kConsumerThreads) {
          const int r = e / kHeadDim;
          const int d = e % kHeadDim;
          float v = 0.0f;
#pragma unroll
          for (int w = 0; w < kGroups; ++w) v += scratch[(w * 16 + r) * kHeadDim + d];
          p.part_o[part * group * kHeadDim + e] = v;
        }
        if (tid < group) p.part_lse[part * group + tid] = sh.row_lse[tid];
        __threadfence();
        ConsumerSync<kConsumerThreads>();
        if (tid == 0) {
          const int arrived = atomicAdd(p.counters + flat_head, 1);
          sh.is_last_arrival = arrived == owner_last - owner_first;
        }
        ConsumerSync<kConsumerThreads>();
        if (sh.is_last_arrival) {
          __threadfence();
          // Merge the partials in block order (deterministic whichever block arrives last) with
          // attention_state.h's rule. The rule's (scale_a, scale_b) chain is sequential per row
          // but cheap; it runs from shared memory, and the o loads are independent of it, so
          // they are issued several parts ahead (a plain loop waited one L2 round trip per part
          // and element: ~100 us of tail for a head split over 33 blocks).
          constexpr int kBatch = Config::kKvBytes / (2 * kMaxGroup * 4);
          float* scale_a = scratch;                      // (kBatch, kMaxGroup)
          float* scale_b = scratch + kBatch * kMaxGroup;  // (kBatch, kMaxGroup)
          const int num_vecs = group * kHeadDim / 4;
          const int64_t num_parts = owner_last - owner_first + 1;
          if (tid < group) sh.row_lse[tid] = FERRY_EMPTY_LSE;
          for (int64_t base = 0; base < num_parts; base += kBatch) {
            const int n = static_cast<int>(num_parts - base < kBatch ? num_parts - base : kBatch);
            for (int x = tid; x < n * group; x += kConsumerThreads) {
              const int i = x / group;
              const int r = x % group;
              const int64_t w = owner_first + base + i;
              const int64_t src = w * 2 + (w == owner_first ? 1 : 0);
              scale_b[i * kMaxGroup + r] = __ldcg(p.part_lse + src * group + r);
            }
            ConsumerSync<kConsumerThreads>();
            if (tid < group) {
              float lse = sh.row_lse[tid];
              for (int i = 0; i < n; ++i) {
                const MergeWeights mw = ComputeMergeWeights(lse, scale_b[i * kMaxGroup + tid]);
                scale_a[i * kMaxGroup + tid] = mw.scale_a;
                scale_b[i * kMaxGroup + tid] = mw.scale_b;
                lse = mw.lse;
              }
              sh.row_lse[tid] = lse;
            }
            ConsumerSync<kConsumerThreads>();
            // Batches after the first (more than kBatch parts) continue from state_o, which
            // this same thread wrote: it holds the running merge.
            for (int vec = tid; vec < num_vecs; vec += kConsumerThreads) {
              const int r = vec * 4 / kHeadDim;
              float* dst = a.state_o + first_row * kHeadDim + vec * 4;
              float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
              if (base > 0) o = make_float4(dst[0], dst[1], dst[2], dst[3]);
#pragma unroll 4
              for (int i = 0; i < n; ++i) {
                const int64_t w = owner_first + base + i;
                const int64_t src = w * 2 + (w == owner_first ? 1 : 0);
                const float4 part = __ldcg(
                    reinterpret_cast<const float4*>(p.part_o + src * group * kHeadDim) + vec);
                const float sa = scale_a[i * kMaxGroup + r];
                const float sb = scale_b[i * kMaxGroup + r];
                o.x = sa * o.x + sb * part.x;
                o.y = sa * o.y + sb * part.y;
                o.z = sa * o.z + sb * part.z;
                o.w = sa * o.w + sb * part.w;
              }
              dst[0] = o.x;
              dst[1] = o.y;
              dst[2] = o.z;
              dst[3] = o.w;
              if (out != nullptr && base + n == num_parts) {
                T* out_dst = out + first_row * kHeadDim + vec * 4;
                out_dst[0] = Traits::FromFloat(o.x);
                out_dst[1] = Traits::FromFloat(o.y);
                out_dst[2] = Traits::FromFloat(o.z);
                out_dst[3] = Traits::FromFloat(o.w);
              }
            }
            ConsumerSync<kConsumerThreads>();  // scales consumed before the next batch
          }
          if (tid < group) a.state_lse[first_row + tid] = sh.row_lse[tid];
          if (tid == 0) p.counters[flat_head] = 0;  // ready for the next launch
        }
      }
    }
    // Hand the stage back to the producer once every lane of this warp is done with it.
    __syncwarp();
    if (lane == 0) MbarrierArrive(SmemAddr(&sh.empty[stage]));
    if (++stage == p.stages) {
      stage = 0;
      phase ^= 1;
    }
  }
}

// --- Host side. ----------------------------------------------------------------------------

struct LaunchPlan {
  const void* kernel = nullptr;
  int threads = 0;
  int kv_bytes = 0;          // K + V bytes of one stage
  int max_stages = 0;
  int max_dynamic_smem = 0;  // bytes of shared memory the ring may use
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
  plan.kv_bytes = Config::kKvBytes;
  plan.max_stages = Config::kMaxStages;
  int optin = 0, sms = 0;
  cudaFuncAttributes attrs;
  if ((plan.error = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           device)) != cudaSuccess ||
      (plan.error = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device)) !=
          cudaSuccess ||
      (plan.error = cudaFuncGetAttributes(&attrs, kernel)) != cudaSuccess) {
    return plan;
  }
  // One block per multiprocessor owning as much of its shared memory as a block may: the
  // ring's depth is what keeps the loads in flight. At least two stages for the largest group.
  plan.max_dynamic_smem = optin - static_cast<int>(attrs.sharedSizeBytes);
  if (plan.max_dynamic_smem < 2 * StageBytes<kHeadDim>(kMaxGroup)) {
    plan.error = cudaErrorNotSupported;
    return plan;
  }
  if ((plan.error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         plan.max_dynamic_smem)) != cudaSuccess) {
    return plan;
  }
  int per_sm = 0;
  if ((plan.error = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
           &per_sm, kernel, plan.threads, plan.max_dynamic_smem)) != cudaSuccess) {
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
      return bf16 ? CachedLaunchPlan<64, Bf16Traits>(device)
                  : CachedLaunchPlan<64, Fp16Traits>(device);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_128
    case 128:
      return bf16 ? CachedLaunchPlan<128, Bf16Traits>(device)
                  : CachedLaunchPlan<128, Fp16Traits>(device);
#endif
#ifdef FERRY_LEAN_HEAD_DIM_256
    case 256:
      return bf16 ? CachedLaunchPlan<256, Bf16Traits>(device)
                  : CachedLaunchPlan<256, Fp16Traits>(device);
#endif
    default:
      return none;
  }
}

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n, size_t align = kAlign) { return (n + align - 1) / align * align; }

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
  params.stage_bytes =
      plan.kv_bytes + static_cast<int>(AlignUp(size_t(group) * kv.head_dim * 4, kStageAlign));
  params.stages = std::min(plan.max_stages, plan.max_dynamic_smem / params.stage_bytes);
  params.q_scale = args.softmax_scale * kLog2e;
  params.block_shift = -1;
  if ((kv.block_size & (kv.block_size - 1)) == 0) {
    params.block_shift = 0;
    while ((1 << params.block_shift) < kv.block_size) ++params.block_shift;
  }
  void* kernel_args[] = {&params};
  return cudaLaunchKernel(plan.kernel, dim3(plan.grid), dim3(plan.threads), kernel_args,
                          size_t(params.stages) * params.stage_bytes, stream);
}

}  // namespace ferry::kernels
