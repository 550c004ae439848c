// CPU parity with Hugging Face transformers on the committed tiny checkpoints
// (tests/data/parity, written by tests/parity/make_models.sh; tests/data/hf_written, written by
// transformers). golden.json holds transformers'
// greedy tokens (64 per prompt, float64 reference, full recompute) and its logits at the last
// position; it comes from tests/parity/hf_parity.py run on a machine with transformers, never
// from Ferry. Here Ferry's CPU decoder must produce the same tokens and logits within 1e-4.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/decoder.h"
#include "runtime/model/generate.h"
#include "tests/common/hf_golden.h"
#include "tests/common/tiny_models.h"

namespace ferry::model {
namespace {

void CheckGolden(const std::string& dir, const std::string& golden_file, size_t min_models,
                 bool strict) {
  auto golden = test::LoadGolden(dir + "/" + golden_file);
  ASSERT_TRUE(golden.ok()) << golden.status();
  ASSERT_GE(golden->size(), min_models);
  for (const test::GoldenModel& entry : *golden) {
    const std::string& name = entry.name;
    LoadOptions load;
    load.strict = strict;
    auto model = LoadModel(dir + "/" + name, load);
    ASSERT_TRUE(model.ok()) << model.status();
    auto attention = InProcessAttention::Create(test::FloatKvAttentionOptions((*model)->config, 64));
    ASSERT_TRUE(attention.ok());
    Decoder decoder(**model, **attention);
    for (const test::GoldenPrompt& rec : entry.prompts) {
      const std::vector<int32_t>& prompt = rec.prompt_ids;
      const std::vector<int32_t>& want = rec.token_ids;
      GenerateOptions options;
      options.max_tokens = static_cast<int>(want.size());
      options.ignore_eos = true;
      auto result = Generate(decoder, 1, prompt, options);
      ASSERT_TRUE(result.ok()) << result.status();
      EXPECT_EQ(result->tokens, want) << name << " prompt of " << prompt.size();
      const std::vector<double>& ref = rec.last_logits;
      ASSERT_EQ(result->last_logits.size(), ref.size());
      double max_diff = 0;
      for (size_t i = 0; i < ref.size(); ++i) {
        max_diff = std::max(max_diff, std::abs(result->last_logits[i] - ref[i]));
      }
      EXPECT_LT(max_diff, 1e-4) << name << " prompt of " << prompt.size();
    }
  }
}

// Ferry's make-tiny checkpoints (tests/parity/make_models.sh), reference by transformers.
TEST(HfParityTest, GreedyTokensAndLogitsMatchTransformers) {
  CheckGolden(test::ParityDataDir() + "/parity", "golden.json", 4, /*strict=*/false);
}

// A checkpoint written by transformers' save_pretrained itself (tests/parity/hf_written.py):
// sharded with model.safetensors.index.json, transformers-5 config.json, generation_config.json
// beside it; loaded with strict checking (no unused tensors).
TEST(HfParityTest, TransformersWrittenShardedCheckpoint) {
  CheckGolden(test::ParityDataDir() + "/hf_written", "hf_written_golden.json", 1, /*strict=*/true);
}

}  // namespace
}  // namespace ferry::model
