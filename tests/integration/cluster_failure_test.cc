// What a cluster does when a job cannot go on, with real daemons on loopback: a cancelled job
// frees its KV on every worker (blocks counted), a deadline gives DEADLINE_EXCEEDED, a job whose
// KV can never fit gives RESOURCE_EXHAUSTED while the others finish (when the KV runs full the
// newest job waits and resumes, or with --kv-full fail gives way), and a worker killed mid-step:
// the step's appends on the other workers are undone (Truncate), the jobs whose KV it held get
// it rebuilt on the survivors from their tokens, and every job ends with exactly the in-process
// tokens; with --kv-rebuilds 0 those jobs fail instead and only those.
#include <algorithm>
#include <iostream>
#include <thread>

#include "gtest/gtest.h"
#include "in_process_tokens.h"
#include "local_cluster.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

// K and V bytes of one block of the tiny model as the tests run it: 2 layers, 2 KV heads of 64,
// fp32, 64 positions per block.
constexpr int64_t kBlockBytes = 2 * 2 * 2 * 64 * 64 * 4;

class ClusterFailureTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (HasFailure() && cluster_ != nullptr) std::cerr << cluster_->Logs();
    cluster_.reset();
  }
  void Start(int workers, int64_t capacity, std::vector<std::string> flags = {}) {
    testing::LocalClusterOptions options;
    options.num_workers = workers;
    options.worker_kv_capacity = capacity;
    options.coordinator_flags = std::move(flags);
    cluster_ = std::make_unique<testing::LocalCluster>(options);
    ASSERT_TRUE(cluster_->ok());
  }
  std::vector<int32_t> Expected(const std::vector<int32_t>& prompt, int max_tokens) {
    return testing::InProcessTokens(cluster_->model_dir(), prompt, max_tokens);
  }

  std::unique_ptr<testing::LocalCluster> cluster_;
};

TEST_F(ClusterFailureTest, CancelledJobFreesItsKvOnEveryWorker) {
  Start(3, 64 << 20, {"--shard-positions", "32"});
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + 40s);
  auto reader = cluster_->generation().Generate(
      &context, testing::TokenRequest(testing::TestPrompt(100), 3000));
  ferry::v1::GenerateResponse response;
  int tokens = 0;
  while (tokens < 40 && reader->Read(&response)) tokens += response.has_token();
  ASSERT_EQ(tokens, 40);
  // Mid-stream, the job's 140 positions are in shards over all three workers: blocks are
  // held on each (the table is at most a heartbeat old).
  int holders = 0;
  int64_t blocks = 0;
  for (int attempt = 0; attempt < 100 && holders < 3; ++attempt) {
    holders = 0;
    blocks = 0;
    const ferry::v1::ListWorkersResponse workers = cluster_->Workers();
    for (const auto& w : workers.workers()) {
      EXPECT_EQ(w.kv_used_bytes() % kBlockBytes, 0) << w.worker_id();
      holders += w.kv_used_bytes() > 0;
      blocks += w.kv_used_bytes() / kBlockBytes;
    }
    std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(holders, 3);
  EXPECT_GE(blocks, 3);  // [0, 100) (the prompt, 2 blocks), [100, 132), [132, 140): 4
  context.TryCancel();
  while (reader->Read(&response)) {
  }
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(cluster_->WaitAllKvFreed(5s)) << "a worker still holds the cancelled job's KV";
}

TEST_F(ClusterFailureTest, DeadlineExceededEndsTheJobAndFreesItsKv) {
  Start(2, 64 << 20);
  const testing::StreamResult timed_out =
      cluster_->Generate(testing::TokenRequest(testing::TestPrompt(20), 4000), 300ms);
  EXPECT_EQ(timed_out.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_LT(timed_out.tokens.size(), 4000u);
  EXPECT_TRUE(cluster_->WaitAllKvFreed(5s));
  // The cluster serves on.
  const std::vector<int32_t> prompt = testing::TestPrompt(9, 1);
  const testing::StreamResult after = cluster_->Generate(testing::TokenRequest(prompt, 8));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, Expected(prompt, 8));
}

// Two workers of 8 blocks each (16 blocks, 1024 positions in all), and five jobs admitted in
// order: two small ones, two of 600 positions (10 blocks) that fit alone but not together, one
// of 2100 positions that fits nowhere.
struct Job {
  std::vector<int32_t> prompt;
  int max_tokens;
  testing::StreamResult result;
};

std::vector<Job> RunJobsThatDoNotAllFit(testing::LocalCluster& cluster) {
  std::vector<Job> jobs = {
      {testing::TestPrompt(10, 1), 30, {}},    // small: one block
      {testing::TestPrompt(25, 2), 30, {}},    // small: one block
      {testing::TestPrompt(200, 3), 400, {}},  // 600 positions: 10 blocks; fits alone
      {testing::TestPrompt(200, 4), 400, {}},  // the same: both cannot fit at once
      {testing::TestPrompt(100, 5), 2000, {}},  // 2100 positions: more than the whole cluster
  };
  std::vector<std::thread> threads;
  for (size_t i = 0; i < jobs.size(); ++i) {
    threads.emplace_back([&, i] {
      jobs[i].result =
          cluster.Generate(testing::TokenRequest(jobs[i].prompt, jobs[i].max_tokens), 50s);
    });
    std::this_thread::sleep_for(30ms);  // admitted in this order
  }
  for (auto& thread : threads) thread.join();
  EXPECT_EQ(jobs[4].result.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
      << jobs[4].result.status.error_message();
  EXPECT_TRUE(jobs[4].result.tokens.empty());
  return jobs;
}

TEST_F(ClusterFailureTest, WhenTheKvIsFullTheNewestJobWaitsAndEveryJobThatFitsFinishes) {
  Start(2, 8 * kBlockBytes);
  std::vector<Job> jobs = RunJobsThatDoNotAllFit(*cluster_);
  // One large job is preempted when the room runs out and resumes, its KV rebuilt, once the
  // other finished; both end with exactly the in-process tokens.
  for (int i : {0, 1, 2, 3}) {
    ASSERT_TRUE(jobs[i].result.status.ok()) << i << ": " << jobs[i].result.status.error_message();
    EXPECT_EQ(jobs[i].result.reason, ferry::v1::FINISH_REASON_LENGTH) << i;
    EXPECT_EQ(jobs[i].result.tokens, Expected(jobs[i].prompt, jobs[i].max_tokens)) << i;
  }
  EXPECT_GE(jobs[2].result.timings.preemptions() + jobs[3].result.timings.preemptions(), 1);
  EXPECT_NE(cluster_->coordinator().Log().find("preempted"), std::string::npos);
  EXPECT_NE(cluster_->coordinator().Log().find("resumed after preemption"), std::string::npos);
  EXPECT_TRUE(cluster_->WaitAllKvFreed(5s));
}

TEST_F(ClusterFailureTest, WithKvFullFailJobsThatCannotFitGetResourceExhaustedWhileOthersFinish) {
  Start(2, 8 * kBlockBytes, {"--kv-full", "fail"});
  std::vector<Job> jobs = RunJobsThatDoNotAllFit(*cluster_);
  for (int i : {0, 1}) {
    ASSERT_TRUE(jobs[i].result.status.ok()) << i << ": " << jobs[i].result.status.error_message();
    EXPECT_EQ(jobs[i].result.tokens, Expected(jobs[i].prompt, jobs[i].max_tokens)) << i;
  }
  // Of the two large jobs one gives way (the one admitted last when the room ran out); the other
  // finishes exactly, its KV spread over both workers once the first one filled.
  int finished = 0, exhausted = 0;
  for (int i : {2, 3}) {
    const testing::StreamResult& r = jobs[i].result;
    if (r.status.ok() && r.reason == ferry::v1::FINISH_REASON_LENGTH) {
      ++finished;
      EXPECT_EQ(r.tokens, Expected(jobs[i].prompt, jobs[i].max_tokens)) << i;
    } else {
      ++exhausted;
      EXPECT_EQ(r.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << i << ": " << r.status.error_message();
    }
  }
  EXPECT_EQ(finished, 1);
  EXPECT_EQ(exhausted, 1);
  EXPECT_TRUE(cluster_->WaitAllKvFreed(5s));
}

class ClusterRebuildTest : public ClusterFailureTest,
                           public ::testing::WithParamInterface<testing::ClusterMode> {};

TEST_P(ClusterRebuildTest, KilledWorkersJobsAreRebuiltAndEveryJobKeepsItsTokens) {
  Start(3, 64 << 20, GetParam().coordinator_flags);
  constexpr int kJobs = 6, kMaxTokens = 200;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kJobs; ++i) prompts.push_back(testing::TestPrompt(5 + 7 * i, i));
  std::vector<ferry::v1::GenerateRequest> requests;
  for (int i = 0; i < kJobs; ++i) requests.push_back(testing::TokenRequest(prompts[i], kMaxTokens));
  std::thread killer([&] {
    // Once six sequences (or head groups) hold KV, kill the worker holding the most: jobs may
    // still be arriving, so admissions meet the dead worker too.
    std::vector<int> held(3, 0);
    for (int attempt = 0; attempt < 200; ++attempt) {
      for (int w = 0; w < 3; ++w) {
        held[w] = cluster_->SequencesOn(testing::LocalCluster::WorkerId(w));
      }
      if (held[0] + held[1] + held[2] >= kJobs) break;
      std::this_thread::sleep_for(10ms);
    }
    const int victim = static_cast<int>(std::max_element(held.begin(), held.end()) - held.begin());
    cluster_->worker(victim).Signal(SIGKILL);
  });
  const std::vector<testing::StreamResult> results = cluster_->GenerateAll(requests, 50s);
  killer.join();
  for (int i = 0; i < kJobs; ++i) {
    ASSERT_TRUE(results[i].status.ok()) << "job " << i << ": " << results[i].status.error_message();
    EXPECT_EQ(results[i].reason, ferry::v1::FINISH_REASON_LENGTH) << results[i].error;
    EXPECT_EQ(results[i].tokens, Expected(prompts[i], kMaxTokens)) << "job " << i;
  }
  EXPECT_NE(cluster_->coordinator().Log().find("rebuilding its kv"), std::string::npos)
      << "the killed worker held no job while one ran";
}

INSTANTIATE_TEST_SUITE_P(
    Placements, ClusterRebuildTest,
    ::testing::Values(testing::ClusterMode{"whole_sequences", {}},
                      testing::ClusterMode{"by_sequence_range_2_micro_batches",
                                           {"--shard-positions", "48", "--micro-batches", "2"}},
                      testing::ClusterMode{"by_head_group", {"--shard", "heads"}}),
    testing::ClusterModeName);

TEST_F(ClusterFailureTest, WithoutRebuildsAKilledWorkerFailsOnlyItsJobsAndTheOthersRetryExactly) {
  Start(3, 64 << 20, {"--kv-rebuilds", "0"});
  constexpr int kJobs = 6, kMaxTokens = 400;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kJobs; ++i) prompts.push_back(testing::TestPrompt(5 + 7 * i, i));
  std::vector<testing::StreamResult> results(kJobs);
  std::atomic<int> killed{-1};
  std::vector<std::thread> threads;
  for (int i = 0; i < kJobs; ++i) {
    threads.emplace_back([&, i] {
      results[i] = cluster_->Generate(
          testing::TokenRequest(prompts[i], kMaxTokens), 50s, [&, i](int count) {
            if (i != 0 || count != 30) return;
            // Kill the worker holding the most sequences, mid-generation.
            int victim = 0, most = -1;
            for (int w = 0; w < 3; ++w) {
              const int held = cluster_->SequencesOn(testing::LocalCluster::WorkerId(w));
              if (held > most) {
                most = held;
                victim = w;
              }
            }
            cluster_->worker(victim).Signal(SIGKILL);
            killed = victim;
          });
    });
  }
  for (auto& thread : threads) thread.join();
  ASSERT_GE(killed.load(), 0);

  int failed = 0, finished = 0;
  for (int i = 0; i < kJobs; ++i) {
    const testing::StreamResult& r = results[i];
    if (r.status.ok() && r.reason == ferry::v1::FINISH_REASON_LENGTH) {
      ++finished;
      EXPECT_EQ(r.tokens, Expected(prompts[i], kMaxTokens)) << "job " << i;
    } else {
      ++failed;
      // The error names the dead worker's loss (a reset connection or a keepalive timeout),
      // not a confused retry ("not the next position").
      EXPECT_TRUE(r.status.error_code() == grpc::StatusCode::UNAVAILABLE ||
                  r.status.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED)
          << "job " << i << ": " << r.status.error_message();
      EXPECT_NE(r.status.error_message().find(testing::LocalCluster::WorkerId(killed)),
                std::string::npos)
          << r.status.error_message();
    }
  }
  EXPECT_GE(failed, 1);
  EXPECT_GE(finished, 1);
  // The survivors hold nothing once their jobs are done (the dead one drops out of the table).
  for (int attempt = 0; attempt < 100; ++attempt) {
    bool free = true;
    const ferry::v1::ListWorkersResponse workers = cluster_->Workers();
    for (const auto& w : workers.workers()) {
      if (w.worker_id() != testing::LocalCluster::WorkerId(killed) &&
          w.state() != ferry::v1::WORKER_STATE_DEAD) {
        free &= w.kv_used_bytes() == 0;
      }
    }
    if (free) break;
    ASSERT_LT(attempt, 99) << "KV left on a surviving worker";
    std::this_thread::sleep_for(50ms);
  }
  // New jobs go to the survivors.
  const std::vector<int32_t> prompt = testing::TestPrompt(12, 9);
  const testing::StreamResult after = cluster_->Generate(testing::TokenRequest(prompt, 10));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, Expected(prompt, 10));
}

}  // namespace
}  // namespace ferry
