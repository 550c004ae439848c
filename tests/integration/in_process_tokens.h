// Test helper: the tokens in-process generation gives for a model folder (fp32 KV, block 64;
// greedy unless sampling parameters are given), the reference the daemons' streams are compared
// with.
#pragma once

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/model/attention_step.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/generate.h"

namespace ferry::testing {

inline std::vector<int32_t> InProcessTokens(const std::string& model_dir,
                                            const std::vector<int32_t>& prompt, int max_tokens,
                                            const model::SamplingParams& sampling = {}) {
  auto model = model::LoadModel(model_dir);
  EXPECT_TRUE(model.ok()) << model.status();
  if (!model.ok()) return {};
  model::InProcessAttentionOptions options;
  options.num_heads = (*model)->config.num_heads;
  options.kv = {(*model)->config.num_layers, (*model)->config.num_kv_heads,
                (*model)->config.head_dim, DType::kFloat32, 64, 64 << 20};
  auto attention = model::CreateInProcessAttention((*model)->config, options);
  EXPECT_TRUE(attention.ok()) << attention.status();
  if (!attention.ok()) return {};
  model::Decoder decoder(**model, **attention);
  model::GenerateOptions generate;
  generate.max_tokens = max_tokens;
  generate.ignore_eos = true;
  generate.sampling = sampling;
  auto result = model::Generate(decoder, 1, prompt, generate);
  EXPECT_TRUE(result.ok()) << result.status();
  return result.ok() ? result->tokens : std::vector<int32_t>{};
}

}  // namespace ferry::testing
