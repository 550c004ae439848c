// In-process attention on a CUDA device: the AttentionStep of the CUDA decoder's single-machine
// mode (`--device cuda:N --local-attention`).
//
// KV lives in a kv::CudaKvPool (device pools in DESIGN.md's layout, the host cache's allocator).
// BeginStep groups the rows into runs (attention_step.h's GroupStepRows), reserves blocks and stages the step's
// tables on the device without a host synchronisation; StartAttend (device pointers, attention_step.h)
// appends the rows' k/v (float32, converted to the cache dtype) and runs
//   LeanDecode (kernels/include/ferry/kernels/lean_attention.h) when every row is a decode row,
//     the cache is bf16/fp16 and the build serves the head dim and group, else
//   PrefillAttention (prefill_attention.h, tensor cores) for bf16/fp16 caches on the head dims
//     the build serves (FERRY_HEAD_DIMS): each run is a chunk whose rows attend causally over
//     their sequence's prefix (prefills, mixed steps, decode steps LeanDecode does not serve);
//     its q and softmax weights are rounded to the cache dtype (bf16: a few 1e-3 relative), else
//   PagedPrefillAttention (paged_prefill_attention.h), the fallback: fp32 caches (exact float32
//     arithmetic, for the exactness tests), head dims the build does not serve, unaligned q/out.
// All read only device tables at fixed addresses (cuda_kv_pool.h stages them in BeginStep), so
// the decoder may replay captured decode steps (device_stream()). out is float32
// (rows, num_heads, head_dim), normalised.
// Memory: kv.capacity_bytes of device memory for the pools, plus tables and workspace sized by
// max_step_rows / max_step_seqs. A step larger than those is INVALID_ARGUMENT.
// Threads: one owner thread (the decoder's); all work is on device_stream(), created here.
// Availability: CreateCudaAttention is FAILED_PRECONDITION in builds without CUDA or when the
// device does not exist. No CUDA types in this header.
#pragma once

#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/common/cuda_util.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/model/attention_step.h"

namespace ferry::kv {
class CudaKvPool;
}

namespace ferry::model {

struct CudaAttentionOptions {
  int num_heads = 0;
  kv::KvCacheConfig kv;  // capacity_bytes counts device memory
  int device = 0;
  int max_step_rows = 2048;
  int max_step_seqs = 256;
};

absl::StatusOr<std::unique_ptr<AttentionStep>> CreateCudaAttention(
    const CudaAttentionOptions& options);

// The concrete step, for CUDA-built code that needs the pool (benchmarks, GPU tests).
class CudaAttention : public AttentionStep {
 public:
  static absl::StatusOr<std::unique_ptr<CudaAttention>> Create(const CudaAttentionOptions& options);
  ~CudaAttention() override;

  absl::Status AddSequence(kv::SequenceId seq) override;
  absl::Status FreeSequence(kv::SequenceId seq) override;
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override;
  absl::Status BeginStep(std::span<const StepRow> rows) override;
  // One range of all the step's rows (micro-batches are for offloaded attention): the work is
  // enqueued on device_stream() and FinishAttend only checks the call order.
  absl::Status StartAttend(int layer, int64_t first_row, int64_t num_rows, const float* q,
                           const float* k, const float* v, float* out) override;
  absl::Status FinishAttend(int layer, int64_t first_row) override;
  std::vector<kv::SequenceId> AbortStep() override;
  absl::Status CheckCapacity(int64_t positions) override;
  absl::Status EndStep() override;
  void* device_stream() const override { return stream_; }

  kv::CudaKvPool& pool() { return *pool_; }
  // Whether decode steps run LeanDecode (else the prefill kernels serve every step).
  bool uses_lean_decode() const { return lean_workspace_.bytes() > 0; }
  // Whether prefill and mixed steps run PrefillAttention (else PagedPrefillAttention).
  bool uses_prefill_tensor_cores() const { return prefill_tensor_cores_; }

 private:
  explicit CudaAttention(const CudaAttentionOptions& options);

  CudaAttentionOptions options_;
  void* stream_ = nullptr;  // cudaStream_t
  std::unique_ptr<kv::CudaKvPool> pool_;
  DeviceBuffer lean_workspace_;  // empty when LeanDecode does not serve the shape
  DeviceBuffer lse_;             // (max_step_rows, num_heads) float32
  bool prefill_tensor_cores_ = false;
  bool in_step_ = false;
  bool decode_only_ = false;
  std::vector<kv::KvAppendRun> runs_;
};

}  // namespace ferry::model
