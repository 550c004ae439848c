// Transport benchmark: Ferry's UcxNode request/reply over loopback with Attend-sized messages
// (batch B, 32 q heads, head dim 128: request = 64 + 16 B + B*32*128*4 bytes of header, table and
// q; reply = 64 + B*32*(128+1)*4 bytes of o and lse), beside which run_transport_bench.sh runs
// ucx_perftest on the same transport and sizes.
//
//   transport_bench --serve [--tls=T]          echo server (replies with the size it is asked)
//   transport_bench [--tls=T] [--batches=1,4,16,64,256] [--iters=N] [--busy-poll-us=U]
//                   [--eager-limit=BYTES] [--eager-limit-shm=BYTES] [--rndv-scheme=S]
// The client forks a server process of itself and prints one line per batch:
//   ferry tls=T batch=B request=Sq reply=Sr attend_rtt_us=... oneway_us=... bw_MBps=... eager_limit=E
// attend_rtt_us: median round trip, Attend request out and Attend reply back (no compute).
// oneway_us: median of half the round trip with Sq bytes each way (ucx_perftest's latency).
// bw_MBps: Sq-byte requests, 16 in flight, 8-byte replies (ucx_perftest ucp_am_bw's pattern).
// eager_limit: the client's eager limit for its endpoint (UcxNode::EagerLimit; the server's is the
// same, both following the endpoint's lanes).
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <string>
#include <thread>
#include <vector>

#include "runtime/transport/ucx_node.h"
#include "spdlog/spdlog.h"

namespace {

using ferry::transport::Buffer;
using ferry::transport::CallResult;
using ferry::transport::ReplyFuture;
using ferry::transport::UcxNode;
using ferry::transport::UcxNodeOptions;
using Clock = std::chrono::steady_clock;

constexpr int kQHeads = 32, kHeadDim = 128;

size_t RequestBytes(int batch) { return 64 + 16 * size_t(batch) + size_t(batch) * kQHeads * kHeadDim * 4; }
size_t ReplyBytes(int batch) { return 64 + size_t(batch) * kQHeads * (kHeadDim + 1) * 4; }

bool Flag(const char* arg, const char* name, std::string* value) {
  const size_t length = std::strlen(name);
  if (std::strncmp(arg, name, length) != 0 || arg[length] != '=') return false;
  *value = arg + length + 1;
  return true;
}

// The server answers from one thread that takes requests with NextRequest (progressing the
// worker itself) and replies from the same thread, as WorkerServer does.
int Serve(UcxNodeOptions options) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  auto node = UcxNode::Create(options);
  if (!node.ok()) return 1;
  UcxNode* raw = node->get();
  auto port = raw->Listen("127.0.0.1", 0);
  if (!port.ok()) return 1;
  std::atomic<bool> stop{false};
  std::thread server([raw, &stop] {
    while (!stop) {
      auto request = raw->NextRequest(absl::Milliseconds(100));
      if (!request.ok() || !request->status.ok()) continue;
      Buffer& message = request->message;
      uint64_t reply_size = 8;
      if (message.size() >= 8) std::memcpy(&reply_size, message.data(), 8);
      raw->buffers().Release(std::move(message));
      Buffer reply = raw->buffers().Acquire(std::max<uint64_t>(reply_size, 8));
      raw->Reply(request->peer, request->call_id, std::move(reply)).IgnoreError();
    }
  });
  std::printf("PORT %d\n", *port);
  std::fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);
  stop = true;
  server.join();
  return 0;
}

Buffer Message(UcxNode& node, size_t size, uint64_t reply_size) {
  Buffer buffer = node.buffers().Acquire(std::max<size_t>(size, 8));
  std::memcpy(buffer.data(), &reply_size, 8);
  return buffer;
}

double Median(std::vector<double> values) {
  std::sort(values.begin(), values.end());
  return values[values.size() / 2];
}

// Median round trip in microseconds.
double RoundTrip(UcxNode& node, ferry::transport::PeerId peer, size_t request, size_t reply,
                 int iters) {
  std::vector<double> samples;
  for (int i = 0; i < iters + iters / 10 + 1; ++i) {
    const auto start = Clock::now();
    auto future = node.Call(peer, Message(node, request, reply));
    CallResult result = node.Await(future);
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - start).count();
    if (!result.ok()) {
      std::fprintf(stderr, "call failed: %s\n", result.status().ToString().c_str());
      std::exit(1);
    }
    node.buffers().Release(std::move(*result));
    if (i > iters / 10) samples.push_back(us);  // the first tenth warms up
  }
  return Median(samples);
}

double Bandwidth(UcxNode& node, ferry::transport::PeerId peer, size_t request, int iters) {
  constexpr int kWindow = 16;
  std::deque<ReplyFuture> in_flight;
  auto drain_one = [&] {
    CallResult result = node.Await(in_flight.front());
    if (!result.ok()) std::exit(1);
    node.buffers().Release(std::move(*result));
    in_flight.pop_front();
  };
  for (int i = 0; i < kWindow; ++i) in_flight.push_back(node.Call(peer, Message(node, request, 8)));
  while (!in_flight.empty()) drain_one();  // warm-up
  const auto start = Clock::now();
  for (int i = 0; i < iters; ++i) {
    if (in_flight.size() == kWindow) drain_one();
    in_flight.push_back(node.Call(peer, Message(node, request, 8)));
  }
  while (!in_flight.empty()) drain_one();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  return double(request) * iters / seconds / (1024.0 * 1024.0);  // MB as ucx_perftest: 2^20
}

}  // namespace

int main(int argc, char** argv) {
  spdlog::set_level(spdlog::level::warn);
  UcxNodeOptions options;
  options.name = "bench";
  options.call_timeout = absl::Seconds(10);
  options.connection_managers = "tcp";
  bool serve = false;
  std::string batches = "1,4,16,64,256";
  int iters = 300;
  for (int i = 1; i < argc; ++i) {
    std::string value;
    if (std::strcmp(argv[i], "--serve") == 0) {
      serve = true;
    } else if (Flag(argv[i], "--tls", &value)) {
      options.tls = value;
    } else if (Flag(argv[i], "--batches", &value)) {
      batches = value;
    } else if (Flag(argv[i], "--iters", &value)) {
      iters = std::atoi(value.c_str());
    } else if (Flag(argv[i], "--busy-poll-us", &value)) {
      options.busy_poll = absl::Microseconds(std::atoi(value.c_str()));
    } else if (Flag(argv[i], "--eager-limit-shm", &value)) {
      options.eager_limit_shared_memory = std::strtoull(value.c_str(), nullptr, 10);
    } else if (Flag(argv[i], "--rndv-scheme", &value)) {
      options.rendezvous_scheme = value;
    } else if (Flag(argv[i], "--eager-limit", &value)) {
      options.eager_limit = std::strtoull(value.c_str(), nullptr, 10);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", argv[i]);
      return 2;
    }
  }
  if (serve) return Serve(options);

  // The server: this program again, in its own process.
  int fds[2];
  if (pipe(fds) != 0) return 1;
  const pid_t child = fork();
  if (child == 0) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    dup2(fds[1], STDOUT_FILENO);
    std::vector<std::string> args = {"/proc/self/exe", "--serve"};
    if (!options.tls.empty()) args.push_back("--tls=" + options.tls);
    args.push_back("--busy-poll-us=" + std::to_string(absl::ToInt64Microseconds(options.busy_poll)));
    args.push_back("--eager-limit-shm=" + std::to_string(options.eager_limit_shared_memory));
    args.push_back("--eager-limit=" + std::to_string(options.eager_limit));
    args.push_back("--rndv-scheme=" + options.rendezvous_scheme);
    std::vector<char*> argv_child;
    for (auto& arg : args) argv_child.push_back(arg.data());
    argv_child.push_back(nullptr);
    execv("/proc/self/exe", argv_child.data());
    _exit(127);
  }
  close(fds[1]);
  FILE* from_server = fdopen(fds[0], "r");
  char line[256];
  int port = 0;
  while (fgets(line, sizeof(line), from_server) != nullptr) {
    if (std::sscanf(line, "PORT %d", &port) == 1) break;
  }
  if (port == 0) {
    std::fprintf(stderr, "server did not start\n");
    return 1;
  }
  int status = 0;
  {
    auto node = UcxNode::Create(options);
    if (!node.ok()) return 1;
    auto peer = (*node)->Connect("127.0.0.1", port);
    if (!peer.ok()) {
      std::fprintf(stderr, "%s\n", peer.status().ToString().c_str());
      status = 1;
    } else {
      auto info = (*node)->DescribePeer(*peer);
      if (info.ok()) std::fprintf(stderr, "%s", info->c_str());
      auto eager_limit = (*node)->EagerLimit(*peer);
      size_t begin = 0;
      while (begin < batches.size()) {
        size_t end = batches.find(',', begin);
        if (end == std::string::npos) end = batches.size();
        const int batch = std::atoi(batches.substr(begin, end - begin).c_str());
        begin = end + 1;
        const size_t request = RequestBytes(batch), reply = ReplyBytes(batch);
        const int n = std::max(20, iters / std::max(1, batch / 16));
        const double attend = RoundTrip(**node, *peer, request, reply, n);
        const double oneway = RoundTrip(**node, *peer, request, request, n) / 2;
        const double bw = Bandwidth(**node, *peer, request, n);
        std::printf("ferry tls=%s batch=%d request=%zu reply=%zu attend_rtt_us=%.1f oneway_us=%.1f "
                    "bw_MBps=%.0f eager_limit=%zu\n",
                    options.tls.empty() ? "env" : options.tls.c_str(), batch, request, reply,
                    attend, oneway, bw, eager_limit.ok() ? *eager_limit : 0);
        std::fflush(stdout);
      }
    }
  }
  kill(child, SIGTERM);
  waitpid(child, nullptr, 0);
  return status;
}
