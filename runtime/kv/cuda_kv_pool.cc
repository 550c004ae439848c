#include "runtime/kv/cuda_kv_pool.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/kv_append.h"
#include "ferry/status.h"

namespace ferry::kv {
namespace {

size_t AlignUp(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

absl::StatusOr<std::unique_ptr<CudaKvPool>> CudaKvPool::Create(const CudaKvPoolOptions& options) {
  if (options.max_step_rows <= 0 || options.max_step_runs <= 0) {
    return absl::InvalidArgumentError("cuda kv pool: max_step_rows and max_step_runs must be > 0");
  }
  if (options.cache.head_dim % 8 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda kv pool: head_dim ", options.cache.head_dim, " is not a multiple of 8"));
  }
  FERRY_ASSIGN_OR_RETURN(const int64_t total_blocks, KvCacheTotalBlocks(options.cache));
  FERRY_RETURN_IF_ERROR(UseCudaDevice(options.device));
  std::unique_ptr<CudaKvPool> pool(new CudaKvPool(options));
  FERRY_ASSIGN_OR_RETURN(
      pool->pools_,
      DeviceBuffer::Allocate(static_cast<size_t>(total_blocks * KvBlockBytes(options.cache)),
                             "the KV pools"));
  FERRY_ASSIGN_OR_RETURN(pool->cache_, KvCache::CreateOverPools(options.cache, pool->pools_.get()));

  const size_t rows = static_cast<size_t>(options.max_step_rows);
  const size_t runs = static_cast<size_t>(options.max_step_runs);
  size_t offset = 0;
  auto place = [&offset](size_t bytes) {
    const size_t at = offset;
    offset += AlignUp(bytes);
    return at;
  };
  const size_t slots_at = place(rows * sizeof(int64_t));
  const size_t indptr_at = place((runs + 1) * sizeof(int32_t));
  const size_t lens_at = place(runs * sizeof(int32_t));
  const size_t run_at = place(rows * sizeof(int32_t));
  const size_t pos_at = place(rows * sizeof(int32_t));
  const size_t q_indptr_at = place((runs + 1) * sizeof(int32_t));
  const size_t causal_offset_at = place(runs * sizeof(int32_t));
  pool->table_offset_ = place(static_cast<size_t>(total_blocks) * sizeof(int32_t));
  FERRY_ASSIGN_OR_RETURN(pool->staging_, PinnedBuffer::Allocate(offset, "kv step tables"));
  FERRY_ASSIGN_OR_RETURN(pool->tables_, DeviceBuffer::Allocate(offset, "kv step tables"));
  uint8_t* base = pool->tables_.get<uint8_t>();
  pool->step_.row_slots = reinterpret_cast<const int64_t*>(base + slots_at);
  pool->step_.indptr = reinterpret_cast<const int32_t*>(base + indptr_at);
  pool->step_.seq_lens = reinterpret_cast<const int32_t*>(base + lens_at);
  pool->step_.row_run = reinterpret_cast<const int32_t*>(base + run_at);
  pool->step_.row_pos = reinterpret_cast<const int32_t*>(base + pos_at);
  pool->step_.q_indptr = reinterpret_cast<const int32_t*>(base + q_indptr_at);
  pool->step_.causal_offset = reinterpret_cast<const int32_t*>(base + causal_offset_at);
  pool->step_.table = reinterpret_cast<const int32_t*>(base + pool->table_offset_);
  cudaEvent_t event = nullptr;
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaEventCreateWithFlags(&event, cudaEventDisableTiming),
                                   "cudaEventCreate"));
  pool->staged_event_ = event;
  return pool;
}

CudaKvPool::~CudaKvPool() {
  if (staged_event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(staged_event_));
}

absl::Status CudaKvPool::StageStep(std::span<const KvAppendRun> runs, void* stream) {
  const KvCacheConfig& c = options_.cache;
  if (static_cast<int64_t>(runs.size()) > options_.max_step_runs) {
    return absl::InvalidArgumentError(absl::StrCat("cuda kv pool: a step of ", runs.size(),
                                                   " sequences exceeds max_step_runs ",
                                                   options_.max_step_runs));
  }
  int64_t num_rows = 0;
  std::unordered_set<SequenceId> seen;
  for (const KvAppendRun& run : runs) {
    if (run.count < 0 || run.first_position < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda kv pool: sequence ", run.seq, ": negative run"));
    }
    if (!seen.insert(run.seq).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda kv pool: sequence ", run.seq, " appears twice in one step"));
    }
    FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(run.seq));
    const int64_t end = run.first_position + run.count;
    if (end > static_cast<int64_t>(blocks->size()) * c.block_size) {
      return absl::OutOfRangeError(absl::StrCat("cuda kv pool: sequence ", run.seq, ": positions [",
                                                run.first_position, ", ", end,
                                                ") are not reserved"));
    }
    if (end > INT32_MAX) {
      return absl::OutOfRangeError(absl::StrCat("cuda kv pool: sequence ", run.seq,
                                                " is longer than 2^31 positions"));
    }
    num_rows += run.count;
  }
  if (num_rows > options_.max_step_rows) {
    return absl::InvalidArgumentError(absl::StrCat("cuda kv pool: a step of ", num_rows,
                                                   " rows exceeds max_step_rows ",
                                                   options_.max_step_rows));
  }
  FERRY_RETURN_IF_ERROR(UseCudaDevice(options_.device));
  // The previous step's copy must have left the pinned memory before it is rewritten. It was
  // enqueued a whole step ago, so this normally returns at once.
  if (staged_once_) {
    FERRY_RETURN_IF_ERROR(CudaStatus(
        cudaEventSynchronize(static_cast<cudaEvent_t>(staged_event_)), "kv step tables copy"));
  }
  uint8_t* host = staging_.get<uint8_t>();
  const uint8_t* device = tables_.get<uint8_t>();
  auto host_of = [&](const void* device_ptr) {
    return host + (static_cast<const uint8_t*>(device_ptr) - device);
  };
  auto* slots = reinterpret_cast<int64_t*>(host_of(step_.row_slots));
  auto* indptr = reinterpret_cast<int32_t*>(host_of(step_.indptr));
  auto* lens = reinterpret_cast<int32_t*>(host_of(step_.seq_lens));
  auto* row_run = reinterpret_cast<int32_t*>(host_of(step_.row_run));
  auto* row_pos = reinterpret_cast<int32_t*>(host_of(step_.row_pos));
  auto* q_indptr = reinterpret_cast<int32_t*>(host_of(step_.q_indptr));
  auto* causal_offset = reinterpret_cast<int32_t*>(host_of(step_.causal_offset));
  auto* table = reinterpret_cast<int32_t*>(host_of(step_.table));
  int64_t row = 0;
  int32_t table_len = 0;
  int64_t max_run_rows = 0;
  indptr[0] = 0;
  q_indptr[0] = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const KvAppendRun& run = runs[i];
    const std::vector<int32_t>& blocks = **cache_->BlockTable(run.seq);
    const int64_t end = run.first_position + run.count;
    const int64_t used_blocks = (end + c.block_size - 1) / c.block_size;
    // Every block belongs to one sequence and each sequence appears once, so the tables of a
    // step never hold more than total_blocks entries.
    for (int64_t b = 0; b < used_blocks; ++b) table[table_len++] = blocks[b];
    indptr[i + 1] = table_len;
    lens[i] = static_cast<int32_t>(end);
    causal_offset[i] = static_cast<int32_t>(run.first_position);
    max_run_rows = std::max(max_run_rows, run.count);
    for (int64_t p = run.first_position; p < end; ++p, ++row) {
      slots[row] = int64_t{blocks[p / c.block_size]} * c.block_size + p % c.block_size;
      row_run[row] = static_cast<int32_t>(i);
      row_pos[row] = static_cast<int32_t>(p);
    }
    q_indptr[i + 1] = static_cast<int32_t>(row);
  }
  const size_t bytes = table_offset_ + sizeof(int32_t) * static_cast<size_t>(table_len);
  auto cuda_stream = static_cast<cudaStream_t>(stream);
  FERRY_RETURN_IF_ERROR(CudaStatus(
      cudaMemcpyAsync(tables_.get(), host, bytes, cudaMemcpyHostToDevice, cuda_stream),
      "kv step tables copy"));
  FERRY_RETURN_IF_ERROR(CudaStatus(
      cudaEventRecord(static_cast<cudaEvent_t>(staged_event_), cuda_stream), "cudaEventRecord"));
  staged_once_ = true;
  step_.num_runs = static_cast<int>(runs.size());
  step_.num_rows = static_cast<int>(num_rows);
  step_.max_run_rows = static_cast<int>(max_run_rows);
  return absl::OkStatus();
}

absl::Status CudaKvPool::Append(int layer, const void* k, const void* v, DType src_dtype,
                                void* stream) {
  const KvCacheConfig& c = options_.cache;
  if (layer < 0 || layer >= c.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("cuda kv pool: layer ", layer, " out of range [0, ", c.num_layers, ")"));
  }
  kernels::KvAppendArgs args;
  args.k_pool = cache_->k_pool(layer);
  args.v_pool = cache_->v_pool(layer);
  args.dtype = c.dtype;
  args.num_blocks = static_cast<int>(cache_->total_blocks());
  args.num_kv_heads = c.num_kv_heads;
  args.block_size = c.block_size;
  args.head_dim = c.head_dim;
  args.num_rows = step_.num_rows;
  args.row_slots = step_.row_slots;
  args.k = k;
  args.v = v;
  args.src_dtype = src_dtype;
  return CudaStatus(kernels::KvAppend(args, static_cast<cudaStream_t>(stream)), "KvAppend");
}

}  // namespace ferry::kv
