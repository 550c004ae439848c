#include "tests/common/tiny_models.h"

#include <unistd.h>

#include <filesystem>
#include <string>

#include "gtest/gtest.h"
#include "runtime/model/tiny_checkpoint.h"

namespace ferry::model::test {

std::vector<DecoderVariant> DecoderVariants() {
  return {DecoderVariant{"llama_gqa", Architecture::kLlama, false, false, false},
          DecoderVariant{"qwen2_bias", Architecture::kQwen2, false, false, false},
          DecoderVariant{"llama3_bias_tied", Architecture::kLlama, true, true, true},
          DecoderVariant{"mistral", Architecture::kMistral, false, false, false}};
}

std::vector<DecoderVariant> LinearDecoderVariants() {
  return {DecoderVariant{"llama_linear_1_plus_x", Architecture::kLlama, false, false, false,
                         AttentionKind::kLinear},
          DecoderVariant{"qwen2_linear_elu", Architecture::kQwen2, false, false, false,
                         AttentionKind::kLinear, kernels::LinearFeatureMap::kEluPlusOne}};
}

absl::StatusOr<std::unique_ptr<Model>> MakeTinyDecoderModel(std::string_view tag,
                                                            const DecoderVariant& variant,
                                                            DType dtype, uint64_t seed) {
  TinyCheckpointOptions o;
  o.out_dir = ::testing::TempDir() + "/ferry_" + std::string(tag) + "_" + variant.name + "_" +
              std::to_string(getpid());
  std::filesystem::remove_all(o.out_dir);
  o.arch = variant.arch;
  o.num_layers = 2;
  o.hidden_size = 128;
  o.num_heads = 4;
  o.num_kv_heads = 2;
  o.head_dim = 64;
  o.vocab_size = 200;
  o.dtype = dtype;
  o.rope_llama3 = variant.llama3;
  o.max_positions = 256;  // llama3: original 64, so the prompts cross the scaled band
  o.attention_bias = variant.bias;
  o.tie_word_embeddings = variant.tied;
  o.attention_kind = variant.attention;
  o.linear_feature_map = variant.feature_map;
  o.seed = seed;
  if (absl::Status written = WriteTinyCheckpoint(o); !written.ok()) return written;
  return LoadModel(o.out_dir);
}

InProcessAttentionOptions FloatKvAttentionOptions(const ModelConfig& config, int64_t blocks) {
  InProcessAttentionOptions a;
  a.num_heads = config.num_heads;
  a.kv.num_layers = config.num_layers;
  a.kv.num_kv_heads = config.num_kv_heads;
  a.kv.head_dim = config.head_dim;
  a.kv.dtype = DType::kFloat32;
  a.kv.block_size = 16;
  a.kv.capacity_bytes = blocks * kv::KvBlockBytes(a.kv);
  return a;
}

}  // namespace ferry::model::test
