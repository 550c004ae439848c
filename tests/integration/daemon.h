// Test helper: runs a Ferry daemon (or any program) as a child process with its output in a log
// file, waits for its gRPC health check, signals it and reaps it. Every wait is bounded.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>

extern char** environ;

namespace ferry::testing {

class Daemon {
 public:
  Daemon(const std::string& program, const std::vector<std::string>& args,
         const std::string& log_path)
      : log_path_(log_path) {
    std::vector<std::string> argv_storage = {program};
    argv_storage.insert(argv_storage.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (std::string& arg : argv_storage) argv.push_back(arg.data());
    argv.push_back(nullptr);
    posix_spawn_file_actions_t actions;
    posix_spawn_file_actions_init(&actions);
    posix_spawn_file_actions_addopen(&actions, 1, log_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC,
                                     0644);
    posix_spawn_file_actions_adddup2(&actions, 1, 2);
    if (posix_spawn(&pid_, program.c_str(), &actions, nullptr, argv.data(), environ) != 0) {
      pid_ = -1;
    }
    posix_spawn_file_actions_destroy(&actions);
  }
  ~Daemon() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      waitpid(pid_, nullptr, 0);
    }
  }
  Daemon(const Daemon&) = delete;
  Daemon& operator=(const Daemon&) = delete;

  bool started() const { return pid_ > 0; }
  pid_t pid() const { return pid_; }

  // Polls grpc.health.v1 at `address` until SERVING or `timeout`.
  bool WaitHealthy(const std::string& address, std::chrono::milliseconds timeout) {
    auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (Exited()) return false;
      grpc::ClientContext context;
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(200));
      // grpc.health.v1.HealthCheckRequest{service: ""} is the empty message.
      grpc::Slice empty(std::string{});
      grpc::ByteBuffer request(&empty, 1), response;
      grpc::GenericStub stub(channel);
      grpc::Status status;
      bool done = false;
      std::mutex mutex;
      std::condition_variable cv;
      stub.UnaryCall(&context, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request,
                     &response, [&](grpc::Status s) {
                       std::lock_guard<std::mutex> lock(mutex);
                       status = s;
                       done = true;
                       cv.notify_all();
                     });
      std::unique_lock<std::mutex> lock(mutex);
      cv.wait_for(lock, std::chrono::seconds(1), [&] { return done; });
      // A healthy reply is {status: SERVING} = bytes 08 01.
      std::vector<grpc::Slice> slices;
      if (done && status.ok() && response.Dump(&slices).ok() && !slices.empty() &&
          slices[0].size() >= 2 && slices[0].begin()[1] == 1) {
        return true;
      }
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  void Signal(int signal_number) {
    if (pid_ > 0) kill(pid_, signal_number);
  }

  // Waits up to `timeout` for the process to exit; returns its exit code, or -1 (still running,
  // killed by a signal).
  int Wait(std::chrono::milliseconds timeout) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < deadline) {
      if (Exited()) return exit_code_;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    return -1;
  }

  std::string Log() const {
    std::ifstream in(log_path_);
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  // True once the process has exited (it is reaped here).
  bool Exited() {
    if (pid_ <= 0) return true;
    int status = 0;
    if (waitpid(pid_, &status, WNOHANG) == pid_) {
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
      pid_ = -1;
      return true;
    }
    return false;
  }

 private:
  std::string log_path_;
  pid_t pid_ = -1;
  int exit_code_ = -1;
};

}  // namespace ferry::testing
