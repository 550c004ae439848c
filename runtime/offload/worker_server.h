// The worker service on the data plane: a UcxNode listening for frames and one request thread
// that takes each request (UcxNode::NextRequest, progressing the UCP worker itself while it
// waits), runs WorkerService::Handle and sends the reply from the same thread, so a request
// crosses no thread on its way in or out. Entry point for the worker daemon (services/worker) and
// for tests' worker processes.
//
// Ownership: owns its node, service and thread. Stop() (and the destructor) stops taking
// requests, finishes the one in progress, joins the thread (within kStopBound of that request's
// end) and shuts the node down (bounded).
// Threads: Start/Stop from one owner thread; requests are handled in arrival order on the
// request thread (WorkerService is single-threaded; its attention uses its own pool).
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>
#include <thread>
#include <unordered_map>

#include "absl/status/statusor.h"
#include "runtime/offload/worker_service.h"
#include "runtime/transport/ucx_node.h"

namespace ferry::offload {

struct WorkerServerOptions {
  transport::UcxNodeOptions node;
  WorkerServiceOptions service;
  // "cpu", or "cuda:N" (cuda_attention_backend.h: the KV pools and attention on GPU N, frames in
  // pinned host memory); "cuda:N" in a build without CUDA fails Start with UNIMPLEMENTED.
  std::string device = "cpu";
  std::string host = "127.0.0.1";
  int port = 0;  // 0: any free port
  // Tests only: hold each Attend this long before handling it (a slow worker, to kill mid-request).
  absl::Duration attend_delay = absl::ZeroDuration();
};

class WorkerServer {
 public:
  static absl::StatusOr<std::unique_ptr<WorkerServer>> Start(const WorkerServerOptions& options);
  // The device number of "cuda:N" ("cuda" is device 0), or -1 for "cpu"; INVALID_ARGUMENT
  // for anything else.
  static absl::StatusOr<int> ParseDevice(const std::string& device);
  // The --device values this build can serve on this machine: "cpu", then "cuda:N" for each GPU
  // the CUDA runtime finds (none in a build without CUDA).
  static std::vector<std::string> AttentionDevices();
  ~WorkerServer();
  WorkerServer(const WorkerServer&) = delete;
  WorkerServer& operator=(const WorkerServer&) = delete;

  int port() const { return port_; }
  // KV bytes in use, sequences held and sequences ever opened (WorkerService::sequences_opened),
  // as of the last request handled. Any thread.
  int64_t kv_used_bytes() const { return kv_used_bytes_.load(); }
  int32_t sequences_held() const { return sequences_held_.load(); }
  int64_t sequences_opened() const { return sequences_opened_.load(); }
  int64_t kv_capacity_bytes() const { return options_.service.kv_capacity_bytes; }
  void Stop();

 private:
  // How long the request thread waits for a request before it looks at stopping_ again.
  static constexpr absl::Duration kStopBound = absl::Milliseconds(100);

  explicit WorkerServer(const WorkerServerOptions& options) : options_(options) {}
  void Serve();
  absl::StatusOr<transport::Buffer> Forward(const std::string& host, int port,
                                            transport::Buffer frame);

  WorkerServerOptions options_;
  std::unique_ptr<transport::UcxNode> node_;
  std::unique_ptr<WorkerService> service_;
  int port_ = 0;
  std::thread thread_;
  std::atomic<int64_t> kv_used_bytes_{0};
  std::atomic<int32_t> sequences_held_{0};
  std::atomic<int64_t> sequences_opened_{0};
  std::atomic<bool> stopping_{false};
  std::unordered_map<std::string, transport::PeerId> forward_peers_;  // request thread only
};

}  // namespace ferry::offload
