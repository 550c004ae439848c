// Test helper: a whole Ferry cluster on loopback, as a user runs it: a tiny random model, one
// ferry-coordinator and N ferry-worker daemons (UCX over tcp), with the gRPC stubs and the
// queries the daemon tests share. Ports are chosen free at start, so tests can run in parallel.
// Every wait is bounded. Needs FERRY_COORDINATOR_BINARY and FERRY_WORKER_BINARY.
#pragma once

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <functional>
#include <ostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "daemon.h"
#include "ferry/v1/cluster.grpc.pb.h"
#include "ferry/v1/generation.grpc.pb.h"
#include "generation_stream.h"
#include "gtest/gtest.h"
#include "runtime/model/tiny_checkpoint.h"
#include "test_ports.h"

namespace ferry::testing {

// A named set of coordinator flags, the parameter of the cluster tests that run the same jobs
// under several placements.
struct ClusterMode {
  const char* name;
  std::vector<std::string> coordinator_flags;
};
inline void PrintTo(const ClusterMode& mode, std::ostream* os) { *os << mode.name; }
inline std::string ClusterModeName(const ::testing::TestParamInfo<ClusterMode>& info) {
  return info.param.name;
}

struct LocalClusterOptions {
  int num_workers = 2;
  int64_t worker_kv_capacity = 64 << 20;
  std::vector<std::string> coordinator_flags;  // beyond model, address, transport, heartbeats
  uint64_t model_seed = 9;
  model::AttentionKind attention_kind = model::AttentionKind::kSoftmax;
};

class LocalCluster {
 public:
  // Writes the model and starts the daemons; check ok() (gtest assertions report why not).
  explicit LocalCluster(const LocalClusterOptions& options) {
    dir_ = std::filesystem::temp_directory_path() /
           ("ferry_cluster_" + std::to_string(getpid()) + "_" + std::to_string(next_id_++));
    model::TinyCheckpointOptions tiny;
    tiny.out_dir = dir_;
    tiny.seed = options.model_seed;
    tiny.attention_kind = options.attention_kind;
    if (!model::WriteTinyCheckpoint(tiny).ok()) {
      ADD_FAILURE() << "cannot write the tiny model in " << dir_;
      return;
    }
    // The port is free when picked but may be taken before the coordinator binds it (another
    // test's listener): a coordinator that exits before it is healthy gets another port.
    for (int attempt = 0;; ++attempt) {
      address_ = "127.0.0.1:" + std::to_string(UnusedTcpPort());
      std::vector<std::string> args = {"--model", dir_, "--listen", address_, "--ucx-tls", "tcp",
                                       "--kv-dtype", "fp32", "--heartbeat-ms",
                                       std::to_string(kHeartbeatMs), "--dead-after-ms", "1500"};
      args.insert(args.end(), options.coordinator_flags.begin(), options.coordinator_flags.end());
      coordinator_ = std::make_unique<Daemon>(FERRY_COORDINATOR_BINARY, args,
                                              dir_ + "/coordinator.log");
      if (coordinator_->WaitHealthy(address_, std::chrono::seconds(20))) break;
      if (attempt == 2 || !coordinator_->Exited()) {
        ADD_FAILURE() << "the coordinator did not come up: " << coordinator_->Log();
        return;
      }
    }
    for (int i = 0; i < options.num_workers; ++i) {
      workers_.push_back(std::make_unique<Daemon>(
          FERRY_WORKER_BINARY,
          std::vector<std::string>{"--coordinator", address_, "--kv-capacity",
                                   std::to_string(options.worker_kv_capacity), "--ucx-tls", "tcp",
                                   "--threads", "1", "--worker-id", WorkerId(i),
                                   "--drain-timeout", "10"},
          dir_ + "/worker" + std::to_string(i) + ".log"));
    }
    channel_ = grpc::CreateChannel(address_, grpc::InsecureChannelCredentials());
    generation_ = ferry::v1::GenerationService::NewStub(channel_);
    cluster_ = ferry::v1::ClusterService::NewStub(channel_);
    for (int i = 0; i < 200 && ReadyWorkers() < options.num_workers; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    if (ReadyWorkers() != options.num_workers) {
      ADD_FAILURE() << "workers did not register: " << (workers_.empty() ? "" : workers_[0]->Log());
      return;
    }
    ok_ = true;
  }
  ~LocalCluster() {
    workers_.clear();
    coordinator_.reset();
    std::filesystem::remove_all(dir_);
  }

  bool ok() const { return ok_; }
  static std::string WorkerId(int i) { return "w" + std::to_string(i); }
  // The workers' heartbeat interval: the worker table is at most this stale. Short, so that a
  // test looking at it mid-generation sees a change well before the job ends.
  static constexpr int kHeartbeatMs = 20;
  const std::string& model_dir() const { return dir_; }
  Daemon& coordinator() { return *coordinator_; }
  Daemon& worker(int i) { return *workers_[i]; }
  ferry::v1::GenerationService::Stub& generation() { return *generation_; }
  ferry::v1::ClusterService::Stub& cluster() { return *cluster_; }

  ferry::v1::ListWorkersResponse Workers() {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    ferry::v1::ListWorkersResponse response;
    cluster_->ListWorkers(&context, {}, &response);
    return response;
  }
  int ReadyWorkers() {
    int ready = 0;
    const ferry::v1::ListWorkersResponse workers = Workers();
    for (const auto& w : workers.workers()) ready += w.state() == ferry::v1::WORKER_STATE_READY;
    return ready;
  }
  // A worker's row in the table (id empty when it is not listed).
  ferry::v1::WorkerInfo Worker(const std::string& id) {
    const ferry::v1::ListWorkersResponse workers = Workers();
    for (const auto& w : workers.workers()) {
      if (w.worker_id() == id) return w;
    }
    return {};
  }
  int SequencesOn(const std::string& id) {
    const ferry::v1::WorkerInfo info = Worker(id);
    return info.worker_id().empty() ? -1 : info.sequences_held();
  }
  // The worker that reports holding the one running sequence, waited for (at most 2 s) while
  // heartbeats bring the table up to date; empty if none does.
  std::string HolderOfTheOnlySequence() {
    for (int attempt = 0; attempt < 100; ++attempt) {
      int total = 0;
      std::string holder;
      for (size_t i = 0; i < workers_.size(); ++i) {
        const int held = SequencesOn(WorkerId(static_cast<int>(i)));
        total += std::max(held, 0);
        if (held == 1) holder = WorkerId(static_cast<int>(i));
      }
      if (total == 1) return holder;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return "";
  }
  // Waits (bounded) until every listed worker reports no KV in use; false on timeout.
  bool WaitAllKvFreed(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      bool all_free = true;
      const ferry::v1::ListWorkersResponse workers = Workers();
      for (const auto& w : workers.workers()) {
        all_free &= w.kv_used_bytes() == 0 && w.sequences_held() == 0;
      }
      if (all_free) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  StreamResult Generate(const ferry::v1::GenerateRequest& request,
                        std::chrono::milliseconds deadline = std::chrono::seconds(40),
                        const std::function<void(int)>& on_token = {}) {
    return ReadGeneration(*generation_, request, deadline, on_token);
  }

  // Runs every request at once (a stream each) and returns the results in request order. With
  // `held`, sets (*held)[i] when worker i (WorkerId(i)) opened a sequence while they ran (its
  // sequences_opened grew; waited for at most 2 s after the jobs end).
  std::vector<StreamResult> GenerateAll(const std::vector<ferry::v1::GenerateRequest>& requests,
                                        std::chrono::milliseconds deadline,
                                        std::vector<bool>* held = nullptr) {
    const std::vector<int64_t> opened_before = SequencesOpened();
    std::vector<StreamResult> results(requests.size());
    std::vector<std::thread> threads;
    for (size_t i = 0; i < requests.size(); ++i) {
      threads.emplace_back([&, i] { results[i] = Generate(requests[i], deadline); });
    }
    for (auto& thread : threads) thread.join();
    if (held == nullptr) return results;
    const std::vector<int64_t> opened =
        WaitSequencesOpened(std::chrono::seconds(2), [&](const std::vector<int64_t>& now) {
          for (size_t i = 0; i < now.size(); ++i) {
            if (now[i] <= opened_before[i]) return false;
          }
          return true;
        });
    held->assign(workers_.size(), false);
    for (size_t i = 0; i < workers_.size(); ++i) (*held)[i] = opened[i] > opened_before[i];
    return results;
  }

  // Each worker's sequences_opened (sequences added since it started, cumulative) as the table
  // lists it, by index (0 when not listed).
  std::vector<int64_t> SequencesOpened() {
    std::vector<int64_t> opened(workers_.size(), 0);
    for (size_t i = 0; i < workers_.size(); ++i) {
      opened[i] = Worker(WorkerId(static_cast<int>(i))).sequences_opened();
    }
    return opened;
  }
  // Polls SequencesOpened until `done` accepts it or `timeout` passes; returns the last read.
  // Counts only grow, so a later heartbeat cannot take back what `done` waits for.
  std::vector<int64_t> WaitSequencesOpened(
      std::chrono::milliseconds timeout,
      const std::function<bool(const std::vector<int64_t>&)>& done) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (true) {
      std::vector<int64_t> opened = SequencesOpened();
      if (done(opened) || std::chrono::steady_clock::now() > until) return opened;
      std::this_thread::sleep_for(std::chrono::milliseconds(kHeartbeatMs));
    }
  }

  std::string Logs() const {
    std::string logs = "coordinator:\n" + coordinator_->Log();
    for (size_t i = 0; i < workers_.size(); ++i) {
      logs += "worker " + std::to_string(i) + ":\n" + workers_[i]->Log();
    }
    return logs;
  }

 private:
  static inline int next_id_ = 0;
  bool ok_ = false;
  std::string dir_, address_;
  std::unique_ptr<Daemon> coordinator_;
  std::vector<std::unique_ptr<Daemon>> workers_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<ferry::v1::GenerationService::Stub> generation_;
  std::unique_ptr<ferry::v1::ClusterService::Stub> cluster_;
};

// Deterministic prompts of a given length.
inline std::vector<int32_t> TestPrompt(int length, int salt = 0) {
  std::vector<int32_t> prompt(length);
  for (int i = 0; i < length; ++i) prompt[i] = (i * 31 + 7 + salt * 13) % 500;
  return prompt;
}

}  // namespace ferry::testing
