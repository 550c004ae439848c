// A fixed pool of threads that CPU kernels are handed (kernels own no threads of their own).
//
// ParallelFor(n, fn) runs fn(i) for every i in [0, n) across the pool's threads and the calling
// thread, and returns when all have finished. Which thread runs which i is not fixed, so a
// deterministic kernel makes its result depend on i only. One ParallelFor at a time per pool:
// calls from several threads are serialised. The destructor joins the threads.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace ferry::kernels {

class ThreadPool {
 public:
  // num_threads counts the caller: 1 runs everything on the calling thread. 0 means one per
  // hardware thread.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void WorkerLoop();
  void RunTasks();

  std::vector<std::thread> workers_;
  std::mutex call_mutex_;  // serialises ParallelFor callers
  std::mutex mutex_;
  std::condition_variable work_ready_;
  std::condition_variable work_done_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t num_tasks_ = 0;
  int64_t next_task_ = 0;
  int64_t tasks_finished_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
};

}  // namespace ferry::kernels
