// A worker process for integration tests and the transport benchmark: WorkerServer on
// 127.0.0.1, port printed as "PORT <n>" on stdout, serving until SIGTERM/SIGINT or until its
// parent dies. Flags (--name=value): --port, --tls, --capacity-bytes, --threads, --keepalive-ms,
// --attend-delay-ms. The real daemon (services/worker, CLI11, gRPC registration) comes later.
#include <signal.h>
#include <sys/prctl.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "runtime/offload/worker_server.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {

bool Flag(const char* arg, const char* name, std::string* value) {
  const size_t length = std::strlen(name);
  if (std::strncmp(arg, name, length) != 0 || arg[length] != '=') return false;
  *value = arg + length + 1;
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test that started us
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);  // before any thread starts

  // stdout carries only the PORT line; logs go to stderr.
  spdlog::set_default_logger(spdlog::stderr_color_mt("worker"));
  ferry::offload::WorkerServerOptions options;
  options.node.name = "test-worker";
  options.node.connection_managers = "tcp";  // loopback: no RDMA
  options.service.kv_capacity_bytes = int64_t{16} << 20;
  options.service.num_threads = 2;
  for (int i = 1; i < argc; ++i) {
    std::string value;
    if (Flag(argv[i], "--port", &value)) {
      options.port = std::atoi(value.c_str());
    } else if (Flag(argv[i], "--tls", &value)) {
      options.node.tls = value;
    } else if (Flag(argv[i], "--capacity-bytes", &value)) {
      options.service.kv_capacity_bytes = std::atoll(value.c_str());
    } else if (Flag(argv[i], "--threads", &value)) {
      options.service.num_threads = std::atoi(value.c_str());
    } else if (Flag(argv[i], "--keepalive-ms", &value)) {
      options.node.keepalive_interval = absl::Milliseconds(std::atoi(value.c_str()));
    } else if (Flag(argv[i], "--attend-delay-ms", &value)) {
      options.attend_delay = absl::Milliseconds(std::atoi(value.c_str()));
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  auto server = ferry::offload::WorkerServer::Start(options);
  if (!server.ok()) {
    std::fprintf(stderr, "worker: %s\n", server.status().ToString().c_str());
    return 1;
  }
  std::printf("PORT %d\n", (*server)->port());
  std::fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);
  (*server)->Stop();
  return 0;
}
