// config.json parsing: both transformers key forms, the architectures' bias rules, errors.
#include "runtime/model/model_config.h"

#include <string>

#include "gtest/gtest.h"

namespace ferry::model {
namespace {

constexpr char kLlama3Pre5[] = R"({
  "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
  "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
  "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
  "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
  "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "attention_bias": false, "mlp_bias": false,
  "hidden_act": "silu"})";

constexpr char kLlama3Since5[] = R"({
  "architectures": ["LlamaForCausalLM"], "hidden_size": 2048, "intermediate_size": 8192,
  "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
  "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
  "rope_parameters": {"rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
  "low_freq_factor": 1.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": true, "dtype": "bfloat16", "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009]})";

void ExpectLlama32(const ModelConfig& c) {
  EXPECT_EQ(c.arch, Architecture::kLlama);
  EXPECT_EQ(c.hidden_size, 2048);
  EXPECT_EQ(c.num_kv_heads, 8);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.rope.type, RopeType::kLlama3);
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 32.0);
  EXPECT_EQ(c.rope.original_max_position_embeddings, 8192);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.dtype, DType::kBFloat16);
  EXPECT_EQ(c.bos_token_id, 128000);
  EXPECT_EQ(c.eos_token_ids, (std::vector<int32_t>{128001, 128008, 128009}));
  EXPECT_FALSE(c.qkv_bias);
}

TEST(ModelConfigTest, ParsesTransformersBefore5Form) {
  auto c = ParseModelConfig(kLlama3Pre5);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectLlama32(*c);
}

TEST(ModelConfigTest, ParsesTransformers5Form) {
  auto c = ParseModelConfig(kLlama3Since5);
  ASSERT_TRUE(c.ok()) << c.status();
  ExpectLlama32(*c);
}

TEST(ModelConfigTest, Qwen2HasQkvBiasAndDefaults) {
  auto c = ParseModelConfig(R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 896,
      "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
      "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0,
      "use_sliding_window": false, "sliding_window": 32768, "torch_dtype": "bfloat16",
      "eos_token_id": 151643, "tie_word_embeddings": true})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->arch, Architecture::kQwen2);
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_FALSE(c->o_bias);
  EXPECT_EQ(c->head_dim, 64);
  EXPECT_EQ(c->rope.type, RopeType::kDefault);
  EXPECT_EQ(c->eos_token_ids, std::vector<int32_t>{151643});
}

TEST(ModelConfigTest, LlamaAttentionBiasAddsOBias) {
  auto c = ParseModelConfig(R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
      "vocab_size": 10, "attention_bias": true})");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->qkv_bias);
  EXPECT_TRUE(c->o_bias);
  EXPECT_EQ(c->num_kv_heads, 1);  // absent: multi-head attention
}

TEST(ModelConfigTest, RoundTripsBothForms) {
  auto c = ParseModelConfig(kLlama3Pre5);
  ASSERT_TRUE(c.ok());
  for (bool form5 : {false, true}) {
    auto again = ParseModelConfig(ModelConfigToJson(*c, form5));
    ASSERT_TRUE(again.ok()) << again.status();
    ExpectLlama32(*again);
  }
}

TEST(ModelConfigTest, LinearAttentionKeysParseAndRoundTrip) {
  const std::string base = R"("architectures": ["LlamaForCausalLM"], "hidden_size": 64,
      "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
      "vocab_size": 10)";
  auto softmax = ParseModelConfig("{" + base + "}");
  ASSERT_TRUE(softmax.ok()) << softmax.status();
  EXPECT_EQ(softmax->attention_kind, AttentionKind::kSoftmax);
  auto linear = ParseModelConfig("{" + base + R"(, "attention_kind": "linear"})");
  ASSERT_TRUE(linear.ok()) << linear.status();
  EXPECT_EQ(linear->attention_kind, AttentionKind::kLinear);
  EXPECT_EQ(linear->linear_feature_map, kernels::LinearFeatureMap::kOnePlusXMaxNorm);
  EXPECT_TRUE(linear->linear_normalize);
  auto identity = ParseModelConfig("{" + base + R"(, "attention_kind": "linear",
      "linear_feature_map": "identity", "linear_normalize": false})");
  ASSERT_TRUE(identity.ok()) << identity.status();
  EXPECT_EQ(identity->linear_feature_map, kernels::LinearFeatureMap::kIdentity);
  EXPECT_FALSE(identity->linear_normalize);
  for (bool form5 : {false, true}) {
    auto again = ParseModelConfig(ModelConfigToJson(*identity, form5));
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->attention_kind, AttentionKind::kLinear);
    EXPECT_EQ(again->linear_feature_map, kernels::LinearFeatureMap::kIdentity);
    EXPECT_FALSE(again->linear_normalize);
  }
  EXPECT_EQ(ModelConfigToJson(*softmax, true).find("linear"), std::string::npos);
}

TEST(ModelConfigTest, RejectsBadConfigsWithNamedErrors) {
  const std::string base = R"("hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10)";
  struct Case {
    std::string json;
    absl::StatusCode code;
    std::string needle;
  };
  const Case cases[] = {
      {"not json", absl::StatusCode::kInvalidArgument, "not a JSON object"},
      {R"({"architectures": ["GPT2LMHeadModel"], )" + base + "}", absl::StatusCode::kUnimplemented,
       "GPT2LMHeadModel"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})",
       absl::StatusCode::kInvalidArgument, "intermediate_size"},
      {R"({"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 3, )" + base + "}",
       absl::StatusCode::kInvalidArgument, "num_key_value_heads"},
      {R"({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "yarn",
          "factor": 4.0}, )" + base + "}",
       absl::StatusCode::kUnimplemented, "yarn"},
      {R"({"architectures": ["LlamaForCausalLM"], "rope_scaling": {"rope_type": "llama3"}, )" +
           base + "}",
       absl::StatusCode::kInvalidArgument, "factor"},
      {R"({"architectures": ["LlamaForCausalLM"], "torch_dtype": "int8", )" + base + "}",
       absl::StatusCode::kInvalidArgument, "torch_dtype"},
      {R"({"architectures": ["LlamaForCausalLM"], "eos_token_id": 99, )" + base + "}",
       absl::StatusCode::kInvalidArgument, "eos_token_id"},
      {R"({"architectures": ["LlamaForCausalLM"], "hidden_size": "64",
          "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
          "vocab_size": 10})",
       absl::StatusCode::kInvalidArgument, "hidden_size"},
      {R"({"architectures": ["Qwen2ForCausalLM"], "use_sliding_window": true, )" + base + "}",
       absl::StatusCode::kUnimplemented, "sliding"},
      {R"({"architectures": ["LlamaForCausalLM"], "attention_kind": "mamba", )" + base + "}",
       absl::StatusCode::kInvalidArgument, "attention_kind"},
      {R"({"architectures": ["LlamaForCausalLM"], "linear_feature_map": "1+x", )" + base + "}",
       absl::StatusCode::kInvalidArgument, "linear_feature_map"},
      {R"({"architectures": ["LlamaForCausalLM"], "attention_kind": "linear",
          "linear_feature_map": "relu", )" + base + "}",
       absl::StatusCode::kInvalidArgument, "linear_feature_map"},
      {R"({"architectures": ["LlamaForCausalLM"], "attention_kind": "linear",
          "linear_feature_map": "identity", )" + base + "}",
       absl::StatusCode::kInvalidArgument, "identity"},
  };
  for (const Case& c : cases) {
    auto parsed = ParseModelConfig(c.json);
    ASSERT_FALSE(parsed.ok()) << c.json;
    EXPECT_EQ(parsed.status().code(), c.code) << parsed.status();
    EXPECT_NE(parsed.status().message().find(c.needle), std::string::npos) << parsed.status();
  }
}

}  // namespace
}  // namespace ferry::model
