// Attention as a pluggable step of the decoder, so the same model code runs with in-process
// attention (InProcessAttention, below; CudaAttention on a GPU, cuda_attention.h) or with
// attention offloaded to workers (runtime/offload).
//
// One decode/prefill step of the decoder is a batch of token rows; row r belongs to sequence
// rows[r].seq at position rows[r].position. The rows of one sequence are contiguous in the batch
// and hold consecutive positions that start at the sequence's current length (a prefill chunk is
// many rows, a decode step one). Per step the decoder calls:
//   BeginStep(rows)                  once, before layer 0
//   per layer, in layer order, for each micro-batch (a range of rows [first_row, first_row + n)
//   holding whole sequences' rows; one range of all rows without micro-batching):
//     StartAttend(layer, first_row, n, q, k, v, out)   sends the range's attention
//     FinishAttend(layer, first_row)                   waits for it and writes out
//       q   (n, num_heads, head_dim)     float32, RoPE applied
//       k,v (n, num_kv_heads, head_dim)  float32, RoPE applied to k: the rows' new KV entries
//       out (n, num_heads, head_dim)     float32: causal attention of each row over positions
//                                        [0, its position] of its sequence, new rows included
//     StartAttend may return before the attention is done (offloaded attention then runs on
//     the workers while the caller runs another micro-batch's dense layers); it keeps nothing
//     of q, k, v, so those buffers are free on return; out must stay valid until FinishAttend.
//     Ranges of one layer are disjoint; every started range is finished before EndStep.
//   EndStep()                        once, after the last layer: the rows become part of the
//                                    sequences' lengths.
// A failed step (any call above returned an error, BeginStep included) is ended by AbortStep():
// it waits for attention still in flight and puts every sequence's KV back at its length before
// the step, wherever it is held, so the step can be retried; it returns the sequences the failure
// belongs to (e.g. their KV was lost with a worker): the caller fails those and may retry the
// rest. An empty list means the failure is not tied to particular sequences; KV that does not fit
// is such a failure (RESOURCE_EXHAUSTED: the sequences holding the room are the ones to give way,
// which is the caller's choice).
// CheckCapacity(positions) says RESOURCE_EXHAUSTED when a sequence of that many positions could
// not fit even in all of the KV capacity (a scheduler refuses such a request up front).
// Softmax scale 1/sqrt(head_dim); GQA maps q head h to KV head h / (num_heads / num_kv_heads).
// Threads: one step at a time per object; the caller serialises.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "ferry/kernels/thread_pool.h"
#include "ferry/kernels/linear_attention.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/state_cache.h"
#include "runtime/model/model_config.h"

namespace ferry::model {

struct StepRow {
  kv::SequenceId seq = 0;
  int64_t position = 0;
};

// The rows of one sequence in a step: rows [first_row, first_row + count) hold its positions
// [first_position, first_position + count).
struct StepRun {
  kv::SequenceId seq = 0;
  int64_t first_row = 0;
  int64_t first_position = 0;
  int64_t count = 0;
};

// A step's rows as runs, in row order; INVALID_ARGUMENT when a sequence's rows are not
// contiguous or not consecutive positions.
absl::StatusOr<std::vector<StepRun>> GroupRuns(std::span<const StepRow> rows);
// GroupRuns, then each run checked to continue its sequence: first_position == length(seq)
// (INVALID_ARGUMENT otherwise; length's error, e.g. NOT_FOUND, as it is). The attention steps'
// BeginStep.
absl::StatusOr<std::vector<StepRun>> GroupStepRows(
    std::span<const StepRow> rows,
    absl::FunctionRef<absl::StatusOr<int64_t>(kv::SequenceId)> length);
// The indices of the runs that make up rows [first_row, first_row + num_rows); INVALID_ARGUMENT
// when the range is empty, leaves the step or cuts a run.
absl::StatusOr<std::vector<size_t>> RunsInRange(std::span<const StepRun> runs, int64_t first_row,
                                                int64_t num_rows);

// The (layer, first row) ranges a step has started and not finished: the bookkeeping behind the
// in-process steps' FinishAttend and EndStep checks.
class StartedRanges {
 public:
  void Clear() { started_.clear(); }
  void Add(int layer, int64_t first_row) { started_.emplace_back(layer, first_row); }
  // FAILED_PRECONDITION when that range was not started (or already finished).
  absl::Status Finish(int layer, int64_t first_row);
  // FAILED_PRECONDITION while any range is unfinished.
  absl::Status CheckAllFinished() const;

 private:
  std::vector<std::pair<int, int64_t>> started_;
};

class AttentionStep {
 public:
  virtual ~AttentionStep() = default;
  virtual absl::Status AddSequence(kv::SequenceId seq) = 0;
  virtual absl::Status FreeSequence(kv::SequenceId seq) = 0;
  virtual absl::StatusOr<int64_t> Length(kv::SequenceId seq) const = 0;
  virtual absl::Status BeginStep(std::span<const StepRow> rows) = 0;
  virtual absl::Status StartAttend(int layer, int64_t first_row, int64_t num_rows, const float* q,
                                   const float* k, const float* v, float* out) = 0;
  virtual absl::Status FinishAttend(int layer, int64_t first_row) = 0;
  virtual absl::Status EndStep() = 0;
  virtual std::vector<kv::SequenceId> AbortStep() = 0;
  virtual absl::Status CheckCapacity(int64_t positions) = 0;

  // nullptr (the default): StartAttend takes host pointers. Otherwise the step lives on a CUDA
  // device: StartAttend takes device pointers, enqueues its work on this stream (a
  // cudaStream_t) and returns at once, and BeginStep's uploads are ordered on the same stream.
  // Such a StartAttend launches only work whose arguments depend on the layer, the step's row
  // count and whether every row is a decode row (one row per sequence), and never waits on the
  // host, so a decoder may capture a step's attention calls into a CUDA graph and replay it in
  // place of the calls of a later step of the same shape, after that step's BeginStep.
  virtual void* device_stream() const { return nullptr; }
};

struct InProcessAttentionOptions {
  int num_heads = 0;
  kv::KvCacheConfig kv;  // num_layers, num_kv_heads, head_dim, dtype, block_size, capacity
  int num_threads = 1;   // the attention kernel's pool (1: the calling thread only)
};

// Host KV cache (runtime/kv) + DecodeAttentionCpu. Prefill runs through the same kernel: each
// prompt row is a query whose range ends at its own position, which makes it causal.
// StartAttend computes at once (FinishAttend only checks), so micro-batches run one after the
// other. Head dims are the kernel's (64, 128, 256).
class InProcessAttention : public AttentionStep {
 public:
  static absl::StatusOr<std::unique_ptr<InProcessAttention>> Create(
      const InProcessAttentionOptions& options);

  absl::Status AddSequence(kv::SequenceId seq) override;
  absl::Status FreeSequence(kv::SequenceId seq) override;
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override;
  absl::Status BeginStep(std::span<const StepRow> rows) override;
  absl::Status StartAttend(int layer, int64_t first_row, int64_t num_rows, const float* q,
                           const float* k, const float* v, float* out) override;
  absl::Status FinishAttend(int layer, int64_t first_row) override;
  absl::Status EndStep() override;
  std::vector<kv::SequenceId> AbortStep() override;
  absl::Status CheckCapacity(int64_t positions) override;

  kv::KvCache& cache() { return *cache_; }

 private:
  InProcessAttention(const InProcessAttentionOptions& options, std::unique_ptr<kv::KvCache> cache);

  InProcessAttentionOptions options_;
  std::unique_ptr<kv::KvCache> cache_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  bool in_step_ = false;
  int64_t num_rows_ = 0;
  std::vector<StepRun> runs_;
  std::vector<int32_t> indptr_, block_table_, seq_lens_;
  std::vector<int32_t> range_indptr_;
  StartedRanges started_;
  std::vector<float> lse_;
  std::vector<uint16_t> k_half_, v_half_;  // staging for bf16 / fp16 caches
};

// Linear attention in process (linear_attention.h): a recurrent state per sequence (StateCache)
// instead of KV blocks, advanced by LinearAttentionForwardCpu over prompt chunks and by
// LinearAttentionDecodeCpu over decode rows, all in float32. The new k and v are rounded to
// options.kv.dtype and widened back first, exactly as they reach an attention worker, so the
// two give the same bits. options.kv.block_size is unused; capacity buys whole state slots.
// AbortStep restores the states a failed step had advanced (the cache's backups).
class InProcessLinearAttention : public AttentionStep {
 public:
  static absl::StatusOr<std::unique_ptr<InProcessLinearAttention>> Create(
      const InProcessAttentionOptions& options, kernels::LinearFeatureMap feature_map,
      bool normalize);

  absl::Status AddSequence(kv::SequenceId seq) override;
  absl::Status FreeSequence(kv::SequenceId seq) override;
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override;
  absl::Status BeginStep(std::span<const StepRow> rows) override;
  absl::Status StartAttend(int layer, int64_t first_row, int64_t num_rows, const float* q,
                           const float* k, const float* v, float* out) override;
  absl::Status FinishAttend(int layer, int64_t first_row) override;
  absl::Status EndStep() override;
  std::vector<kv::SequenceId> AbortStep() override;
  absl::Status CheckCapacity(int64_t positions) override;

  kv::StateCache& states() { return *states_; }

 private:
  InProcessLinearAttention(const InProcessAttentionOptions& options,
                           kernels::LinearAttentionConfig kernel,
                           std::unique_ptr<kv::StateCache> states);

  InProcessAttentionOptions options_;
  kernels::LinearAttentionConfig kernel_;  // num_seqs set per call
  std::unique_ptr<kv::StateCache> states_;
  std::unique_ptr<kernels::ThreadPool> pool_;
  std::map<kv::SequenceId, int64_t> lengths_;
  bool in_step_ = false;
  std::vector<StepRun> runs_;
  StartedRanges started_;
  std::vector<std::pair<kv::SequenceId, int>> saved_;  // (sequence, layer) advanced this step
  std::vector<float> k_, v_, q_batch_, k_batch_, v_batch_, out_batch_;
  std::vector<uint8_t> rounded_;
  std::vector<int32_t> slots_;
};

// In-process attention of the kind `config` selects (softmax: InProcessAttention; linear:
// InProcessLinearAttention with its feature map), from the same options.
absl::StatusOr<std::unique_ptr<AttentionStep>> CreateInProcessAttention(
    const ModelConfig& config, const InProcessAttentionOptions& options);

}  // namespace ferry::model
