#include "services/coordinator/worker_registry.h"

#include "absl/strings/str_cat.h"

namespace ferry::coordinator {
namespace {

constexpr size_t kMaxAddressBytes = 256;
constexpr size_t kMaxIdBytes = 128;
constexpr size_t kMaxDeviceNameBytes = 256;

// host:port with a non-empty host and a port in 1..65535.
bool IsHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == address.size()) return false;
  int port = 0;
  for (size_t i = colon + 1; i < address.size(); ++i) {
    if (address[i] < '0' || address[i] > '9') return false;
    port = port * 10 + (address[i] - '0');
    if (port > 65535) return false;
  }
  return port > 0;
}

}  // namespace

const char* WorkerStateName(WorkerState state) {
  switch (state) {
    case WorkerState::kReady: return "READY";
    case WorkerState::kDraining: return "DRAINING";
    case WorkerState::kDead: return "DEAD";
  }
  return "UNKNOWN";
}

WorkerRegistry::WorkerRegistry(Options options) : options_(std::move(options)) {}

absl::StatusOr<std::string> WorkerRegistry::Register(const WorkerRegistration& registration) {
  if (registration.data_address.size() > kMaxAddressBytes ||
      !IsHostPort(registration.data_address)) {
    return absl::InvalidArgumentError(
        absl::StrCat("data_address must be host:port of at most ", kMaxAddressBytes, " bytes"));
  }
  if (registration.worker_id.size() > kMaxIdBytes) {
    return absl::InvalidArgumentError(absl::StrCat("worker_id longer than ", kMaxIdBytes));
  }
  if (registration.device_name.size() > kMaxDeviceNameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("device_name longer than ",
                                                   kMaxDeviceNameBytes));
  }
  if (registration.kv_capacity_bytes <= 0) {
    return absl::InvalidArgumentError("kv_capacity_bytes must be > 0");
  }
  std::lock_guard<std::mutex> lock(mutex_);
  std::string id = registration.worker_id;
  const bool known = !id.empty() && workers_.count(id) != 0;
  if (!known && workers_.size() >= options_.max_workers) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cluster is full (", options_.max_workers, " workers)"));
  }
  while (id.empty() || (registration.worker_id.empty() && workers_.count(id) != 0)) {
    id = absl::StrCat("w", next_id_++);
  }
  Entry& entry = workers_[id];
  entry.status = WorkerStatus{};
  entry.status.worker_id = id;
  entry.status.data_address = registration.data_address;
  entry.status.device = registration.device;
  entry.status.device_name = registration.device_name;
  entry.status.kv_capacity_bytes = registration.kv_capacity_bytes;
  entry.status.state = WorkerState::kReady;
  entry.last_heartbeat = options_.clock();
  return id;
}

absl::StatusOr<WorkerState> WorkerRegistry::Heartbeat(const std::string& worker_id,
                                                      int64_t kv_used_bytes,
                                                      int32_t sequences_held,
                                                      int64_t sequences_opened) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown worker ", worker_id, "; register again"));
  }
  Entry& entry = it->second;
  if (entry.status.state == WorkerState::kDead) {
    // Its sequences may already be rebuilt elsewhere: it must register again to be used.
    return absl::FailedPreconditionError(
        absl::StrCat("worker ", worker_id, " was declared dead; register again"));
  }
  if (kv_used_bytes < 0 || sequences_held < 0 || sequences_opened < 0) {
    return absl::InvalidArgumentError(
        "kv_used_bytes, sequences_held and sequences_opened must be >= 0");
  }
  entry.status.kv_used_bytes = kv_used_bytes;
  entry.status.sequences_held = sequences_held;
  entry.status.sequences_opened = sequences_opened;
  entry.last_heartbeat = options_.clock();
  return entry.status.state;
}

absl::StatusOr<WorkerState> WorkerRegistry::Drain(const std::string& worker_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = workers_.find(worker_id);
  if (it == workers_.end()) return absl::NotFoundError(absl::StrCat("unknown worker ", worker_id));
  if (it->second.status.state == WorkerState::kReady) {
    it->second.status.state = WorkerState::kDraining;
  }
  return it->second.status.state;
}

absl::Status WorkerRegistry::Remove(const std::string& worker_id) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (workers_.erase(worker_id) == 0) {
    return absl::NotFoundError(absl::StrCat("unknown worker ", worker_id));
  }
  return absl::OkStatus();
}

std::vector<std::string> WorkerRegistry::SweepLocked() {
  std::vector<std::string> died;
  const auto now = options_.clock();
  for (auto it = workers_.begin(); it != workers_.end();) {
    Entry& entry = it->second;
    if (entry.status.state != WorkerState::kDead &&
        now - entry.last_heartbeat > options_.dead_after) {
      if (entry.status.state == WorkerState::kDraining && entry.status.sequences_held == 0) {
        it = workers_.erase(it);  // drained and gone: it left, it did not die
        continue;
      }
      entry.status.state = WorkerState::kDead;
      // Its KV went with it (the requests it held are rebuilt elsewhere or failed): the table
      // shows none, not its last report. sequences_opened stays, a count of the past.
      entry.status.kv_used_bytes = 0;
      entry.status.sequences_held = 0;
      died.push_back(it->first);
    }
    ++it;
  }
  return died;
}

std::vector<std::string> WorkerRegistry::Sweep() {
  std::lock_guard<std::mutex> lock(mutex_);
  return SweepLocked();
}

WorkerStatus WorkerRegistry::Snapshot(const Entry& entry) const {
  WorkerStatus status = entry.status;
  status.since_heartbeat = std::chrono::duration_cast<std::chrono::milliseconds>(
      options_.clock() - entry.last_heartbeat);
  return status;
}

std::vector<WorkerStatus> WorkerRegistry::List() {
  std::lock_guard<std::mutex> lock(mutex_);
  SweepLocked();
  std::vector<WorkerStatus> out;
  for (const auto& [id, entry] : workers_) out.push_back(Snapshot(entry));
  return out;
}

std::vector<WorkerStatus> WorkerRegistry::ReadyWorkers() {
  std::lock_guard<std::mutex> lock(mutex_);
  SweepLocked();
  std::vector<WorkerStatus> out;
  for (const auto& [id, entry] : workers_) {
    if (entry.status.state == WorkerState::kReady) out.push_back(Snapshot(entry));
  }
  return out;
}

void WorkerRegistry::RecordAttentionThroughput(const std::string& worker_id,
                                               double bytes_per_second) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = workers_.find(worker_id);
  if (it != workers_.end()) it->second.status.attention_bytes_per_second = bytes_per_second;
}

}  // namespace ferry::coordinator
