// gRPC glue for ferry.v1.ClusterService over a WorkerRegistry. Validates every request field
// (sizes, enums) and converts errors with services/common/grpc_status.h. Thread-safe: gRPC calls
// handlers on its own threads; all state lives in the registry.
#pragma once

#include "ferry/v1/cluster.grpc.pb.h"
#include "services/coordinator/worker_registry.h"

namespace ferry::coordinator {

class ClusterServiceImpl final : public ferry::v1::ClusterService::Service {
 public:
  // `registry` must outlive the service. `model` is sent to every worker that registers.
  ClusterServiceImpl(WorkerRegistry* registry, ferry::v1::ModelShape model);

  grpc::Status RegisterWorker(grpc::ServerContext* context,
                              const ferry::v1::RegisterWorkerRequest* request,
                              ferry::v1::RegisterWorkerResponse* response) override;
  grpc::Status Heartbeat(grpc::ServerContext* context, const ferry::v1::HeartbeatRequest* request,
                         ferry::v1::HeartbeatResponse* response) override;
  grpc::Status ListWorkers(grpc::ServerContext* context,
                           const ferry::v1::ListWorkersRequest* request,
                           ferry::v1::ListWorkersResponse* response) override;
  grpc::Status DrainWorker(grpc::ServerContext* context,
                           const ferry::v1::DrainWorkerRequest* request,
                           ferry::v1::DrainWorkerResponse* response) override;

 private:
  WorkerRegistry* const registry_;
  const ferry::v1::ModelShape model_;
};

ferry::v1::WorkerState ToProto(WorkerState state);

}  // namespace ferry::coordinator
