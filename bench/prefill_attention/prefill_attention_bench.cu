// Causal prefill attention (PrefillAttention) on a suite of prompt shapes: median time and
// TFLOP/s; peers.py times PyTorch SDPA (flash, cuDNN) and a bf16 matrix product (the device's
// matrix ceiling) on the same shapes in the same job and writes the comparison table.
//
// Usage: prefill_attention_bench [--csv PATH] [--iters N]
// Inputs are random (generated on the device), bf16 KV in a paged pool of 64-position blocks in
// shuffled order, q float32 (the wire's dtype). Each shape: a warm-up of at least 200 ms, then
// CUDA events between back-to-back launches (no host synchronisation in between), median of
// --iters launches. FLOPs counted as the causal work only: 4 * d * (visible positions summed
// over rows) per q head (two matrix products, 2 FLOPs per multiply-add).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench/common/cuda_check.h"
#include "bench/common/device_memory.h"
#include "ferry/kernels/prefill_attention.h"

namespace ferry::kernels {
namespace {

struct BenchShape {
  int batch;        // chunks (one per sequence)
  int q_len;        // rows per chunk
  int prefix;       // cached positions before the chunk
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
};

std::string Name(const BenchShape& s) {
  return "b" + std::to_string(s.batch) + " L" + std::to_string(s.q_len) +
         (s.prefix > 0 ? " prefix" + std::to_string(s.prefix) : "") + " hq" +
         std::to_string(s.num_q_heads) + " hkv" + std::to_string(s.num_kv_heads) + " d" +
         std::to_string(s.head_dim);
}

template <typename T>
T* Upload(const std::vector<T>& host) {
  T* device = nullptr;
  BENCH_CHECK(cudaMalloc(&device, std::max<size_t>(host.size(), 1) * sizeof(T)));
  BENCH_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return device;
}

struct Result {
  double median_ms;
  double min_ms;
  double flops;
};

Result RunShape(const BenchShape& shape, int iters) {
  constexpr int kBlockSize = 64;
  const int kv_len = shape.prefix + shape.q_len;
  const int blocks_per_seq = (kv_len + kBlockSize - 1) / kBlockSize;
  const int num_blocks = shape.batch * blocks_per_seq;
  std::vector<int32_t> table(num_blocks), table_indptr(shape.batch + 1), q_indptr(shape.batch + 1),
      kv_lens(shape.batch, kv_len), offsets(shape.batch, shape.prefix);
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(7));
  for (int s = 0; s <= shape.batch; ++s) {
    table_indptr[s] = s * blocks_per_seq;
    q_indptr[s] = s * shape.q_len;
  }
  const int64_t pool_elems =
      int64_t{num_blocks} * shape.num_kv_heads * kBlockSize * shape.head_dim;
  const int64_t q_elems = int64_t{shape.batch} * shape.q_len * shape.num_q_heads * shape.head_dim;
  uint16_t *k = nullptr, *v = nullptr;
  float *q = nullptr, *o = nullptr, *lse = nullptr;
  BENCH_CHECK(cudaMalloc(&k, pool_elems * 2));
  BENCH_CHECK(cudaMalloc(&v, pool_elems * 2));
  BENCH_CHECK(cudaMalloc(&q, q_elems * 4));
  BENCH_CHECK(cudaMalloc(&o, q_elems * 4));
  BENCH_CHECK(cudaMalloc(&lse, q_elems / shape.head_dim * 4));
  if (!bench::FillRandomBf16(k, pool_elems, 11) || !bench::FillRandomBf16(v, pool_elems, 22) ||
      !bench::FillRandomFloat(q, q_elems, 33)) {
    std::fprintf(stderr, "random fill failed\n");
    std::exit(1);
  }
  int32_t* d_table = Upload(table);
  int32_t* d_table_indptr = Upload(table_indptr);
  int32_t* d_q_indptr = Upload(q_indptr);
  int32_t* d_kv_lens = Upload(kv_lens);
  int32_t* d_offsets = Upload(offsets);

  PrefillAttentionArgs args;
  args.num_seqs = shape.batch;
  args.num_q_heads = shape.num_q_heads;
  args.max_q_len = shape.q_len;
  args.q = q;
  args.kv = {k, v, DType::kBFloat16, num_blocks, shape.num_kv_heads, kBlockSize, shape.head_dim};
  args.q_indptr = d_q_indptr;
  args.block_table_indptr = d_table_indptr;
  args.block_table = d_table;
  args.kv_lens = d_kv_lens;
  args.causal_offset = d_offsets;
  args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
  args.state_o = o;
  args.state_lse = lse;

  std::vector<cudaEvent_t> events(iters + 1);
  for (cudaEvent_t& e : events) BENCH_CHECK(cudaEventCreate(&e));
  const auto warm_start = std::chrono::steady_clock::now();
  for (int i = 0; i < 3 || std::chrono::steady_clock::now() - warm_start <
                               std::chrono::milliseconds(200);
       ++i) {
    BENCH_CHECK(PrefillAttention(args, nullptr));
    if (i % 4 == 3) BENCH_CHECK(cudaDeviceSynchronize());
  }
  BENCH_CHECK(cudaEventRecord(events[0]));
  for (int i = 0; i < iters; ++i) {
    BENCH_CHECK(PrefillAttention(args, nullptr));
    BENCH_CHECK(cudaEventRecord(events[i + 1]));
  }
  BENCH_CHECK(cudaEventSynchronize(events[iters]));
  std::vector<float> ms(iters);
  for (int i = 0; i < iters; ++i) BENCH_CHECK(cudaEventElapsedTime(&ms[i], events[i], events[i + 1]));
  for (cudaEvent_t& e : events) BENCH_CHECK(cudaEventDestroy(e));
  std::sort(ms.begin(), ms.end());
  for (void* p : {static_cast<void*>(k), static_cast<void*>(v), static_cast<void*>(q),
                  static_cast<void*>(o), static_cast<void*>(lse), static_cast<void*>(d_table),
                  static_cast<void*>(d_table_indptr), static_cast<void*>(d_q_indptr),
                  static_cast<void*>(d_kv_lens), static_cast<void*>(d_offsets)}) {
    BENCH_CHECK(cudaFree(p));
  }
  // Row i sees prefix + i + 1 positions.
  const double q_len = shape.q_len;
  const double visible = q_len * shape.prefix + q_len * (q_len + 1) / 2.0;
  const double flops = 4.0 * shape.head_dim * visible * shape.num_q_heads * shape.batch;
  return {ms[ms.size() / 2], ms[0], flops};
}

}  // namespace
}  // namespace ferry::kernels

int main(int argc, char** argv) {
  using namespace ferry::kernels;
  std::string csv_path;
  int iters = 30;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--csv") == 0 && i + 1 < argc) {
      csv_path = argv[++i];
    } else if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--csv PATH] [--iters N]\n", argv[0]);
      return 2;
    }
  }
  cudaDeviceProp prop;
  BENCH_CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const std::vector<BenchShape> suite = {
      {1, 2048, 0, 32, 8, 128},  {1, 8192, 0, 32, 8, 128}, {1, 16384, 0, 32, 8, 128},
      {8, 2048, 0, 32, 8, 128},  {4, 4096, 0, 32, 32, 128}, {1, 2048, 14336, 32, 8, 128},
  };
  FILE* csv = csv_path.empty() ? nullptr : std::fopen(csv_path.c_str(), "w");
  if (csv != nullptr) std::fprintf(csv, "name,batch,q_len,prefix,hq,hkv,d,median_ms,min_ms,tflops\n");
  std::printf("%-40s %10s %10s %10s\n", "shape", "median ms", "min ms", "TFLOP/s");
  for (const BenchShape& shape : suite) {
    const Result r = RunShape(shape, iters);
    const double tflops = r.flops / (r.median_ms * 1e-3) / 1e12;
    std::printf("%-40s %10.3f %10.3f %10.1f\n", Name(shape).c_str(), r.median_ms, r.min_ms, tflops);
    if (csv != nullptr) {
      std::fprintf(csv, "%s,%d,%d,%d,%d,%d,%d,%.4f,%.4f,%.2f\n", Name(shape).c_str(), shape.batch,
                   shape.q_len, shape.prefix, shape.num_q_heads, shape.num_kv_heads,
                   shape.head_dim, r.median_ms, r.min_ms, tflops);
    }
  }
  if (csv != nullptr) std::fclose(csv);
  return 0;
}
