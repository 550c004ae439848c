// Continuous batching over a real tiny checkpoint and the in-process attention: batched
// generation gives each request the tokens it gets alone, cancellation and errors free KV and
// spare the other requests, KV exhaustion preempts the newest request, which resumes with the
// tokens it gets alone (or, without preemption, fails while the rest finish), and a request
// whose KV is lost with a worker (a failure injected into the real in-process step) gets it
// rebuilt from its tokens and the tokens it gets alone.
#include "runtime/scheduler/batch_scheduler.h"

#include <condition_variable>
#include <filesystem>
#include <map>
#include <mutex>
#include <set>
#include <thread>

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

  // Each request's tokens when it runs alone, through model::Generate (ignoring end tokens, as
  // the requests of these tests do).
  std::vector<std::vector<int32_t>> TokensAlone(const std::vector<GenerationRequest>& requests) {
    std::vector<std::vector<int32_t>> alone;
    for (size_t i = 0; i < requests.size(); ++i) {
      model::GenerateOptions options;
      options.max_tokens = requests[i].max_tokens;
      options.sampling = requests[i].sampling;
      options.ignore_eos = true;
      auto result = model::Generate(*decoder_, 100 + i, requests[i].prompt, options);
      EXPECT_TRUE(result.ok()) << result.status();
      alone.push_back(result.ok() ? result->tokens : std::vector<int32_t>{});
    }
    return alone;
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

// The in-process attention step with worker losses injected: the steps listed in `fail_at`
// (counting, from 1, the steps that hold rows of `victim`) fail at layer 1 with UNAVAILABLE, as
// OffloadedAttention reports a worker that died, and AbortStep names the victim. The inner step
// is aborted for real (its appends undone).
class LosingAttention : public model::AttentionStep {
 public:
  LosingAttention(model::AttentionStep& inner, kv::SequenceId victim, std::set<int> fail_at)
      : inner_(inner), victim_(victim), fail_at_(std::move(fail_at)) {}

  int adds_of_victim() const { return adds_of_victim_; }

  absl::Status AddSequence(kv::SequenceId seq) override {
    adds_of_victim_ += seq == victim_;
    return inner_.AddSequence(seq);
  }
  absl::Status FreeSequence(kv::SequenceId seq) override { return inner_.FreeSequence(seq); }
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override { return inner_.Length(seq); }
  absl::Status BeginStep(std::span<const model::StepRow> rows) override {
    failing_ = false;
    const auto holds_victim = [&](const model::StepRow& row) { return row.seq == victim_; };
    if (std::any_of(rows.begin(), rows.end(), holds_victim)) {
      failing_ = fail_at_.count(++victim_steps_) != 0;
    }
    return inner_.BeginStep(rows);
  }
  absl::Status StartAttend(int layer, int64_t first_row, int64_t num_rows, const float* q,
                           const float* k, const float* v, float* out) override {
    if (failing_ && layer == 1) return absl::UnavailableError("worker w9: peer reset");
    return inner_.StartAttend(layer, first_row, num_rows, q, k, v, out);
  }
  absl::Status FinishAttend(int layer, int64_t first_row) override {
    return inner_.FinishAttend(layer, first_row);
  }
  absl::Status EndStep() override { return inner_.EndStep(); }
  std::vector<kv::SequenceId> AbortStep() override {
    std::vector<kv::SequenceId> failed = inner_.AbortStep();
    if (failing_) failed.push_back(victim_);
    return failed;
  }
  absl::Status CheckCapacity(int64_t positions) override {
    return inner_.CheckCapacity(positions);
  }

 private:
  model::AttentionStep& inner_;
  const kv::SequenceId victim_;
  const std::set<int> fail_at_;
  int victim_steps_ = 0;
  bool failing_ = false;
  int adds_of_victim_ = 0;
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
  const std::vector<std::vector<int32_t>> alone = TokensAlone(requests);
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
  const SchedulerStats stats = scheduler.stats();
  int64_t prompt_tokens = 0, generated_tokens = 0;
  for (const GenerationRequest& request : requests) {
    prompt_tokens += static_cast<int64_t>(request.prompt.size());
    generated_tokens += request.max_tokens;
  }
  EXPECT_EQ(stats.submitted, 6);
  EXPECT_EQ(stats.finished_length, 6);
  EXPECT_EQ(stats.failed + stats.cancelled + stats.finished_stop, 0);
  EXPECT_EQ(stats.prompt_tokens, prompt_tokens);
  EXPECT_EQ(stats.generated_tokens, generated_tokens);
  EXPECT_EQ(stats.steps, scheduler.steps());
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

TEST_F(BatchSchedulerTest, KvExhaustionPreemptsTheNewestWhichResumesWithItsTokens) {
  MakeDecoder(12);  // 192 positions in all
  std::vector<GenerationRequest> requests(3);
  for (int i = 0; i < 3; ++i) {
    requests[i].prompt = Prompt(i == 2 ? 5 : 60, 2 + i);
    requests[i].max_tokens = i == 2 ? 10 : 60;  // 120 positions each for the first two
    requests[i].ignore_eos = true;
    if (i == 1) requests[i].sampling = {0.8, 20, 0.9, 31u};
  }
  const std::vector<std::vector<int32_t>> alone = TokensAlone(requests);
  BatchScheduler scheduler(*decoder_, {});
  std::vector<Outcome> outcomes(3);
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(scheduler.Submit(requests[i], outcomes[i].Callbacks()).ok());
  }
  // The second runs out of room mid-generation and waits for the first to finish; a third
  // arrives while it waits (or after 5 s, when the test fails).
  for (int i = 0; i < 5000 && scheduler.stats().preemptions == 0; ++i) {
    std::this_thread::sleep_for(1ms);
  }
  ASSERT_TRUE(scheduler.Submit(requests[2], outcomes[2].Callbacks()).ok());
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(outcomes[i].Wait()) << "request " << i;
    EXPECT_EQ(outcomes[i].reason, FinishReason::kLength) << outcomes[i].error;
    EXPECT_EQ(outcomes[i].tokens, alone[i]) << "request " << i;
  }
  EXPECT_GE(scheduler.stats().preemptions, 1);
  EXPECT_GE(outcomes[1].timings.preemptions, 1) << "the newer of the two large requests";
  EXPECT_EQ(outcomes[0].timings.preemptions, 0);
  EXPECT_EQ(scheduler.stats().finished_length, 3);
  scheduler.Stop();
  EXPECT_EQ(attention_->cache().free_blocks(), 12);
}

TEST_F(BatchSchedulerTest, WithoutPreemptionKvExhaustionFailsOneRequestAndTheOthersFinish) {
  MakeDecoder(12);  // 192 positions in all
  BatchSchedulerOptions options;
  options.preempt_when_kv_full = false;
  BatchScheduler scheduler(*decoder_, options);
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

TEST_F(BatchSchedulerTest, KvLostWithAWorkerIsRebuiltFromTheTokensAndTheTokensStay) {
  MakeDecoder(256);
  // Request ids count from 1 per scheduler: the victim is the first submitted.
  std::vector<GenerationRequest> requests(2);
  requests[0].prompt = Prompt(40, 3);
  requests[0].max_tokens = 30;
  requests[0].sampling = {0.8, 20, 0.9, 77u};  // its Sampler must continue where it was
  requests[1].prompt = Prompt(20, 4);
  requests[1].max_tokens = 30;
  for (GenerationRequest& request : requests) request.ignore_eos = true;
  const std::vector<std::vector<int32_t>> alone = TokensAlone(requests);
  const int64_t free_before = attention_->cache().free_blocks();
  // Lost in its first step (the prompt read, nothing sampled yet) and again after 11 tokens.
  LosingAttention losing(*attention_, /*victim=*/1, {1, 12});
  model::Decoder decoder(*model_, losing);
  BatchScheduler scheduler(decoder, {});
  std::vector<Outcome> outcomes(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(scheduler.Submit(requests[i], outcomes[i].Callbacks()).ok());
  }
  for (size_t i = 0; i < requests.size(); ++i) {
    ASSERT_TRUE(outcomes[i].Wait()) << "request " << i << " did not finish";
    EXPECT_EQ(outcomes[i].reason, FinishReason::kLength) << outcomes[i].error;
    EXPECT_EQ(outcomes[i].tokens, alone[i]) << "request " << i;
  }
  EXPECT_EQ(losing.adds_of_victim(), 3) << "added, then rebuilt twice";
  EXPECT_EQ(scheduler.stats().kv_rebuilds, 2);
  EXPECT_EQ(outcomes[0].timings.kv_rebuilds, 2);
  EXPECT_EQ(outcomes[1].timings.kv_rebuilds, 0);
  scheduler.Stop();
  EXPECT_EQ(attention_->cache().free_blocks(), free_before) << "kv leaked";
}

TEST_F(BatchSchedulerTest, KvRebuildsAreBoundedPerRequest) {
  MakeDecoder(256);
  for (const int max_rebuilds : {0, 1}) {
    SCOPED_TRACE(max_rebuilds);
    const int64_t free_before = attention_->cache().free_blocks();
    LosingAttention losing(*attention_, /*victim=*/1, {5, 10});
    model::Decoder decoder(*model_, losing);
    BatchSchedulerOptions options;
    options.max_kv_rebuilds = max_rebuilds;
    BatchScheduler scheduler(decoder, options);
    GenerationRequest request;
    request.prompt = Prompt(10, 5);
    request.max_tokens = 20;
    request.ignore_eos = true;
    Outcome victim, other;
    ASSERT_TRUE(scheduler.Submit(request, victim.Callbacks()).ok());
    ASSERT_TRUE(scheduler.Submit(request, other.Callbacks()).ok());
    ASSERT_TRUE(victim.Wait());
    ASSERT_TRUE(other.Wait());
    EXPECT_EQ(victim.reason, FinishReason::kError);
    EXPECT_EQ(victim.error.code(), absl::StatusCode::kUnavailable) << victim.error;
    // Steps 1-4 read its prompt and sample 4 tokens; step 5 fails. Rebuilt, step 6 reads the
    // prompt and 3 tokens again, steps 7-9 sample 3 more, step 10 fails for good.
    EXPECT_EQ(victim.tokens.size(), max_rebuilds == 0 ? 4u : 7u);
    EXPECT_EQ(losing.adds_of_victim(), 1 + max_rebuilds);
    EXPECT_EQ(other.reason, FinishReason::kLength) << other.error;
    EXPECT_EQ(other.tokens.size(), 20u);
    scheduler.Stop();
    EXPECT_EQ(attention_->cache().free_blocks(), free_before) << "kv leaked";
  }
}

}  // namespace
}  // namespace ferry::scheduler
