// The worker's side of cluster membership: register with the coordinator, then heartbeat.
//
// Start() spawns one thread that registers, retrying with exponential backoff (so workers and
// the coordinator can start in any order), then sends a heartbeat every interval the coordinator
// asked for. Every RPC has a deadline (rpc_timeout). A heartbeat answered NOT_FOUND or
// FAILED_PRECONDITION (the coordinator restarted, or declared this worker dead) makes the link
// register again under the same id. A DRAINING reply sets drain_requested(). Stop() wakes the
// thread, joins it within one rpc_timeout and sends a last heartbeat (bounded the same way) with
// the load the worker leaves with. Threads: all public methods are thread-safe.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "ferry/v1/cluster.grpc.pb.h"

namespace ferry::worker {

struct WorkerLoad {
  int64_t kv_used_bytes = 0;
  int32_t sequences_held = 0;
  int64_t sequences_opened = 0;
};

struct CoordinatorLinkOptions {
  std::string coordinator_address;  // host:port of the coordinator's gRPC server
  ferry::v1::RegisterWorkerRequest registration;
  std::chrono::milliseconds rpc_timeout{1000};
  std::chrono::milliseconds initial_backoff{100};
  std::chrono::milliseconds max_backoff{2000};
  std::function<WorkerLoad()> load = [] { return WorkerLoad{}; };
};

class CoordinatorLink {
 public:
  explicit CoordinatorLink(CoordinatorLinkOptions options);
  ~CoordinatorLink();  // Stop()s

  void Start();
  void Stop();

  // Waits (at most `timeout`) for the first successful registration.
  absl::StatusOr<ferry::v1::RegisterWorkerResponse> WaitRegistered(
      std::chrono::milliseconds timeout);
  bool drain_requested() const { return drain_requested_.load(); }
  int registrations() const { return registrations_.load(); }

 private:
  void Run();
  // Sleeps for `duration` unless Stop() is called first; returns false when stopping.
  bool SleepFor(std::chrono::milliseconds duration);
  grpc::Status SendHeartbeat(const std::string& worker_id,
                             ferry::v1::HeartbeatResponse* response = nullptr);

  const CoordinatorLinkOptions options_;
  // Created by the link's thread before its first call; read by Stop() after the join.
  std::unique_ptr<ferry::v1::ClusterService::Stub> stub_;
  std::thread thread_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::optional<ferry::v1::RegisterWorkerResponse> registered_;
  std::atomic<bool> drain_requested_{false};
  std::atomic<int> registrations_{0};
};

}  // namespace ferry::worker
