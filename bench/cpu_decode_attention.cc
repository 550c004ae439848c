// CPU decode attention bandwidth, beside the machine's memcpy and plain-read bandwidth measured
// in the same run. Reports GB/s of K+V read and the ratio to each baseline.
//
//   build/bin/bench_cpu_decode_attention [--threads=N] [--benchmark_filter=...]
//
// The OneThreadInCache cases time one thread on a context that fits the caches (ns per position
// and KV head, minimum over iterations): the arithmetic cost, to tell compute- from memory-bound.
//
// memcpy GB/s counts bytes read plus bytes written (a copy of B bytes moves 2B); read GB/s is a
// multi-threaded sum over a buffer far larger than the caches. Attention GB/s counts the K and V
// bytes of the attended ranges (each read once). The table gives medians and, after the bar, the
// best samples (ratios of best to best).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"
#include "decode_problem.h"
#include "ferry/kernels/cpu_attention.h"

namespace {

using Clock = std::chrono::steady_clock;
using ferry::kernels::ThreadPool;

int g_threads = 0;
ThreadPool& Pool() {
  static ThreadPool pool(g_threads);
  return pool;
}

std::map<std::string, std::vector<double>>& Bandwidths() {
  static std::map<std::string, std::vector<double>> samples;
  return samples;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

constexpr int64_t kBaselineBytes = int64_t{1} << 30;  // 1 GiB: far past any cache

void BM_Memcpy(benchmark::State& state) {
  std::vector<uint8_t> src(kBaselineBytes, 1), dst(kBaselineBytes, 0);
  ThreadPool& pool = Pool();
  const int64_t parts = pool.num_threads();
  for (auto _ : state) {
    const auto start = Clock::now();
    pool.ParallelFor(parts, [&](int64_t p) {
      const int64_t begin = kBaselineBytes * p / parts, end = kBaselineBytes * (p + 1) / parts;
      std::memcpy(dst.data() + begin, src.data() + begin, end - begin);
    });
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    state.SetIterationTime(seconds);
    Bandwidths()["memcpy"].push_back(2.0 * kBaselineBytes / seconds / 1e9);
  }
  benchmark::DoNotOptimize(dst.data());
  state.SetBytesProcessed(state.iterations() * 2 * kBaselineBytes);
}
BENCHMARK(BM_Memcpy)->UseManualTime()->Iterations(8)->Unit(benchmark::kMillisecond);

void BM_Read(benchmark::State& state) {
  std::vector<uint64_t> data(kBaselineBytes / 8, 3);
  ThreadPool& pool = Pool();
  const int64_t parts = pool.num_threads();
  std::vector<uint64_t> sums(parts);
  for (auto _ : state) {
    const auto start = Clock::now();
    pool.ParallelFor(parts, [&](int64_t p) {
      const int64_t n = data.size();
      uint64_t a = 0, b = 0, c = 0, d = 0;
      for (int64_t i = n * p / parts; i + 4 <= n * (p + 1) / parts; i += 4) {
        a += data[i]; b += data[i + 1]; c += data[i + 2]; d += data[i + 3];
      }
      sums[p] = a + b + c + d;
    });
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    state.SetIterationTime(seconds);
    Bandwidths()["read"].push_back(kBaselineBytes / seconds / 1e9);
  }
  benchmark::DoNotOptimize(sums.data());
  state.SetBytesProcessed(state.iterations() * kBaselineBytes);
}
BENCHMARK(BM_Read)->UseManualTime()->Iterations(8)->Unit(benchmark::kMillisecond);

// Args: batch, q heads, kv heads, context, head dim, dtype (0 bf16, 1 fp16, 2 fp32).
ferry::kernels::reference::DecodeProblem MakeProblem(const benchmark::State& state) {
  ferry::kernels::reference::DecodeProblemShape shape;
  shape.seq_lens.assign(state.range(0), static_cast<int32_t>(state.range(3)));
  shape.num_q_heads = state.range(1);
  shape.num_kv_heads = state.range(2);
  shape.head_dim = state.range(4);
  shape.dtype = state.range(5) == 0   ? ferry::DType::kBFloat16
                : state.range(5) == 1 ? ferry::DType::kFloat16
                                      : ferry::DType::kFloat32;
  shape.block_size = 64;
  return ferry::kernels::reference::MakeRandomDecodeProblem(shape, 42);
}

// Nanoseconds per (position, KV head) of one thread on a context that stays in the caches: the
// kernel's arithmetic cost, without the memory system (run pinned: taskset -c N).
std::map<std::string, std::vector<double>>& OneThreadNs() {
  static std::map<std::string, std::vector<double>> samples;
  return samples;
}

void BM_DecodeAttentionOneThreadInCache(benchmark::State& state) {
  auto problem = MakeProblem(state);
  const auto args = problem.Args();
  static ThreadPool pool(1);
  char name[128];
  std::snprintf(name, sizeof(name), "1 thread, in cache: group %d ctx=%d d=%d %s",
                args.num_q_heads / args.kv.num_kv_heads, problem.shape.seq_lens[0],
                args.kv.head_dim, std::string(ferry::DTypeName(args.kv.dtype)).c_str());
  const double units = static_cast<double>(problem.shape.seq_lens[0]) * args.num_seqs *
                       args.kv.num_kv_heads;
  for (auto _ : state) {
    const auto start = Clock::now();
    if (!ferry::kernels::DecodeAttentionCpu(args, pool).ok()) state.SkipWithError("failed");
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    state.SetIterationTime(seconds);
    OneThreadNs()[name].push_back(seconds * 1e9 / units);
  }
  state.SetBytesProcessed(state.iterations() * problem.kv_bytes_read());
}
BENCHMARK(BM_DecodeAttentionOneThreadInCache)
    ->ArgNames({"batch", "hq", "hkv", "ctx", "d", "dtype"})
    ->Args({1, 4, 1, 2048, 128, 0})
    ->Args({1, 1, 1, 2048, 128, 0})
    ->Args({1, 8, 1, 2048, 128, 0})
    ->UseManualTime()
    ->MinTime(0.5)
    ->Unit(benchmark::kMicrosecond);

void BM_DecodeAttention(benchmark::State& state) {
  auto problem = MakeProblem(state);
  const auto args = problem.Args();
  const auto& shape = problem.shape;
  const int batch = problem.num_seqs();
  ThreadPool& pool = Pool();
  char name[128];
  std::snprintf(name, sizeof(name), "decode b=%d hq=%d hkv=%d ctx=%d d=%d %s", batch,
                shape.num_q_heads, shape.num_kv_heads, shape.seq_lens[0], shape.head_dim,
                std::string(ferry::DTypeName(shape.dtype)).c_str());
  for (auto _ : state) {
    const auto start = Clock::now();
    if (!ferry::kernels::DecodeAttentionCpu(args, pool).ok()) state.SkipWithError("failed");
    const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
    state.SetIterationTime(seconds);
    Bandwidths()[name].push_back(problem.kv_bytes_read() / seconds / 1e9);
  }
  state.SetBytesProcessed(state.iterations() * problem.kv_bytes_read());
  state.SetLabel(std::string(ferry::DTypeName(shape.dtype)) + " " +
                 ferry::kernels::CpuKernelIsa());
}
BENCHMARK(BM_DecodeAttention)
    ->ArgNames({"batch", "hq", "hkv", "ctx", "d", "dtype"})
    ->Args({1, 32, 8, 131072, 128, 0})
    ->Args({1, 32, 8, 32768, 128, 0})
    ->Args({8, 32, 8, 32768, 128, 0})
    ->Args({1, 32, 32, 32768, 128, 0})
    ->Args({64, 32, 8, 4096, 128, 0})
    ->Args({1, 32, 8, 32768, 64, 0})
    ->Args({1, 32, 8, 32768, 256, 0})
    ->Args({1, 32, 8, 32768, 128, 1})
    ->Args({1, 32, 8, 32768, 128, 2})
    ->UseManualTime()
    ->MinTime(1.0)
    ->Unit(benchmark::kMillisecond);

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--threads=", 10) == 0) g_threads = std::atoi(argv[i] + 10);
  }
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  // Medians, and the best samples: on a shared machine (other jobs taking cores or memory
  // bandwidth at times) the best of each is the steadier comparison.
  auto best = [](const std::vector<double>& v) {
    return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
  };
  const double memcpy_bw = Median(Bandwidths()["memcpy"]);
  const double read_bw = Median(Bandwidths()["read"]);
  const double memcpy_best = best(Bandwidths()["memcpy"]);
  const double read_best = best(Bandwidths()["read"]);
  std::printf("\nthreads %d, isa %s; baselines: memcpy %.2f GB/s (read+write), read %.2f GB/s "
              "(median); best memcpy %.2f, read %.2f\n",
              Pool().num_threads(), ferry::kernels::CpuKernelIsa(), memcpy_bw, read_bw,
              memcpy_best, read_best);
  std::printf("%-46s %8s %8s %8s | %8s %8s %8s\n", "case", "GB/s", "/memcpy", "/read", "best",
              "/memcpy", "/read");
  for (const auto& [name, samples] : Bandwidths()) {
    if (name == "memcpy" || name == "read") continue;
    const double bw = Median(samples);
    const double bw_best = best(samples);
    std::printf("%-46s %8.2f %8.2f %8.2f | %8.2f %8.2f %8.2f\n", name.c_str(), bw,
                bw / memcpy_bw, bw / read_bw, bw_best, bw_best / memcpy_best, bw_best / read_best);
  }
  if (!OneThreadNs().empty()) std::printf("\n%-46s %10s\n", "case", "ns/(pos, kv head) (min)");
  for (const auto& [name, samples] : OneThreadNs()) {
    std::printf("%-46s %10.1f\n", name.c_str(), *std::min_element(samples.begin(), samples.end()));
  }
  return 0;
}
