// Generate: max tokens, stop tokens and eos (included in the output), --ignore-eos, seeds, and
// that the sequence is freed so the same id can run again.
#include "runtime/model/generate.h"

#include <unistd.h>

#include <filesystem>

#include "gtest/gtest.h"
#include "runtime/model/tiny_checkpoint.h"

namespace ferry::model {
namespace {

class GenerateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TinyCheckpointOptions o;
    o.out_dir = ::testing::TempDir() + "/ferry_generate_tiny_" + std::to_string(getpid());
    std::filesystem::remove_all(o.out_dir);
    o.num_layers = 1;
    o.hidden_size = 128;
    o.num_heads = 2;
    o.num_kv_heads = 1;
    o.vocab_size = 64;
    o.max_positions = 64;
    ASSERT_TRUE(WriteTinyCheckpoint(o).ok());
    auto model = LoadModel(o.out_dir);
    std::filesystem::remove_all(o.out_dir);  // loaded: the files are no longer needed
    ASSERT_TRUE(model.ok());
    model_ = std::move(*model);
    InProcessAttentionOptions a;
    a.num_heads = 2;
    a.kv = {.num_layers = 1, .num_kv_heads = 1, .head_dim = 64, .dtype = DType::kBFloat16,
            .block_size = 8, .capacity_bytes = 0};
    a.kv.capacity_bytes = 16 * kv::KvBlockBytes(a.kv);
    auto attention = InProcessAttention::Create(a);
    ASSERT_TRUE(attention.ok());
    attention_ = std::move(*attention);
    decoder_ = std::make_unique<Decoder>(*model_, *attention_);
  }
  std::unique_ptr<Model> model_;
  std::unique_ptr<InProcessAttention> attention_;
  std::unique_ptr<Decoder> decoder_;
};

TEST_F(GenerateTest, StopsAtLengthOrStopTokenAndFreesTheSequence) {
  GenerateOptions o;
  o.max_tokens = 20;
  o.ignore_eos = true;
  auto full = Generate(*decoder_, 9, {1, 2, 3}, o);
  ASSERT_TRUE(full.ok()) << full.status();
  EXPECT_EQ(full->tokens.size(), 20u);
  EXPECT_EQ(full->finish_reason, "length");
  EXPECT_FALSE(attention_->cache().HasSequence(9));

  o.stop_tokens = {full->tokens[4]};
  auto stopped = Generate(*decoder_, 9, {1, 2, 3}, o);
  ASSERT_TRUE(stopped.ok());
  const auto first = std::find(full->tokens.begin(), full->tokens.end(), full->tokens[4]);
  EXPECT_EQ(stopped->tokens,
            std::vector<int32_t>(full->tokens.begin(), first + 1));  // the stop token included
  EXPECT_EQ(stopped->finish_reason, "stop");

  // The model's eos (2 for make-tiny) ends generation unless ignore_eos.
  o.stop_tokens.clear();
  o.ignore_eos = false;
  auto with_eos = Generate(*decoder_, 9, {1, 2, 3}, o);
  ASSERT_TRUE(with_eos.ok());
  const auto eos = std::find(full->tokens.begin(), full->tokens.end(), 2);
  if (eos == full->tokens.end()) {
    EXPECT_EQ(with_eos->tokens, full->tokens);
  } else {
    EXPECT_EQ(with_eos->tokens, std::vector<int32_t>(full->tokens.begin(), eos + 1));
    EXPECT_EQ(with_eos->finish_reason, "stop");
  }
}

TEST_F(GenerateTest, SeedsReproduce) {
  GenerateOptions o;
  o.max_tokens = 16;
  o.ignore_eos = true;
  o.sampling.temperature = 1.0;
  o.sampling.top_p = 0.9;
  o.sampling.seed = 77;
  auto a = Generate(*decoder_, 1, {1, 5}, o);
  auto b = Generate(*decoder_, 1, {1, 5}, o);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
}

TEST_F(GenerateTest, RejectsBadRequests) {
  GenerateOptions o;
  EXPECT_EQ(Generate(*decoder_, 1, {}, o).status().code(), absl::StatusCode::kInvalidArgument);
  o.max_tokens = 100;  // 1 + 100 > max positions (64)
  EXPECT_EQ(Generate(*decoder_, 1, {1}, o).status().code(), absl::StatusCode::kOutOfRange);
  o.max_tokens = 4;
  o.sampling.top_p = 0;
  EXPECT_EQ(Generate(*decoder_, 1, {1}, o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace ferry::model
