// A paged KV cache in CUDA device memory: the coordinator's in-process attention on a GPU and the
// CUDA attention worker build on it.
//
// Storage: one cudaMalloc on `device` of KvCacheTotalBlocks(cache) * KvBlockBytes(cache) bytes in
// DESIGN.md's layout (kv_cache.h): per layer a K pool then a V pool, each
// (num_blocks, num_kv_heads, block_size, head_dim) in cache.dtype. LayerView(layer) hands the
// pools to the kernels (LeanDecode, PrefillAttention, PagedPrefillAttention) as device pointers.
// The pools are not initialised: kernels read only positions that were written.
//
// Accounting: cache() is a kv::KvCache over that memory, the same allocator, block tables and
// lengths as the host cache (AddSequence, Reserve, Length, SetLength, FreeSequence, BlockTable;
// its WriteHost is refused). A block id names the same slot in every layer's pools.
//
// Steps. A step appends rows to some sequences, as runs (kv_cache.h's KvAppendRun: consecutive
// new positions of one sequence; the step's rows are the runs' rows in run order).
//   StageStep(runs, stream): on the host, checks the runs (distinct sequences, each reserved up
//     to first_position + count, within the pool's step limits), fills pinned host memory and
//     enqueues its copy to fixed device buffers on `stream`. No host synchronisation: it only
//     waits, if ever, for the previous StageStep's copy to have left the pinned memory. After it,
//     step() describes the staged step with device pointers that kernels on `stream` may read:
//       indptr    (num_runs + 1) int32   CSR block tables of the step's sequences: the blocks
//       table     (indptr[num_runs]) int32   covering each sequence's length after the step
//       seq_lens  (num_runs) int32       each sequence's length after the step
//       row_run   (num_rows) int32       the run of each row
//       row_pos   (num_rows) int32       the position of each row
//       row_slots (num_rows) int64       block * block_size + slot of each row (KvAppend's map)
//       q_indptr  (num_runs + 1) int32   the rows of run i are [q_indptr[i], q_indptr[i + 1])
//       causal_offset (num_runs) int32   each run's first new position
//     (q_indptr, seq_lens as kv_lens and causal_offset are PrefillAttention's chunk tables: row
//     i of run s sees positions <= causal_offset[s] + i, its causal prefix), and on the host
//       max_run_rows                     the largest run's row count (PrefillAttention's max_q_len)
//     These buffers keep their addresses for the pool's life, so a CUDA graph captured over
//     kernels reading them stays valid for later steps of the same num_runs / num_rows (and
//     max_run_rows, where a kernel's grid depends on it: 1 in every decode step).
//   Append(layer, k, v, src_dtype, stream): KvAppend of the staged rows' new K and V,
//     (num_rows, num_kv_heads, head_dim) device arrays in float32 or the cache dtype. Graph-safe.
//   Lengths do not move with StageStep or Append: the owner calls cache().SetLength when the
//   step is done (a failed step leaves them as they were).
// A block freed (FreeSequence) may be handed to another sequence at once: the owner must not
// free a sequence while kernels of a step that reads it are still queued (a step ends with a
// synchronisation in the decoder, so freeing between steps is safe there).
//
// Errors: absl::Status; CUDA errors are INTERNAL (RESOURCE_EXHAUSTED when the pools do not fit),
// a bad step INVALID_ARGUMENT / OUT_OF_RANGE, nothing staged then.
// Threads: one owner thread at a time. Create and StageStep make `device` the calling thread's
// current device; Append launches on the current device, which must be that one.
// No CUDA types here: streams are void* (a cudaStream_t).
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ferry/kernels/decode_attention.h"
#include "runtime/common/cuda_util.h"
#include "runtime/kv/kv_cache.h"

namespace ferry::kv {

struct CudaKvPoolOptions {
  KvCacheConfig cache;       // capacity_bytes counts device memory for the K and V pools
  int device = 0;
  int max_step_rows = 4096;  // rows one step may append
  int max_step_runs = 1024;  // sequences one step may touch
};

// Device pointers of the staged step (see the contract above).
struct CudaStepTables {
  int num_runs = 0;
  int num_rows = 0;
  const int32_t* indptr = nullptr;
  const int32_t* table = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* row_run = nullptr;
  const int32_t* row_pos = nullptr;
  const int64_t* row_slots = nullptr;
  const int32_t* q_indptr = nullptr;
  const int32_t* causal_offset = nullptr;
  int max_run_rows = 0;  // host
};

class CudaKvPool {
 public:
  static absl::StatusOr<std::unique_ptr<CudaKvPool>> Create(const CudaKvPoolOptions& options);
  ~CudaKvPool();

  const CudaKvPoolOptions& options() const { return options_; }
  int device() const { return options_.device; }
  KvCache& cache() { return *cache_; }
  const KvCache& cache() const { return *cache_; }
  kernels::PagedKvView LayerView(int layer) const { return cache_->LayerView(layer); }

  absl::Status StageStep(std::span<const KvAppendRun> runs, void* stream);
  const CudaStepTables& step() const { return step_; }
  absl::Status Append(int layer, const void* k, const void* v, DType src_dtype, void* stream);

 private:
  explicit CudaKvPool(const CudaKvPoolOptions& options) : options_(options) {}

  CudaKvPoolOptions options_;
  DeviceBuffer pools_;
  std::unique_ptr<KvCache> cache_;
  // Step tables: the same layout in pinned host memory and in device memory; the table, whose
  // used length varies most, is last so one copy of a prefix moves everything that changed.
  PinnedBuffer staging_;
  DeviceBuffer tables_;
  size_t table_offset_ = 0;
  void* staged_event_ = nullptr;  // cudaEvent_t: the last staging copy
  bool staged_once_ = false;
  CudaStepTables step_;
};

}  // namespace ferry::kv
