// The paged KV cache of one process: fixed-size blocks, a block table per sequence, capacity
// accounting. Used by attention workers and by the coordinator's in-process attention.
//
// Layout (DESIGN.md, the same on every backend and on the wire): per layer, a K pool and a V pool
// of (num_blocks, num_kv_heads, block_size, head_dim) elements of `dtype`. A block id names the
// same slot in every layer's pools, so one block table per sequence serves all layers; a block
// costs 2 * num_layers * num_kv_heads * block_size * head_dim * DTypeSize(dtype) bytes, and
// capacity_bytes buys floor(capacity_bytes / that) blocks.
// Errors: a reservation the pool cannot meet is RESOURCE_EXHAUSTED and changes nothing; unknown
// sequences are NOT_FOUND; out-of-range layers or positions are INVALID_ARGUMENT / OUT_OF_RANGE.
// Memory: host memory (CreateOnHost allocates it) or memory the caller allocated and owns
// (CreateOverPools: device memory, say; runtime/kv/cuda_kv_pool.h does this on CUDA). Over
// caller memory the pools' pointers are that memory's, and WriteHost / BlockData are refused or
// unusable: the owner writes through its backend.
// Threads: not thread-safe; the owner serialises calls (the worker service's request loop).
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ferry/kernels/decode_attention.h"
#include "ferry/kernels/dtype.h"

namespace ferry::kv {

using SequenceId = uint64_t;

struct KvCacheConfig {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::kBFloat16;
  int block_size = 64;
  int64_t capacity_bytes = 0;
};

// Bytes one block takes over all layers, K and V.
int64_t KvBlockBytes(const KvCacheConfig& config);

// Validates the config and returns the blocks its capacity buys (at least 1, below 2^31).
absl::StatusOr<int64_t> KvCacheTotalBlocks(const KvCacheConfig& config);

// A run of new positions [first_position, first_position + count) of one sequence: what a step
// appends to it. A step's rows are its runs' rows, in run order.
struct KvAppendRun {
  SequenceId seq = 0;
  int64_t first_position = 0;
  int64_t count = 0;
};

class KvCache {
 public:
  // Host-memory cache. Fails on a bad config or a capacity of less than one block.
  static absl::StatusOr<std::unique_ptr<KvCache>> CreateOnHost(const KvCacheConfig& config);
  // Accounting over pools the caller allocated: `pools` holds KvCacheTotalBlocks(config) *
  // KvBlockBytes(config) bytes in the layout above and outlives the cache.
  static absl::StatusOr<std::unique_ptr<KvCache>> CreateOverPools(const KvCacheConfig& config,
                                                                  void* pools);

  // False for caches over caller memory: WriteHost is refused and BlockData must not be used.
  bool host_memory() const { return pools_ != nullptr; }

  const KvCacheConfig& config() const { return config_; }
  int64_t total_blocks() const { return total_blocks_; }
  int64_t free_blocks() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t used_bytes() const { return (total_blocks_ - free_blocks()) * KvBlockBytes(config_); }
  size_t num_sequences() const { return sequences_.size(); }

  absl::Status AddSequence(SequenceId id);
  bool HasSequence(SequenceId id) const { return sequences_.count(id) != 0; }
  // Makes room for positions [0, num_positions): allocates blocks as needed; all or nothing.
  absl::Status Reserve(SequenceId id, int64_t num_positions);
  // Positions written so far (the sequence's length); advanced by SetLength after writes.
  absl::StatusOr<int64_t> Length(SequenceId id) const;
  absl::Status SetLength(SequenceId id, int64_t length);
  // Returns every block of the sequence to the pool and forgets it.
  absl::Status FreeSequence(SequenceId id);
  // Keeps positions [0, num_positions) (the length is cut to at most that) and returns the blocks
  // beyond them to the pool: undoes writes and reservations past num_positions. Returns the
  // number of blocks freed.
  absl::StatusOr<int64_t> Truncate(SequenceId id, int64_t num_positions);
  // Returns the blocks reserved past the sequence's length (an aborted step's); unknown ids are
  // ignored. Rows written there but not counted in the length are simply overwritten later.
  void ReleaseUnwritten(SequenceId id);
  // RESOURCE_EXHAUSTED when a sequence of `positions` positions could not fit even in the whole
  // pool (a scheduler refuses such a request up front).
  absl::Status CheckFits(int64_t positions) const;
  absl::StatusOr<const std::vector<int32_t>*> BlockTable(SequenceId id) const;

  // Copies K and V rows for positions [first, first + count) of one layer from host memory:
  // k and v are (count, num_kv_heads, head_dim) in the cache's dtype. Positions must be reserved.
  // Host-memory caches only (FAILED_PRECONDITION otherwise).
  absl::Status WriteHost(SequenceId id, int layer, int64_t first, int64_t count, const void* k,
                         const void* v);

  // Bytes of one block in one pool (one layer, K or V): num_kv_heads * block_size * head_dim
  // elements, contiguous in the pool. Export and import of blocks (migration) copy these.
  int64_t BlockPoolBytes() const {
    return int64_t{config_.num_kv_heads} * config_.block_size * config_.head_dim *
           DTypeSize(config_.dtype);
  }
  // Host address of one block of one layer's K or V pool (host-memory caches only; the caller
  // checks block against total_blocks()).
  uint8_t* BlockData(int layer, bool is_v, int32_t block) {
    return base_ + PoolOffset(layer, is_v) + block * BlockPoolBytes();
  }

  // The layer's pools as the kernels see them.
  kernels::PagedKvView LayerView(int layer) const;
  void* k_pool(int layer) { return base_ + PoolOffset(layer, /*is_v=*/false); }
  void* v_pool(int layer) { return base_ + PoolOffset(layer, /*is_v=*/true); }

 private:
  struct Sequence {
    std::vector<int32_t> blocks;
    int64_t length = 0;
  };

  KvCache(const KvCacheConfig& config, int64_t total_blocks, uint8_t* external_pools);
  int64_t PoolBytes() const;
  int64_t PoolOffset(int layer, bool is_v) const {
    return (2 * int64_t{layer} + (is_v ? 1 : 0)) * PoolBytes();
  }
  absl::StatusOr<Sequence*> Find(SequenceId id);

  KvCacheConfig config_;
  int64_t total_blocks_;
  // Per layer: K pool then V pool. Left uninitialised: the kernels read only written positions,
  // and untouched pages of a large capacity then cost no memory until used. pools_ is empty
  // over caller memory; base_ points at the pools either way.
  std::unique_ptr<uint8_t[]> pools_;
  uint8_t* base_ = nullptr;
  std::vector<int32_t> free_list_;
  std::unordered_map<SequenceId, Sequence> sequences_;
};

}  // namespace ferry::kv
