// The ferry-coordinator daemon with in-process attention, driven over gRPC as a user would:
// health, token parity with in-process generation, concurrent streams, deadlines and bad
// requests that spare the other requests, and SIGTERM: accepted jobs finish within the grace
// while new ones are refused, or with no grace open streams end and the daemon exits at once.
#include <atomic>
#include <filesystem>
#include <thread>

#include "daemon.h"
#include "ferry/v1/generation.grpc.pb.h"
#include "gtest/gtest.h"
#include "generation_stream.h"
#include "in_process_tokens.h"
#include "runtime/model/tiny_checkpoint.h"
#include "test_ports.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

using testing::StreamResult;

StreamResult Generate(ferry::v1::GenerationService::Stub& stub,
                      const ferry::v1::GenerateRequest& request,
                      std::chrono::milliseconds deadline = 30s) {
  return testing::ReadGeneration(stub, request, deadline);
}

ferry::v1::GenerateRequest Request(const std::vector<int32_t>& prompt, int max_tokens) {
  return testing::TokenRequest(prompt, max_tokens);
}

class CoordinatorLocalTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("ferry_coordinator_test_" + std::to_string(getpid()));
    model::TinyCheckpointOptions tiny;
    tiny.out_dir = dir_;
    tiny.seed = 5;
    ASSERT_TRUE(model::WriteTinyCheckpoint(tiny).ok());
    StartDaemon({});
  }
  // (Re)starts the coordinator with the tests' flags and `extra`.
  void StartDaemon(const std::vector<std::string>& extra) {
    daemon_.reset();
    address_ = "127.0.0.1:" + std::to_string(testing::UnusedTcpPort());
    std::vector<std::string> args = {"--model",       dir_,       "--local-attention",
                                     "--listen",      address_,   "--threads",
                                     "2",             "--kv-capacity", "67108864",
                                     "--kv-dtype",    "fp32"};
    args.insert(args.end(), extra.begin(), extra.end());
    daemon_ = std::make_unique<testing::Daemon>(FERRY_COORDINATOR_BINARY, args, dir_ + ".log");
    ASSERT_TRUE(daemon_->started());
    ASSERT_TRUE(daemon_->WaitHealthy(address_, 20s)) << daemon_->Log();
    stub_ = ferry::v1::GenerationService::NewStub(
        grpc::CreateChannel(address_, grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    daemon_.reset();
    std::filesystem::remove_all(dir_);
    if (!HasFailure()) std::filesystem::remove(dir_ + ".log");
  }

  // The tokens in-process generation gives (greedy, fp32 KV as the daemon was started with).
  std::vector<int32_t> InProcessTokens(const std::vector<int32_t>& prompt, int max_tokens) {
    return testing::InProcessTokens(dir_, prompt, max_tokens);
  }

  std::string dir_;
  std::string address_;
  std::unique_ptr<testing::Daemon> daemon_;
  std::unique_ptr<ferry::v1::GenerationService::Stub> stub_;
};

TEST_F(CoordinatorLocalTest, StreamsTheTokensOfInProcessGeneration) {
  const std::vector<int32_t> prompt = {3, 14, 15, 92, 65};
  const StreamResult result = Generate(*stub_, Request(prompt, 12));
  ASSERT_TRUE(result.status.ok()) << result.status.error_message() << daemon_->Log();
  EXPECT_EQ(result.reason, ferry::v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(result.tokens, InProcessTokens(prompt, 12));
}

TEST_F(CoordinatorLocalTest, ConcurrentStreamsEachGetTheirOwnTokens) {
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 8; ++i) prompts.push_back({i + 1, 2 * i + 7, 100 + i});
  std::vector<StreamResult> results(prompts.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < prompts.size(); ++i) {
    threads.emplace_back([&, i] { results[i] = Generate(*stub_, Request(prompts[i], 10)); });
  }
  for (auto& thread : threads) thread.join();
  for (size_t i = 0; i < prompts.size(); ++i) {
    ASSERT_TRUE(results[i].status.ok()) << results[i].status.error_message();
    EXPECT_EQ(results[i].tokens, InProcessTokens(prompts[i], 10)) << "stream " << i;
  }
}

TEST_F(CoordinatorLocalTest, DeadlinesAndBadRequestsSpareTheOthers) {
  // A job far longer than its deadline ends DEADLINE_EXCEEDED.
  const StreamResult timed_out = Generate(*stub_, Request({1, 2, 3}, 4000), 300ms);
  EXPECT_EQ(timed_out.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  // Bad requests are refused with INVALID_ARGUMENT or FAILED_PRECONDITION.
  EXPECT_EQ(Generate(*stub_, Request({}, 4)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_EQ(Generate(*stub_, Request({1, 999999}, 4)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ferry::v1::GenerateRequest many_stops = Request({1, 2}, 4);
  for (int i = 0; i < 100; ++i) many_stops.add_stop_token_ids(i);
  EXPECT_EQ(Generate(*stub_, many_stops).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ferry::v1::GenerateRequest text = Request({}, 4);
  text.set_prompt_text("no tokenizer in this model folder");
  EXPECT_EQ(Generate(*stub_, text).status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  // Absurd max_tokens: none, negative, or past the model's 4096 positions.
  for (int max_tokens : {0, -5, 1 << 30, 4094}) {
    EXPECT_EQ(Generate(*stub_, Request({1, 2, 3}, max_tokens)).status.error_code(),
              grpc::StatusCode::INVALID_ARGUMENT)
        << max_tokens;
  }
  // Oversized messages: more prompt ids, or more prompt text, than the API takes.
  std::vector<int32_t> many_ids((1 << 20) + 1, 7);
  EXPECT_EQ(Generate(*stub_, Request(many_ids, 4)).status.error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  ferry::v1::GenerateRequest long_text = Request({}, 4);
  long_text.set_prompt_text(std::string((4 << 20) + 1, 'a'));
  EXPECT_EQ(Generate(*stub_, long_text).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  ferry::v1::GenerateRequest long_stop = Request({1, 2}, 4);
  long_stop.add_stop_strings(std::string(300, 's'));
  EXPECT_EQ(Generate(*stub_, long_stop).status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  // And the daemon still serves.
  const std::vector<int32_t> prompt = {9, 8, 7};
  const StreamResult after = Generate(*stub_, Request(prompt, 6));
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, InProcessTokens(prompt, 6));
}

TEST_F(CoordinatorLocalTest, SigtermLetsAcceptedJobsFinishAndRefusesNewOnes) {
  const std::vector<int32_t> prompt = {1, 2, 3};
  std::atomic<bool> signalled{false};
  StreamResult long_job;
  std::thread stream([&] {
    long_job = testing::ReadGeneration(*stub_, Request(prompt, 600), 30s, [&](int count) {
      if (count == 5) {
        daemon_->Signal(SIGTERM);
        signalled = true;
      }
    });
  });
  for (int i = 0; i < 1000 && !signalled; ++i) std::this_thread::sleep_for(2ms);
  ASSERT_TRUE(signalled);
  // Refused once the daemon has taken the signal (a request it accepted just before runs).
  grpc::Status refused;
  for (int attempt = 0; attempt < 100; ++attempt) {
    refused = Generate(*stub_, Request({4, 5}, 1), 5s).status;
    if (!refused.ok()) break;
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::UNAVAILABLE) << refused.error_message();
  stream.join();
  ASSERT_TRUE(long_job.status.ok()) << long_job.status.error_message() << daemon_->Log();
  EXPECT_EQ(long_job.reason, ferry::v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(long_job.tokens, InProcessTokens(prompt, 600));
  EXPECT_EQ(daemon_->Wait(20s), 0) << daemon_->Log();
}

TEST_F(CoordinatorLocalTest, WithNoGraceSigtermEndsOpenStreamsAndExitsAtOnce) {
  StartDaemon({"--shutdown-grace-s", "0"});
  StreamResult long_job;
  std::thread stream([&] { long_job = Generate(*stub_, Request({1, 2, 3}, 4000), 30s); });
  std::this_thread::sleep_for(200ms);
  daemon_->Signal(SIGTERM);
  EXPECT_EQ(daemon_->Wait(10s), 0) << daemon_->Log();
  stream.join();
  EXPECT_LT(long_job.tokens.size(), 4000u);
  EXPECT_TRUE(!long_job.status.ok() || long_job.reason != ferry::v1::FINISH_REASON_LENGTH);
}

}  // namespace
}  // namespace ferry
