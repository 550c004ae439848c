// A CUDA attention worker (WorkerServer with device "cuda:0") beside a CPU worker, both in this
// process, reached by an AttentionClient over real UCX on 127.0.0.1 (tcp): one batch split by
// position range over the two, prefill chunks on both, and migration CPU -> CUDA -> CPU.
// Skips without a CUDA device.
//
// Tolerances, against the in-process CPU kernel (float32 accumulation) on the same KV:
//  * decode (LeanDecode, GQA group 4: q and the weights as hi + lo 16-bit pairs): relative
//    2-norm error of o below 1e-4, lse within 1e-3;
//  * prefill (PrefillAttention: q and the weights rounded once to the KV dtype): relative error
//    of o below 1.5e-2 (bf16) / 4e-3 (fp16), lse within 3e-2 / 8e-3;
//  * migration images are byte-identical whatever the backend, so a sequence that went to the
//    GPU and back attends bit for bit as before.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <map>
#include <random>
#include <vector>

#include "absl/time/clock.h"
#include "cuda_device.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"
#include "gtest/gtest.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/offload/attention_client.h"
#include "runtime/offload/worker_server.h"
#include "tests/common/host_cache_attention.h"

namespace ferry::offload {
namespace {

constexpr int kLayers = 2;
constexpr int kKvHeads = 2;
constexpr int kQHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kBlockSize = 16;
constexpr int64_t kRow = int64_t{kKvHeads} * kHeadDim;  // elements of one position's K (or V)

double RelativeError(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (double{got[i]} - want[i]) * (double{got[i]} - want[i]);
    den += double{want[i]} * want[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

double MaxAbsError(const std::vector<float>& got, const std::vector<float>& want) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (std::isinf(want[i]) && got[i] == want[i]) continue;
    worst = std::max(worst, std::abs(double{got[i]} - want[i]));
  }
  return worst;
}

class CudaWorkerTest : public ::testing::TestWithParam<DType> {
 protected:
  void SetUp() override {
    FERRY_SKIP_WITHOUT_CUDA_DEVICE();
    for (const char* device : {"cpu", "cuda:0"}) {
      WorkerServerOptions options;
      options.device = device;
      options.node.name = std::string("worker-") + device;
      options.node.tls = "tcp";
      options.node.connection_managers = "tcp";
      options.service.kv_capacity_bytes = int64_t{64} << 20;
      options.service.num_threads = 2;
      auto server = WorkerServer::Start(options);
      ASSERT_TRUE(server.ok()) << server.status();
      servers_.push_back(std::move(*server));
    }
    transport::UcxNodeOptions options;
    options.name = "client";
    options.tls = "tcp";
    options.connection_managers = "tcp";
    options.call_timeout = absl::Seconds(10);  // first CUDA calls load kernels
    auto client = AttentionClient::Create(options);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    ModelShape shape;
    shape.num_layers = kLayers;
    shape.num_kv_heads = kKvHeads;
    shape.head_dim = kHeadDim;
    shape.block_size = kBlockSize;
    shape.dtype = GetParam();
    shape.plan_workers = 2;
    shape.kv_tile_size = 32;
    for (auto& server : servers_) {
      auto index = client_->AddWorker("127.0.0.1", server->port());
      ASSERT_TRUE(index.ok()) << index.status();
      auto configured = client_->Configure(*index, shape);
      ASSERT_TRUE(configured.ok()) << configured.status();
    }
  }

  std::vector<uint16_t> RandomKv(size_t count) {
    std::normal_distribution<float> normal;
    std::vector<uint16_t> out(count);
    for (uint16_t& x : out) {
      x = GetParam() == DType::kBFloat16 ? FloatToBFloat16Bits(normal(rng_))
                                         : FloatToFloat16Bits(normal(rng_));
    }
    return out;
  }
  std::vector<float> RandomQ(size_t rows) {
    std::normal_distribution<float> normal;
    std::vector<float> out(rows * kQHeads * kHeadDim);
    for (float& x : out) x = normal(rng_);
    return out;
  }

  // Appends positions [begin, end) of a sequence to a worker, one position per call.
  void Append(int worker, uint64_t id, int64_t begin, int64_t end) {
    for (int layer = 0; layer < kLayers; ++layer) {
      for (int64_t p = begin; p < end; ++p) {
        absl::Status status = client_->AppendKv(worker, layer, std::vector<SequenceEntry>{{id, p}},
                                                k_[layer][id].data() + p * kRow,
                                                v_[layer][id].data() + p * kRow);
        ASSERT_TRUE(status.ok()) << status;
      }
    }
  }

  // The in-process CPU kernel over positions [0, ends[i]) of sequences[i], one layer.
  PartialStates InProcess(int layer, const std::vector<uint64_t>& sequences,
                          const std::vector<int32_t>& ends, const float* q) {
    kv::KvCacheConfig config{kLayers, kKvHeads, kHeadDim, GetParam(), kBlockSize, int64_t{64} << 20};
    auto cache = *kv::KvCache::CreateOnHost(config);
    for (const uint64_t id : sequences) {
      if (cache->HasSequence(id)) continue;
      const int64_t length = static_cast<int64_t>(k_[layer][id].size()) / kRow;
      FERRY_CHECK(cache->AddSequence(id).ok());
      FERRY_CHECK(cache->Reserve(id, length).ok());
      FERRY_CHECK(cache->WriteHost(id, layer, 0, length, k_[layer][id].data(),
                                   v_[layer][id].data()).ok());
    }
    auto states = test::AttendHostCache(*cache, layer, sequences, ends, q, kQHeads);
    FERRY_CHECK(states.ok());
    return *std::move(states);
  }

  void MakeSequence(uint64_t id, int64_t length) {
    for (int layer = 0; layer < kLayers; ++layer) {
      k_[layer][id] = RandomKv(length * kRow);
      v_[layer][id] = RandomKv(length * kRow);
    }
  }

  std::mt19937_64 rng_{20261124};
  std::vector<std::unique_ptr<WorkerServer>> servers_;  // 0: cpu, 1: cuda:0
  std::unique_ptr<AttentionClient> client_;
  std::map<uint64_t, std::vector<uint16_t>> k_[kLayers], v_[kLayers];
};

constexpr int kCpu = 0;
constexpr int kCuda = 1;

TEST_P(CudaWorkerTest, CpuAndCudaWorkersServeOneBatch) {
  // Each sequence's positions [0, split) live on the CPU worker, [split, length) on the CUDA
  // worker (split 0: all on the GPU; split = length: all on the CPU), and the step's new token
  // goes to the CUDA worker in the Attend message (the tail shard).
  const std::vector<uint64_t> ids = {1, 2, 3, 4, 5, 6};
  const std::vector<int64_t> lengths = {1, 17, 64, 100, 200, 333};
  const std::vector<int64_t> splits = {0, 9, 64, 0, 130, 170};
  for (size_t i = 0; i < ids.size(); ++i) MakeSequence(ids[i], lengths[i] + 1);
  std::vector<SequenceEntry> cpu_open, cuda_open;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (splits[i] > 0) cpu_open.push_back({ids[i], 0});
    cuda_open.push_back({ids[i], splits[i]});
  }
  ASSERT_TRUE(client_->OpenSequences(kCpu, cpu_open).ok());
  ASSERT_TRUE(client_->OpenSequences(kCuda, cuda_open).ok());
  for (size_t i = 0; i < ids.size(); ++i) {
    if (splits[i] > 0) Append(kCpu, ids[i], 0, splits[i]);
    // The GPU half of even sequences comes by Prefill with K and V, of odd ones by AppendKv.
    if (i % 2 == 0 && lengths[i] > splits[i]) {
      const int tokens = static_cast<int>(lengths[i] - splits[i]);
      std::vector<float> q = RandomQ(tokens);
      for (int layer = 0; layer < kLayers; ++layer) {
        auto states = client_->Prefill(kCuda, layer, ids[i], splits[i], tokens, kQHeads, q.data(),
                                       k_[layer][ids[i]].data() + splits[i] * kRow,
                                       v_[layer][ids[i]].data() + splits[i] * kRow);
        ASSERT_TRUE(states.ok()) << states.status();
      }
    } else {
      Append(kCuda, ids[i], splits[i], lengths[i]);
    }
  }
  const int batch = static_cast<int>(ids.size());
  std::vector<float> q = RandomQ(batch);
  for (int layer = 0; layer < kLayers; ++layer) {
    AttentionClient::Shard cpu_shard, cuda_shard;
    cpu_shard.worker = kCpu;
    cuda_shard.worker = kCuda;
    std::vector<uint16_t> new_k, new_v;
    for (int i = 0; i < batch; ++i) {
      if (splits[i] > 0) {
        cpu_shard.batch_index.push_back(i);
        cpu_shard.sequences.push_back(ids[i]);
      }
      cuda_shard.batch_index.push_back(i);
      cuda_shard.sequences.push_back(ids[i]);
      cuda_shard.positions.push_back(lengths[i]);
      const auto* k_row = k_[layer][ids[i]].data() + lengths[i] * kRow;
      const auto* v_row = v_[layer][ids[i]].data() + lengths[i] * kRow;
      new_k.insert(new_k.end(), k_row, k_row + kRow);
      new_v.insert(new_v.end(), v_row, v_row + kRow);
    }
    cuda_shard.new_k = new_k.data();
    cuda_shard.new_v = new_v.data();
    auto result = client_->AttendLayer(layer, batch, kQHeads, q.data(), {cpu_shard, cuda_shard});
    ASSERT_TRUE(result.ok()) << result.status();
    for (const absl::Status& status : result->shard_status) ASSERT_TRUE(status.ok()) << status;
    std::vector<int32_t> ends;
    for (int64_t length : lengths) ends.push_back(static_cast<int32_t>(length + 1));
    PartialStates want = InProcess(layer, ids, ends, q.data());
    const double o_err = RelativeError(result->merged.o, want.o);
    const double lse_err = MaxAbsError(result->merged.lse, want.lse);
    std::printf("  %s layer %d: decode merged cpu+cuda vs in-process: o rel err %.2e, lse abs "
                "err %.2e\n", std::string(DTypeName(GetParam())).c_str(), layer, o_err, lse_err);
    EXPECT_LT(o_err, 1e-4);
    EXPECT_LT(lse_err, 1e-3);
  }
}

TEST_P(CudaWorkerTest, PrefillOnTheGpuMatchesTheCpuWorker) {
  // The same chunks on both workers: a chunk over a cached prefix (positions [90, 150) after
  // [0, 90)), and a non-tail shard (the worker holds [0, 60); queries at [60, 100) bring no K/V).
  const double o_tolerance = GetParam() == DType::kBFloat16 ? 1.5e-2 : 4e-3;
  const double lse_tolerance = GetParam() == DType::kBFloat16 ? 3e-2 : 8e-3;
  MakeSequence(100, 150);
  MakeSequence(101, 60);
  for (int w : {kCpu, kCuda}) {
    ASSERT_TRUE(client_->OpenSequences(w, std::vector<SequenceEntry>{{100, 0}, {101, 0}}).ok());
    Append(w, 101, 0, 60);
  }
  std::vector<float> q = RandomQ(150);
  struct Chunk {
    uint64_t id;
    int64_t first;
    int tokens;
    bool with_kv;
  };
  for (const Chunk& chunk : {Chunk{100, 0, 90, true}, Chunk{100, 90, 60, true},
                             Chunk{101, 60, 40, false}}) {
    for (int layer = 0; layer < kLayers; ++layer) {
      PartialStates got[2];
      for (int w : {kCpu, kCuda}) {
        auto states = client_->Prefill(
            w, layer, chunk.id, chunk.first, chunk.tokens, kQHeads,
            q.data() + (chunk.with_kv ? chunk.first : 0) * kQHeads * kHeadDim,
            chunk.with_kv ? k_[layer][chunk.id].data() + chunk.first * kRow : nullptr,
            chunk.with_kv ? v_[layer][chunk.id].data() + chunk.first * kRow : nullptr);
        ASSERT_TRUE(states.ok()) << states.status();
        got[w] = *states;
      }
      const double o_err = RelativeError(got[kCuda].o, got[kCpu].o);
      const double lse_err = MaxAbsError(got[kCuda].lse, got[kCpu].lse);
      std::printf("  %s prefill seq %llu [%lld, +%d) layer %d: cuda vs cpu worker: o rel err "
                  "%.2e, lse abs err %.2e\n", std::string(DTypeName(GetParam())).c_str(),
                  static_cast<unsigned long long>(chunk.id), static_cast<long long>(chunk.first),
                  chunk.tokens, layer, o_err, lse_err);
      EXPECT_LT(o_err, o_tolerance);
      EXPECT_LT(lse_err, lse_tolerance);
    }
  }
}

TEST_P(CudaWorkerTest, MigrationBetweenCpuAndCudaWorkers) {
  MakeSequence(7, 90);
  ASSERT_TRUE(client_->OpenSequences(kCpu, std::vector<SequenceEntry>{{7, 0}}).ok());
  Append(kCpu, 7, 0, 90);
  std::vector<float> q = RandomQ(1);
  std::vector<PartialStates> before;
  for (int layer = 0; layer < kLayers; ++layer) {
    auto states = client_->Attend(kCpu, layer, std::vector<uint64_t>{7}, kQHeads, q.data());
    ASSERT_TRUE(states.ok()) << states.status();
    before.push_back(*states);
  }
  auto cpu_image = client_->ExportBlocks(kCpu, 7);
  ASSERT_TRUE(cpu_image.ok()) << cpu_image.status();

  // CPU -> CUDA, worker to worker.
  ASSERT_TRUE(client_->Migrate(kCpu, 7, "127.0.0.1", servers_[kCuda]->port()).ok());
  EXPECT_EQ(client_->Attend(kCpu, 0, std::vector<uint64_t>{7}, kQHeads, q.data()).status().code(),
            absl::StatusCode::kNotFound);
  for (int layer = 0; layer < kLayers; ++layer) {
    auto states = client_->Attend(kCuda, layer, std::vector<uint64_t>{7}, kQHeads, q.data());
    ASSERT_TRUE(states.ok()) << states.status();
    EXPECT_LT(RelativeError(states->o, before[layer].o), 1e-4);
    EXPECT_LT(MaxAbsError(states->lse, before[layer].lse), 1e-3);
  }
  // The GPU's image is the CPU's, byte for byte (request ids aside).
  auto cuda_image = client_->ExportBlocks(kCuda, 7);
  ASSERT_TRUE(cuda_image.ok()) << cuda_image.status();
  ASSERT_EQ(cuda_image->size(), cpu_image->size());
  EXPECT_EQ(std::memcmp(cuda_image->data() + kFrameHeaderBytes,
                        cpu_image->data() + kFrameHeaderBytes,
                        cpu_image->size() - kFrameHeaderBytes), 0);

  // And back: CUDA -> CPU; the CPU kernel then sees the same bytes, so the same bits.
  ASSERT_TRUE(client_->Migrate(kCuda, 7, "127.0.0.1", servers_[kCpu]->port()).ok());
  for (int layer = 0; layer < kLayers; ++layer) {
    auto states = client_->Attend(kCpu, layer, std::vector<uint64_t>{7}, kQHeads, q.data());
    ASSERT_TRUE(states.ok()) << states.status();
    EXPECT_EQ(std::memcmp(states->o.data(), before[layer].o.data(), states->o.size() * 4), 0);
    EXPECT_EQ(std::memcmp(states->lse.data(), before[layer].lse.data(), states->lse.size() * 4), 0);
  }
  // The GPU freed it exactly: its pool is empty again.
  EXPECT_EQ(servers_[kCuda]->sequences_held(), 0);
  EXPECT_EQ(servers_[kCuda]->kv_used_bytes(), 0);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, CudaWorkerTest,
                         ::testing::Values(DType::kBFloat16, DType::kFloat16),
                         [](const auto& info) { return std::string(DTypeName(info.param)); });

}  // namespace
}  // namespace ferry::offload
