// The coordinator's Prometheus metrics: the text MetricsText renders (families, labels escaped),
// /metrics of a real cluster on loopback counting what its jobs did, and a bad --metrics-listen
// refused at start with a clear error.
#include "services/coordinator/metrics.h"

#include <httplib.h>

#include <thread>

#include "gtest/gtest.h"
#include "local_cluster.h"

namespace ferry {
namespace {

using namespace std::chrono_literals;

bool HasLine(const std::string& text, const std::string& line) {
  return ("\n" + text).find("\n" + line + "\n") != std::string::npos;
}

TEST(MetricsTextTest, RendersCountersGaugesAndEscapedWorkerLabels) {
  scheduler::SchedulerStats stats;
  stats.submitted = 5;
  stats.finished_length = 3;
  stats.failed = 1;
  stats.generated_tokens = 1234567890123;
  stats.kv_rebuilds = 2;
  stats.waiting = 1;
  std::vector<coordinator::WorkerStatus> workers(2);
  workers[0].worker_id = "w0";
  workers[0].kv_capacity_bytes = int64_t{40} << 30;
  workers[0].sequences_opened = 7;
  workers[0].attention_bytes_per_second = 2.5e9;
  workers[1].worker_id = "odd\"id\\";
  workers[1].state = coordinator::WorkerState::kDead;
  workers[1].since_heartbeat = 1500ms;
  const std::string text = coordinator::MetricsText(stats, workers);
  for (const char* line : {
           "# TYPE ferry_requests_submitted_total counter",
           "ferry_requests_submitted_total 5",
           "ferry_requests_finished_total{reason=\"length\"} 3",
           "ferry_requests_finished_total{reason=\"error\"} 1",
           "ferry_generated_tokens_total 1234567890123",
           "ferry_kv_rebuilds_total 2",
           "# TYPE ferry_requests_waiting gauge",
           "ferry_requests_waiting 1",
           "ferry_worker_up{worker=\"w0\"} 1",
           "ferry_worker_kv_capacity_bytes{worker=\"w0\"} 42949672960",
           "ferry_worker_sequences_opened_total{worker=\"w0\"} 7",
           "ferry_worker_attention_bytes_per_second{worker=\"w0\"} 2500000000",
           "ferry_worker_up{worker=\"odd\\\"id\\\\\"} 0",
           "ferry_worker_seconds_since_heartbeat{worker=\"odd\\\"id\\\\\"} 1.5",
       }) {
    EXPECT_TRUE(HasLine(text, line)) << "missing: " << line << "\n" << text;
  }
}

TEST(MetricsEndpointTest, CountsWhatTheClusterDid) {
  const int metrics_port = testing::UnusedTcpPort();
  testing::LocalClusterOptions options;
  options.coordinator_flags = {"--metrics-listen", "127.0.0.1:" + std::to_string(metrics_port)};
  testing::LocalCluster cluster(options);
  ASSERT_TRUE(cluster.ok());
  std::vector<ferry::v1::GenerateRequest> requests;
  for (int i = 0; i < 3; ++i) {
    requests.push_back(testing::TokenRequest(testing::TestPrompt(10 + i, i), 12));
  }
  for (const testing::StreamResult& result : cluster.GenerateAll(requests, 30s)) {
    ASSERT_TRUE(result.status.ok()) << result.status.error_message();
  }
  httplib::Client client("127.0.0.1", metrics_port);
  client.set_connection_timeout(2, 0);
  client.set_read_timeout(2, 0);
  const std::vector<std::string> expected = {
      "ferry_requests_submitted_total 3",
      "ferry_requests_finished_total{reason=\"length\"} 3",
      "ferry_prompt_tokens_total 33",
      "ferry_generated_tokens_total 36",
      "ferry_requests_running 0",
      "ferry_worker_up{worker=\"w0\"} 1",
      "ferry_worker_up{worker=\"w1\"} 1",
  };
  std::string text;
  bool all = false;
  // The counters settle at the end of the scheduler's step, just after the streams end.
  for (int attempt = 0; attempt < 100 && !all; ++attempt) {
    httplib::Result response = client.Get("/metrics");
    ASSERT_TRUE(response) << "GET /metrics failed: " << httplib::to_string(response.error());
    ASSERT_EQ(response->status, 200);
    EXPECT_EQ(response->get_header_value("Content-Type").rfind("text/plain; version=0.0.4", 0),
              0u);
    text = response->body;
    all = true;
    for (const std::string& line : expected) all &= HasLine(text, line);
    if (!all) std::this_thread::sleep_for(20ms);
  }
  for (const std::string& line : expected) EXPECT_TRUE(HasLine(text, line)) << line << "\n" << text;
  httplib::Result missing = client.Get("/other");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
}

TEST(MetricsEndpointTest, BadListenAddressIsRefusedAtStart) {
  const std::string dir = std::filesystem::temp_directory_path() /
                          ("ferry_metrics_test_" + std::to_string(getpid()));
  model::TinyCheckpointOptions tiny;
  tiny.out_dir = dir;
  ASSERT_TRUE(model::WriteTinyCheckpoint(tiny).ok());
  testing::Daemon coordinator(
      FERRY_COORDINATOR_BINARY,
      {"--model", dir, "--listen", "127.0.0.1:" + std::to_string(testing::UnusedTcpPort()),
       "--metrics-listen", "no-port-here"},
      dir + "/coordinator.log");
  EXPECT_EQ(coordinator.Wait(20s), 1) << coordinator.Log();
  EXPECT_NE(coordinator.Log().find("metrics address \"no-port-here\" is not host:port"),
            std::string::npos)
      << coordinator.Log();
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace ferry
