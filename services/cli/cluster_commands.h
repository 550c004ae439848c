// `ferry cluster status` and `ferry cluster drain`: operator commands against the coordinator's
// ClusterService. Each call has a deadline (timeout); errors come back as absl::Status.
#pragma once

#include <chrono>
#include <ostream>
#include <string>

#include "absl/status/statusor.h"
#include "ferry/v1/cluster.pb.h"

namespace ferry::cli {

absl::StatusOr<ferry::v1::ListWorkersResponse> ListWorkers(const std::string& coordinator,
                                                           std::chrono::milliseconds timeout);

// A table: id, address, device, state, KV used / capacity, sequences, heartbeat age.
void PrintWorkerTable(const ferry::v1::ListWorkersResponse& workers, std::ostream& out);

absl::StatusOr<ferry::v1::WorkerState> DrainWorker(const std::string& coordinator,
                                                   const std::string& worker_id,
                                                   std::chrono::milliseconds timeout);

}  // namespace ferry::cli
