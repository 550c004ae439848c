// The CPU decoder against the float64 reference (tests/common/decoder_reference.h: full recompute,
// plain loops), and against itself: prefill-then-decode equals a full prefill, batched decode
// equals one sequence at a time, mixed prefill/decode batches, an aborted step leaves no trace;
// for softmax and for linear attention (whose float64 reference is kernels/reference's quadratic
// form). fp32 weights (make-tiny --dtype=fp32) and an fp32 KV cache, so the only differences are
// fp32 rounding: relative error (max |diff| / max |ref| over the vocabulary) under 1e-5.
#include "runtime/model/decoder.h"

#include <random>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "runtime/model/checkpoint.h"
#include "tests/common/decoder_reference.h"
#include "tests/common/tiny_models.h"

namespace ferry::model {
namespace {

using ref::ReferenceLogits;
using ref::RelError;

class DecoderTest : public ::testing::TestWithParam<test::DecoderVariant> {
 protected:
  void SetUp() override {
    const uint64_t seed = std::random_device{}();
    auto model = test::MakeTinyDecoderModel("decoder", GetParam(), DType::kFloat32, seed);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    rng_.seed(seed);
  }

  std::unique_ptr<AttentionStep> MakeAttention() {
    InProcessAttentionOptions a = test::FloatKvAttentionOptions(model_->config, 128);
    a.num_threads = 2;
    auto attention = CreateInProcessAttention(model_->config, a);
    EXPECT_TRUE(attention.ok()) << attention.status();
    return std::move(*attention);
  }

  std::vector<int32_t> RandomTokens(int n) {
    std::uniform_int_distribution<int32_t> dist(0, model_->config.vocab_size - 1);
    std::vector<int32_t> t(n);
    for (auto& x : t) x = dist(rng_);
    return t;
  }

  std::unique_ptr<Model> model_;
  std::mt19937 rng_;
};

TEST_P(DecoderTest, LogitsMatchFloat64Reference) {
  auto attention = MakeAttention();
  Decoder decoder(*model_, *attention);
  auto tokens = RandomTokens(70);  // past the llama3 original context (64) and several blocks
  const int prefill = 60;
  ASSERT_TRUE(attention->AddSequence(7).ok());
  std::vector<float> logits;
  SeqChunk chunk{7, 0, std::span<const int32_t>(tokens.data(), prefill)};
  ASSERT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());
  auto want = ReferenceLogits(*model_, std::vector<int32_t>(tokens.begin(), tokens.begin() + prefill));
  EXPECT_LT(RelError(logits.data(), want), 1e-5);
  for (int p = prefill; p < 70; ++p) {
    chunk = SeqChunk{7, p, std::span<const int32_t>(&tokens[p], 1)};
    ASSERT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());
    want = ReferenceLogits(*model_, std::vector<int32_t>(tokens.begin(), tokens.begin() + p + 1));
    EXPECT_LT(RelError(logits.data(), want), 1e-5) << "position " << p;
  }
}

TEST_P(DecoderTest, PrefillThenDecodeEqualsFullPrefill) {
  auto tokens = RandomTokens(41);
  auto a = MakeAttention(), b = MakeAttention();
  Decoder da(*model_, *a), db(*model_, *b);
  ASSERT_TRUE(a->AddSequence(1).ok());
  ASSERT_TRUE(b->AddSequence(1).ok());
  std::vector<float> la, lb;
  SeqChunk chunk{1, 0, std::span<const int32_t>(tokens.data(), 30)};
  ASSERT_TRUE(da.Forward({&chunk, 1}, &la).ok());
  for (int p = 30; p < 41; ++p) {
    chunk = SeqChunk{1, p, std::span<const int32_t>(&tokens[p], 1)};
    ASSERT_TRUE(da.Forward({&chunk, 1}, &la).ok());
  }
  chunk = SeqChunk{1, 0, tokens};
  ASSERT_TRUE(db.Forward({&chunk, 1}, &lb).ok());
  EXPECT_LT(RelError(la.data(), lb.data(), model_->config.vocab_size), 1e-5);
}

TEST_P(DecoderTest, BatchedDecodeEqualsOneAtATime) {
  const std::vector<int> prompt_lens = {3, 17, 33, 64};
  const int vocab = model_->config.vocab_size;
  std::vector<std::vector<int32_t>> seqs;
  for (int n : prompt_lens) seqs.push_back(RandomTokens(n + 5));
  // Batched: a mixed first step (all prefills), then 5 decode steps of the whole batch, with one
  // sequence's prefill joining in the middle of the batch at the second step.
  auto batched = MakeAttention();
  Decoder db(*model_, *batched);
  std::vector<float> batch_logits;
  for (size_t s = 0; s < seqs.size(); ++s) ASSERT_TRUE(batched->AddSequence(100 + s).ok());
  std::vector<SeqChunk> chunks;
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (s == 2) continue;
    chunks.push_back({100 + s, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])});
  }
  ASSERT_TRUE(db.Forward(chunks, &batch_logits).ok());
  std::vector<std::vector<float>> last(seqs.size());
  for (int step = 0; step < 5; ++step) {
    chunks.clear();
    for (size_t s = 0; s < seqs.size(); ++s) {
      if (s == 2 && step == 0) {
        chunks.push_back({102, 0, std::span<const int32_t>(seqs[2].data(), prompt_lens[2] + 1)});
        continue;
      }
      const int position = prompt_lens[s] + step;
      chunks.push_back({100 + s, position, std::span<const int32_t>(&seqs[s][position], 1)});
    }
    ASSERT_TRUE(db.Forward(chunks, &batch_logits).ok());
    for (size_t s = 0; s < seqs.size(); ++s) {
      last[s].assign(batch_logits.begin() + s * vocab, batch_logits.begin() + (s + 1) * vocab);
    }
  }
  // One at a time, each on its own cache, final positions prompt_len + 4.
  for (size_t s = 0; s < seqs.size(); ++s) {
    auto alone = MakeAttention();
    Decoder d(*model_, *alone);
    ASSERT_TRUE(alone->AddSequence(5).ok());
    std::vector<float> logits;
    SeqChunk chunk{5, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])};
    ASSERT_TRUE(d.Forward({&chunk, 1}, &logits).ok());
    for (int p = prompt_lens[s]; p < prompt_lens[s] + 5; ++p) {
      chunk = SeqChunk{5, p, std::span<const int32_t>(&seqs[s][p], 1)};
      ASSERT_TRUE(d.Forward({&chunk, 1}, &logits).ok());
    }
    EXPECT_LT(RelError(last[s].data(), logits.data(), vocab), 1e-5) << "sequence " << s;
  }
}

TEST_P(DecoderTest, MicroBatchesGiveTheLogitsOfOneBatch) {
  const std::vector<int> prompt_lens = {5, 1, 30, 2, 9};
  const int vocab = model_->config.vocab_size;
  std::vector<std::vector<int32_t>> seqs;
  for (int n : prompt_lens) seqs.push_back(RandomTokens(n + 3));
  // The same mixed steps (prefills, then decodes of every sequence) with 1, 2 and 3 micro-batches.
  std::vector<std::vector<float>> final_logits;
  for (int micro_batches : {1, 2, 3}) {
    auto attention = MakeAttention();
    Decoder decoder(*model_, *attention, DecoderOptions{micro_batches});
    for (size_t s = 0; s < seqs.size(); ++s) ASSERT_TRUE(attention->AddSequence(s).ok());
    std::vector<SeqChunk> chunks;
    for (size_t s = 0; s < seqs.size(); ++s) {
      chunks.push_back({s, 0, std::span<const int32_t>(seqs[s].data(), prompt_lens[s])});
    }
    std::vector<float> logits;
    ASSERT_TRUE(decoder.Forward(chunks, &logits).ok());
    for (int step = 0; step < 3; ++step) {
      chunks.clear();
      for (size_t s = 0; s < seqs.size(); ++s) {
        const int position = prompt_lens[s] + step;
        chunks.push_back({s, position, std::span<const int32_t>(&seqs[s][position], 1)});
      }
      ASSERT_TRUE(decoder.Forward(chunks, &logits).ok()) << micro_batches;
    }
    final_logits.push_back(logits);
  }
  for (size_t i = 1; i < final_logits.size(); ++i) {
    EXPECT_LT(RelError(final_logits[i].data(), final_logits[0].data(),
                       static_cast<int>(seqs.size()) * vocab),
              1e-6)
        << "micro-batches " << i + 1;
  }
  auto attention = MakeAttention();
  EXPECT_EQ(Decoder(*model_, *attention, DecoderOptions{0}).Forward({}, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(DecoderTest, AnAbortedStepLeavesNoTrace) {
  const std::vector<int32_t> tokens = RandomTokens(12);
  auto clean = MakeAttention(), aborted = MakeAttention();
  Decoder clean_decoder(*model_, *clean), aborted_decoder(*model_, *aborted);
  std::vector<float> clean_logits, aborted_logits;
  for (auto [attention, decoder, logits] :
       {std::make_tuple(clean.get(), &clean_decoder, &clean_logits),
        std::make_tuple(aborted.get(), &aborted_decoder, &aborted_logits)}) {
    ASSERT_TRUE(attention->AddSequence(3).ok());
    SeqChunk chunk{3, 0, std::span<const int32_t>(tokens.data(), 10)};
    ASSERT_TRUE(decoder->Forward({&chunk, 1}, logits).ok());
  }
  // A step of position 10 that wrote layer 0's KV (or advanced its state) with made-up values,
  // then failed: aborted, it must leave the sequence as it was.
  const ModelConfig& c = model_->config;
  std::vector<float> q(c.num_heads * c.head_dim, 0.5f), kv(c.num_kv_heads * c.head_dim, 3.0f);
  std::vector<float> out(q.size());
  const StepRow row{3, 10};
  ASSERT_TRUE(aborted->BeginStep({&row, 1}).ok());
  ASSERT_TRUE(aborted->StartAttend(0, 0, 1, q.data(), kv.data(), kv.data(), out.data()).ok());
  ASSERT_TRUE(aborted->FinishAttend(0, 0).ok());
  EXPECT_TRUE(aborted->AbortStep().empty());
  EXPECT_EQ(*aborted->Length(3), 10);
  for (auto [decoder, logits] : {std::make_pair(&clean_decoder, &clean_logits),
                                 std::make_pair(&aborted_decoder, &aborted_logits)}) {
    for (int p = 10; p < 12; ++p) {
      SeqChunk chunk{3, p, std::span<const int32_t>(&tokens[p], 1)};
      ASSERT_TRUE(decoder->Forward({&chunk, 1}, logits).ok());
    }
  }
  EXPECT_EQ(clean_logits, aborted_logits);
}

TEST_P(DecoderTest, RejectsBadSteps) {
  auto attention = MakeAttention();
  Decoder decoder(*model_, *attention);
  ASSERT_TRUE(attention->AddSequence(1).ok());
  std::vector<float> logits;
  const int32_t bad = model_->config.vocab_size;
  SeqChunk chunk{1, 0, std::span<const int32_t>(&bad, 1)};
  EXPECT_EQ(decoder.Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  const int32_t ok = 3;
  chunk = SeqChunk{1, 5, std::span<const int32_t>(&ok, 1)};  // the sequence holds 0 positions
  EXPECT_EQ(decoder.Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kInvalidArgument);
  chunk = SeqChunk{2, 0, std::span<const int32_t>(&ok, 1)};  // unknown sequence
  EXPECT_EQ(decoder.Forward({&chunk, 1}, &logits).code(), absl::StatusCode::kNotFound);
  chunk = SeqChunk{1, 0, std::span<const int32_t>(&ok, 1)};
  EXPECT_TRUE(decoder.Forward({&chunk, 1}, &logits).ok());  // failures left no trace
}

INSTANTIATE_TEST_SUITE_P(
    Variants, DecoderTest,
    ::testing::ValuesIn([] {
      std::vector<test::DecoderVariant> variants = test::DecoderVariants();
      for (const auto& v : test::LinearDecoderVariants()) variants.push_back(v);
      return variants;
    }()),
    [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::model
