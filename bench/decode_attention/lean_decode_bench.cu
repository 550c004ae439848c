// Decode-attention benchmark of LeanDecode on the issue's suite, plus the device's HBM read
// bandwidth measured in the same process (a plain streaming-read kernel).
//
// Usage: lean_decode_bench [--csv PATH] [--iters N] [--only SUBSTRING]
//                          [--mode rotate|single|sync|ordered] [--uniform-block-size N]
//                          [--states-only]
// --states-only: the partial states alone (state_o, state_lse), as the runtime calls the kernel;
// by default the kernel also writes the normalised bf16 output.
// Each shape: inputs generated on the device (no zeros), two disjoint copies of the KV cache
// (separate block tables into one pool) alternated launch by launch so L2 (50 MB) never serves
// a launch from the previous one; CUDA events between back-to-back launches (no host sync in
// between, so host launch overhead is not counted); median over --iters launches.
// Prints a table; --csv writes one row per shape (the Python peers script reads it). Each
// shape's line on stderr carries a digest of one launch's state_o and state_lse, so two builds
// can be compared bit for bit (same device, so the same grid).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/common/cuda_check.h"
#include "bench/common/device_memory.h"
#include "ferry/kernels/lean_attention.h"

namespace ferry::kernels {
namespace {

struct BenchShape {
  std::string name;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  int block_size;
  std::vector<int32_t> seq_lens;
};

std::vector<int32_t> Uniform(int batch, int len) { return std::vector<int32_t>(batch, len); }

// Long-tailed lengths: Pareto(alpha 1.2) scaled to a 512-token minimum, capped at 128k. Seeded.
std::vector<int32_t> LongTail(int batch, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int32_t> lens(batch);
  for (int32_t& len : lens) {
    const double x = 512.0 / std::pow(1.0 - u(rng), 1.0 / 1.2);
    len = static_cast<int32_t>(std::min(131072.0, x));
  }
  return lens;
}

// Page size of the uniform rows (--uniform-block-size; the issue's suite uses 64).
int g_uniform_block_size = 64;

std::vector<BenchShape> Suite() {
  std::vector<BenchShape> suite;
  auto uniform = [&](int b, int hq, int hkv, int len, int d) {
    suite.push_back({"b" + std::to_string(b) + " hq" + std::to_string(hq) + " hkv" +
                         std::to_string(hkv) + " L" + std::to_string(len) + " d" +
                         std::to_string(d),
                     hq, hkv, d, g_uniform_block_size, Uniform(b, len)});
  };
  uniform(1, 32, 8, 524288, 128);
  uniform(1, 32, 8, 131072, 128);
  uniform(1, 32, 32, 262144, 128);
  uniform(8, 32, 8, 32768, 128);
  uniform(16, 32, 32, 16384, 128);
  uniform(64, 32, 8, 4096, 128);
  uniform(128, 32, 8, 2048, 128);
  uniform(256, 32, 8, 1024, 128);
  uniform(8, 32, 8, 32768, 64);
  uniform(64, 32, 8, 4096, 64);
  uniform(8, 32, 8, 32768, 256);
  uniform(64, 32, 8, 4096, 256);
  std::vector<int32_t> mixed(64, 2048);
  mixed[0] = 131072;
  for (int bs : {64, 16}) {
    suite.push_back({"ragged 1x128k+63x2k bs" + std::to_string(bs), 32, 8, 128, bs, mixed});
    suite.push_back({"ragged longtail64 bs" + std::to_string(bs), 32, 8, 128, bs,
                     LongTail(64, 42)});
  }
  return suite;
}

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Times `launch(i)` for i in [0, warmup + iters): an event between consecutive launches and no
// host synchronisation until the end, so the GPU never waits for the host (launch overhead is
// hidden behind the previous kernel, as in a decode step). Returns the per-launch times (ms)
// after the warm-up.
template <typename Launch>
std::vector<float> TimeBackToBack(int warmup, int iters, Launch launch) {
  std::vector<cudaEvent_t> events(iters + 1);
  for (cudaEvent_t& e : events) BENCH_CHECK(cudaEventCreate(&e));
  // Warm up for at least 200 ms as well: the first shape after an idle GPU measured up to 15%
  // slower over its whole timing loop otherwise (clocks still rising).
  const auto warm_start = std::chrono::steady_clock::now();
  for (int i = 0; i < warmup || std::chrono::steady_clock::now() - warm_start <
                                     std::chrono::milliseconds(200);
       ++i) {
    launch(i);
    if (i % 8 == 7) BENCH_CHECK(cudaDeviceSynchronize());
  }
  BENCH_CHECK(cudaEventRecord(events[0]));
  for (int i = 0; i < iters; ++i) {
    launch(warmup + i);
    BENCH_CHECK(cudaEventRecord(events[i + 1]));
  }
  BENCH_CHECK(cudaEventSynchronize(events[iters]));
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) {
    BENCH_CHECK(cudaEventElapsedTime(&ms[i], events[i], events[i + 1]));
  }
  for (cudaEvent_t& e : events) BENCH_CHECK(cudaEventDestroy(e));
  return ms;
}

struct ShapeResult {
  double ms;
  double min_ms;
  double bytes;
};

// Timing modes, for diagnosis: the default alternates the two KV copies back to back;
// "single" reuses one copy; "sync" synchronises after every launch (host overhead included).
std::string g_mode = "rotate";
// Without the bf16 output (args.out = nullptr): the call the runtime makes (states only).
bool g_states_only = false;

// K and V pools are allocated once, for the largest shape, and reused by every shape (as a
// worker holds its pools): per-shape cudaMalloc/cudaFree of multi-GB pools made the timings of a
// shape depend on the shapes run before it (up to 18% in one suite order).
int64_t PoolElems(const BenchShape& shape) {
  int64_t blocks = 0;
  for (int32_t len : shape.seq_lens) blocks += (len + shape.block_size - 1) / shape.block_size;
  return 2 * blocks * shape.num_kv_heads * shape.block_size * shape.head_dim;
}
uint16_t* g_k_pool = nullptr;
uint16_t* g_v_pool = nullptr;

ShapeResult RunShape(const BenchShape& shape, int iters) {
  const int num_seqs = static_cast<int>(shape.seq_lens.size());
  const int d = shape.head_dim;
  const int bs = shape.block_size;
  // Two copies: set c uses blocks [c * blocks, (c + 1) * blocks), in shuffled order.
  std::vector<int32_t> indptr(num_seqs + 1, 0);
  for (int s = 0; s < num_seqs; ++s) indptr[s + 1] = indptr[s] + (shape.seq_lens[s] + bs - 1) / bs;
  const int64_t blocks = indptr[num_seqs];
  std::mt19937 rng(123);
  std::vector<int32_t> tables[2];
  for (int c = 0; c < 2; ++c) {
    tables[c].resize(blocks);
    std::iota(tables[c].begin(), tables[c].end(), static_cast<int32_t>(c * blocks));
    // "ordered": each sequence's blocks consecutive in the pool (a contiguous cache, as the
    // peers read), to separate the cost of paging from the kernel's.
    if (g_mode != "ordered") std::shuffle(tables[c].begin(), tables[c].end(), rng);
  }
  const int64_t pool_elems = 2 * blocks * shape.num_kv_heads * bs * d;
  uint16_t* k = g_k_pool;
  uint16_t* v = g_v_pool;
  float *q = nullptr, *state_o = nullptr, *state_lse = nullptr;
  uint16_t* out = nullptr;
  int32_t *d_indptr = nullptr, *d_lens = nullptr, *d_tables[2] = {nullptr, nullptr};
  const int64_t q_elems = int64_t{num_seqs} * shape.num_q_heads * d;
  BENCH_CHECK(cudaMalloc(&q, q_elems * 4));
  BENCH_CHECK(cudaMalloc(&state_o, q_elems * 4));
  BENCH_CHECK(cudaMalloc(&state_lse, int64_t{num_seqs} * shape.num_q_heads * 4));
  BENCH_CHECK(cudaMalloc(&out, q_elems * 2));
  BENCH_CHECK(cudaMalloc(&d_indptr, indptr.size() * 4));
  BENCH_CHECK(cudaMalloc(&d_lens, num_seqs * 4));
  for (int c = 0; c < 2; ++c) {
    BENCH_CHECK(cudaMalloc(&d_tables[c], blocks * 4));
    BENCH_CHECK(cudaMemcpy(d_tables[c], tables[c].data(), blocks * 4, cudaMemcpyHostToDevice));
  }
  BENCH_CHECK(cudaMemcpy(d_indptr, indptr.data(), indptr.size() * 4, cudaMemcpyHostToDevice));
  BENCH_CHECK(cudaMemcpy(d_lens, shape.seq_lens.data(), num_seqs * 4, cudaMemcpyHostToDevice));
  if (!bench::FillRandomBf16(k, pool_elems, 11) || !bench::FillRandomBf16(v, pool_elems, 22) ||
      !bench::FillRandomFloat(q, q_elems, 33)) {
    std::fprintf(stderr, "random fill failed\n");
    std::exit(1);
  }

  DecodeAttentionArgs args;
  args.num_seqs = num_seqs;
  args.num_q_heads = shape.num_q_heads;
  args.q = q;
  args.kv = {k, v, DType::kBFloat16, static_cast<int>(2 * blocks), shape.num_kv_heads, bs, d};
  args.block_table_indptr = d_indptr;
  args.seq_lens = d_lens;
  args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(d));
  args.state_o = state_o;
  args.state_lse = state_lse;
  args.out = g_states_only ? nullptr : out;
  cudaError_t error = cudaSuccess;
  const size_t ws_bytes = LeanDecodeWorkspaceSize(num_seqs, shape.num_q_heads,
                                                  shape.num_kv_heads, d, DType::kBFloat16, 0,
                                                  &error);
  BENCH_CHECK(error);
  void* workspace = nullptr;
  BENCH_CHECK(cudaMalloc(&workspace, ws_bytes));
  BENCH_CHECK(cudaMemset(workspace, 0, ws_bytes));

  // Alternating block tables: consecutive launches read disjoint copies of the KV cache.
  const std::vector<float> ms = TimeBackToBack(4, iters, [&](int i) {
    args.block_table = d_tables[g_mode == "single" ? 0 : i % 2];
    BENCH_CHECK(LeanDecode(args, workspace, ws_bytes, 0));
    if (g_mode == "sync") BENCH_CHECK(cudaStreamSynchronize(0));
  });
  // Host cost of one LeanDecode call (validation + launch), for the record.
  BENCH_CHECK(cudaDeviceSynchronize());
  const auto host_start = std::chrono::steady_clock::now();
  for (int i = 0; i < 20; ++i) BENCH_CHECK(LeanDecode(args, workspace, ws_bytes, 0));
  const double host_us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - host_start)
          .count() / 20;
  BENCH_CHECK(cudaDeviceSynchronize());
  // A digest of one launch's outputs (first KV copy), so builds can be compared bit for bit.
  args.block_table = d_tables[0];
  BENCH_CHECK(LeanDecode(args, workspace, ws_bytes, 0));
  std::vector<uint8_t> bytes(q_elems * 4 + int64_t{num_seqs} * shape.num_q_heads * 4);
  BENCH_CHECK(cudaMemcpy(bytes.data(), state_o, q_elems * 4, cudaMemcpyDeviceToHost));
  BENCH_CHECK(cudaMemcpy(bytes.data() + q_elems * 4, state_lse,
                         int64_t{num_seqs} * shape.num_q_heads * 4, cudaMemcpyDeviceToHost));
  uint64_t digest = 1469598103934665603ull;  // FNV-1a
  for (const uint8_t b : bytes) digest = (digest ^ b) * 1099511628211ull;
  std::fprintf(stderr, "%s: host %.1f us per LeanDecode call, output digest %016llx\n",
               shape.name.c_str(), host_us, static_cast<unsigned long long>(digest));
  int32_t error_word = 0;
  BENCH_CHECK(cudaMemcpy(&error_word, workspace, 4, cudaMemcpyDeviceToHost));
  if (error_word != 0) std::fprintf(stderr, "%s: error word %d\n", shape.name.c_str(), error_word);

  for (void* p : {static_cast<void*>(q),
                  static_cast<void*>(state_o), static_cast<void*>(state_lse),
                  static_cast<void*>(out), static_cast<void*>(d_indptr),
                  static_cast<void*>(d_lens), static_cast<void*>(d_tables[0]),
                  static_cast<void*>(d_tables[1]), workspace}) {
    BENCH_CHECK(cudaFree(p));
  }
  int64_t positions = 0;
  for (int32_t len : shape.seq_lens) positions += len;
  ShapeResult result;
  result.ms = Median(ms);
  result.min_ms = *std::min_element(ms.begin(), ms.end());
  result.bytes = 2.0 * positions * shape.num_kv_heads * d * 2;
  return result;
}

int Main(int argc, char** argv) {
  std::string csv_path, only;
  int iters = 50;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--csv" && i + 1 < argc) csv_path = argv[++i];
    else if (arg == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (arg == "--only" && i + 1 < argc) only = argv[++i];
    else if (arg == "--mode" && i + 1 < argc) g_mode = argv[++i];
    else if (arg == "--states-only") g_states_only = true;
    else if (arg == "--uniform-block-size" && i + 1 < argc) {
      g_uniform_block_size = std::atoi(argv[++i]);
    }
  }
  if (g_uniform_block_size < 1) {
    std::fprintf(stderr, "--uniform-block-size must be >= 1\n");
    return 1;
  }
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  const double read_gbps = bench::MeasureHbmReadBandwidth(int64_t{4} << 30, 20);
  if (read_gbps <= 0) {
    std::fprintf(stderr, "read-bandwidth measurement failed\n");
    return 1;
  }
  std::printf("device %s, %d SMs, L2 %d MB; streaming read %.0f GB/s\n", prop.name,
              prop.multiProcessorCount, prop.l2CacheSize >> 20, read_gbps);
  int64_t max_pool = 0;
  for (const BenchShape& shape : Suite()) max_pool = std::max(max_pool, PoolElems(shape));
  BENCH_CHECK(cudaMalloc(&g_k_pool, max_pool * 2));
  BENCH_CHECK(cudaMalloc(&g_v_pool, max_pool * 2));
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv != nullptr) {
    std::fprintf(csv, "name,num_q_heads,num_kv_heads,head_dim,block_size,lens,kv_bytes,ours_ms,"
                      "ours_min_ms,read_gbps,grid\n");
  }
  std::printf("%-34s %10s %10s %8s %8s\n", "shape", "KV MB", "ms", "GB/s", "of read");
  for (const BenchShape& shape : Suite()) {
    if (!only.empty() && shape.name.find(only) == std::string::npos) continue;
    const ShapeResult r = RunShape(shape, iters);
    const double gbps = r.bytes / (r.ms * 1e-3) / 1e9;
    std::printf("%-34s %10.1f %10.4f %8.0f %8.3f\n", shape.name.c_str(), r.bytes / 1e6, r.ms,
                gbps, gbps / read_gbps);
    if (csv != nullptr) {
      std::string lens;
      for (size_t i = 0; i < shape.seq_lens.size(); ++i) {
        lens += (i ? ";" : "") + std::to_string(shape.seq_lens[i]);
      }
      std::fprintf(csv, "%s,%d,%d,%d,%d,%s,%.0f,%.5f,%.5f,%.1f,%d\n", shape.name.c_str(),
                   shape.num_q_heads, shape.num_kv_heads, shape.head_dim, shape.block_size,
                   lens.c_str(), r.bytes, r.ms, r.min_ms, read_gbps,
                   LeanDecodeGridSize(shape.num_q_heads, shape.num_kv_heads, shape.head_dim,
                                      DType::kBFloat16, 0));
    }
  }
  if (csv != nullptr) std::fclose(csv);
  return 0;
}

}  // namespace
}  // namespace ferry::kernels

int main(int argc, char** argv) { return ferry::kernels::Main(argc, argv); }
