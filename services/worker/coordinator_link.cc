#include "services/worker/coordinator_link.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>

#include "ferry/v1/cluster.grpc.pb.h"
#include "runtime/common/log.h"

namespace ferry::worker {

CoordinatorLink::CoordinatorLink(CoordinatorLinkOptions options) : options_(std::move(options)) {}

CoordinatorLink::~CoordinatorLink() { Stop(); }

void CoordinatorLink::Start() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (thread_.joinable()) return;
  stopping_ = false;
  thread_ = std::thread([this] { Run(); });
}

void CoordinatorLink::Stop() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_ && !thread_.joinable()) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (!thread_.joinable()) return;
  thread_.join();
  // A last report, so that the coordinator sees the load we leave with (a drained worker holds
  // nothing, and is then forgotten rather than declared dead).
  std::string worker_id;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (registered_.has_value()) worker_id = registered_->worker_id();
  }
  if (!worker_id.empty() && stub_ != nullptr) SendHeartbeat(worker_id);
}

grpc::Status CoordinatorLink::SendHeartbeat(const std::string& worker_id,
                                            ferry::v1::HeartbeatResponse* response) {
  const WorkerLoad load = options_.load();
  ferry::v1::HeartbeatRequest heartbeat;
  heartbeat.set_worker_id(worker_id);
  heartbeat.set_kv_used_bytes(load.kv_used_bytes);
  heartbeat.set_sequences_held(load.sequences_held);
  heartbeat.set_sequences_opened(load.sequences_opened);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
  ferry::v1::HeartbeatResponse ignored;
  return stub_->Heartbeat(&context, heartbeat, response != nullptr ? response : &ignored);
}

bool CoordinatorLink::SleepFor(std::chrono::milliseconds duration) {
  std::unique_lock<std::mutex> lock(mutex_);
  return !wake_.wait_for(lock, duration, [this] { return stopping_; });
}

absl::StatusOr<ferry::v1::RegisterWorkerResponse> CoordinatorLink::WaitRegistered(
    std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mutex_);
  if (!wake_.wait_for(lock, timeout, [this] { return registered_.has_value() || stopping_; }) ||
      !registered_.has_value()) {
    return absl::DeadlineExceededError("not registered with the coordinator in time");
  }
  return *registered_;
}

void CoordinatorLink::Run() {
  // gRPC's own reconnect backoff grows to minutes; keep it at our retry schedule so a
  // coordinator that starts late is found within one backoff step.
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS,
              static_cast<int>(options_.initial_backoff.count()));
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, static_cast<int>(options_.initial_backoff.count()));
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, static_cast<int>(options_.max_backoff.count()));
  auto channel = grpc::CreateCustomChannel(options_.coordinator_address,
                                           grpc::InsecureChannelCredentials(), args);
  stub_ = ferry::v1::ClusterService::NewStub(channel);
  ferry::v1::ClusterService::Stub* stub = stub_.get();
  ferry::v1::RegisterWorkerRequest registration = options_.registration;
  std::chrono::milliseconds backoff = options_.initial_backoff;
  std::string worker_id;
  std::chrono::milliseconds interval{500};

  while (true) {
    if (worker_id.empty()) {
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + options_.rpc_timeout);
      // Wait (within the deadline) for a connection instead of failing at once while the
      // channel is between reconnect attempts.
      context.set_wait_for_ready(true);
      ferry::v1::RegisterWorkerResponse response;
      const grpc::Status status = stub->RegisterWorker(&context, registration, &response);
      if (!status.ok()) {
        FERRY_LOG_WARN("worker: register with {} failed ({}), retrying in {} ms",
                       options_.coordinator_address, status.error_message(), backoff.count());
        if (!SleepFor(backoff)) return;
        backoff = std::min(backoff * 2, options_.max_backoff);
        continue;
      }
      worker_id = response.worker_id();
      registration.set_worker_id(worker_id);  // keep the id across re-registrations
      interval = std::chrono::milliseconds(std::max(10, response.heartbeat_interval_ms()));
      backoff = options_.initial_backoff;
      registrations_.fetch_add(1);
      FERRY_LOG_INFO("worker {}: registered with {}", worker_id, options_.coordinator_address);
      {
        std::lock_guard<std::mutex> lock(mutex_);
        registered_ = response;
      }
      wake_.notify_all();
    }
    if (!SleepFor(interval)) return;

    ferry::v1::HeartbeatResponse response;
    const grpc::Status status = SendHeartbeat(worker_id, &response);
    if (status.error_code() == grpc::StatusCode::NOT_FOUND ||
        status.error_code() == grpc::StatusCode::FAILED_PRECONDITION) {
      FERRY_LOG_WARN("worker {}: coordinator forgot us ({}), registering again", worker_id,
                     status.error_message());
      worker_id.clear();
    } else if (!status.ok()) {
      FERRY_LOG_WARN("worker {}: heartbeat failed: {}", worker_id, status.error_message());
    } else if (response.state() == ferry::v1::WORKER_STATE_DRAINING) {
      drain_requested_.store(true);
    }
  }
}

}  // namespace ferry::worker
