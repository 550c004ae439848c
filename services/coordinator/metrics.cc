#include "services/coordinator/metrics.h"

#include <httplib.h>

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace ferry::coordinator {
namespace {

// A label value as the text format wants it: backslash, double quote and newline escaped.
std::string LabelValue(const std::string& value) {
  std::string out;
  for (char c : value) {
    if (c == '\\' || c == '"') {
      out += '\\';
      out += c;
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

void Family(std::string& out, const char* name, const char* type, const char* help) {
  absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

// Whole numbers (counts, bytes) in full, others to 9 significant digits.
void Sample(std::string& out, const char* name, const std::string& labels, double value) {
  const bool whole = value == std::floor(value) && std::fabs(value) < 9.007199254740992e15;
  absl::StrAppend(&out, name, labels.empty() ? "" : "{", labels, labels.empty() ? "" : "}", " ",
                  whole ? absl::StrFormat("%.0f", value) : absl::StrFormat("%.9g", value), "\n");
}

}  // namespace

std::string MetricsText(const scheduler::SchedulerStats& stats,
                        const std::vector<WorkerStatus>& workers) {
  std::string out;
  const auto counter = [&](const char* name, const char* help, int64_t value) {
    Family(out, name, "counter", help);
    Sample(out, name, "", static_cast<double>(value));
  };
  const auto gauge = [&](const char* name, const char* help, int64_t value) {
    Family(out, name, "gauge", help);
    Sample(out, name, "", static_cast<double>(value));
  };
  counter("ferry_requests_submitted_total", "Generation requests accepted.", stats.submitted);
  Family(out, "ferry_requests_finished_total", "counter", "Generation requests ended, by reason.");
  Sample(out, "ferry_requests_finished_total", "reason=\"length\"",
         static_cast<double>(stats.finished_length));
  Sample(out, "ferry_requests_finished_total", "reason=\"stop\"",
         static_cast<double>(stats.finished_stop));
  Sample(out, "ferry_requests_finished_total", "reason=\"cancelled\"",
         static_cast<double>(stats.cancelled));
  Sample(out, "ferry_requests_finished_total", "reason=\"error\"",
         static_cast<double>(stats.failed));
  counter("ferry_prompt_tokens_total", "Prompt tokens of admitted requests.", stats.prompt_tokens);
  counter("ferry_generated_tokens_total", "Tokens sampled.", stats.generated_tokens);
  counter("ferry_kv_rebuilds_total",
          "Requests whose KV was rebuilt from their tokens after a worker loss.",
          stats.kv_rebuilds);
  counter("ferry_preemptions_total", "Requests preempted because the KV was full.",
          stats.preemptions);
  counter("ferry_scheduler_steps_total", "Decoder steps run.", stats.steps);
  gauge("ferry_requests_running", "Requests in the running batch.", stats.running);
  gauge("ferry_requests_waiting", "Requests queued or preempted.", stats.waiting);

  struct WorkerFamily {
    const char* name;
    const char* type;
    const char* help;
    double (*value)(const WorkerStatus&);
  };
  const WorkerFamily families[] = {
      {"ferry_worker_up", "gauge", "1 while the worker is READY or DRAINING, 0 once DEAD.",
       [](const WorkerStatus& w) { return w.state == WorkerState::kDead ? 0.0 : 1.0; }},
      {"ferry_worker_draining", "gauge", "1 while the worker is DRAINING.",
       [](const WorkerStatus& w) { return w.state == WorkerState::kDraining ? 1.0 : 0.0; }},
      {"ferry_worker_kv_capacity_bytes", "gauge", "KV bytes the worker offers.",
       [](const WorkerStatus& w) { return static_cast<double>(w.kv_capacity_bytes); }},
      {"ferry_worker_kv_used_bytes", "gauge", "KV bytes in use, as of its last heartbeat.",
       [](const WorkerStatus& w) { return static_cast<double>(w.kv_used_bytes); }},
      {"ferry_worker_sequences_held", "gauge", "Sequences held, as of its last heartbeat.",
       [](const WorkerStatus& w) { return static_cast<double>(w.sequences_held); }},
      {"ferry_worker_sequences_opened_total", "counter",
       "Sequences added to the worker since it started.",
       [](const WorkerStatus& w) { return static_cast<double>(w.sequences_opened); }},
      {"ferry_worker_attention_bytes_per_second", "gauge",
       "Measured attention throughput (KV bytes read per second); 0 until measured.",
       [](const WorkerStatus& w) { return w.attention_bytes_per_second; }},
      {"ferry_worker_seconds_since_heartbeat", "gauge", "Time since the worker's last heartbeat.",
       [](const WorkerStatus& w) { return w.since_heartbeat.count() / 1000.0; }},
  };
  for (const WorkerFamily& family : families) {
    Family(out, family.name, family.type, family.help);
    for (const WorkerStatus& w : workers) {
      Sample(out, family.name, absl::StrCat("worker=\"", LabelValue(w.worker_id), "\""),
             family.value(w));
    }
  }
  return out;
}

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& listen, std::function<std::string()> render) {
  const size_t colon = listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(listen.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("metrics address \"", listen, "\" is not host:port"));
  }
  const std::string host = listen.substr(0, colon);
  std::unique_ptr<MetricsServer> metrics(new MetricsServer());
  metrics->server_ = std::make_unique<httplib::Server>();
  metrics->server_->Get("/metrics", [render = std::move(render)](const httplib::Request&,
                                                                 httplib::Response& response) {
    response.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  metrics->port_ = port == 0 ? metrics->server_->bind_to_any_port(host)
                             : (metrics->server_->bind_to_port(host, port) ? port : -1);
  if (metrics->port_ <= 0) {
    return absl::UnavailableError(absl::StrCat("cannot listen for metrics on ", listen));
  }
  httplib::Server* server = metrics->server_.get();
  metrics->thread_ = std::thread([server] { server->listen_after_bind(); });
  return metrics;
}

MetricsServer::~MetricsServer() {
  if (server_ != nullptr) server_->stop();
  if (thread_.joinable()) thread_.join();
}

}  // namespace ferry::coordinator
