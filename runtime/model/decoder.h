// The Llama-family decoder on the CPU: embedding, per layer RMSNorm -> q/k/v projection (+bias)
// -> RoPE -> attention (a pluggable AttentionStep) -> o projection (+bias) + residual -> RMSNorm
// -> SwiGLU MLP + residual, then final RMSNorm and the LM head.
//
// One Forward call runs a batch of chunks: chunk i appends tokens to sequence chunks[i].seq
// starting at chunks[i].start_position (which must equal the sequence's length in the attention
// step). A chunk of many tokens is a prefill (causal over the prompt), a chunk of one a decode
// step; one batch may mix them and hold sequences at different positions. All dense work runs as
// one GEMM over every row of the batch. Output: logits of each chunk's last token,
// (num_chunks, vocab) float32 row-major. Numerics: float32 weights and activations (checkpoint.h
// explains why), sums of squares in double.
// Micro-batch pipelining (options.micro_batches = K > 1): the step's rows are cut, at chunk
// boundaries, into up to K micro-batches of about equal rows; per layer each micro-batch's
// attention is started (AttentionStep::StartAttend) as soon as its q, k, v exist, and while it
// runs (on attention workers) the decoder runs the other micro-batches' dense work:
//   for m: dense-in(0, m), start(0, m)
//   for l: for m: finish(l, m), dense-out(l, m), and unless l is last: dense-in(l+1, m),
//                 start(l+1, m)
// Every row sees the same arithmetic as without micro-batches (the dense ops are row-wise).
// A step that fails after BeginStep is ended with AttentionStep::AbortStep (lengths and KV as
// before the step); failed_sequences() then names the sequences the failure belongs to.
// Ownership: the Decoder borrows the Model and the AttentionStep, which must outlive it.
// Threads: one Forward at a time (scratch buffers are members).
#pragma once

#include <cstdint>
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

struct DecoderOptions {
  int micro_batches = 1;  // >= 1
};

class Decoder {
 public:
  Decoder(const Model& model, AttentionStep& attention, DecoderOptions options = {});

  absl::Status Forward(std::span<const SeqChunk> chunks, std::vector<float>* logits);
  // After a failed Forward: the sequences its failure belongs to (AttentionStep::AbortStep).
  const std::vector<kv::SequenceId>& failed_sequences() const { return failed_sequences_; }

  const Model& model() const { return model_; }
  AttentionStep& attention() { return attention_; }

 private:
  // Rows [first, first + count) of the step, at chunk boundaries.
  struct RowRange {
    int64_t first;
    int64_t count;
  };
  std::vector<RowRange> MicroBatches(std::span<const SeqChunk> chunks, int64_t rows) const;
  // A layer's dense work on a range of rows: before attention (norm, QKV, RoPE: x_ to q_, k_,
  // v_) and after it (o projection, residual, norm, MLP: attn_ to x_).
  void DenseIn(int layer, RowRange range);
  void DenseOut(int layer, RowRange range);
  absl::Status StartAttend(int layer, RowRange range);
  // The layers of a step whose rows are set up (x_ embedded): BeginStep done, EndStep not.
  absl::Status RunLayers(std::span<const SeqChunk> chunks, int64_t rows);

  const Model& model_;
  AttentionStep& attention_;
  const DecoderOptions options_;
  std::vector<float> inv_freq_;
  std::vector<kv::SequenceId> failed_sequences_;
  // Scratch, reused across calls.
  std::vector<StepRow> rows_;
  std::vector<float> x_, h_, qkv_, q_, k_, v_, attn_, gate_up_, act_, cos_sin_, last_;
};

}  // namespace ferry::model
