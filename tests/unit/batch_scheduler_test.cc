// Continuous batching over a real tiny checkpoint and the in-process attention: batched
// generation gives each request the tokens it gets alone, cancellation and errors free KV and
// spare the other requests, KV exhaustion fails one request and the rest finish.
#include "runtime/scheduler/batch_scheduler.h"

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>

#include "gtest/gtest.h"
#include "runtime/model/checkpoint.h"
#include "runtime/model/generate.h"
#include "runtime/model/tiny_checkpoint.h"

namespace ferry::scheduler {
namespace {

using namespace std::chrono_literals;

// Collects one request's events; Wait() is bounded.
struct Outcome {
  std::mutex mutex;
  std::condition_variable done_cv;
  std::vector<int32_t> tokens;
  bool done = false;
  FinishReason reason = FinishReason::kError;
  absl::Status error;
  GenerationTimings timings;

  GenerationCallbacks Callbacks() {
    return {[this](int index, int32_t token) {
              std::lock_guard<std::mutex> lock(mutex);
              EXPECT_EQ(index, static_cast<int>(tokens.size()));
              tokens.push_back(token);
            },
            [this](FinishReason r, const absl::Status& e, const GenerationTimings& t) {
              std::lock_guard<std::mutex> lock(mutex);
              EXPECT_FALSE(done) << "on_finish called twice";
              done = true;
              reason = r;
              error = e;
              timings = t;
              done_cv.notify_all();
            }};
  }
  bool Wait(std::chrono::milliseconds timeout = 30s) {
    std::unique_lock<std::mutex> lock(mutex);
    return done_cv.wait_for(lock, timeout, [this] { return done; });
  }
};

class BatchSchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(std::filesystem::temp_directory_path() /
                           ("ferry_scheduler_test_" + std::to_string(getpid())));
    model::TinyCheckpointOptions options;
    options.out_dir = *dir_;
    options.num_layers = 2;
    options.hidden_size = 128;
    options.num_heads = 2;  // head dim 64, the smallest the attention kernels serve
    options.num_kv_heads = 1;
    options.vocab_size = 300;
    options.seed = 11;
    ASSERT_TRUE(model::WriteTinyCheckpoint(options).ok());
    auto loaded = model::LoadModel(*dir_);
    ASSERT_TRUE(loaded.ok()) << loaded.status();
    model_ = loaded->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    std::filesystem::remove_all(*dir_);
    delete dir_;
  }

  // A fresh attention step and decoder; capacity in KV blocks of 16 positions.
  void MakeDecoder(int64_t capacity_blocks) {
    model::InProcessAttentionOptions options;
    options.num_heads = model_->config.num_heads;
    options.kv = {model_->config.num_layers, model_->config.num_kv_heads,
                  model_->config.head_dim, DType::kFloat32, 16, 0};
    options.kv.capacity_bytes = capacity_blocks * kv::KvBlockBytes(options.kv);
    auto attention = model::InProcessAttention::Create(options);
    ASSERT_TRUE(attention.ok()) << attention.status();
    attention_ = std::move(*attention);
    decoder_ = std::make_unique<model::Decoder>(*model_, *attention_);
  }

  std::vector<int32_t> Prompt(int length, int salt) {
    std::vector<int32_t> prompt(length);
    for (int i = 0; i < length; ++i) prompt[i] = (i * 37 + salt * 101 + 5) % 300;
    return prompt;
  }

  static std::string* dir_;
  static model::Model* model_;
  std::unique_ptr<model::InProcessAttention> attention_;
  std::unique_ptr<model::Decoder> decoder_;
};

std::string* BatchSchedulerTest::dir_ = nullptr;
model::Model* BatchSchedulerTest::model_ = nullptr;

TEST_F(BatchSchedulerTest, BatchedRequestsGetTheTokensTheyGetAlone) {
  MakeDecoder(1024);
  std::vector<GenerationRequest> requests;
  for (int i = 0; i < 6; ++i) {
    GenerationRequest request;
    request.prompt = Prompt(i == 2 ? 300 : 1 + 7 * i, i);  // one prompt spans 3 prefill chunks
    request.max_tokens = 6 + i;
    request.ignore_eos = true;
    if (i % 2 == 1) request.sampling = {0.8, 20, 0.9, 1000u + i};
    requests.push_back(request);
  }
  // Alone, one at a time, through model::Generate.
  std::vector<std::vector<int32_t>> alone;
  for (size_t i = 0; i < requests.size(); ++i) {
    model::GenerateOptions options;
    options.max_tokens = requests[i].max_tokens;
    options.sampling = requests[i].sampling;
    options.ignore_eos = true;
    auto result = model::Generate(*decoder_, 100 + i, requests[i].prompt, options);
    ASSERT_TRUE(result.ok()) << result.status();
    alone.push_back(result->tokens);
  }
  const int64_t free_before = attention_->cache().free_blocks();

  BatchSchedulerOptions options;
  options.prefill_chunk_tokens = 128;
  options.step_token_budget = 160;
  BatchScheduler scheduler(*decoder_, options);
  std::vector<Outcome> outcomes(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(scheduler.Submit(requests[i], outcomes[i].Callbacks()).ok());
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(outcomes[i].Wait()) << "request " << i << " did not finish";
    EXPECT_EQ(outcomes[i].reason, FinishReason::kLength);
    EXPECT_EQ(outcomes[i].tokens, alone[i]) << "request " << i;
    EXPECT_EQ(outcomes[i].timings.generated_tokens, requests[i].max_tokens);
    EXPECT_EQ(outcomes[i].timings.prompt_tokens, static_cast<int>(requests[i].prompt.size()));
  }
  EXPECT_LT(scheduler.steps(), 6 * 12) << "requests were not batched";
  scheduler.Stop();
  EXPECT_EQ(attention_->cache().free_blocks(), free_before) << "kv leaked";
}

TEST_F(BatchSchedulerTest, StopTokenEndsTheRequestAndIsIncluded) {
  MakeDecoder(256);
  GenerationRequest request;
  request.prompt = Prompt(9, 3);
  request.max_tokens = 8;
  request.ignore_eos = true;
  BatchScheduler scheduler(*decoder_, {});
  Outcome first;
  ASSERT_TRUE(scheduler.Submit(request, first.Callbacks()).ok());
  ASSERT_TRUE(first.Wait());
  ASSERT_EQ(first.tokens.size(), 8u);
  request.stop_tokens = {first.tokens[3]};
  Outcome stopped;
  ASSERT_TRUE(scheduler.Submit(request, stopped.Callbacks()).ok());
  ASSERT_TRUE(stopped.Wait());
  EXPECT_EQ(stopped.reason, FinishReason::kStop);
  // Stops at the first occurrence of that token, which may come before index 3.
  ASSERT_LE(stopped.tokens.size(), 4u);
  EXPECT_EQ(stopped.tokens.back(), first.tokens[3]);
  EXPECT_EQ(std::vector<int32_t>(first.tokens.begin(), first.tokens.begin() + stopped.tokens.size()),
            stopped.tokens);
}

TEST_F(BatchSchedulerTest, CancelFreesKvAndSparesTheOthers) {
  MakeDecoder(512);
  const int64_t total = attention_->cache().free_blocks();
  BatchScheduler scheduler(*decoder_, {});
  GenerationRequest long_request;
  long_request.prompt = Prompt(40, 1);
  long_request.max_tokens = 3000;
  long_request.ignore_eos = true;
  GenerationRequest short_request = long_request;
  short_request.max_tokens = 5;
  Outcome cancelled, kept;
  auto id = scheduler.Submit(long_request, cancelled.Callbacks());
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(scheduler.Submit(short_request, kept.Callbacks()).ok());
  ASSERT_TRUE(kept.Wait());
  EXPECT_EQ(kept.reason, FinishReason::kLength);
  EXPECT_EQ(kept.tokens.size(), 5u);
  scheduler.Cancel(*id);
  ASSERT_TRUE(cancelled.Wait());
  EXPECT_EQ(cancelled.reason, FinishReason::kCancelled);
  EXPECT_LT(cancelled.tokens.size(), 3000u);
  scheduler.Stop();
  EXPECT_EQ(attention_->cache().free_blocks(), total);
}

TEST_F(BatchSchedulerTest, BadRequestsAreRejectedAtSubmit) {
  MakeDecoder(64);
  BatchScheduler scheduler(*decoder_, {});
  Outcome unused;
  GenerationRequest request;
  EXPECT_EQ(scheduler.Submit(request, unused.Callbacks()).status().code(),
            absl::StatusCode::kInvalidArgument);  // empty prompt
  request.prompt = {1, 2, 300};
  EXPECT_EQ(scheduler.Submit(request, unused.Callbacks()).status().code(),
            absl::StatusCode::kInvalidArgument);  // token outside the vocabulary
  request.prompt = {1, 2};
  request.max_tokens = 0;
  EXPECT_EQ(scheduler.Submit(request, unused.Callbacks()).status().code(),
            absl::StatusCode::kInvalidArgument);
  request.max_tokens = 5000;  // past max positions (4096)
  EXPECT_EQ(scheduler.Submit(request, unused.Callbacks()).status().code(),
            absl::StatusCode::kInvalidArgument);
  request.max_tokens = 2;
  request.sampling.temperature = -1;
  EXPECT_EQ(scheduler.Submit(request, unused.Callbacks()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(BatchSchedulerTest, KvExhaustionFailsOneRequestAndTheOthersFinish) {
  MakeDecoder(12);  // 192 positions in all
  BatchScheduler scheduler(*decoder_, {});
  GenerationRequest request;
  request.prompt = Prompt(60, 2);
  request.max_tokens = 60;  // 120 positions each: two cannot both fit
  request.ignore_eos = true;
  Outcome first, second;
  ASSERT_TRUE(scheduler.Submit(request, first.Callbacks()).ok());
  ASSERT_TRUE(scheduler.Submit(request, second.Callbacks()).ok());
  ASSERT_TRUE(first.Wait());
  ASSERT_TRUE(second.Wait());
  EXPECT_EQ(first.reason, FinishReason::kLength) << first.error;
  EXPECT_EQ(first.tokens.size(), 60u);
  EXPECT_EQ(second.reason, FinishReason::kError);
  EXPECT_EQ(second.error.code(), absl::StatusCode::kResourceExhausted) << second.error;
  scheduler.Stop();
  EXPECT_EQ(attention_->cache().free_blocks(), 12);
}

}  // namespace
}  // namespace ferry::scheduler
