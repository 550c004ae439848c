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

class Decoder {
 public:
  Decoder(const Model& model, AttentionStep& attention);

  absl::Status Forward(std::span<const SeqChunk> chunks, std::vector<float>* logits);

  const Model& model() const { return model_; }
  AttentionStep& attention() { return attention_; }

 private:
  const Model& model_;
  AttentionStep& attention_;
  std::vector<float> inv_freq_;
  // Scratch, reused across calls.
  std::vector<StepRow> rows_;
  std::vector<float> x_, h_, qkv_, q_, k_, v_, attn_, gate_up_, act_, cos_sin_, last_;
};

}  // namespace ferry::model
