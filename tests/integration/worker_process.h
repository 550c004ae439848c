// Starts tests' worker processes (test_worker_main.cc) and stops or kills them. Every wait is
// bounded; the destructor terminates a worker still running (SIGTERM, then SIGKILL).
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace ferry::testing {

class WorkerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<WorkerProcess>> Start(std::vector<std::string> flags) {
    int pipe_fds[2];
    if (pipe(pipe_fds) != 0) return absl::InternalError("pipe failed");
    std::vector<std::string> args = {FERRY_TEST_WORKER_PATH};
    args.insert(args.end(), flags.begin(), flags.end());
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      dup2(pipe_fds[1], STDOUT_FILENO);
      close(pipe_fds[0]);
      close(pipe_fds[1]);
      std::vector<char*> argv;
      for (std::string& arg : args) argv.push_back(arg.data());
      argv.push_back(nullptr);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(pipe_fds[1]);
    std::unique_ptr<WorkerProcess> process(new WorkerProcess(pid, pipe_fds[0]));
    // Read a line "PORT <n>" within 10 s (other output may come first).
    std::string line;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    auto port_line = [&line]() -> size_t {
      const size_t at = line.rfind("PORT ");
      if (at == std::string::npos || (at > 0 && line[at - 1] != '\n')) return std::string::npos;
      return line.find('\n', at) == std::string::npos ? std::string::npos : at;
    };
    while (port_line() == std::string::npos) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      pollfd fd = {pipe_fds[0], POLLIN, 0};
      if (left.count() <= 0 || poll(&fd, 1, static_cast<int>(left.count())) <= 0) {
        return absl::DeadlineExceededError("worker did not report its port");
      }
      char buffer[64];
      const ssize_t n = read(pipe_fds[0], buffer, sizeof(buffer));
      if (n <= 0) return absl::InternalError("worker exited before reporting its port");
      line.append(buffer, n);
    }
    if (sscanf(line.c_str() + port_line(), "PORT %d", &process->port_) != 1) {
      return absl::InternalError(absl::StrCat("worker said: ", line));
    }
    return process;
  }

  ~WorkerProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGTERM);
      if (!WaitFor(std::chrono::seconds(3))) {
        kill(pid_, SIGKILL);
        WaitFor(std::chrono::seconds(3));
      }
    }
    close(fd_);
  }

  int port() const { return port_; }
  pid_t pid() const { return pid_; }

  void Kill() {
    kill(pid_, SIGKILL);
    WaitFor(std::chrono::seconds(3));
  }

 private:
  WorkerProcess(pid_t pid, int fd) : pid_(pid), fd_(fd) {}
  bool WaitFor(std::chrono::milliseconds bound) {
    const auto deadline = std::chrono::steady_clock::now() + bound;
    while (std::chrono::steady_clock::now() < deadline) {
      if (waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return false;
  }

  pid_t pid_;
  int fd_;
  int port_ = 0;
};

}  // namespace ferry::testing
