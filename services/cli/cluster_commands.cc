#include "services/cli/cluster_commands.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>

#include "absl/strings/str_format.h"
#include "ferry/v1/cluster.grpc.pb.h"
#include "services/common/grpc_status.h"

namespace ferry::cli {
namespace {

std::unique_ptr<ferry::v1::ClusterService::Stub> Connect(const std::string& coordinator) {
  return ferry::v1::ClusterService::NewStub(
      grpc::CreateChannel(coordinator, grpc::InsecureChannelCredentials()));
}

std::string Bytes(int64_t bytes) {
  constexpr double kGiB = 1024.0 * 1024 * 1024;
  return absl::StrFormat("%.2f GiB", bytes / kGiB);
}

const char* StateName(ferry::v1::WorkerState state) {
  switch (state) {
    case ferry::v1::WORKER_STATE_READY: return "READY";
    case ferry::v1::WORKER_STATE_DRAINING: return "DRAINING";
    case ferry::v1::WORKER_STATE_DEAD: return "DEAD";
    default: return "UNKNOWN";
  }
}

}  // namespace

absl::StatusOr<ferry::v1::ListWorkersResponse> ListWorkers(const std::string& coordinator,
                                                           std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  ferry::v1::ListWorkersResponse response;
  const grpc::Status status =
      Connect(coordinator)->ListWorkers(&context, ferry::v1::ListWorkersRequest(), &response);
  if (!status.ok()) return services::FromGrpcStatus(status);
  return response;
}

void PrintWorkerTable(const ferry::v1::ListWorkersResponse& workers, std::ostream& out) {
  out << absl::StrFormat("%-10s %-22s %-6s %-9s %12s %12s %6s %8s %12s %10s\n", "ID",
                         "ADDRESS", "DEVICE", "STATE", "KV USED", "KV FREE", "SEQS", "OPENED",
                         "ATTENTION/S", "HEARTBEAT");
  for (const ferry::v1::WorkerInfo& w : workers.workers()) {
    out << absl::StrFormat(
        "%-10s %-22s %-6s %-9s %12s %12s %6d %8d %12s %8d ms\n", w.worker_id(), w.data_address(),
        w.device() == ferry::v1::DEVICE_KIND_CUDA ? "cuda" : "cpu", StateName(w.state()),
        Bytes(w.kv_used_bytes()), Bytes(w.kv_capacity_bytes() - w.kv_used_bytes()),
        w.sequences_held(), w.sequences_opened(),
        w.attention_bytes_per_second() > 0
            ? Bytes(static_cast<int64_t>(w.attention_bytes_per_second()))
            : std::string("-"),
        static_cast<int>(w.ms_since_heartbeat()));
  }
  if (workers.workers_size() == 0) out << "(no workers registered)\n";
}

absl::StatusOr<ferry::v1::WorkerState> DrainWorker(const std::string& coordinator,
                                                   const std::string& worker_id,
                                                   std::chrono::milliseconds timeout) {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  ferry::v1::DrainWorkerRequest request;
  request.set_worker_id(worker_id);
  ferry::v1::DrainWorkerResponse response;
  const grpc::Status status = Connect(coordinator)->DrainWorker(&context, request, &response);
  if (!status.ok()) return services::FromGrpcStatus(status);
  return response.state();
}

}  // namespace ferry::cli
