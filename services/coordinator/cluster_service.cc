#include "services/coordinator/cluster_service.h"

#include "services/common/grpc_status.h"

namespace ferry::coordinator {

ferry::v1::WorkerState ToProto(WorkerState state) {
  switch (state) {
    case WorkerState::kReady: return ferry::v1::WORKER_STATE_READY;
    case WorkerState::kDraining: return ferry::v1::WORKER_STATE_DRAINING;
    case WorkerState::kDead: return ferry::v1::WORKER_STATE_DEAD;
  }
  return ferry::v1::WORKER_STATE_UNSPECIFIED;
}

namespace {

ferry::v1::DeviceKind ToProto(DeviceKind device) {
  return device == DeviceKind::kCuda ? ferry::v1::DEVICE_KIND_CUDA : ferry::v1::DEVICE_KIND_CPU;
}

}  // namespace

ClusterServiceImpl::ClusterServiceImpl(WorkerRegistry* registry, ferry::v1::ModelShape model)
    : registry_(registry), model_(std::move(model)) {}

grpc::Status ClusterServiceImpl::RegisterWorker(grpc::ServerContext*,
                                                const ferry::v1::RegisterWorkerRequest* request,
                                                ferry::v1::RegisterWorkerResponse* response) {
  WorkerRegistration registration;
  switch (request->device()) {
    case ferry::v1::DEVICE_KIND_CPU: registration.device = DeviceKind::kCpu; break;
    case ferry::v1::DEVICE_KIND_CUDA: registration.device = DeviceKind::kCuda; break;
    default:
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "device must be CPU or CUDA");
  }
  registration.worker_id = request->worker_id();
  registration.data_address = request->data_address();
  registration.device_name = request->device_name();
  registration.kv_capacity_bytes = request->kv_capacity_bytes();
  absl::StatusOr<std::string> id = registry_->Register(registration);
  if (!id.ok()) return services::ToGrpcStatus(id.status());
  response->set_worker_id(*id);
  *response->mutable_model() = model_;
  response->set_heartbeat_interval_ms(
      static_cast<int32_t>(registry_->heartbeat_interval().count()));
  return grpc::Status::OK;
}

grpc::Status ClusterServiceImpl::Heartbeat(grpc::ServerContext*,
                                           const ferry::v1::HeartbeatRequest* request,
                                           ferry::v1::HeartbeatResponse* response) {
  absl::StatusOr<WorkerState> state = registry_->Heartbeat(
      request->worker_id(), request->kv_used_bytes(), request->sequences_held(),
      request->sequences_opened());
  if (!state.ok()) return services::ToGrpcStatus(state.status());
  response->set_state(ToProto(*state));
  return grpc::Status::OK;
}

grpc::Status ClusterServiceImpl::ListWorkers(grpc::ServerContext*,
                                             const ferry::v1::ListWorkersRequest*,
                                             ferry::v1::ListWorkersResponse* response) {
  for (const WorkerStatus& worker : registry_->List()) {
    ferry::v1::WorkerInfo* info = response->add_workers();
    info->set_worker_id(worker.worker_id);
    info->set_data_address(worker.data_address);
    info->set_device(ToProto(worker.device));
    info->set_device_name(worker.device_name);
    info->set_state(ToProto(worker.state));
    info->set_kv_capacity_bytes(worker.kv_capacity_bytes);
    info->set_kv_used_bytes(worker.kv_used_bytes);
    info->set_sequences_held(worker.sequences_held);
    info->set_sequences_opened(worker.sequences_opened);
    info->set_attention_bytes_per_second(worker.attention_bytes_per_second);
    info->set_ms_since_heartbeat(worker.since_heartbeat.count());
  }
  return grpc::Status::OK;
}

grpc::Status ClusterServiceImpl::DrainWorker(grpc::ServerContext*,
                                             const ferry::v1::DrainWorkerRequest* request,
                                             ferry::v1::DrainWorkerResponse* response) {
  absl::StatusOr<WorkerState> state = registry_->Drain(request->worker_id());
  if (!state.ok()) return services::ToGrpcStatus(state.status());
  response->set_state(ToProto(*state));
  return grpc::Status::OK;
}

}  // namespace ferry::coordinator
