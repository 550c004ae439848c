// ferry-worker: an attention worker. Serves the data plane over UCX (KV cache, append, attend,
// prefill, migrate), registers with the coordinator (retrying until it answers, so start order
// does not matter) and heartbeats its KV use. It leaves when the coordinator has drained it (no
// sequences left) or on SIGTERM/SIGINT, which first asks the coordinator to drain it and waits,
// bounded by --drain-timeout, for its sequences to move. Flags are parsed here and nowhere else.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "CLI/CLI.hpp"
#include "ferry/v1/cluster.grpc.pb.h"
#include "runtime/common/log.h"
#include "runtime/offload/worker_server.h"
#include "services/worker/coordinator_link.h"
#include "spdlog/sinks/stdout_color_sinks.h"

namespace {

struct Flags {
  std::string coordinator;
  std::string device = "cpu";
  int64_t kv_capacity = int64_t{1} << 30;
  std::string data_listen = "127.0.0.1:0";
  std::string advertise_host;
  std::string worker_id;
  std::string ucx_tls;
  std::string ucx_cm = "tcp";
  int threads = 0;
  int drain_timeout_s = 30;
};

std::string CpuModelName() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "cpu";
}

// sigtimedwait on the blocked set: true when a stop signal arrived within `timeout`.
bool StopSignalWithin(const sigset_t& signals, std::chrono::milliseconds timeout) {
  timespec wait{static_cast<time_t>(timeout.count() / 1000),
                static_cast<long>(timeout.count() % 1000) * 1000000};
  return sigtimedwait(&signals, nullptr, &wait) > 0;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  CLI::App app{"ferry-worker: holds KV and runs decode attention for the coordinator"};
  app.add_flag_callback(
      "--list-devices",
      [] {
        for (const std::string& device : ferry::offload::WorkerServer::AttentionDevices()) {
          std::printf("%s\n", device.c_str());
        }
        throw CLI::Success();
      },
      "print the --device values this build can serve here, one per line, and exit");
  app.add_option("--coordinator", flags.coordinator, "coordinator gRPC address host:port")
      ->required();
  app.add_option("--device", flags.device,
                 "attention device: cpu, or cuda:N (KV pools and attention on GPU N)")
      ->check([](const std::string& device) {
        auto parsed = ferry::offload::WorkerServer::ParseDevice(device);
        return parsed.ok() ? std::string() : std::string(parsed.status().message());
      })
      ->capture_default_str();
  app.add_option("--kv-capacity", flags.kv_capacity, "bytes of K and V pools")
      ->check(CLI::Range(int64_t{1} << 20, int64_t{1} << 50));
  app.add_option("--data-listen", flags.data_listen, "UCX listener host:port (port 0: any)")
      ->capture_default_str();
  app.add_option("--advertise-host", flags.advertise_host,
                 "host the coordinator should connect to (default: the listen host)");
  app.add_option("--worker-id", flags.worker_id, "stable id (default: assigned)");
  app.add_option("--ucx-tls", flags.ucx_tls, "UCX transports, e.g. tcp or sm,tcp (default: UCX's)");
  app.add_option("--ucx-cm", flags.ucx_cm,
                 "UCX connection managers for the listener: tcp, or rdmacm on RDMA hosts")
      ->capture_default_str();
  app.add_option("--threads", flags.threads, "attention threads (0: all)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--drain-timeout", flags.drain_timeout_s, "seconds to wait for a drain on SIGTERM")
      ->check(CLI::Range(0, 3600));
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("worker"));

  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any thread starts

  const size_t colon = flags.data_listen.rfind(':');
  if (colon == std::string::npos) {
    FERRY_LOG_ERROR("worker: --data-listen must be host:port");
    return 2;
  }
  ferry::offload::WorkerServerOptions options;
  options.node.name = "worker";
  options.node.tls = flags.ucx_tls;
  // UCX's default would try rdmacm first; without RDMA devices that can leave the listener
  // unbound now and then, so the worker asks for what the host really has.
  options.node.connection_managers = flags.ucx_cm;
  options.host = flags.data_listen.substr(0, colon);
  options.port = std::atoi(flags.data_listen.c_str() + colon + 1);
  options.device = flags.device;
  options.service.kv_capacity_bytes = flags.kv_capacity;
  options.service.num_threads = flags.threads;
  auto server = ferry::offload::WorkerServer::Start(options);
  if (!server.ok()) {
    FERRY_LOG_ERROR("worker: {}", server.status().ToString());
    return 1;
  }
  const std::string host = flags.advertise_host.empty() ? options.host : flags.advertise_host;
  const std::string data_address = host + ":" + std::to_string((*server)->port());
  FERRY_LOG_INFO("worker: data plane on {}", data_address);

  ferry::worker::CoordinatorLinkOptions link_options;
  link_options.coordinator_address = flags.coordinator;
  link_options.registration.set_data_address(data_address);
  const bool on_cuda = *ferry::offload::WorkerServer::ParseDevice(flags.device) >= 0;
  link_options.registration.set_device(on_cuda ? ferry::v1::DEVICE_KIND_CUDA
                                               : ferry::v1::DEVICE_KIND_CPU);
  link_options.registration.set_device_name(on_cuda ? flags.device : CpuModelName());
  link_options.registration.set_kv_capacity_bytes(flags.kv_capacity);
  link_options.registration.set_worker_id(flags.worker_id);
  ferry::offload::WorkerServer* raw_server = server->get();
  link_options.load = [raw_server] {
    return ferry::worker::WorkerLoad{raw_server->kv_used_bytes(), raw_server->sequences_held(),
                                     raw_server->sequences_opened()};
  };
  ferry::worker::CoordinatorLink link(link_options);
  link.Start();

  bool draining_on_signal = false;
  auto drain_deadline = std::chrono::steady_clock::time_point::max();
  while (true) {
    if (StopSignalWithin(signals, std::chrono::milliseconds(100))) {
      if (draining_on_signal) break;  // a second signal: leave now
      draining_on_signal = true;
      drain_deadline =
          std::chrono::steady_clock::now() + std::chrono::seconds(flags.drain_timeout_s);
      auto registered = link.WaitRegistered(std::chrono::milliseconds(0));
      if (registered.ok() && raw_server->sequences_held() > 0) {
        FERRY_LOG_INFO("worker {}: stopping; asking the coordinator to drain us",
                       registered->worker_id());
        auto stub = ferry::v1::ClusterService::NewStub(
            grpc::CreateChannel(flags.coordinator, grpc::InsecureChannelCredentials()));
        grpc::ClientContext context;
        context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
        ferry::v1::DrainWorkerRequest request;
        request.set_worker_id(registered->worker_id());
        ferry::v1::DrainWorkerResponse response;
        stub->DrainWorker(&context, request, &response);
      }
    }
    const bool empty = raw_server->sequences_held() == 0;
    if ((link.drain_requested() || draining_on_signal) && empty) break;
    if (std::chrono::steady_clock::now() > drain_deadline) {
      FERRY_LOG_WARN("worker: drain timed out with {} sequences", raw_server->sequences_held());
      break;
    }
  }
  FERRY_LOG_INFO("worker: leaving");
  link.Stop();
  (*server)->Stop();
  return 0;
}
