// Attention as a pluggable step of the decoder, so the same model code runs with in-process
// attention (InProcessAttention, below; CudaAttention on a GPU, cuda_attention.h) or with
// attention offloaded to workers (runtime/offload).
//
// One decode/prefill step of the decoder is a batch of token rows; row r belongs to sequence
// rows[r].seq at position rows[r].position. The rows of one sequence are contiguous in the batch
// and hold consecutive positions that start at the sequence's current length (a prefill chunk is
// many rows, a decode step one). Per step the decoder calls:
//   BeginStep(rows)                  once, before layer 0
//   Attend(layer, q, k, v, out)      once per layer, in layer order
//     q   (rows, num_heads, head_dim)     float32, RoPE applied
//     k,v (rows, num_kv_heads, head_dim)  float32, RoPE applied to k: the rows' new KV entries
//     out (rows, num_heads, head_dim)     float32: causal attention of each row over positions
//                                          [0, its position] of its sequence, new rows included
//   EndStep()                        once, after the last layer: the rows become part of the
//                                    sequences' lengths. A failed step leaves lengths unchanged.
// Softmax scale 1/sqrt(head_dim); GQA maps q head h to KV head h / (num_heads / num_kv_heads).
// Threads: one step at a time per object; the caller serialises.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ferry/kernels/thread_pool.h"
#include "runtime/kv/kv_cache.h"

namespace ferry::model {

struct StepRow {
  kv::SequenceId seq = 0;
  int64_t position = 0;
};

class AttentionStep {
 public:
  virtual ~AttentionStep() = default;
  virtual absl::Status AddSequence(kv::SequenceId seq) = 0;
  virtual absl::Status FreeSequence(kv::SequenceId seq) = 0;
  virtual absl::StatusOr<int64_t> Length(kv::SequenceId seq) const = 0;
  virtual absl::Status BeginStep(std::span<const StepRow> rows) = 0;
  virtual absl::Status Attend(int layer, const float* q, const float* k, const float* v,
                              float* out) = 0;
  virtual absl::Status EndStep() = 0;

  // nullptr (the default): Attend takes host pointers and is done when it returns. Otherwise the
  // step lives on a CUDA device: Attend takes device pointers, enqueues its work on this stream
  // (a cudaStream_t) and returns at once, and BeginStep's uploads are ordered on the same
  // stream. Such an Attend launches only work whose arguments depend on the layer, the step's
  // row count and whether every row is a decode row (one row per sequence), and never waits on
  // the host, so a decoder may capture a step's Attend calls into a CUDA graph and replay it in
  // place of the Attend calls of a later step of the same shape, after that step's BeginStep.
  virtual void* device_stream() const { return nullptr; }
};

// Groups a step's rows into runs (one per sequence, in row order) and checks them against the
// cache: a sequence's rows contiguous, at consecutive positions that start at its length.
// INVALID_ARGUMENT otherwise, NOT_FOUND for an unknown sequence. Shared by the in-process steps.
absl::Status GroupStepRows(std::span<const StepRow> rows, const kv::KvCache& cache,
                           std::vector<kv::KvAppendRun>* runs);

struct InProcessAttentionOptions {
  int num_heads = 0;
  kv::KvCacheConfig kv;  // num_layers, num_kv_heads, head_dim, dtype, block_size, capacity
  int num_threads = 1;   // the attention kernel's pool (1: the calling thread only)
};

// Host KV cache (runtime/kv) + DecodeAttentionCpu. Prefill runs through the same kernel: each
// prompt row is a query whose range ends at its own position, which makes it causal.
// Head dims are the kernel's (64, 128, 256).
class InProcessAttention : public AttentionStep {
 public:
  static absl::StatusOr<std::unique_ptr<InProcessAttention>> Create(
      const InProcessAttentionOptions& options);

  absl::Status AddSequence(kv::SequenceId seq) override;
  absl::Status FreeSequence(kv::SequenceId seq) override;
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override;
  absl::Status BeginStep(std::span<const StepRow> rows) override;
  absl::Status Attend(int layer, const float* q, const float* k, const float* v,
                      float* out) override;
  absl::Status EndStep() override;

  kv::KvCache& cache() { return *cache_; }

 private:
  InProcessAttention(const InProcessAttentionOptions& options, std::unique_ptr<kv::KvCache> cache);

  InProcessAttentionOptions options_;
  std::unique_ptr<kv::KvCache> cache_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  bool in_step_ = false;
  int64_t num_rows_ = 0;
  std::vector<kv::KvAppendRun> runs_;
  std::vector<int32_t> indptr_, block_table_, seq_lens_;
  std::vector<float> lse_;
  std::vector<uint16_t> k_half_, v_half_;  // staging for bf16 / fp16 caches
};

}  // namespace ferry::model
