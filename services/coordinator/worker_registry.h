// The coordinator's table of attention workers: registration, heartbeats, liveness, draining.
//
// A worker registers with its data-plane address, device kind and KV capacity and gets an id
// (or keeps the one it asks for, so a restarted worker is recognised). Heartbeats report KV use;
// a worker that misses heartbeats for `dead_after` is marked DEAD on the next Sweep (or any
// query), so placement never picks it, and listed with no KV in use; a DRAINING worker that holds no sequence and stops
// heartbeating has left and is forgotten. Drain marks a worker DRAINING: it takes no new KV, and its
// heartbeat reply tells it so. Ready workers are the candidates for placement.
// Threads: every method is thread-safe (one mutex; calls are short). The clock is injectable so
// tests control time.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace ferry::coordinator {

enum class DeviceKind { kCpu, kCuda };
enum class WorkerState { kReady, kDraining, kDead };

const char* WorkerStateName(WorkerState state);

struct WorkerRegistration {
  std::string worker_id;  // empty: assign one
  std::string data_address;
  DeviceKind device = DeviceKind::kCpu;
  std::string device_name;
  int64_t kv_capacity_bytes = 0;
};

struct WorkerStatus {
  std::string worker_id;
  std::string data_address;
  DeviceKind device = DeviceKind::kCpu;
  std::string device_name;
  WorkerState state = WorkerState::kReady;
  int64_t kv_capacity_bytes = 0;
  int64_t kv_used_bytes = 0;
  int32_t sequences_held = 0;
  int64_t sequences_opened = 0;
  double attention_bytes_per_second = 0;
  std::chrono::milliseconds since_heartbeat{0};
};

class WorkerRegistry {
 public:
  using Clock = std::function<std::chrono::steady_clock::time_point()>;

  struct Options {
    std::chrono::milliseconds heartbeat_interval{500};
    std::chrono::milliseconds dead_after{2000};
    size_t max_workers = 1024;
    Clock clock = [] { return std::chrono::steady_clock::now(); };
  };

  explicit WorkerRegistry(Options options);

  // Validates and records a worker; re-registering an id replaces its entry and revives it.
  absl::StatusOr<std::string> Register(const WorkerRegistration& registration);
  // Records a heartbeat; NOT_FOUND for an unknown id (the worker should register again).
  absl::StatusOr<WorkerState> Heartbeat(const std::string& worker_id, int64_t kv_used_bytes,
                                        int32_t sequences_held, int64_t sequences_opened);
  absl::StatusOr<WorkerState> Drain(const std::string& worker_id);
  // Forgets a worker (after its drain finished, or after it died and its KV was rebuilt).
  absl::Status Remove(const std::string& worker_id);
  // Marks workers whose last heartbeat is older than dead_after as DEAD; returns their ids.
  std::vector<std::string> Sweep();
  // Every worker, ordered by id, after a Sweep.
  std::vector<WorkerStatus> List();
  // Ready workers only, ordered by id, after a Sweep.
  std::vector<WorkerStatus> ReadyWorkers();
  void RecordAttentionThroughput(const std::string& worker_id, double bytes_per_second);

  std::chrono::milliseconds heartbeat_interval() const { return options_.heartbeat_interval; }

 private:
  struct Entry {
    WorkerStatus status;
    std::chrono::steady_clock::time_point last_heartbeat;
  };
  std::vector<std::string> SweepLocked();
  WorkerStatus Snapshot(const Entry& entry) const;

  const Options options_;
  std::mutex mutex_;
  std::map<std::string, Entry> workers_;
  uint64_t next_id_ = 1;
};

}  // namespace ferry::coordinator
