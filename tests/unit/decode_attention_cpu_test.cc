// CPU decode attention against the float64 reference: dtypes, head dims, GQA, ragged batches,
// random KV partitions merged with the partial-state algebra, determinism and bad input.
#include <algorithm>
#include <cstring>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "attention_reference.h"
#include "decode_problem.h"
#include "ferry/kernels/cpu_attention.h"
#include "gtest/gtest.h"

namespace ferry::kernels {
namespace {

using reference::DecodeProblem;
using reference::DecodeProblemShape;
using reference::MakeRandomDecodeProblem;
using reference::RelativeError;

// float32 accumulation against float64 on the same (already rounded) KV values: rounding of
// float32 sums over up to 1e5 positions stays far below 1e-5. bf16 KV gets the 1e-2
// bound, though the inputs are identical, because a bf16 `out` is compared too.
double Tolerance(DType dtype) { return dtype == DType::kFloat32 ? 1e-5 : 1e-2; }

std::vector<double> Widen(const std::vector<float>& values) {
  return std::vector<double>(values.begin(), values.end());
}

std::vector<double> OutAsDouble(const DecodeProblem& problem) {
  std::vector<double> values(problem.state_o.size());
  for (size_t i = 0; i < values.size(); ++i) {
    values[i] = reference::LoadAsDouble(problem.out.data(), problem.shape.dtype, i);
  }
  return values;
}

void ExpectMatchesReference(DecodeProblem& problem, ThreadPool& pool,
                            const CpuDecodeOptions& options = {}) {
  problem.Poison();
  ASSERT_TRUE(DecodeAttentionCpu(problem.Args(), pool, options).ok());
  const reference::ReferenceStates expected = reference::DecodeAttentionReference(problem.Args());
  const double tolerance = Tolerance(problem.shape.dtype);
  EXPECT_LT(RelativeError(Widen(problem.state_o), expected.o), tolerance);
  // Compare lse where finite; empty ranges must give exactly -inf.
  for (size_t i = 0; i < expected.lse.size(); ++i) {
    if (std::isinf(expected.lse[i])) {
      EXPECT_EQ(problem.state_lse[i], -INFINITY) << "state " << i;
    } else {
      EXPECT_NEAR(problem.state_lse[i], expected.lse[i], 1e-5 * (1 + std::fabs(expected.lse[i])))
          << "state " << i;
    }
  }
  // The rounded output: a bf16 rounding is ~4e-3 relative.
  EXPECT_LT(RelativeError(OutAsDouble(problem), expected.o),
            problem.shape.dtype == DType::kFloat32 ? 1e-5 : 1e-2);
}

// Every instruction set this CPU runs: each has its own compiled copy of the inner loop.
// (std::string, not const char*: gtest prints a string parameter, not a pointer, in test names.)
const std::vector<std::string> kIsas = {"avx512", "avx2", "baseline"};

// Selects the parameter's instruction set for the test (skipped where this CPU lacks it).
class IsaScope {
 public:
  explicit IsaScope(const std::string& isa) : supported_(SetCpuKernelIsa(isa)) {}
  ~IsaScope() { SetCpuKernelIsa("best"); }
  bool supported() const { return supported_; }

 private:
  bool supported_;
};

class DecodeAttentionCpuTest
    : public ::testing::TestWithParam<std::tuple<DType, int, std::string>> {};

TEST_P(DecodeAttentionCpuTest, RaggedGqaBatchMatchesReference) {
  const auto [dtype, head_dim, isa] = GetParam();
  IsaScope scope(isa);
  if (!scope.supported()) GTEST_SKIP() << isa << " is not supported on this CPU";
  ThreadPool pool(3);
  DecodeProblemShape shape;
  shape.seq_lens = {1, 63, 64, 65, 700, 2049, 0};
  shape.num_q_heads = 8;
  shape.num_kv_heads = 2;
  shape.head_dim = head_dim;
  shape.block_size = 32;
  shape.dtype = dtype;
  DecodeProblem problem = MakeRandomDecodeProblem(shape, std::random_device{}());
  ExpectMatchesReference(problem, pool, {.num_workers = 5, .kv_tile_size = 128});
}

INSTANTIATE_TEST_SUITE_P(DtypesHeadDimsAndIsas, DecodeAttentionCpuTest,
                         ::testing::Combine(::testing::Values(DType::kFloat32, DType::kFloat16,
                                                              DType::kBFloat16),
                                            ::testing::Values(64, 128, 256),
                                            ::testing::ValuesIn(kIsas)));

// The inner loop processes a GQA group in passes of 4, 2 and 1 heads: every group size from 1 to
// 8 and 16 (each mix of passes), each dtype, odd block sizes (chunks cross block edges at odd
// places) and lengths around the chunk of 64 and the score steps.
class DecodeAttentionCpuGroupTest
    : public ::testing::TestWithParam<std::tuple<int, DType, std::string>> {};

TEST_P(DecodeAttentionCpuGroupTest, GroupSizeMatchesReference) {
  const auto [group, dtype, isa] = GetParam();
  IsaScope scope(isa);
  if (!scope.supported()) GTEST_SKIP() << isa << " is not supported on this CPU";
  ThreadPool pool(2);
  std::mt19937 rng(std::random_device{}());
  for (int head_dim : {64, 128, 256}) {
    DecodeProblemShape shape;
    shape.seq_lens = {1, 2, 7, 63, 64, 65, 129, 200, 0, 777};
    shape.num_kv_heads = 2;
    shape.num_q_heads = 2 * group;
    shape.head_dim = head_dim;
    shape.block_size = head_dim == 128 ? 7 : 16;
    shape.dtype = dtype;
    DecodeProblem problem = MakeRandomDecodeProblem(shape, rng());
    SCOPED_TRACE(testing::Message() << "head_dim " << head_dim);
    ExpectMatchesReference(problem, pool, {.num_workers = 3, .kv_tile_size = 96});
  }
}

INSTANTIATE_TEST_SUITE_P(GroupsDtypesAndIsas, DecodeAttentionCpuGroupTest,
                         ::testing::Combine(::testing::Values(1, 2, 3, 4, 5, 6, 7, 8, 16),
                                            ::testing::Values(DType::kFloat32, DType::kFloat16,
                                                              DType::kBFloat16),
                                            ::testing::ValuesIn(kIsas)));

// Extreme scores: one position far above the rest (the others' weights underflow to 0) and
// large negative offsets, in every instruction set; and fp16 KV with subnormal, tiny and
// large-magnitude values (the baseline set converts fp16 by hand).
TEST(DecodeAttentionCpuValuesTest, ExtremeScoresAndFp16Values) {
  for (const std::string& isa : kIsas) {
    IsaScope scope(isa);
    if (!scope.supported()) continue;
    SCOPED_TRACE(isa);
    ThreadPool pool(2);
    for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16}) {
      DecodeProblemShape shape;
      shape.seq_lens = {300, 5};
      shape.num_q_heads = 4;
      shape.num_kv_heads = 1;
      shape.head_dim = 64;
      shape.block_size = 16;
      shape.dtype = dtype;
      DecodeProblem problem = MakeRandomDecodeProblem(shape, 11);
      // Scale scores up: softmax close to one-hot, most weights below exp(-87).
      problem.softmax_scale = 8.0f;
      ExpectMatchesReference(problem, pool, {.num_workers = 2, .kv_tile_size = 64});
      if (dtype != DType::kFloat16) continue;
      // V values across fp16's range: subnormals, the smallest normal, near the maximum.
      const uint16_t specials[] = {0x0001, 0x03ff, 0x0400, 0x8001, 0x7bff, 0xfbff, 0x3c00,
                                   0x0000, 0x8000, 0x1234, 0x83ff, 0x5555};
      uint16_t* v = reinterpret_cast<uint16_t*>(problem.v_pool.data());
      for (size_t i = 0; i < problem.v_pool.size() / 2; ++i) v[i] = specials[i % 12];
      problem.softmax_scale = 0.125f;
      ExpectMatchesReference(problem, pool, {.num_workers = 2, .kv_tile_size = 64});
    }
  }
}

TEST(DecodeAttentionCpuRaggedTest, LengthsFromOneToOneHundredThousand) {
  ThreadPool pool(2);
  DecodeProblemShape shape;
  shape.seq_lens = {100000, 1, 5, 3333, 17, 40000};
  shape.num_q_heads = 2;
  shape.num_kv_heads = 1;
  shape.head_dim = 64;
  shape.block_size = 16;
  shape.dtype = DType::kBFloat16;
  DecodeProblem problem = MakeRandomDecodeProblem(shape, std::random_device{}());
  ExpectMatchesReference(problem, pool, {.num_workers = 7, .kv_tile_size = 256});
}

TEST(DecodeAttentionCpuRaggedTest, BlockSizesAndWorkerCounts) {
  ThreadPool pool(2);
  std::mt19937 rng(std::random_device{}());
  for (int block_size : {1, 16, 64, 256}) {
    for (int workers : {1, 2, 13, 200}) {
      DecodeProblemShape shape;
      shape.seq_lens = {static_cast<int32_t>(rng() % 900 + 1), 1,
                        static_cast<int32_t>(rng() % 300)};
      shape.num_q_heads = 4;
      shape.num_kv_heads = 4;
      shape.head_dim = 64;
      shape.block_size = block_size;
      shape.dtype = DType::kFloat32;
      DecodeProblem problem = MakeRandomDecodeProblem(shape, rng());
      SCOPED_TRACE(testing::Message() << "block " << block_size << ", workers " << workers);
      ExpectMatchesReference(problem, pool, {.num_workers = workers, .kv_tile_size = 64});
    }
  }
}

// A worker attends over its shard only. Cutting each sequence's KV into 1..64 random ranges
// (empty ones included), attending per range and merging must give whole attention.
TEST(DecodeAttentionCpuPartitionTest, RandomPartitionsMergeToWholeAttention) {
  ThreadPool pool(2);
  std::mt19937 rng(std::random_device{}());
  for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
    DecodeProblemShape shape;
    shape.seq_lens = {1, 130, 1000, 4097};
    shape.num_q_heads = 4;
    shape.num_kv_heads = 2;
    shape.head_dim = 128;
    shape.block_size = 64;
    shape.dtype = dtype;
    DecodeProblem problem = MakeRandomDecodeProblem(shape, rng());
    const reference::ReferenceStates whole = reference::DecodeAttentionReference(problem.Args());
    const int num_seqs = problem.num_seqs();
    const int64_t num_states = int64_t{num_seqs} * shape.num_q_heads;
    for (int num_parts : {1, 2, 7, 64}) {
      // Random cut points per sequence (duplicates allowed: empty parts).
      std::vector<std::vector<int32_t>> cuts(num_seqs);
      for (int s = 0; s < num_seqs; ++s) {
        cuts[s].push_back(0);
        for (int p = 1; p < num_parts; ++p) cuts[s].push_back(rng() % (shape.seq_lens[s] + 1));
        cuts[s].push_back(shape.seq_lens[s]);
        std::sort(cuts[s].begin(), cuts[s].end());
      }
      std::vector<float> parts_o(num_parts * problem.state_o.size());
      std::vector<float> parts_lse(num_parts * num_states);
      problem.kv_begin.resize(num_seqs);
      problem.kv_end.resize(num_seqs);
      for (int p = 0; p < num_parts; ++p) {
        for (int s = 0; s < num_seqs; ++s) {
          problem.kv_begin[s] = cuts[s][p];
          problem.kv_end[s] = cuts[s][p + 1];
        }
        problem.Poison();
        ASSERT_TRUE(DecodeAttentionCpu(problem.Args(), pool, {.num_workers = 3, .kv_tile_size = 100}).ok());
        std::copy(problem.state_o.begin(), problem.state_o.end(),
                  parts_o.begin() + p * problem.state_o.size());
        std::copy(problem.state_lse.begin(), problem.state_lse.end(),
                  parts_lse.begin() + p * num_states);
      }
      std::vector<float> merged_o(problem.state_o.size(), NAN), merged_lse(num_states, NAN);
      ASSERT_TRUE(MergeStatesCpu(parts_o.data(), parts_lse.data(), num_parts, num_states,
                                 shape.head_dim, merged_o.data(), merged_lse.data(), &pool)
                      .ok());
      SCOPED_TRACE(testing::Message() << DTypeName(dtype) << ", " << num_parts << " parts");
      EXPECT_LT(RelativeError(Widen(merged_o), whole.o), Tolerance(dtype));
      EXPECT_LT(RelativeError(Widen(merged_lse), whole.lse), 1e-6);
      problem.kv_begin.clear();
      problem.kv_end.clear();
    }
  }
}

TEST(DecodeAttentionCpuDeterminismTest, BitIdenticalRunToRunForAThreadCount) {
  ThreadPool pool(4);
  DecodeProblemShape shape;
  shape.seq_lens = {5000, 3, 12000};
  shape.num_q_heads = 16;
  shape.num_kv_heads = 4;
  DecodeProblem problem = MakeRandomDecodeProblem(shape, std::random_device{}());
  ASSERT_TRUE(DecodeAttentionCpu(problem.Args(), pool).ok());
  const std::vector<float> first_o = problem.state_o, first_lse = problem.state_lse;
  for (int run = 0; run < 5; ++run) {
    problem.Poison();
    ASSERT_TRUE(DecodeAttentionCpu(problem.Args(), pool).ok());
    ASSERT_EQ(0, std::memcmp(first_o.data(), problem.state_o.data(), first_o.size() * 4));
    ASSERT_EQ(0, std::memcmp(first_lse.data(), problem.state_lse.data(), first_lse.size() * 4));
  }
}

TEST(DecodeAttentionCpuBadInputTest, ErrorsNameTheField) {
  ThreadPool pool(1);
  DecodeProblemShape shape;
  shape.seq_lens = {10, 70};
  shape.num_q_heads = 4;
  shape.num_kv_heads = 2;
  shape.head_dim = 64;
  shape.block_size = 16;
  DecodeProblem problem = MakeRandomDecodeProblem(shape, 7);
  auto expect_error = [&](DecodeAttentionArgs args, const std::string& field) {
    problem.Poison();
    const absl::Status status = DecodeAttentionCpu(args, pool);
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << field;
    EXPECT_NE(status.message().find(field), std::string::npos) << status;
    EXPECT_TRUE(std::isnan(problem.state_lse[0])) << "nothing written on error";
  };
  DecodeAttentionArgs args = problem.Args();
  args.num_q_heads = 3;
  expect_error(args, "num_q_heads");
  args = problem.Args();
  args.kv.head_dim = 96;
  expect_error(args, "head_dim");
  args = problem.Args();
  std::vector<int32_t> bad_table = problem.block_table;
  bad_table.back() = problem.num_blocks;  // one past the pool
  args.block_table = bad_table.data();
  expect_error(args, "block_table[");
  args = problem.Args();
  std::vector<int32_t> begin = {0, 0}, end = {10, 71};  // past the second sequence's end
  args.kv_begin = begin.data();
  args.kv_end = end.data();
  expect_error(args, "kv range of sequence 1");
  args = problem.Args();
  std::vector<int32_t> long_lens = {10, 1000};
  args.seq_lens = long_lens.data();
  expect_error(args, "seq_lens[1]");
  args = problem.Args();
  args.kv.block_size = 0;
  expect_error(args, "block_size");
}

}  // namespace
}  // namespace ferry::kernels
