// The attention data plane end to end: worker processes (test_worker_main.cc) on 127.0.0.1 and
// the AttentionClient, over tcp and over shared memory (UCX_MM_ERROR_HANDLING=y so shm stays in
// PEER error mode). Results are compared with the same kernels run in this process (bit for bit,
// same plan) and with the float64 reference.
#include <dirent.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <future>
#include <map>
#include <random>

#include "absl/time/clock.h"
#include "attention_reference.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"
#include "gtest/gtest.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/offload/attention_client.h"
#include "tests/common/host_cache_attention.h"
#include "worker_process.h"

namespace ferry::offload {
namespace {

using testing::WorkerProcess;

struct TransportCase {
  const char* name;
  const char* tls;
  const char* expect;  // substring of ucp_ep_print_info for the data lanes
};
void PrintTo(const TransportCase& c, std::ostream* os) { *os << c.name; }

constexpr int kLayers = 2;
constexpr int kKvHeads = 2;
constexpr int kQHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kBlockSize = 16;
constexpr int kPlanWorkers = 2;
constexpr int kTile = 32;
constexpr int64_t kRow = int64_t{kKvHeads} * kHeadDim;  // elements of one position's K (or V)

ModelShape Shape() {
  ModelShape shape;
  shape.num_layers = kLayers;
  shape.num_kv_heads = kKvHeads;
  shape.head_dim = kHeadDim;
  shape.block_size = kBlockSize;
  shape.dtype = DType::kBFloat16;
  shape.plan_workers = kPlanWorkers;
  shape.kv_tile_size = kTile;
  return shape;
}

std::vector<uint16_t> RandomBf16(size_t count, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  std::vector<uint16_t> out(count);
  for (uint16_t& x : out) x = FloatToBFloat16Bits(normal(rng));
  return out;
}

std::vector<float> RandomFloats(size_t count, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  std::vector<float> out(count);
  for (float& x : out) x = normal(rng);
  return out;
}

// K and V of every position of some sequences, per layer: data[layer][sequence] holds
// (length, kv heads, head dim) bf16.
struct KvData {
  std::map<uint64_t, int64_t> lengths;
  std::vector<std::map<uint64_t, std::vector<uint16_t>>> k, v;
  KvData(const std::map<uint64_t, int64_t>& lens, uint64_t seed)
      : lengths(lens), k(kLayers), v(kLayers) {
    std::mt19937_64 rng(seed);
    for (int layer = 0; layer < kLayers; ++layer) {
      for (auto [id, length] : lens) {
        k[layer][id] = RandomBf16(length * kRow, rng);
        v[layer][id] = RandomBf16(length * kRow, rng);
      }
    }
  }
};

// Positions [begin, end) of each sequence, as one worker holds them.
using Ranges = std::map<uint64_t, std::pair<int64_t, int64_t>>;

// Appends the ranges to a worker one step at a time (every sequence's next position per call).
void FillWorker(AttentionClient& client, int worker, const KvData& data, const Ranges& ranges) {
  std::vector<SequenceEntry> open;
  for (auto [id, range] : ranges) open.push_back({id, range.first});
  ASSERT_TRUE(client.OpenSequences(worker, open).ok());
  int64_t longest = 0;
  for (auto [id, range] : ranges) longest = std::max(longest, range.second - range.first);
  for (int layer = 0; layer < kLayers; ++layer) {
    for (int64_t step = 0; step < longest; ++step) {
      std::vector<SequenceEntry> entries;
      std::vector<uint16_t> k, v;
      for (auto [id, range] : ranges) {
        const int64_t position = range.first + step;
        if (position >= range.second) continue;
        entries.push_back({id, position});
        const uint16_t* k_row = data.k[layer].at(id).data() + position * kRow;
        const uint16_t* v_row = data.v[layer].at(id).data() + position * kRow;
        k.insert(k.end(), k_row, k_row + kRow);
        v.insert(v.end(), v_row, v_row + kRow);
      }
      absl::Status status = client.AppendKv(worker, layer, entries, k.data(), v.data());
      ASSERT_TRUE(status.ok()) << status;
    }
  }
}

// One query of a reference check: its sequence and the end of the positions it attends, [0, end).
struct ReferenceQuery {
  uint64_t id;
  int64_t kv_end;
};

// Checks states (o, lse) against the float64 reference: query i (q row i: kQHeads x kHeadDim)
// over positions [0, queries[i].kv_end) of its sequence's K and V of `layer` in `data`.
void ExpectStatesMatchTheReference(const KvData& data, int layer,
                                   const std::vector<ReferenceQuery>& queries, const float* q,
                                   const std::vector<float>& o, const std::vector<float>& lse) {
  kv::KvCacheConfig config{kLayers, kKvHeads, kHeadDim, DType::kBFloat16, kBlockSize, 16 << 20};
  auto cache = *kv::KvCache::CreateOnHost(config);
  std::vector<int32_t> indptr = {0}, table, lens, begins, ends;
  for (const ReferenceQuery& query : queries) {
    const int64_t length = data.lengths.at(query.id);
    if (!cache->Length(query.id).ok()) {
      ASSERT_TRUE(cache->AddSequence(query.id).ok());
      ASSERT_TRUE(cache->Reserve(query.id, length).ok());
      ASSERT_TRUE(cache->WriteHost(query.id, layer, 0, length, data.k[layer].at(query.id).data(),
                                   data.v[layer].at(query.id).data())
                      .ok());
    }
    const auto* blocks = *cache->BlockTable(query.id);
    table.insert(table.end(), blocks->begin(), blocks->end());
    indptr.push_back(static_cast<int32_t>(table.size()));
    lens.push_back(static_cast<int32_t>(length));
    begins.push_back(0);
    ends.push_back(static_cast<int32_t>(query.kv_end));
  }
  kernels::DecodeAttentionArgs args;
  args.num_seqs = static_cast<int>(queries.size());
  args.num_q_heads = kQHeads;
  args.q = q;
  args.kv = cache->LayerView(layer);
  args.block_table_indptr = indptr.data();
  args.block_table = table.data();
  args.seq_lens = lens.data();
  args.kv_begin = begins.data();
  args.kv_end = ends.data();
  args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  auto reference = kernels::reference::DecodeAttentionReference(args);
  std::vector<double> got_o(o.begin(), o.end()), got_lse(lse.begin(), lse.end());
  EXPECT_LT(kernels::reference::RelativeError(got_o, reference.o), 1e-5);
  EXPECT_LT(kernels::reference::RelativeError(got_lse, reference.lse), 1e-6);
}

// The same ranges in a cache in this process, attended by the same kernel and plan.
PartialStates InProcessAttend(const KvData& data, const Ranges& ranges, int layer,
                              const std::vector<uint64_t>& sequences, const float* q) {
  kv::KvCacheConfig config{kLayers, kKvHeads, kHeadDim, DType::kBFloat16, kBlockSize,
                           int64_t{16} << 20};
  auto cache = kv::KvCache::CreateOnHost(config);
  FERRY_CHECK(cache.ok());
  for (auto [id, range] : ranges) {
    const int64_t length = range.second - range.first;
    FERRY_CHECK((*cache)->AddSequence(id).ok());
    FERRY_CHECK((*cache)->Reserve(id, length).ok());
    for (int l = 0; l < kLayers; ++l) {
      FERRY_CHECK((*cache)
                      ->WriteHost(id, l, 0, length, data.k[l].at(id).data() + range.first * kRow,
                                  data.v[l].at(id).data() + range.first * kRow)
                      .ok());
    }
    FERRY_CHECK((*cache)->SetLength(id, length).ok());
  }
  std::vector<int32_t> lens;
  for (uint64_t id : sequences) {
    lens.push_back(static_cast<int32_t>(ranges.at(id).second - ranges.at(id).first));
  }
  kernels::CpuDecodeOptions plan;
  plan.num_workers = kPlanWorkers;
  plan.kv_tile_size = kTile;
  auto states = test::AttendHostCache(**cache, layer, sequences, lens, q, kQHeads, plan);
  FERRY_CHECK(states.ok());
  return *std::move(states);
}

// True when every thread of the process is stopped (state 'T' in /proc/<pid>/task/*/stat).
bool ProcessStopped(pid_t pid) {
  const std::string dir = "/proc/" + std::to_string(pid) + "/task";
  DIR* tasks = opendir(dir.c_str());
  if (tasks == nullptr) return false;
  bool all = true;
  int seen = 0;
  while (dirent* entry = readdir(tasks)) {
    if (entry->d_name[0] == '.') continue;
    std::ifstream stat(dir + "/" + entry->d_name + "/stat");
    std::string line;
    std::getline(stat, line);
    const size_t paren = line.rfind(')');
    if (paren == std::string::npos || paren + 2 >= line.size()) continue;
    ++seen;
    if (line[paren + 2] != 'T' && line[paren + 2] != 't') all = false;
  }
  closedir(tasks);
  return all && seen > 0;
}

bool BitEqual(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

class OffloadTest : public ::testing::TestWithParam<TransportCase> {
 protected:
  void SetUp() override {
    setenv("UCX_MM_ERROR_HANDLING", "y", 1);
    setenv("UCX_WARN_UNUSED_ENV_VARS", "n", 1);  // MM_ is read by transports, not by ucp_init
  }

  std::unique_ptr<WorkerProcess> StartWorker(std::vector<std::string> flags = {}) {
    flags.push_back(std::string("--tls=") + GetParam().tls);
    flags.push_back("--keepalive-ms=1000");
    auto worker = WorkerProcess::Start(flags);
    if (!worker.ok()) {
      ADD_FAILURE() << worker.status();
      std::abort();  // every test needs its workers
    }
    return std::move(*worker);
  }

  std::unique_ptr<AttentionClient> MakeClient() {
    transport::UcxNodeOptions options;
    options.name = "client";
    options.tls = GetParam().tls;
    options.keepalive_interval = absl::Seconds(1);  // short, but above this VM's scheduling stalls
    options.connection_managers = "tcp";
    options.call_timeout = absl::Seconds(2);
    auto client = AttentionClient::Create(options);
    EXPECT_TRUE(client.ok()) << client.status();
    return std::move(*client);
  }

  int Connect(AttentionClient& client, const WorkerProcess& worker) {
    auto index = client.AddWorker("127.0.0.1", worker.port());
    EXPECT_TRUE(index.ok()) << index.status();
    absl::StatusOr<int64_t> configured = client.Configure(*index, Shape());
    EXPECT_TRUE(configured.ok()) << configured.status();
    auto info = client.node().DescribePeer(client.peer(*index));
    EXPECT_TRUE(info.ok());
    // The transport under test really carries the data (no silent fall-back to tcp).
    EXPECT_NE(info->find(GetParam().expect), std::string::npos) << *info;
    return *index;
  }
};

TEST_P(OffloadTest, SingleWorkerAttendIsBitIdenticalToInProcess) {
  auto worker = StartWorker();
  auto client = MakeClient();
  const int w = Connect(*client, *worker);
  KvData data({{1, 37}, {2, 100}, {3, 1}, {4, 64}}, 11);
  Ranges ranges;
  for (auto [id, length] : data.lengths) ranges[id] = {0, length};
  FillWorker(*client, w, data, ranges);
  std::mt19937_64 rng(5);
  const std::vector<uint64_t> sequences = {4, 1, 3, 2};
  for (int layer = 0; layer < kLayers; ++layer) {
    std::vector<float> q = RandomFloats(sequences.size() * kQHeads * kHeadDim, rng);
    auto remote = client->Attend(w, layer, sequences, kQHeads, q.data());
    ASSERT_TRUE(remote.ok()) << remote.status();
    PartialStates local = InProcessAttend(data, ranges, layer, sequences, q.data());
    EXPECT_TRUE(BitEqual(remote->o, local.o)) << "layer " << layer;
    EXPECT_TRUE(BitEqual(remote->lse, local.lse)) << "layer " << layer;
  }
}

TEST_P(OffloadTest, AttendWithTheNewTokensKvEqualsAppendThenAttend) {
  auto worker0 = StartWorker();
  auto worker1 = StartWorker();
  auto client = MakeClient();
  const int w0 = Connect(*client, *worker0);
  const int w1 = Connect(*client, *worker1);
  KvData data({{1, 25}, {2, 40}}, 91);
  // Both workers hold positions [0, len - 1); the last position comes with the attend.
  Ranges held = {{1, {0, 24}}, {2, {0, 39}}};
  FillWorker(*client, w0, data, held);
  FillWorker(*client, w1, data, held);
  std::mt19937_64 rng(12);
  std::vector<float> q = RandomFloats(2 * kQHeads * kHeadDim, rng);
  const int layer = 1;
  std::vector<uint16_t> k, v;
  for (uint64_t id : {1, 2}) {
    const int64_t last = data.lengths.at(id) - 1;
    k.insert(k.end(), data.k[layer].at(id).begin() + last * kRow,
             data.k[layer].at(id).begin() + (last + 1) * kRow);
    v.insert(v.end(), data.v[layer].at(id).begin() + last * kRow,
             data.v[layer].at(id).begin() + (last + 1) * kRow);
  }
  // Worker 0: one message. Worker 1: AppendKv, then Attend.
  AttentionClient::Shard fused{w0, {0, 1}, {1, 2}, {24, 39}, k.data(), v.data()};
  auto one = client->AttendLayer(layer, 2, kQHeads, q.data(), {&fused, 1});
  ASSERT_TRUE(one.ok() && one->shard_status[0].ok());
  ASSERT_TRUE(client->AppendKv(w1, layer, std::vector<SequenceEntry>{{1, 24}, {2, 39}}, k.data(),
                               v.data()).ok());
  auto two = client->Attend(w1, layer, std::vector<uint64_t>{1, 2}, kQHeads, q.data());
  ASSERT_TRUE(two.ok()) << two.status();
  EXPECT_TRUE(BitEqual(one->merged.o, two->o));
  EXPECT_TRUE(BitEqual(one->merged.lse, two->lse));
  Ranges whole = {{1, {0, 25}}, {2, {0, 40}}};
  EXPECT_TRUE(BitEqual(two->o, InProcessAttend(data, whole, layer, {1, 2}, q.data()).o));
  // The same position again is refused (append-only, in order).
  auto again = client->AttendLayer(layer, 2, kQHeads, q.data(), {&fused, 1});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->shard_status[0].code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(OffloadTest, TwoWorkersSplitByRangeMergeBitIdenticallyAndMatchTheReference) {
  auto worker0 = StartWorker();
  auto worker1 = StartWorker();
  auto client = MakeClient();
  const int w0 = Connect(*client, *worker0);
  const int w1 = Connect(*client, *worker1);
  KvData data({{10, 90}, {11, 33}, {12, 150}}, 21);
  // Sequence 10 and 12 are split by position range; 11 lives on worker 1 only.
  Ranges ranges0 = {{10, {0, 40}}, {12, {0, 64}}};
  Ranges ranges1 = {{10, {40, 90}}, {11, {0, 33}}, {12, {64, 150}}};
  FillWorker(*client, w0, data, ranges0);
  FillWorker(*client, w1, data, ranges1);
  // Batch order: 11, 12, 10.
  std::vector<AttentionClient::Shard> shards = {{w0, {1, 2}, {12, 10}}, {w1, {2, 0, 1}, {10, 11, 12}}};
  std::mt19937_64 rng(9);
  const int layer = 1;
  std::vector<float> q = RandomFloats(3 * kQHeads * kHeadDim, rng);
  auto result = client->AttendLayer(layer, 3, kQHeads, q.data(), shards);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_TRUE(result->shard_status[0].ok()) << result->shard_status[0];
  ASSERT_TRUE(result->shard_status[1].ok()) << result->shard_status[1];
  EXPECT_EQ(result->complete, std::vector<bool>({true, true, true}));

  // The same plan in process: each worker's part, then the merge in shard order.
  const int64_t states = 3 * kQHeads;
  std::vector<float> parts_o(2 * states * kHeadDim, 0.0f), parts_lse(2 * states, -INFINITY);
  for (int p = 0; p < 2; ++p) {
    const auto& shard = shards[p];
    std::vector<float> shard_q;
    for (int index : shard.batch_index) {
      shard_q.insert(shard_q.end(), q.begin() + index * kQHeads * kHeadDim,
                     q.begin() + (index + 1) * kQHeads * kHeadDim);
    }
    PartialStates part =
        InProcessAttend(data, p == 0 ? ranges0 : ranges1, layer, shard.sequences, shard_q.data());
    for (size_t i = 0; i < shard.sequences.size(); ++i) {
      const int64_t state = int64_t{shard.batch_index[i]} * kQHeads;
      std::memcpy(&parts_o[(p * states + state) * kHeadDim], &part.o[i * kQHeads * kHeadDim],
                  kQHeads * kHeadDim * 4);
      std::memcpy(&parts_lse[p * states + state], &part.lse[i * kQHeads], kQHeads * 4);
    }
  }
  std::vector<float> o(states * kHeadDim), lse(states);
  ASSERT_TRUE(kernels::MergeStatesCpu(parts_o.data(), parts_lse.data(), 2, states, kHeadDim,
                                      o.data(), lse.data())
                  .ok());
  EXPECT_TRUE(BitEqual(result->merged.o, o));
  EXPECT_TRUE(BitEqual(result->merged.lse, lse));

  // And the float64 reference over whole sequences.
  ExpectStatesMatchTheReference(data, layer, {{11, 33}, {12, 150}, {10, 90}}, q.data(),
                                result->merged.o, result->merged.lse);
}

TEST_P(OffloadTest, PrefillThenDecodeMatchesTheReference) {
  auto worker = StartWorker();
  auto client = MakeClient();
  const int w = Connect(*client, *worker);
  const uint64_t id = 77;
  const int64_t prompt = 300, total = 303;
  KvData data({{id, total}}, 31);
  ASSERT_TRUE(client->OpenSequences(w, std::vector<SequenceEntry>{{id, 0}}).ok());
  std::mt19937_64 rng(3);
  const int layer = 0;
  std::vector<float> q = RandomFloats(total * kQHeads * kHeadDim, rng);
  std::vector<float> got_o, got_lse;
  // The prompt in chunks of 260 (more than one kernel call's 256 queries), 30 and 10, on both
  // layers so the sequence stays whole.
  int64_t first = 0;
  for (int tokens : {260, 30, 10}) {
    for (int l = 0; l < kLayers; ++l) {
      auto states = client->Prefill(w, l, id, first, tokens, kQHeads,
                                    q.data() + first * kQHeads * kHeadDim,
                                    data.k[l].at(id).data() + first * kRow,
                                    data.v[l].at(id).data() + first * kRow);
      ASSERT_TRUE(states.ok()) << states.status();
      if (l == layer) {
        got_o.insert(got_o.end(), states->o.begin(), states->o.end());
        got_lse.insert(got_lse.end(), states->lse.begin(), states->lse.end());
      }
    }
    first += tokens;
  }
  ASSERT_EQ(first, prompt);
  // Then decode: append one position, attend with its q.
  for (int64_t position = prompt; position < total; ++position) {
    for (int l = 0; l < kLayers; ++l) {
      ASSERT_TRUE(client->AppendKv(w, l, std::vector<SequenceEntry>{{id, position}},
                                   data.k[l].at(id).data() + position * kRow,
                                   data.v[l].at(id).data() + position * kRow).ok());
    }
    auto states = client->Attend(w, layer, std::vector<uint64_t>{id}, kQHeads,
                                 q.data() + position * kQHeads * kHeadDim);
    ASSERT_TRUE(states.ok()) << states.status();
    got_o.insert(got_o.end(), states->o.begin(), states->o.end());
    got_lse.insert(got_lse.end(), states->lse.begin(), states->lse.end());
  }
  // Reference: query p over positions [0, p].
  std::vector<ReferenceQuery> queries;
  for (int64_t p = 0; p < total; ++p) queries.push_back({id, p + 1});
  ExpectStatesMatchTheReference(data, layer, queries, q.data(), got_o, got_lse);
}

TEST_P(OffloadTest, PrefillSplitAcrossWorkersMatchesTheReference) {
  // Worker 0 holds positions [0, 40) of the sequence; the chunk [40, 64) goes to worker 1 with
  // its K and V, and to worker 0 as queries only. Merged, that is causal attention over [0, p].
  auto worker0 = StartWorker();
  auto worker1 = StartWorker();
  auto client = MakeClient();
  const int w0 = Connect(*client, *worker0);
  const int w1 = Connect(*client, *worker1);
  const uint64_t id = 3;
  const int64_t split = 40, total = 64;
  const int tokens = static_cast<int>(total - split);
  KvData data({{id, total}}, 17);
  FillWorker(*client, w0, data, {{id, {0, split}}});
  ASSERT_TRUE(client->OpenSequences(w1, std::vector<SequenceEntry>{{id, split}}).ok());
  std::mt19937_64 rng(23);
  std::vector<float> q = RandomFloats(tokens * kQHeads * kHeadDim, rng);
  const int layer = 0;
  auto old_part = client->Prefill(w0, layer, id, split, tokens, kQHeads, q.data(), nullptr,
                                  nullptr);
  ASSERT_TRUE(old_part.ok()) << old_part.status();
  auto new_part = client->Prefill(w1, layer, id, split, tokens, kQHeads, q.data(),
                                  data.k[layer].at(id).data() + split * kRow,
                                  data.v[layer].at(id).data() + split * kRow);
  ASSERT_TRUE(new_part.ok()) << new_part.status();
  const int64_t states = int64_t{tokens} * kQHeads;
  std::vector<float> parts_o(old_part->o), parts_lse(old_part->lse);
  parts_o.insert(parts_o.end(), new_part->o.begin(), new_part->o.end());
  parts_lse.insert(parts_lse.end(), new_part->lse.begin(), new_part->lse.end());
  std::vector<float> o(states * kHeadDim), lse(states);
  ASSERT_TRUE(kernels::MergeStatesCpu(parts_o.data(), parts_lse.data(), 2, states, kHeadDim,
                                      o.data(), lse.data()).ok());
  std::vector<ReferenceQuery> queries;
  for (int t = 0; t < tokens; ++t) queries.push_back({id, split + t + 1});
  ExpectStatesMatchTheReference(data, layer, queries, q.data(), o, lse);
}

TEST_P(OffloadTest, MigrationMovesKvAndAttentionIsUnchanged) {
  auto worker0 = StartWorker();
  auto worker1 = StartWorker();
  auto client = MakeClient();
  const int w0 = Connect(*client, *worker0);
  const int w1 = Connect(*client, *worker1);
  KvData data({{5, 70}, {6, 20}}, 41);
  FillWorker(*client, w0, data, {{5, {0, 70}}, {6, {0, 20}}});
  std::mt19937_64 rng(8);
  std::vector<float> q = RandomFloats(kQHeads * kHeadDim, rng);
  std::vector<PartialStates> before;
  for (int layer = 0; layer < kLayers; ++layer) {
    auto states = client->Attend(w0, layer, std::vector<uint64_t>{5}, kQHeads, q.data());
    ASSERT_TRUE(states.ok()) << states.status();
    before.push_back(*states);
  }
  ASSERT_TRUE(client->Migrate(w0, 5, "127.0.0.1", worker1->port()).ok());
  for (int layer = 0; layer < kLayers; ++layer) {
    auto states = client->Attend(w1, layer, std::vector<uint64_t>{5}, kQHeads, q.data());
    ASSERT_TRUE(states.ok()) << states.status();
    EXPECT_TRUE(BitEqual(states->o, before[layer].o));
    EXPECT_TRUE(BitEqual(states->lse, before[layer].lse));
  }
  // Gone from the source, which keeps serving its other sequence.
  auto gone = client->Attend(w0, 0, std::vector<uint64_t>{5}, kQHeads, q.data());
  EXPECT_EQ(gone.status().code(), absl::StatusCode::kNotFound) << gone.status();
  EXPECT_TRUE(client->Attend(w0, 0, std::vector<uint64_t>{6}, kQHeads, q.data()).ok());
  // Decoding continues on the destination at the next position.
  std::vector<uint16_t> row(kRow, FloatToBFloat16Bits(0.5f));
  EXPECT_TRUE(client->AppendKv(w1, 0, std::vector<SequenceEntry>{{5, 70}}, row.data(),
                               row.data()).ok());
  // Migration through the client (export, import) works too, and freeing is exact.
  auto image = client->ExportBlocks(w0, 6);
  ASSERT_TRUE(image.ok()) << image.status();
  ASSERT_TRUE(client->ImportBlocks(w1, std::move(*image)).ok());
  auto freed = client->FreeSequences(w0, std::vector<uint64_t>{6});
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 2);  // 20 positions in blocks of 16
  auto states = client->Attend(w1, 1, std::vector<uint64_t>{6}, kQHeads, q.data());
  ASSERT_TRUE(states.ok()) << states.status();
  Ranges r6 = {{6, {0, 20}}};
  PartialStates local = InProcessAttend(data, r6, 1, {6}, q.data());
  EXPECT_TRUE(BitEqual(states->o, local.o));
}

TEST_P(OffloadTest, KilledWorkerFailsWithinTheBoundAndOthersKeepWorking) {
  auto worker0 = StartWorker();
  auto worker1 = StartWorker({"--attend-delay-ms=5000"});  // slow: killed while attending
  auto client = MakeClient();
  const int w0 = Connect(*client, *worker0);
  const int w1 = Connect(*client, *worker1);
  KvData data({{1, 30}, {2, 45}, {3, 17}}, 51);
  FillWorker(*client, w0, data, {{1, {0, 30}}, {2, {0, 45}}});
  FillWorker(*client, w1, data, {{3, {0, 17}}});
  std::vector<AttentionClient::Shard> shards = {{w0, {0, 1}, {1, 2}}, {w1, {2}, {3}}};
  std::mt19937_64 rng(2);
  std::vector<float> q = RandomFloats(3 * kQHeads * kHeadDim, rng);
  auto pending = std::async(std::launch::async, [&] {
    return client->AttendLayer(0, 3, kQHeads, q.data(), shards);
  });
  absl::SleepFor(absl::Milliseconds(200));
  const absl::Time killed = absl::Now();
  worker1->Kill();
  auto result = pending.get();
  const absl::Duration took = absl::Now() - killed;
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_LT(took, absl::Seconds(2));
  EXPECT_TRUE(result->shard_status[0].ok()) << result->shard_status[0];
  EXPECT_FALSE(result->shard_status[1].ok());
  std::printf("killed worker: %s after %s\n", result->shard_status[1].ToString().c_str(),
              absl::FormatDuration(took).c_str());
  EXPECT_EQ(result->complete, std::vector<bool>({true, true, false}));
  // The survivor's states are in the merge, unchanged.
  PartialStates local = InProcessAttend(data, {{1, {0, 30}}, {2, {0, 45}}}, 0, {1, 2}, q.data());
  EXPECT_EQ(std::memcmp(result->merged.o.data(), local.o.data(), local.o.size() * 4), 0);
  // The client keeps working with the survivor, and the dead worker fails fast.
  const absl::Time again = absl::Now();
  auto next = client->AttendLayer(1, 3, kQHeads, q.data(), shards);
  ASSERT_TRUE(next.ok());
  EXPECT_TRUE(next->shard_status[0].ok()) << next->shard_status[0];
  EXPECT_FALSE(next->shard_status[1].ok());
  EXPECT_LT(absl::Now() - again, absl::Seconds(1));
}

TEST_P(OffloadTest, SilentWorkerTimesOutWithinTheBoundAndRecovers) {
  auto worker0 = StartWorker();
  auto worker1 = StartWorker();
  auto client = MakeClient();
  const int w0 = Connect(*client, *worker0);
  const int w1 = Connect(*client, *worker1);
  KvData data({{1, 10}, {2, 12}}, 81);
  FillWorker(*client, w0, data, {{1, {0, 10}}});
  FillWorker(*client, w1, data, {{2, {0, 12}}});
  std::vector<AttentionClient::Shard> shards = {{w0, {0}, {1}}, {w1, {1}, {2}}};
  std::mt19937_64 rng(6);
  std::vector<float> q = RandomFloats(2 * kQHeads * kHeadDim, rng);
  // A stopped process keeps its sockets open and answers nothing: only the deadline catches it.
  ASSERT_EQ(kill(worker1->pid(), SIGSTOP), 0);
  // The stop lands asynchronously: wait (bounded) until every thread of the worker is stopped.
  bool stopped = false;
  for (int i = 0; i < 200 && !stopped; ++i) {
    stopped = ProcessStopped(worker1->pid());
    if (!stopped) absl::SleepFor(absl::Milliseconds(5));
  }
  ASSERT_TRUE(stopped);
  const absl::Time start = absl::Now();
  auto result = client->AttendLayer(0, 2, kQHeads, q.data(), shards);
  const absl::Duration took = absl::Now() - start;
  kill(worker1->pid(), SIGCONT);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->shard_status[0].ok()) << result->shard_status[0];
  EXPECT_FALSE(result->shard_status[1].ok());
  EXPECT_LT(took, absl::Milliseconds(3500));  // the 2 s call bound plus scheduling slack
  EXPECT_EQ(result->complete, std::vector<bool>({true, false}));
  // The client keeps working with the survivor.
  auto next = client->Attend(w0, 1, std::vector<uint64_t>{1}, kQHeads, q.data());
  EXPECT_TRUE(next.ok()) << next.status();
}

TEST_P(OffloadTest, MalformedFramesGetErrorRepliesAndTheWorkerKeepsServing) {
  auto worker = StartWorker();
  auto client = MakeClient();
  const int w = Connect(*client, *worker);
  KvData data({{1, 20}}, 61);
  FillWorker(*client, w, data, {{1, {0, 20}}});
  std::mt19937_64 rng(4);
  std::vector<float> q = RandomFloats(kQHeads * kHeadDim, rng);
  auto good = client->Attend(w, 0, std::vector<uint64_t>{1}, kQHeads, q.data());
  ASSERT_TRUE(good.ok()) << good.status();

  // A valid Attend frame for sequence 1, layer 0; each case breaks one thing.
  auto valid = [&](int n) {
    FrameHeader header;
    header.type = static_cast<uint16_t>(FrameType::kAttend);
    header.request_id = 4242;
    header.dtype = static_cast<uint8_t>(DType::kBFloat16);
    header.shape[0] = n;
    header.shape[1] = kQHeads;
    header.shape[2] = kHeadDim;
    header.payload_bytes = 16 * n + n * q.size() * 4;
    std::vector<uint8_t> frame(kFrameHeaderBytes + header.payload_bytes);
    EncodeFrameHeader(header, frame.data());
    uint8_t* p = frame.data() + kFrameHeaderBytes;
    for (int i = 0; i < n; ++i) {
      const uint64_t id = 1;
      std::memcpy(p + 16 * i, &id, 8);
      std::memset(p + 16 * i + 8, 0, 8);
    }
    for (int i = 0; i < n; ++i) std::memcpy(p + 16 * n + i * q.size() * 4, q.data(), q.size() * 4);
    return frame;
  };
  auto set = [](std::vector<uint8_t>& frame, size_t offset, auto value) {
    std::memcpy(frame.data() + offset, &value, sizeof(value));
  };
  struct Case {
    const char* name;
    std::function<void(std::vector<uint8_t>&)> breaks;
    absl::StatusCode code;
  };
  const std::vector<Case> cases = {
      {"truncated header", [](auto& f) { f.resize(20); }, absl::StatusCode::kInvalidArgument},
      {"empty", [](auto& f) { f.clear(); }, absl::StatusCode::kInvalidArgument},
      {"wrong magic", [&](auto& f) { set(f, 0, uint32_t{0xdeadbeef}); },
       absl::StatusCode::kInvalidArgument},
      {"wrong version", [&](auto& f) { set(f, 4, uint16_t{2}); },
       absl::StatusCode::kInvalidArgument},
      {"unknown type", [&](auto& f) { set(f, 6, uint16_t{77}); },
       absl::StatusCode::kInvalidArgument},
      {"a reply sent as a request", [&](auto& f) { set(f, 6, uint16_t{4 | kReplyBit}); },
       absl::StatusCode::kInvalidArgument},
      {"reserved bytes set", [](auto& f) { f[60] = 1; }, absl::StatusCode::kInvalidArgument},
      {"length says more", [&](auto& f) { set(f, 44, uint64_t{f.size() - 64 + 16}); },
       absl::StatusCode::kInvalidArgument},
      {"payload truncated", [](auto& f) { f.resize(f.size() - 100); },
       absl::StatusCode::kInvalidArgument},
      {"shape says two sequences", [&](auto& f) { set(f, 28, int32_t{2}); },
       absl::StatusCode::kInvalidArgument},
      {"unknown sequence", [&](auto& f) { set(f, 64, uint64_t{999}); },
       absl::StatusCode::kNotFound},
      {"layer out of range", [&](auto& f) { set(f, 20, int32_t{kLayers}); },
       absl::StatusCode::kInvalidArgument},
      {"negative layer", [&](auto& f) { set(f, 20, int32_t{-1}); },
       absl::StatusCode::kInvalidArgument},
      {"wrong dtype", [](auto& f) { f[24] = static_cast<uint8_t>(DType::kFloat32); },
       absl::StatusCode::kInvalidArgument},
      {"oversized batch", [&](auto& f) { set(f, 28, int32_t{1 << 30}); },
       absl::StatusCode::kInvalidArgument},
      {"oversized heads", [&](auto& f) { set(f, 32, int32_t{1 << 30}); },
       absl::StatusCode::kInvalidArgument},
      {"wrong head dim", [&](auto& f) { set(f, 36, int32_t{64}); },
       absl::StatusCode::kInvalidArgument},
      {"unknown flags", [](auto& f) { f[25] = 0x80; }, absl::StatusCode::kInvalidArgument},
  };
  for (const Case& c : cases) {
    std::vector<uint8_t> frame = valid(1);
    c.breaks(frame);
    auto reply = client->CallRaw(w, transport::Buffer::CopyOf(frame.data(), frame.size()));
    ASSERT_TRUE(reply.ok()) << c.name << ": " << reply.status();
    auto header = DecodeFrameHeader(reply->data(), reply->size());
    ASSERT_TRUE(header.ok()) << c.name << ": " << header.status();
    EXPECT_TRUE(header->is_reply()) << c.name;
    absl::Status status = ReplyStatus(*header, reply->data() + kFrameHeaderBytes);
    EXPECT_EQ(status.code(), c.code) << c.name << ": " << status;
    if (frame.size() >= 16) {
      EXPECT_EQ(header->request_id, 4242u) << c.name;
    }
    // The worker keeps serving, with unchanged results.
    auto after = client->Attend(w, 0, std::vector<uint64_t>{1}, kQHeads, q.data());
    ASSERT_TRUE(after.ok()) << c.name << ": " << after.status();
    EXPECT_TRUE(BitEqual(after->o, good->o)) << c.name;
  }
  // Duplicate sequences in one table.
  std::vector<uint8_t> twice = valid(2);
  auto reply = client->CallRaw(w, transport::Buffer::CopyOf(twice.data(), twice.size()));
  ASSERT_TRUE(reply.ok());
  auto header = DecodeFrameHeader(reply->data(), reply->size());
  ASSERT_TRUE(header.ok());
  EXPECT_EQ(ReplyStatus(*header, reply->data() + kFrameHeaderBytes).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_P(OffloadTest, KvFullIsResourceExhaustedAndFreeingIsExact) {
  // One block is 2 * layers * kv heads * block size * head dim * 2 bytes = 16 KiB: room for 4.
  const int64_t block_bytes = int64_t{2} * kLayers * kKvHeads * kBlockSize * kHeadDim * 2;
  auto worker = StartWorker({"--capacity-bytes=" + std::to_string(4 * block_bytes)});
  auto client = MakeClient();
  const int w = Connect(*client, *worker);
  KvData data({{1, 48}, {2, 17}}, 71);
  FillWorker(*client, w, data, {{1, {0, 48}}, {2, {0, 16}}});  // 3 + 1 blocks: full
  std::vector<uint16_t> row(kRow, 0);
  absl::Status full =
      client->AppendKv(w, 0, std::vector<SequenceEntry>{{2, 16}}, row.data(), row.data());
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  std::mt19937_64 rng(1);
  std::vector<float> q = RandomFloats(8 * kQHeads * kHeadDim, rng);
  std::vector<uint16_t> rows(8 * kRow, 0);
  auto prefill = client->Prefill(w, 0, 2, 16, 8, kQHeads, q.data(), rows.data(), rows.data());
  EXPECT_EQ(prefill.status().code(), absl::StatusCode::kResourceExhausted) << prefill.status();
  // Nothing changed: sequence 2 still attends over 16 positions.
  auto states = client->Attend(w, 0, std::vector<uint64_t>{2}, kQHeads, q.data());
  ASSERT_TRUE(states.ok()) << states.status();
  PartialStates local = InProcessAttend(data, {{2, {0, 16}}}, 0, {2}, q.data());
  EXPECT_TRUE(BitEqual(states->o, local.o));
  auto freed = client->FreeSequences(w, std::vector<uint64_t>{1});
  ASSERT_TRUE(freed.ok());
  EXPECT_EQ(*freed, 3);
  EXPECT_TRUE(client->AppendKv(w, 0, std::vector<SequenceEntry>{{2, 16}}, row.data(),
                               row.data()).ok());
  auto again = client->FreeSequences(w, std::vector<uint64_t>{2});
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 2);
  auto unknown = client->FreeSequences(w, std::vector<uint64_t>{2});
  EXPECT_EQ(unknown.status().code(), absl::StatusCode::kNotFound);
}

INSTANTIATE_TEST_SUITE_P(Loopback, OffloadTest,
                         ::testing::Values(TransportCase{"tcp", "tcp", "tcp/lo"},
                                           TransportCase{"shm", "sm,tcp", "memory"}),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
}  // namespace ferry::offload
