// A whole cluster on loopback, as a user runs it: ferry-coordinator with attention on two
// ferry-worker daemons over UCX (tcp). Checks token parity with in-process attention, a long
// sequence spread over both workers, draining a worker mid-generation (its KV migrates, the
// tokens do not change, the worker leaves), and a SIGKILLed worker: its request's KV is rebuilt
// on the survivor from the request's tokens and the tokens do not change, or with
// --kv-rebuilds 0 the request fails within the bound; either way the cluster keeps serving.
#include <iostream>
#include <thread>

#include "gtest/gtest.h"
#include "in_process_tokens.h"
#include "local_cluster.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

using testing::StreamResult;

class ClusterTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (HasFailure() && cluster_ != nullptr) std::cerr << cluster_->Logs();
    cluster_.reset();
  }

  void StartCluster(int shard_positions, std::vector<std::string> flags = {}) {
    testing::LocalClusterOptions options;
    options.coordinator_flags = {"--shard-positions", std::to_string(shard_positions)};
    options.coordinator_flags.insert(options.coordinator_flags.end(), flags.begin(), flags.end());
    cluster_ = std::make_unique<testing::LocalCluster>(options);
    ASSERT_TRUE(cluster_->ok());
  }

  int SequencesOn(const std::string& id) { return cluster_->SequencesOn(id); }
  ferry::v1::ListWorkersResponse Workers() { return cluster_->Workers(); }

  StreamResult Generate(const std::vector<int32_t>& prompt, int max_tokens,
                        std::function<void(int)> on_token = {}) {
    return cluster_->Generate(testing::TokenRequest(prompt, max_tokens), 40s, on_token);
  }

  std::vector<int32_t> InProcessTokens(const std::vector<int32_t>& prompt, int max_tokens) {
    return testing::InProcessTokens(cluster_->model_dir(), prompt, max_tokens);
  }

  std::vector<int32_t> Prompt(int length) { return testing::TestPrompt(length); }

  std::unique_ptr<testing::LocalCluster> cluster_;
};

TEST_F(ClusterTest, OffloadedAttentionGivesTheTokensOfInProcessAttention) {
  StartCluster(0);
  std::vector<std::vector<int32_t>> prompts = {Prompt(1), Prompt(17), Prompt(300), Prompt(5)};
  std::vector<StreamResult> results(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = Generate(prompts[i], 24); });
  }
  for (auto& thread : threads) thread.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].reason, ferry::v1::FINISH_REASON_LENGTH) << results[i].error;
    EXPECT_EQ(results[i].tokens, InProcessTokens(prompts[i], 24)) << "request " << i;
  }
  // Both workers took sequences, and every sequence was freed afterwards.
  for (int i = 0; i < 100 && (SequencesOn("w0") != 0 || SequencesOn("w1") != 0); ++i) {
    std::this_thread::sleep_for(50ms);
  }
  EXPECT_EQ(SequencesOn("w0"), 0);
  EXPECT_EQ(SequencesOn("w1"), 0);
}

TEST_F(ClusterTest, LongSequenceSpreadsOverBothWorkersAndStaysExact) {
  StartCluster(/*shard_positions=*/64);
  const std::vector<int32_t> prompt = Prompt(100);
  const StreamResult result = Generate(prompt, 120);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tokens, InProcessTokens(prompt, 120));
  // A shard opens every 64 of the 220 positions, each on the cheaper worker then: both held one.
  const std::vector<int64_t> opened = cluster_->WaitSequencesOpened(
      2s, [](const std::vector<int64_t>& now) { return now[0] >= 1 && now[1] >= 1; });
  EXPECT_TRUE(opened[0] >= 1 && opened[1] >= 1)
      << "the sequence should have held shards on both workers: " << opened[0] << ", "
      << opened[1];
}

TEST_F(ClusterTest, DrainingAWorkerMovesItsKvAndItLeaves) {
  StartCluster(0);
  const std::vector<int32_t> prompt = Prompt(40);
  std::string drained;
  const StreamResult result = Generate(prompt, 150, [&](int count) {
    if (count != 20) return;
    drained = cluster_->HolderOfTheOnlySequence();
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + 2s);
    ferry::v1::DrainWorkerRequest request;
    request.set_worker_id(drained);
    ferry::v1::DrainWorkerResponse response;
    EXPECT_TRUE(cluster_->cluster().DrainWorker(&context, request, &response).ok());
  });
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.reason, ferry::v1::FINISH_REASON_LENGTH) << result.error;
  EXPECT_EQ(result.tokens, InProcessTokens(prompt, 150));
  ASSERT_FALSE(drained.empty());
  const int index = drained == "w0" ? 0 : 1;
  EXPECT_EQ(cluster_->worker(index).Wait(15s), 0);
  // Gone from the table once its heartbeats stop; the other one serves on.
  for (int i = 0; i < 100 && Workers().workers_size() != 1; ++i) std::this_thread::sleep_for(50ms);
  EXPECT_EQ(Workers().workers_size(), 1);
  const StreamResult after = Generate(Prompt(7), 10);
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, InProcessTokens(Prompt(7), 10));
}

TEST_F(ClusterTest, KilledWorkersSequenceIsRebuiltOnTheSurvivorAndKeepsItsTokens) {
  StartCluster(0);
  const std::vector<int32_t> prompt = Prompt(30);
  std::string killed;
  const StreamResult result = Generate(prompt, 300, [&](int count) {
    if (count != 10) return;
    killed = cluster_->HolderOfTheOnlySequence();
    if (!killed.empty()) cluster_->worker(killed == "w0" ? 0 : 1).Signal(SIGKILL);
  });
  ASSERT_FALSE(killed.empty());
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.reason, ferry::v1::FINISH_REASON_LENGTH) << result.error;
  EXPECT_EQ(result.tokens, InProcessTokens(prompt, 300));
  EXPECT_EQ(result.timings.kv_rebuilds(), 1);
  EXPECT_EQ(result.timings.preemptions(), 0);
  EXPECT_NE(cluster_->coordinator().Log().find("rebuilding its kv"), std::string::npos);
  EXPECT_NE(cluster_->coordinator().Log().find("kv rebuilt"), std::string::npos);
  // The survivor held the rebuilt KV and freed it when the job ended.
  const std::string survivor = killed == "w0" ? "w1" : "w0";
  ferry::v1::WorkerInfo info = cluster_->Worker(survivor);
  for (int i = 0; i < 250 && (info.kv_used_bytes() != 0 || info.sequences_opened() != 1); ++i) {
    std::this_thread::sleep_for(20ms);
    info = cluster_->Worker(survivor);
  }
  EXPECT_EQ(info.sequences_opened(), 1);
  EXPECT_EQ(info.kv_used_bytes(), 0);
}

TEST_F(ClusterTest, WithoutRebuildsAKilledWorkerFailsItsRequestWithinTheBound) {
  StartCluster(0, {"--kv-rebuilds", "0"});
  std::string killed;
  std::chrono::steady_clock::time_point kill_time;
  const StreamResult result = Generate(Prompt(30), 3000, [&](int count) {
    if (count != 10) return;
    killed = cluster_->HolderOfTheOnlySequence();
    if (killed.empty()) return;
    cluster_->worker(killed == "w0" ? 0 : 1).Signal(SIGKILL);
    kill_time = std::chrono::steady_clock::now();
  });
  ASSERT_FALSE(killed.empty());
  const bool failed = !result.status.ok() || result.reason == ferry::v1::FINISH_REASON_ERROR;
  EXPECT_TRUE(failed) << "a request whose KV died with its worker cannot finish";
  EXPECT_LT(result.tokens.size(), 3000u);
  EXPECT_LT(std::chrono::steady_clock::now() - kill_time, 10s)
      << "the error must come within the dead-peer bound";
  // The survivor takes the next request (the dead one is skipped once declared dead).
  StreamResult after;
  for (int attempt = 0; attempt < 20; ++attempt) {
    after = Generate(Prompt(9), 12);
    if (after.status.ok() && after.reason == ferry::v1::FINISH_REASON_LENGTH) break;
    std::this_thread::sleep_for(200ms);
  }
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.reason, ferry::v1::FINISH_REASON_LENGTH) << after.error;
  EXPECT_EQ(after.tokens, InProcessTokens(Prompt(9), 12));
}

}  // namespace
}  // namespace ferry
