// The CUDA KV pool against the host KV cache: the same allocator (same block ids for the same
// calls), appends landing byte for byte where KvCache::WriteHost puts them (fp32 copies,
// bf16/fp16 conversions rounded as dtype.h rounds), the staged step tables as specified, and bad
// steps refused before anything is staged. Skips without a CUDA device.
#include "runtime/kv/cuda_kv_pool.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cuda_device.h"
#include "gtest/gtest.h"

namespace ferry::kv {
namespace {

class CudaKvPoolTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    FERRY_SKIP_WITHOUT_CUDA_DEVICE();
  }
};

template <typename T>
std::vector<T> Download(const void* device, size_t count) {
  std::vector<T> host(count);
  EXPECT_EQ(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost),
            cudaSuccess);
  return host;
}

TEST_P(CudaKvPoolTest, AppendsLandWhereTheHostCacheWritesThem) {
  const DType dtype = GetParam();
  KvCacheConfig config{3, 2, 64, dtype, 16, 0};
  config.capacity_bytes = 12 * KvBlockBytes(config);
  CudaKvPoolOptions options;
  options.cache = config;
  options.max_step_rows = 64;
  options.max_step_runs = 4;
  auto pool = CudaKvPool::Create(options);
  ASSERT_TRUE(pool.ok()) << pool.status();
  auto host = *KvCache::CreateOnHost(config);
  CudaKvPool& p = **pool;

  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
  // Fill the device pools with NaN bits so any element the appends should have written and did
  // not shows up as a mismatch.
  const size_t pool_bytes = static_cast<size_t>(p.cache().total_blocks() * KvBlockBytes(config));
  ASSERT_EQ(cudaMemset(p.cache().k_pool(0), 0xff, pool_bytes), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  std::memset(host->k_pool(0), 0xff, pool_bytes);

  // Two steps: a mixed one (a prefill crossing block edges, a one-row run) and a decode step.
  const std::vector<std::vector<KvAppendRun>> steps = {
      {{10, 0, 37}, {20, 0, 1}, {30, 0, 16}},
      {{20, 1, 1}, {10, 37, 1}, {30, 16, 1}}};
  for (SequenceId id : {10, 20, 30}) {
    ASSERT_TRUE(p.cache().AddSequence(id).ok());
    ASSERT_TRUE(host->AddSequence(id).ok());
  }
  const int row_elems = config.num_kv_heads * config.head_dim;
  for (const auto& runs : steps) {
    int rows = 0;
    for (const KvAppendRun& run : runs) {
      ASSERT_TRUE(p.cache().Reserve(run.seq, run.first_position + run.count).ok());
      ASSERT_TRUE(host->Reserve(run.seq, run.first_position + run.count).ok());
      EXPECT_EQ(**p.cache().BlockTable(run.seq), **host->BlockTable(run.seq));
      rows += static_cast<int>(run.count);
    }
    ASSERT_TRUE(p.StageStep(runs, stream).ok());
    const CudaStepTables& t = p.step();
    ASSERT_EQ(t.num_rows, rows);
    ASSERT_EQ(t.num_runs, static_cast<int>(runs.size()));
    {
      // PrefillAttention's chunk tables: rows per run, each run's first position.
      std::vector<int32_t> q_indptr(runs.size() + 1), causal_offset(runs.size());
      ASSERT_EQ(cudaMemcpyAsync(q_indptr.data(), t.q_indptr, q_indptr.size() * 4,
                                cudaMemcpyDeviceToHost, stream), cudaSuccess);
      ASSERT_EQ(cudaMemcpyAsync(causal_offset.data(), t.causal_offset, causal_offset.size() * 4,
                                cudaMemcpyDeviceToHost, stream), cudaSuccess);
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      int32_t first_row = 0;
      int max_run_rows = 0;
      for (size_t i = 0; i < runs.size(); ++i) {
        EXPECT_EQ(q_indptr[i], first_row);
        EXPECT_EQ(causal_offset[i], runs[i].first_position);
        first_row += static_cast<int32_t>(runs[i].count);
        max_run_rows = std::max(max_run_rows, static_cast<int>(runs[i].count));
      }
      EXPECT_EQ(q_indptr[runs.size()], first_row);
      EXPECT_EQ(t.max_run_rows, max_run_rows);
    }
    for (int layer = 0; layer < config.num_layers; ++layer) {
      std::vector<float> k(static_cast<size_t>(rows) * row_elems), v(k.size());
      for (auto& x : k) x = normal(rng);
      for (auto& x : v) x = normal(rng);
      void* dk = nullptr;
      void* dv = nullptr;
      ASSERT_EQ(cudaMalloc(&dk, k.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMalloc(&dv, v.size() * 4), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dk, k.data(), k.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_EQ(cudaMemcpy(dv, v.data(), v.size() * 4, cudaMemcpyHostToDevice), cudaSuccess);
      ASSERT_TRUE(p.Append(layer, dk, dv, DType::kFloat32, stream).ok());
      ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
      cudaFree(dk);
      cudaFree(dv);
      // The host reference: the same rows converted with dtype.h's conversions.
      std::vector<uint8_t> hk(k.size() * DTypeSize(dtype)), hv(hk.size());
      for (size_t i = 0; i < k.size(); ++i) {
        if (dtype == DType::kFloat32) {
          std::memcpy(&hk[i * 4], &k[i], 4);
          std::memcpy(&hv[i * 4], &v[i], 4);
        } else {
          const uint16_t kb = dtype == DType::kBFloat16 ? FloatToBFloat16Bits(k[i])
                                                        : FloatToFloat16Bits(k[i]);
          const uint16_t vb = dtype == DType::kBFloat16 ? FloatToBFloat16Bits(v[i])
                                                        : FloatToFloat16Bits(v[i]);
          std::memcpy(&hk[i * 2], &kb, 2);
          std::memcpy(&hv[i * 2], &vb, 2);
        }
      }
      size_t offset = 0;
      for (const KvAppendRun& run : runs) {
        const size_t bytes = static_cast<size_t>(run.count) * row_elems * DTypeSize(dtype);
        ASSERT_TRUE(host->WriteHost(run.seq, layer, run.first_position, run.count,
                                    hk.data() + offset, hv.data() + offset)
                        .ok());
        offset += bytes;
      }
    }
    // Tables: CSR over the runs, lengths after the step, per-row run/position/slot.
    const auto indptr = Download<int32_t>(t.indptr, runs.size() + 1);
    const auto lens = Download<int32_t>(t.seq_lens, runs.size());
    const auto table = Download<int32_t>(t.table, indptr.back());
    const auto row_run = Download<int32_t>(t.row_run, rows);
    const auto row_pos = Download<int32_t>(t.row_pos, rows);
    const auto slots = Download<int64_t>(t.row_slots, rows);
    int row = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto& blocks = **host->BlockTable(runs[i].seq);
      const int64_t end = runs[i].first_position + runs[i].count;
      EXPECT_EQ(lens[i], end);
      const int64_t used = (end + config.block_size - 1) / config.block_size;
      ASSERT_EQ(indptr[i + 1] - indptr[i], used);
      for (int64_t b = 0; b < used; ++b) EXPECT_EQ(table[indptr[i] + b], blocks[b]);
      for (int64_t pos = runs[i].first_position; pos < end; ++pos, ++row) {
        EXPECT_EQ(row_run[row], static_cast<int32_t>(i));
        EXPECT_EQ(row_pos[row], pos);
        EXPECT_EQ(slots[row], int64_t{blocks[pos / config.block_size]} * config.block_size +
                                  pos % config.block_size);
      }
    }
  }
  const auto device_pools = Download<uint8_t>(p.cache().k_pool(0), pool_bytes);
  EXPECT_EQ(std::memcmp(device_pools.data(), host->k_pool(0), pool_bytes), 0);
  cudaStreamDestroy(stream);
}

TEST_P(CudaKvPoolTest, RefusesBadStepsAndStagesNothing) {
  KvCacheConfig config{2, 2, 64, GetParam(), 16, 0};
  config.capacity_bytes = 4 * KvBlockBytes(config);
  CudaKvPoolOptions options;
  options.cache = config;
  options.max_step_rows = 8;
  options.max_step_runs = 2;
  auto pool = *CudaKvPool::Create(options);
  ASSERT_TRUE(pool->cache().AddSequence(1).ok());
  ASSERT_TRUE(pool->cache().AddSequence(2).ok());
  ASSERT_TRUE(pool->cache().Reserve(1, 8).ok());
  ASSERT_TRUE(pool->cache().Reserve(2, 8).ok());
  ASSERT_TRUE(pool->StageStep(std::vector<KvAppendRun>{{1, 0, 2}}, nullptr).ok());
  const std::vector<KvAppendRun> unreserved = {{1, 0, 17}};
  EXPECT_EQ(pool->StageStep(unreserved, nullptr).code(), absl::StatusCode::kOutOfRange);
  const std::vector<KvAppendRun> twice = {{1, 0, 1}, {1, 1, 1}};
  EXPECT_EQ(pool->StageStep(twice, nullptr).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<KvAppendRun> unknown = {{3, 0, 1}};
  EXPECT_EQ(pool->StageStep(unknown, nullptr).code(), absl::StatusCode::kNotFound);
  const std::vector<KvAppendRun> too_many_rows = {{1, 0, 8}, {2, 0, 1}};
  EXPECT_EQ(pool->StageStep(too_many_rows, nullptr).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<KvAppendRun> too_many_runs = {{1, 0, 1}, {2, 0, 1}, {3, 0, 1}};
  EXPECT_EQ(pool->StageStep(too_many_runs, nullptr).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->step().num_rows, 2);  // the last good step is still the staged one
  EXPECT_EQ(pool->cache().WriteHost(1, 0, 0, 1, nullptr, nullptr).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool->Append(2, nullptr, nullptr, DType::kFloat32, nullptr).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaKvPoolTest,
                         ::testing::Values(DType::kFloat32, DType::kBFloat16, DType::kFloat16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

}  // namespace
}  // namespace ferry::kv
