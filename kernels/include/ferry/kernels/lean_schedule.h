// The stream-K schedule shared by the CPU and CUDA decode kernels (LeanAttention).
//
// All work of a batch is flattened into one order of *tiles*: sequence-major, then KV head, then
// KV tile (kv_tile_size consecutive positions of the sequence's range). The total T tiles are
// dealt to P workers (CPU threads or CUDA thread blocks) as contiguous ranges whose sizes differ
// by at most one tile, so every worker gets the same amount of KV to read whatever the batch
// looks like. A (sequence, KV head) whose tiles span several workers gets one partial state per
// worker; these are merged in worker order, so results are deterministic for a given P.
//
// Dynamic tail (CUDA kernel, TailSchedule below). Equal ranges finish apart when the workers do
// not stream at the same rate (GPU multiprocessors differ by several percent), so each range is
// cut into *units*: a static unit (the range's first tiles, always run by its own worker) and
// up to kMaxTailChunks tail chunks of halving sizes (the range's last tail_tiles tiles). Chunks
// are handed out at run time from one counter in chunk-major order (every range's first chunk,
// then every range's second, ...), so workers that finish their static unit early take the
// large chunks and the last ones taken are small. Unit boundaries depend only on (T, P, tail
// share, chunk count), never on who runs a unit, so with per-unit partial states merged in a
// fixed order the result stays deterministic. A head split over units is merged in two fixed
// levels (PlanSegmentMerge): its units inside one range first, then the ranges, as before.
// Host+device, header-only.
#pragma once

#include <cstdint>

#include "ferry/kernels/dtype.h"  // FERRY_HOST_DEVICE

namespace ferry::kernels {

FERRY_HOST_DEVICE int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles of one (sequence, KV head): its range [begin, end) cut into kv_tile_size pieces.
FERRY_HOST_DEVICE int64_t NumKvTiles(int64_t begin, int64_t end, int64_t kv_tile_size) {
  return end > begin ? CeilDiv(end - begin, kv_tile_size) : 0;
}

// First tile owned by worker `worker` of `num_workers`; worker w owns
// [FirstTileOfWorker(w), FirstTileOfWorker(w + 1)).
FERRY_HOST_DEVICE int64_t FirstTileOfWorker(int64_t total_tiles, int64_t num_workers,
                                            int64_t worker) {
  return total_tiles * worker / num_workers;
}

// Worker that owns flat tile t (t < total): the largest w with FirstTileOfWorker(w) <= t.
FERRY_HOST_DEVICE int64_t OwnerOfTile(int64_t t, int64_t total_tiles, int64_t num_workers) {
  return ((t + 1) * num_workers - 1) / total_tiles;
}

inline constexpr int kMaxTailChunks = 6;
// The dynamic tail needs every unit to span at least two tiles (a chunk is claimed two tiles
// before the worker needs it) and a static unit longer than the kernel's copy ring (8 stages at
// most), so it is used only when every range has at least kMinTailRange tiles.
inline constexpr int64_t kMinTailChunk = 2;
inline constexpr int64_t kMinTailRange = 16;

// Made by MakeTailSchedule. No member initialisers: the CUDA kernel keeps one in shared memory.
struct TailSchedule {
  int64_t total_tiles;
  int64_t num_workers;
  int num_chunks;       // 0: the plain static schedule (one unit per range)
  int64_t tail_tiles;   // tiles of each range dealt as chunks
  // Chunk c covers tail offsets [chunk_end[c - 1], chunk_end[c]) (chunk_end[-1] = 0), sizes
  // halving, each at least kMinTailChunk.
  int64_t chunk_end[kMaxTailChunks];

  FERRY_HOST_DEVICE int64_t UnitsPerWorker() const { return 1 + num_chunks; }
  FERRY_HOST_DEVICE int64_t NumUnits() const { return num_workers * UnitsPerWorker(); }
  FERRY_HOST_DEVICE int64_t NumChunks() const { return num_workers * num_chunks; }
  FERRY_HOST_DEVICE int64_t RangeBegin(int64_t worker) const {
    return FirstTileOfWorker(total_tiles, num_workers, worker);
  }
  // Units are numbered in tile order: worker w's static unit is w * UnitsPerWorker(), its chunk
  // c is the next 1 + c.
  FERRY_HOST_DEVICE int64_t UnitBegin(int64_t unit) const {
    const int64_t w = unit / UnitsPerWorker();
    const int64_t k = unit - w * UnitsPerWorker();
    if (k == 0) return RangeBegin(w);
    return RangeBegin(w + 1) - tail_tiles + (k == 1 ? 0 : chunk_end[k - 2]);
  }
  FERRY_HOST_DEVICE int64_t UnitEnd(int64_t unit) const {
    const int64_t w = unit / UnitsPerWorker();
    const int64_t k = unit - w * UnitsPerWorker();
    return RangeBegin(w + 1) - tail_tiles + (k == 0 ? 0 : chunk_end[k - 1]);
  }
  FERRY_HOST_DEVICE int64_t UnitOfTile(int64_t t) const {
    const int64_t w = OwnerOfTile(t, total_tiles, num_workers);
    const int64_t into_tail = t - (RangeBegin(w + 1) - tail_tiles);
    int64_t k = 0;
    if (into_tail >= 0) {
      k = 1;
      while (k < num_chunks && chunk_end[k - 1] <= into_tail) ++k;
    }
    return w * UnitsPerWorker() + k;
  }
  // The unit handed out by the counter's claim-th value, or -1 once every chunk is taken.
  FERRY_HOST_DEVICE int64_t UnitOfClaim(int64_t claim) const {
    if (claim >= NumChunks()) return -1;
    const int64_t c = claim / num_workers;
    const int64_t w = claim - c * num_workers;
    return w * UnitsPerWorker() + 1 + c;
  }
};

// The units of total_tiles dealt to num_workers with tail_percent of each range (0..50) in up
// to max_chunks chunks. Falls back to the static schedule (no chunks) when ranges are short.
FERRY_HOST_DEVICE TailSchedule MakeTailSchedule(int64_t total_tiles, int64_t num_workers,
                                                int tail_percent, int max_chunks) {
  TailSchedule s{};
  s.total_tiles = total_tiles;
  s.num_workers = num_workers;
  const int64_t shortest = num_workers > 0 ? total_tiles / num_workers : 0;
  if (shortest < kMinTailRange || tail_percent <= 0 || max_chunks <= 0) return s;
  if (max_chunks > kMaxTailChunks) max_chunks = kMaxTailChunks;
  int64_t tail = shortest * (tail_percent > 50 ? 50 : tail_percent) / 100;
  if (tail < kMinTailChunk) return s;
  s.tail_tiles = tail;
  int64_t done = 0;
  // A fixed trip count (compile-time indices keep the table out of local memory on the GPU).
  for (int c = 0; c < kMaxTailChunks; ++c) {
    if (done < tail) {
      int64_t size = CeilDiv(tail - done, 2);
      if (size < kMinTailChunk) size = kMinTailChunk;
      // The last chunk allowed, or a remainder too small for a chunk of its own: take it all.
      if (c == max_chunks - 1 || tail - done - size < kMinTailChunk) size = tail - done;
      done += size;
      s.num_chunks = c + 1;
    }
    s.chunk_end[c] = done;
  }
  return s;
}

// How a head segment (the tiles of head [head_first, head_last] inside one unit) reaches the
// head's state. Level 1 merges the head's units inside the unit's range (in unit order), level
// 2 the ranges (in range order); a level with one part is skipped. Parts are stored in slots
// (index * 2 + side): side 0 for a part whose head began before the part's first tile, side 1
// otherwise, so a unit or range holds at most the two split heads at its ends apart; the
// merge of parts first .. first + count - 1 reads slot 1 of the first part and slot 0 of the
// others.
struct SegmentMerge {
  int64_t worker;       // the range the unit belongs to
  int64_t unit_first;   // level 1: units of the head inside this range
  int64_t unit_count;
  int64_t unit_slot;    // where this segment's partial goes when unit_count > 1
  int64_t range_first;  // level 2: ranges holding the head
  int64_t range_count;
  int64_t range_slot;   // where this range's partial goes when range_count > 1
};

FERRY_HOST_DEVICE SegmentMerge PlanSegmentMerge(const TailSchedule& s, int64_t head_first,
                                                int64_t head_last, int64_t unit) {
  SegmentMerge m;
  m.worker = unit / s.UnitsPerWorker();
  const int64_t range_begin = s.RangeBegin(m.worker);
  const int64_t range_last = s.RangeBegin(m.worker + 1) - 1;
  const int64_t first_in_range = head_first > range_begin ? head_first : range_begin;
  const int64_t last_in_range = head_last < range_last ? head_last : range_last;
  m.unit_first = s.UnitOfTile(first_in_range);
  m.unit_count = s.UnitOfTile(last_in_range) - m.unit_first + 1;
  m.unit_slot = unit * 2 + (first_in_range < s.UnitBegin(unit) ? 0 : 1);
  m.range_first = OwnerOfTile(head_first, s.total_tiles, s.num_workers);
  m.range_count = OwnerOfTile(head_last, s.total_tiles, s.num_workers) - m.range_first + 1;
  m.range_slot = m.worker * 2 + (head_first < range_begin ? 0 : 1);
  return m;
}

// Slot of part i of a merge over parts first .. first + count - 1 (see SegmentMerge).
FERRY_HOST_DEVICE int64_t MergePartSlot(int64_t first, int64_t i) {
  return (first + i) * 2 + (i == 0 ? 1 : 0);
}

}  // namespace ferry::kernels
