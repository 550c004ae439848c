// Token parity of a loaded cluster: 16 concurrent jobs (greedy and seeded sampling, prompts from
// 1 to 150 tokens) over 3 CPU workers give exactly the tokens of in-process generation with the
// same seeds, for each KV placement (by sequence range, by KV-head group) and micro-batching.
// Every worker must have served attention (its speed measured from its replies), and every
// block is freed at the end.
#include <algorithm>

#include "gtest/gtest.h"
#include "in_process_tokens.h"
#include "local_cluster.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

class ClusterParityTest : public ::testing::TestWithParam<testing::ClusterMode> {};

TEST_P(ClusterParityTest, SixteenJobsOverThreeWorkersGiveTheInProcessTokens) {
  testing::LocalClusterOptions options;
  options.num_workers = 3;
  options.coordinator_flags = GetParam().coordinator_flags;
  testing::LocalCluster cluster(options);
  ASSERT_TRUE(cluster.ok());

  constexpr int kJobs = 16, kMaxTokens = 16;
  std::vector<std::vector<int32_t>> prompts;
  std::vector<model::SamplingParams> sampling(kJobs);
  for (int i = 0; i < kJobs; ++i) {
    prompts.push_back(testing::TestPrompt(1 + (i * 37) % 150, i));
    if (i % 2 == 1) {  // seeded sampling for half of them
      sampling[i].temperature = 0.75;
      sampling[i].seed = 1000 + i;
    }
  }
  std::vector<ferry::v1::GenerateRequest> requests;
  for (int i = 0; i < kJobs; ++i) {
    requests.push_back(testing::TokenRequest(
        prompts[i], kMaxTokens, static_cast<float>(sampling[i].temperature), sampling[i].seed));
  }
  const std::vector<testing::StreamResult> results = cluster.GenerateAll(requests, 50s);

  for (int i = 0; i < kJobs; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << "job " << i << ": " << results[i].status.error_message()
                                        << cluster.Logs();
    EXPECT_EQ(results[i].reason, ferry::v1::FINISH_REASON_LENGTH) << results[i].error;
    EXPECT_EQ(results[i].tokens, testing::InProcessTokens(cluster.model_dir(), prompts[i],
                                                          kMaxTokens, sampling[i]))
        << "job " << i;
  }
  EXPECT_TRUE(cluster.WaitAllKvFreed(5s)) << "KV left on a worker after every job finished";
  // Every worker served attention: its speed was measured from its replies (placement weighs
  // it). (A worker's KV in the heartbeats can be missed when its sequences finish quickly.)
  const ferry::v1::ListWorkersResponse workers = cluster.Workers();
  for (const auto& w : workers.workers()) {
    EXPECT_GT(w.attention_bytes_per_second(), 0) << w.worker_id();
  }
}

TEST(ClusterHeadGroupTest, OneSequencesHeadGroupsLandOnDistinctWorkers) {
  testing::LocalClusterOptions options;
  options.num_workers = 3;
  options.coordinator_flags = {"--shard", "heads"};  // the tiny model: 2 kv heads, 2 groups
  testing::LocalCluster cluster(options);
  ASSERT_TRUE(cluster.ok());
  const std::vector<int32_t> prompt = testing::TestPrompt(50);
  const testing::StreamResult result = cluster.Generate(testing::TokenRequest(prompt, 200), 40s);
  ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  EXPECT_EQ(result.tokens, testing::InProcessTokens(cluster.model_dir(), prompt, 200));
  // Two workers held one group each; the third stayed free for other sequences.
  const std::vector<int64_t> opened =
      cluster.WaitSequencesOpened(2s, [](const std::vector<int64_t>& now) {
        return std::count(now.begin(), now.end(), 1) == 2;
      });
  EXPECT_EQ(std::count(opened.begin(), opened.end(), 1), 2);
  EXPECT_EQ(std::count(opened.begin(), opened.end(), 0), 1);
}

INSTANTIATE_TEST_SUITE_P(
    Placements, ClusterParityTest,
    ::testing::Values(
        testing::ClusterMode{"by_sequence_range",
                             {"--shard", "sequence", "--shard-positions", "48"}},
        testing::ClusterMode{"by_head_group", {"--shard", "heads"}},
        testing::ClusterMode{"by_sequence_range_2_micro_batches",
                             {"--shard", "sequence", "--shard-positions", "48", "--micro-batches",
                              "2"}},
        testing::ClusterMode{"by_head_group_2_micro_batches",
                             {"--shard", "heads", "--micro-batches", "2"}}),
    testing::ClusterModeName);

}  // namespace
}  // namespace ferry
