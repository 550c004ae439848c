// A linear-attention model over the daemons: each sequence keeps a recurrent state per layer on
// the attention worker instead of KV blocks. Two CPU workers; the tokens must be exactly those
// of in-process generation (the same kernels on the same float32 inputs), whole sequences or
// head groups per worker, with and without micro-batches, when a worker holding states is
// drained mid-generation (the states move), and when it is killed (the states are rebuilt on
// the survivor from the tokens).

#include "gtest/gtest.h"
#include "in_process_tokens.h"
#include "local_cluster.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

class ClusterLinearTest : public ::testing::TestWithParam<testing::ClusterMode> {};

TEST_P(ClusterLinearTest, GenerationMatchesInProcessTokensOverTwoWorkers) {
  testing::LocalClusterOptions options;
  options.num_workers = 2;
  options.attention_kind = model::AttentionKind::kLinear;
  options.coordinator_flags = GetParam().coordinator_flags;
  testing::LocalCluster cluster(options);
  ASSERT_TRUE(cluster.ok());

  constexpr int kJobs = 8, kMaxTokens = 20;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<model::SamplingParams> sampling(kJobs);
  for (int i = 0; i < kJobs; ++i) {
    prompts.push_back(testing::TestPrompt(1 + (i * 41) % 300, i));  // 1 to 288 tokens
    if (i % 2 == 1) {
      sampling[i].temperature = 0.75;
      sampling[i].seed = 500 + i;
    }
  }
  std::vector<ferry::v1::GenerateRequest> requests;
  for (int i = 0; i < kJobs; ++i) {
    requests.push_back(testing::TokenRequest(
        prompts[i], kMaxTokens, static_cast<float>(sampling[i].temperature), sampling[i].seed));
  }
  std::vector<bool> held;
  const std::vector<testing::StreamResult> results = cluster.GenerateAll(requests, 50s, &held);
  for (int i = 0; i < kJobs; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << "job " << i << ": " << results[i].status.error_message()
                                        << cluster.Logs();
    EXPECT_EQ(results[i].tokens, testing::InProcessTokens(cluster.model_dir(), prompts[i],
                                                          kMaxTokens, sampling[i]))
        << "job " << i;
  }
  for (int i = 0; i < 2; ++i) EXPECT_TRUE(held[i]) << "worker " << i << " never opened a state";
  EXPECT_TRUE(cluster.WaitAllKvFreed(5s)) << "a state left on a worker";
}

INSTANTIATE_TEST_SUITE_P(
    Placements, ClusterLinearTest,
    ::testing::Values(testing::ClusterMode{"whole_sequences", {}},
                      testing::ClusterMode{"by_head_group_2_micro_batches",
                                           {"--shard", "heads", "--micro-batches", "2"}}),
    testing::ClusterModeName);

TEST(ClusterLinearDrainTest, DrainingAWorkerMovesItsStatesAndTheTokensStay) {
  testing::LocalClusterOptions options;
  options.num_workers = 2;
  options.attention_kind = model::AttentionKind::kLinear;
  testing::LocalCluster cluster(options);
  ASSERT_TRUE(cluster.ok());
  const std::vector<int32_t> prompt = testing::TestPrompt(40, 3);
  std::string drained;
  const testing::StreamResult result =
      cluster.Generate(testing::TokenRequest(prompt, 150), 40s, [&](int count) {
        if (count != 20) return;
        drained = cluster.HolderOfTheOnlySequence();
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + 2s);
        ferry::v1::DrainWorkerRequest request;
        request.set_worker_id(drained);
        ferry::v1::DrainWorkerResponse response;
        EXPECT_TRUE(cluster.cluster().DrainWorker(&context, request, &response).ok());
      });
  ASSERT_TRUE(result.status.ok()) << result.status.error_message() << cluster.Logs();
  ASSERT_FALSE(drained.empty());
  EXPECT_EQ(result.tokens, testing::InProcessTokens(cluster.model_dir(), prompt, 150));
  EXPECT_EQ(cluster.worker(drained == "w0" ? 0 : 1).Wait(15s), 0) << cluster.Logs();
  EXPECT_NE(cluster.coordinator().Log().find("moved from draining worker " + drained),
            std::string::npos)
      << "the state must have moved while the job ran";
}

TEST(ClusterLinearRebuildTest, KilledWorkersStatesAreRebuiltAndTheTokensStay) {
  testing::LocalClusterOptions options;
  options.num_workers = 2;
  options.attention_kind = model::AttentionKind::kLinear;
  testing::LocalCluster cluster(options);
  ASSERT_TRUE(cluster.ok());
  const std::vector<int32_t> prompt = testing::TestPrompt(70, 5);
  std::string killed;
  const testing::StreamResult result =
      cluster.Generate(testing::TokenRequest(prompt, 200), 40s, [&](int count) {
        if (count != 20) return;
        killed = cluster.HolderOfTheOnlySequence();
        if (!killed.empty()) cluster.worker(killed == "w0" ? 0 : 1).Signal(SIGKILL);
      });
  ASSERT_FALSE(killed.empty());
  ASSERT_TRUE(result.status.ok()) << result.status.error_message() << cluster.Logs();
  EXPECT_EQ(result.tokens, testing::InProcessTokens(cluster.model_dir(), prompt, 200));
  EXPECT_NE(cluster.coordinator().Log().find("kv rebuilt"), std::string::npos) << cluster.Logs();
}

}  // namespace
}  // namespace ferry
