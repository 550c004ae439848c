// The stream-K schedule shared by the CPU and CUDA decode kernels (LeanAttention).
//
// All work of a batch is flattened into one order of *tiles*: sequence-major, then KV head, then
// KV tile (kv_tile_size consecutive positions of the sequence's range). The total T tiles are
// dealt to P workers (CPU threads or CUDA thread blocks) as contiguous ranges whose sizes differ
// by at most one tile, so every worker gets the same amount of KV to read whatever the batch
// looks like. A (sequence, KV head) whose tiles span several workers gets one partial state per
// worker; these are merged in worker order, so results are deterministic for a given P.
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

}  // namespace ferry::kernels
