// Writes a small random checkpoint in exactly the Hugging Face layout and tensor names
// (config.json + model.safetensors), for tests, demos and parity runs against transformers.
//
// Deterministic: every tensor is drawn from its own stream, seeded from (seed, tensor name) with
// splitmix64 and Box-Muller, so the bytes do not depend on the platform's <random>, nor on the
// order tensors are written. Scaling (why: a default init gives near-uniform logits, where greedy
// tokens flip on rounding noise): unit-variance embeddings, projections at 1/sqrt(fan_in) so
// attention scores have unit spread, norms drawn in [0.8, 1.2], and an LM head at
// 3/sqrt(hidden), which puts logits at a spread of about 3 and top-2 margins far above fp32/bf16
// rounding. Values are rounded to the requested dtype when written.
// Writes into options.out_dir (created if absent); existing files of the same names are replaced.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "runtime/model/model_config.h"

namespace ferry::model {

struct TinyCheckpointOptions {
  std::string out_dir;
  Architecture arch = Architecture::kLlama;
  int num_layers = 2;
  int hidden_size = 256;
  int intermediate_size = 0;  // 0: 2 * hidden_size
  int num_heads = 4;
  int num_kv_heads = 2;
  int head_dim = 0;  // 0: hidden / heads
  int vocab_size = 512;
  uint64_t seed = 0;
  DType dtype = DType::kBFloat16;
  int64_t max_positions = 4096;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // Llama only; Qwen2 always has q/k/v biases
  bool rope_llama3 = false;     // llama3 rope scaling (factor 8, original 1/4 of max positions)
  double rope_theta = 10000.0;
  bool transformers5_form = true;  // config keys of transformers >= 5
  // Linear attention (model_config.h): the same tensors, another attention function.
  AttentionKind attention_kind = AttentionKind::kSoftmax;
  kernels::LinearFeatureMap linear_feature_map = kernels::LinearFeatureMap::kOnePlusXMaxNorm;
  bool linear_normalize = true;
};

// The config a TinyCheckpointOptions describes (also validates the options).
absl::StatusOr<ModelConfig> TinyConfig(const TinyCheckpointOptions& options);

absl::Status WriteTinyCheckpoint(const TinyCheckpointOptions& options);

}  // namespace ferry::model
