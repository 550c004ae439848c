// The Llama-family decoder: embedding, per layer RMSNorm -> q/k/v projection (+bias) -> RoPE ->
// attention (a pluggable AttentionStep) -> o projection (+bias) + residual -> RMSNorm -> SwiGLU
// MLP + residual, then final RMSNorm and the LM head.
//
// One Forward call runs a batch of chunks: chunk i appends tokens to sequence chunks[i].seq
// starting at chunks[i].start_position (which must equal the sequence's length in the attention
// step). A chunk of many tokens is a prefill (causal over the prompt), a chunk of one a decode
// step; one batch may mix them and hold sequences at different positions. All dense work runs as
// one GEMM over every row of the batch. Output: logits of each chunk's last token,
// (num_chunks, vocab) float32 row-major; ForwardGreedy gives each chunk's arg max instead (the
// Sampler's greedy rule: lowest id on ties, NaN never wins), computed where the logits are.
// Backends: Decoder checks the chunks and builds the step's rows; a DecoderBackend does the math.
// The CPU backend (this file's two-argument constructor) runs float32 weights and activations
// (checkpoint.h explains why) with OpenBLAS, sums of squares in double. The CUDA backend
// (cuda_decoder.h) runs on a GPU with the same model, attention interface and numerics rules.
// Micro-batch pipelining (options.micro_batches = K > 1; the CUDA backend's too, with attention
// off the GPU): the step's rows are cut, at chunk boundaries, into up to K micro-batches of about
// equal rows (SplitMicroBatches); per layer each
// micro-batch's attention is started (AttentionStep::StartAttend) as soon as its q, k, v exist,
// and while it runs (on attention workers) the decoder runs the other micro-batches' dense work:
//   for m: dense-in(0, m), start(0, m)
//   for l: for m: finish(l, m), dense-out(l, m), and unless l is last: dense-in(l+1, m),
//                 start(l+1, m)
// Every row sees the same arithmetic as without micro-batches (the dense ops are row-wise).
// A step that fails is ended with AttentionStep::AbortStep (lengths and KV as before the step);
// failed_sequences() then names the sequences the failure belongs to.
// Ownership: the Decoder borrows the Model and the AttentionStep, which must outlive it.
// Threads: one Forward at a time (scratch buffers are members).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "runtime/model/attention_step.h"
#include "runtime/model/checkpoint.h"

namespace ferry::model {

struct SeqChunk {
  kv::SequenceId seq = 0;
  int64_t start_position = 0;
  std::span<const int32_t> tokens;
};

// One Forward as a backend sees it, already checked by Decoder: row r holds token tokens[r] at
// rows[r] (attention_step.h's StepRow); chunk c's last row is last_rows[c].
struct DecoderStep {
  std::span<const int32_t> tokens;
  std::span<const StepRow> rows;
  std::span<const int32_t> last_rows;
};

// Rows [first, first + count) of a step.
struct RowRange {
  int64_t first = 0;
  int64_t count = 0;
};

// A step's rows cut at chunk boundaries (chunk c ends at row last_rows[c]) into up to
// `micro_batches` ranges of about equal rows, in row order, each at least one chunk.
std::vector<RowRange> SplitMicroBatches(std::span<const int32_t> last_rows, int micro_batches);

struct DecoderOptions {
  int micro_batches = 1;  // >= 1; the CPU backend's (decoder.h's header comment)
};

// The math of a decoder step on one device. Forward runs the attention step's BeginStep,
// StartAttend / FinishAttend per layer and EndStep itself (not AbortStep: the Decoder does), and fills `logits` (num_chunks, vocab) and/or `greedy`
// (num_chunks) where non-null.
class DecoderBackend {
 public:
  virtual ~DecoderBackend() = default;
  virtual absl::Status Forward(const DecoderStep& step, std::vector<float>* logits,
                               std::vector<int32_t>* greedy) = 0;
};

class Decoder {
 public:
  // The CPU backend.
  Decoder(const Model& model, AttentionStep& attention, DecoderOptions options = {});
  // Another backend over the same model and attention step (CreateCudaDecoder builds these).
  Decoder(const Model& model, AttentionStep& attention, std::unique_ptr<DecoderBackend> backend);
  ~Decoder();

  absl::Status Forward(std::span<const SeqChunk> chunks, std::vector<float>* logits);
  absl::Status ForwardGreedy(std::span<const SeqChunk> chunks, std::vector<int32_t>* tokens);

  // After a failed Forward: the sequences its failure belongs to (AttentionStep::AbortStep).
  const std::vector<kv::SequenceId>& failed_sequences() const { return failed_sequences_; }

  const Model& model() const { return model_; }
  AttentionStep& attention() { return attention_; }

 private:
  absl::Status PrepareStep(std::span<const SeqChunk> chunks);
  absl::Status RunStep(std::span<const SeqChunk> chunks, std::vector<float>* logits,
                       std::vector<int32_t>* greedy);

  const Model& model_;
  AttentionStep& attention_;
  std::unique_ptr<DecoderBackend> backend_;
  std::vector<kv::SequenceId> failed_sequences_;
  // The step's rows, reused across calls.
  std::vector<StepRow> rows_;
  std::vector<int32_t> tokens_, last_rows_;
};

}  // namespace ferry::model
