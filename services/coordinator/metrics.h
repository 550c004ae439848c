// The coordinator's metrics in the Prometheus text format (version 0.0.4), served over HTTP at
// /metrics when `--metrics-listen` is given.
//
// MetricsText renders the scheduler's counters and load (SchedulerStats) and the worker table
// (one series per worker, labelled worker="<id>"): counters end in _total, the rest are gauges.
// MetricsServer serves what its render function returns on each GET /metrics (anything else is
// 404) from its own thread; the render function must be thread-safe.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "runtime/scheduler/batch_scheduler.h"
#include "services/coordinator/worker_registry.h"

namespace httplib {
class Server;
}

namespace ferry::coordinator {

std::string MetricsText(const scheduler::SchedulerStats& stats,
                        const std::vector<WorkerStatus>& workers);

class MetricsServer {
 public:
  // `listen` is host:port (port 0: any free one, see port()). UNAVAILABLE when it cannot bind.
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(
      const std::string& listen, std::function<std::string()> render);
  ~MetricsServer();  // stops serving and joins the thread
  MetricsServer(const MetricsServer&) = delete;
  MetricsServer& operator=(const MetricsServer&) = delete;

  int port() const { return port_; }

 private:
  MetricsServer() = default;

  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
  int port_ = 0;
};

}  // namespace ferry::coordinator
