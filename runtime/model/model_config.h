// The shape and hyper-parameters of a Llama-family decoder, read from a Hugging Face config.json.
//
// Accepted architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM. Both key forms
// transformers writes are read: before version 5 (rope_theta, rope_scaling, torch_dtype) and since
// (rope_parameters, dtype). RoPE types: "default" and "llama3"; anything else is UNIMPLEMENTED.
// Biases: Qwen2 always has q/k/v biases; Llama's attention_bias adds q/k/v/o biases; Mistral has
// none. Features Ferry does not implement (mlp_bias, Qwen2 sliding windows) are refused, never
// silently ignored. Every error is INVALID_ARGUMENT naming the key, or UNIMPLEMENTED.
// Linear attention (Ferry's own keys; transformers ignores them): "attention_kind": "linear"
// replaces softmax attention by causal linear attention (kernels/.../linear_attention.h) with
// "linear_feature_map" ("1+x", the default: 1 + q.k over running max norms; "elu+1"; or
// "identity", unnormalised only) and "linear_normalize" (default true). RoPE is applied to q and
// k before the feature map, as in the softmax model. "attention_kind": "softmax" or absent is
// the usual model.
// Plain value types; no threads, no ownership.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "ferry/kernels/dtype.h"
#include "ferry/kernels/linear_attention.h"

namespace ferry::model {

enum class Architecture { kLlama, kMistral, kQwen2 };

std::string_view ArchitectureName(Architecture arch);  // the HF class name

enum class RopeType { kDefault, kLlama3 };

struct RopeConfig {
  RopeType type = RopeType::kDefault;
  double theta = 10000.0;
  // llama3 only.
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

enum class AttentionKind { kSoftmax, kLinear };

// config.json's names of the feature maps: "1+x", "elu+1", "identity".
std::string_view LinearFeatureMapName(kernels::LinearFeatureMap map);
bool ParseLinearFeatureMap(std::string_view name, kernels::LinearFeatureMap* map);

struct ModelConfig {
  Architecture arch = Architecture::kLlama;
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int vocab_size = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // q_proj, k_proj, v_proj carry .bias
  bool o_bias = false;    // o_proj carries .bias
  DType dtype = DType::kBFloat16;  // the checkpoint's declared dtype
  std::vector<int32_t> eos_token_ids;
  int32_t bos_token_id = -1;  // -1: none
  int64_t sliding_window = 0;  // Mistral (0: none); the decoder refuses positions beyond it
  AttentionKind attention_kind = AttentionKind::kSoftmax;
  kernels::LinearFeatureMap linear_feature_map = kernels::LinearFeatureMap::kOnePlusXMaxNorm;
  bool linear_normalize = true;
};

// Parses config.json text. Checks that sizes are positive and consistent (heads divide, head_dim
// times heads fits the projections as HF defines them).
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);

// Reads <dir>/config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

// config.json text in the transformers >= 5 form (rope_parameters, dtype) or the older form,
// for the tiny-checkpoint writer and tests.
std::string ModelConfigToJson(const ModelConfig& config, bool transformers5_form);

}  // namespace ferry::model
