// LeanDecode and MergeStates on a CUDA device against the float64 reference and the CPU twins.
// Skips (SetUp) when no device is present.
//
// Tolerances (relative 2-norm error of state_o against float64; lse absolute):
//  * groups <= 8 run q and the softmax weights through the tensor cores as hi + lo 16-bit
//    pairs (about 16 mantissa bits), K and V are exact in their dtype and accumulation is
//    float32: the error is float32-like, ~1e-5. Bound 2e-4.
//  * groups 9..16 round q and the weights to the KV dtype once (bf16: 8 bits, unit roundoff
//    2^-9 = 2e-3; fp16: 11 bits, 2^-12 = 2.4e-4). Score errors of |s| * u move each weight by
//    about that relative amount, averaged over many positions: bound 1e-2 (bf16), 2e-3 (fp16).
//  * `out` is state_o rounded to the KV dtype: bound 1e-2 (bf16), 2e-3 (fp16) relative.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention_reference.h"
#include "cuda_device.h"
#include "decode_problem.h"
#include "device_buffer.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/kernels/lean_attention.h"
#include "ferry/kernels/thread_pool.h"
#include "gtest/gtest.h"

namespace ferry::kernels {
namespace {

using reference::DecodeProblem;
using reference::DecodeProblemShape;
using reference::MakeRandomDecodeProblem;

// A DecodeProblem mirrored on the device, plus the workspace.
struct DeviceProblem {
  DeviceBuffer k, v, indptr, table, lens, begin, end, q, state_o, state_lse, out, workspace;
  DecodeAttentionArgs args;

  // Uploads inputs and the (poisoned) outputs. Returns false when the shape is not served.
  bool Upload(DecodeProblem& p, int extra_seqs = 0) {
    k.Upload(p.k_pool);
    v.Upload(p.v_pool);
    indptr.Upload(p.block_table_indptr);
    table.Upload(p.block_table.empty() ? std::vector<int32_t>{0} : p.block_table);
    lens.Upload(p.shape.seq_lens);
    begin.Upload(p.kv_begin);
    end.Upload(p.kv_end);
    q.Upload(p.q);
    state_o.Upload(p.state_o);
    state_lse.Upload(p.state_lse);
    out.Upload(p.out);
    args = p.Args();
    args.kv.k_pool = k.get();
    args.kv.v_pool = v.get();
    args.block_table_indptr = indptr.get<int32_t>();
    args.block_table = table.get<int32_t>();
    args.seq_lens = lens.get<int32_t>();
    args.kv_begin = p.kv_begin.empty() ? nullptr : begin.get<int32_t>();
    args.kv_end = p.kv_end.empty() ? nullptr : end.get<int32_t>();
    args.q = q.get<float>();
    args.state_o = state_o.get<float>();
    args.state_lse = state_lse.get<float>();
    args.out = out.get();
    cudaError_t error = cudaSuccess;
    const size_t bytes = LeanDecodeWorkspaceSize(p.num_seqs() + extra_seqs, p.shape.num_q_heads,
                                                 p.shape.num_kv_heads, p.shape.head_dim,
                                                 p.shape.dtype, 0, &error);
    if (error != cudaSuccess) return false;
    workspace.Resize(bytes);
    cudaMemset(workspace.get(), 0, bytes);
    return true;
  }
  cudaError_t Run(cudaStream_t stream = 0) {
    return LeanDecode(args, workspace.get(), workspace.bytes(), stream);
  }
  void Download(DecodeProblem& p) const {
    state_o.Download(p.state_o);
    state_lse.Download(p.state_lse);
    out.Download(p.out);
  }
  int32_t ErrorWord() const {
    int32_t word = -1;
    cudaMemcpy(&word, workspace.get(), sizeof(word), cudaMemcpyDeviceToHost);
    return word;
  }
};

double OTolerance(const DecodeProblemShape& shape) {
  if (shape.num_q_heads / shape.num_kv_heads <= 8) return 2e-4;
  return shape.dtype == DType::kBFloat16 ? 1e-2 : 2e-3;
}

std::string Describe(const DecodeProblemShape& s) {
  std::string lens;
  for (size_t i = 0; i < s.seq_lens.size() && i < 8; ++i) lens += std::to_string(s.seq_lens[i]) + ",";
  return "d=" + std::to_string(s.head_dim) + " " + std::string(DTypeName(s.dtype)) +
         " hq=" + std::to_string(s.num_q_heads) + " hkv=" + std::to_string(s.num_kv_heads) +
         " bs=" + std::to_string(s.block_size) + " lens=" + lens;
}

// Compares a kernel's downloaded outputs with the float64 reference of the same args.
void ExpectMatchesReference(DecodeProblem& p, const reference::ReferenceStates& ref) {
  const DecodeProblemShape& shape = p.shape;
  const int d = shape.head_dim;
  std::vector<double> o(p.state_o.begin(), p.state_o.end());
  std::vector<double> out(p.state_o.size());
  int64_t nan_count = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    nan_count += std::isnan(o[i]);
    const uint16_t bits = reinterpret_cast<const uint16_t*>(p.out.data())[i];
    out[i] = reference::LoadAsDouble(&bits, shape.dtype, 0);
    nan_count += std::isnan(out[i]);
  }
  EXPECT_EQ(nan_count, 0) << Describe(shape);
  const double o_err = reference::RelativeError(o, ref.o);
  const double out_err = reference::RelativeError(out, ref.o);
  EXPECT_LT(o_err, OTolerance(shape)) << Describe(shape);
  EXPECT_LT(out_err, shape.dtype == DType::kBFloat16 ? 1e-2 : 2e-3) << Describe(shape);
  double lse_err = 0.0;
  for (size_t i = 0; i < ref.lse.size(); ++i) {
    if (std::isnan(p.state_lse[i])) {
      ADD_FAILURE() << "lse NaN at row " << i << " " << Describe(shape);
      break;
    }
    if (std::isinf(ref.lse[i])) {
      // Empty range: the identity, exactly.
      EXPECT_TRUE(std::isinf(p.state_lse[i]) && p.state_lse[i] < 0) << "row " << i;
      for (int c = 0; c < d; ++c) EXPECT_EQ(p.state_o[i * d + c], 0.0f) << "row " << i;
      continue;
    }
    lse_err = std::max(lse_err, std::abs(double{p.state_lse[i]} - ref.lse[i]));
  }
  EXPECT_LT(lse_err, shape.num_q_heads / shape.num_kv_heads <= 8 ? 1e-3 : 2e-2)
      << Describe(shape);
  std::printf("  %-60s o err %.2e  out err %.2e  lse err %.2e\n", Describe(shape).c_str(), o_err,
              out_err, lse_err);
}

class LeanDecodeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    FERRY_SKIP_WITHOUT_CUDA_DEVICE();
  }

  // Random problem -> device -> LeanDecode -> compare with float64. Returns the problem.
  void CheckShape(const DecodeProblemShape& shape, uint64_t seed,
                  const std::vector<std::pair<int32_t, int32_t>>& ranges = {}) {
    DecodeProblem p = MakeRandomDecodeProblem(shape, seed);
    if (!ranges.empty()) {
      for (const auto& [b, e] : ranges) {
        p.kv_begin.push_back(b);
        p.kv_end.push_back(e);
      }
    }
    bool served = false;
    CheckProblem(p, &served);
    if (!served) GTEST_SKIP() << "shape not served by this build: " << Describe(shape);
  }

  // Poisons the outputs, runs LeanDecode on the device and compares with float64. *served is
  // false (and nothing is checked) when this build does not serve the shape.
  void CheckProblem(DecodeProblem& p, bool* served) {
    p.Poison();
    DeviceProblem dev;
    *served = dev.Upload(p);
    if (!*served) return;
    CUDA_ASSERT(dev.Run());
    CUDA_ASSERT(cudaDeviceSynchronize());
    dev.Download(p);
    EXPECT_EQ(dev.ErrorWord(), 0);
    ExpectMatchesReference(p, reference::DecodeAttentionReference(p.Args()));
  }
};

TEST_F(LeanDecodeTest, EveryHeadDimAndDtype) {
  uint64_t seed = 1;
  for (int d : {64, 128, 256}) {
    for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
      for (auto [hq, hkv] : {std::pair{8, 2}, std::pair{16, 1}}) {
        DecodeProblemShape shape;
        shape.seq_lens = {1, 37, 300, 1000, 64, 129, 2049};
        shape.num_q_heads = hq;
        shape.num_kv_heads = hkv;
        shape.head_dim = d;
        shape.block_size = 64;
        shape.dtype = dtype;
        CheckShape(shape, seed++);
      }
    }
  }
}

TEST_F(LeanDecodeTest, BlockSizesAndRaggedLengths) {
  uint64_t seed = 100;
  for (int block_size : {16, 64, 256, 48, 1}) {
    DecodeProblemShape shape;
    shape.seq_lens = {1, 15, 17, 255, 257, 1, 4000, 63, 65, 777};
    shape.num_q_heads = 32;
    shape.num_kv_heads = 8;
    shape.block_size = block_size;
    CheckShape(shape, seed++);
  }
}

// Every pool row outside the sequences (the tails of their last pages, unused blocks) is NaN:
// kernels that copy whole pages or boxes must keep those rows out of the result.
TEST_F(LeanDecodeTest, PoolRowsPastTheEndAreNeverUsed) {
  uint64_t seed = 150;
  int checked = 0;
  for (int block_size : {16, 64, 48}) {
    for (int head_dim : {64, 128, 256}) {
      DecodeProblemShape shape;
      shape.seq_lens = {1, 17, 300, 129, 1000};
      shape.num_q_heads = 8;
      shape.num_kv_heads = 2;
      shape.head_dim = head_dim;
      shape.block_size = block_size;
      DecodeProblem p = MakeRandomDecodeProblem(shape, seed++);
      const int64_t row_bytes = int64_t{head_dim} * 2;
      std::vector<bool> used(size_t(p.num_blocks) * block_size, false);  // (block, offset)
      for (int s = 0; s < p.num_seqs(); ++s) {
        for (int pos = 0; pos < shape.seq_lens[s]; ++pos) {
          const int block = p.block_table[p.block_table_indptr[s] + pos / block_size];
          used[size_t(block) * block_size + pos % block_size] = true;
        }
      }
      const uint16_t nan_bits = 0x7fc0;  // a bf16 NaN; as fp16 bits it is a NaN too
      for (int block = 0; block < p.num_blocks; ++block) {
        for (int h = 0; h < shape.num_kv_heads; ++h) {
          for (int r = 0; r < block_size; ++r) {
            if (used[size_t(block) * block_size + r]) continue;
            const int64_t row = (int64_t{block} * shape.num_kv_heads + h) * block_size + r;
            for (int e = 0; e < head_dim; ++e) {
              std::memcpy(&p.k_pool[row * row_bytes + 2 * e], &nan_bits, 2);
              std::memcpy(&p.v_pool[row * row_bytes + 2 * e], &nan_bits, 2);
            }
          }
        }
      }
      bool served = false;
      CheckProblem(p, &served);  // head dims this build lacks are not served: nothing to check
      checked += served ? 1 : 0;
    }
  }
  if (checked == 0) GTEST_SKIP() << "no head dim of this test is served by this build";
}

TEST_F(LeanDecodeTest, GroupSizes) {
  uint64_t seed = 200;
  for (auto [hq, hkv] : {std::pair{4, 4}, std::pair{6, 3}, std::pair{10, 2}, std::pair{7, 1},
                         std::pair{24, 2}, std::pair{32, 2}}) {
    DecodeProblemShape shape;
    shape.seq_lens = {3000, 5, 129};
    shape.num_q_heads = hq;
    shape.num_kv_heads = hkv;
    shape.dtype = DType::kFloat16;
    CheckShape(shape, seed++);
  }
}

TEST_F(LeanDecodeTest, KvRangesIncludingEmpty) {
  DecodeProblemShape shape;
  shape.seq_lens = {1000, 1000, 500, 64, 1, 3000, 0};
  shape.num_q_heads = 16;
  shape.num_kv_heads = 4;
  shape.block_size = 16;
  CheckShape(shape, 300,
             {{0, 1000}, {10, 10}, {100, 357}, {63, 64}, {0, 0}, {1500, 2999}, {0, 0}});
  // Every range empty: identity everywhere, no tiles at all.
  CheckShape(shape, 301, {{5, 5}, {0, 0}, {0, 0}, {1, 1}, {1, 1}, {7, 7}, {0, 0}});
}

TEST_F(LeanDecodeTest, ManySequencesMoreThanThreadsAndBlocks) {
  DecodeProblemShape shape;
  std::mt19937 rng(7);
  for (int i = 0; i < 700; ++i) shape.seq_lens.push_back(1 + rng() % 300);
  shape.num_q_heads = 8;
  shape.num_kv_heads = 2;
  shape.block_size = 16;
  CheckShape(shape, 400);
  // Every third sequence empty, the others several tiles long: a block's range runs from the
  // last head of one sequence across empty ones into the next (the q of the head after an
  // empty sequence is not the one prefetched).
  shape.seq_lens.clear();
  for (int i = 0; i < 700; ++i) shape.seq_lens.push_back(i % 3 == 1 ? 0 : 64 + rng() % 900);
  CheckShape(shape, 401);
}

TEST_F(LeanDecodeTest, LongContext512k) {
  DecodeProblemShape shape;
  shape.seq_lens = {524288};
  shape.num_q_heads = 8;
  shape.num_kv_heads = 1;
  shape.head_dim = 128;
  shape.block_size = 64;
  shape.spare_blocks = 0;
  CheckShape(shape, 500);
}

TEST_F(LeanDecodeTest, LongContextAgainstCpuKernel) {
  // A larger head count than the float64 reference can afford: the CPU kernel (itself tested
  // against float64) is the reference here.
  DecodeProblemShape shape;
  shape.seq_lens = {200000, 3};
  shape.num_q_heads = 32;
  shape.num_kv_heads = 8;
  shape.block_size = 256;
  shape.spare_blocks = 0;
  DecodeProblem p = MakeRandomDecodeProblem(shape, 600);
  DeviceProblem dev;
  ASSERT_TRUE(dev.Upload(p));
  CUDA_ASSERT(dev.Run());
  CUDA_ASSERT(cudaDeviceSynchronize());
  dev.Download(p);
  std::vector<float> gpu_o = p.state_o, gpu_lse = p.state_lse;
  ThreadPool pool(8);
  ASSERT_TRUE(DecodeAttentionCpu(p.Args(), pool).ok());
  std::vector<double> a(gpu_o.begin(), gpu_o.end()), b(p.state_o.begin(), p.state_o.end());
  const double err = reference::RelativeError(a, b);
  EXPECT_LT(err, 2e-4);
  double lse_err = 0;
  for (size_t i = 0; i < gpu_lse.size(); ++i) {
    EXPECT_FALSE(std::isnan(gpu_lse[i])) << i;
    lse_err = std::max(lse_err, double(std::abs(gpu_lse[i] - p.state_lse[i])));
  }
  EXPECT_LT(lse_err, 1e-3);
  std::printf("  vs CPU kernel: o err %.2e lse err %.2e\n", err, lse_err);
}

TEST_F(LeanDecodeTest, DeterministicRunToRun) {
  DecodeProblemShape shape;
  shape.seq_lens = {70000, 1, 333, 20000};
  shape.num_q_heads = 32;
  shape.num_kv_heads = 8;
  DecodeProblem p = MakeRandomDecodeProblem(shape, 700);
  DeviceProblem dev;
  ASSERT_TRUE(dev.Upload(p));
  CUDA_ASSERT(dev.Run());
  CUDA_ASSERT(cudaDeviceSynchronize());
  dev.Download(p);
  const std::vector<float> first_o = p.state_o, first_lse = p.state_lse;
  for (int run = 0; run < 3; ++run) {
    CUDA_ASSERT(cudaMemset(dev.state_o.get(), 0xff, dev.state_o.bytes()));
    CUDA_ASSERT(dev.Run());
    CUDA_ASSERT(cudaDeviceSynchronize());
    dev.Download(p);
    EXPECT_EQ(std::memcmp(first_o.data(), p.state_o.data(), first_o.size() * 4), 0);
    EXPECT_EQ(std::memcmp(first_lse.data(), p.state_lse.data(), first_lse.size() * 4), 0);
  }
}

TEST_F(LeanDecodeTest, GraphReplayFollowsChangingLengths) {
  // Blocks sized for the longest step; the captured graph reads lengths from device memory.
  DecodeProblemShape shape;
  shape.seq_lens = {40000, 900, 5000};
  shape.num_q_heads = 32;
  shape.num_kv_heads = 8;
  shape.block_size = 64;
  DecodeProblem p = MakeRandomDecodeProblem(shape, 800);
  DeviceProblem dev;
  ASSERT_TRUE(dev.Upload(p));
  cudaStream_t stream;
  CUDA_ASSERT(cudaStreamCreate(&stream));
  std::vector<std::vector<int32_t>> steps = {{1000, 17, 4000}, {1001, 18, 4001}, {39999, 900, 1},
                                             {40000, 899, 5000}};
  // Capture with the first step's lengths.
  CUDA_ASSERT(cudaMemcpy(dev.lens.get(), steps[0].data(), 12, cudaMemcpyHostToDevice));
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CUDA_ASSERT(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  ASSERT_EQ(dev.Run(stream), cudaSuccess);
  CUDA_ASSERT(cudaStreamEndCapture(stream, &graph));
  CUDA_ASSERT(cudaGraphInstantiate(&exec, graph, 0));
  for (const std::vector<int32_t>& lens : steps) {
    CUDA_ASSERT(cudaMemcpyAsync(dev.lens.get(), lens.data(), 12, cudaMemcpyHostToDevice, stream));
    CUDA_ASSERT(cudaMemsetAsync(dev.state_o.get(), 0xff, dev.state_o.bytes(), stream));
    CUDA_ASSERT(cudaGraphLaunch(exec, stream));
    CUDA_ASSERT(cudaStreamSynchronize(stream));
    p.shape.seq_lens = lens;
    dev.Download(p);
    const std::vector<float> graph_o = p.state_o, graph_lse = p.state_lse;
    ExpectMatchesReference(p, reference::DecodeAttentionReference(p.Args()));
    // A direct launch with the same lengths gives the same bits.
    CUDA_ASSERT(cudaMemset(dev.state_o.get(), 0xff, dev.state_o.bytes()));
    CUDA_ASSERT(dev.Run(stream));
    CUDA_ASSERT(cudaStreamSynchronize(stream));
    dev.Download(p);
    EXPECT_EQ(std::memcmp(graph_o.data(), p.state_o.data(), graph_o.size() * 4), 0);
    EXPECT_EQ(std::memcmp(graph_lse.data(), p.state_lse.data(), graph_lse.size() * 4), 0);
  }
  EXPECT_EQ(dev.ErrorWord(), 0);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}

TEST_F(LeanDecodeTest, RejectsBadArgumentsBeforeLaunch) {
  DecodeProblemShape shape;
  shape.seq_lens = {100, 5};
  DecodeProblem p = MakeRandomDecodeProblem(shape, 900);
  DeviceProblem dev;
  ASSERT_TRUE(dev.Upload(p));
  auto with = [&](auto mutate) {
    DecodeAttentionArgs args = dev.args;
    mutate(args);
    return LeanDecode(args, dev.workspace.get(), dev.workspace.bytes(), 0);
  };
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.q = nullptr; }), cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.num_q_heads = 7; }), cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.kv.head_dim = 96; }), cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.kv.block_size = 0; }), cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.softmax_scale = NAN; }), cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.kv_end = a.seq_lens; }), cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) {
              a.kv.k_pool = static_cast<const char*>(a.kv.k_pool) + 2;
            }),
            cudaErrorInvalidValue);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) { a.kv.dtype = DType::kFloat32; }),
            cudaErrorNotSupported);
  EXPECT_EQ(with([](DecodeAttentionArgs& a) {
              a.num_q_heads = 64;
              a.kv.num_kv_heads = 2;
            }),
            cudaErrorNotSupported);
  EXPECT_EQ(LeanDecode(dev.args, dev.workspace.get(), 16, 0), cudaErrorInvalidValue);
  DecodeAttentionArgs none = dev.args;
  none.num_seqs = 0;
  EXPECT_EQ(LeanDecode(none, nullptr, 0, 0), cudaSuccess);
  CUDA_ASSERT(cudaDeviceSynchronize());
}

TEST_F(LeanDecodeTest, BadDeviceMetadataIsReportedNotRead) {
  // Lengths and block tables live on the device: the kernel must flag, not read out of bounds.
  DecodeProblemShape shape;
  shape.seq_lens = {300, 200, 100};
  shape.num_q_heads = 8;
  shape.num_kv_heads = 2;
  shape.block_size = 16;
  DecodeProblem p = MakeRandomDecodeProblem(shape, 1000);
  DeviceProblem dev;
  ASSERT_TRUE(dev.Upload(p));
  const std::vector<int32_t> bad_lens = {300, 100000, 100};  // sequence 1 overruns its blocks
  CUDA_ASSERT(cudaMemcpy(dev.lens.get(), bad_lens.data(), 12, cudaMemcpyHostToDevice));
  std::vector<int32_t> bad_table = p.block_table;
  bad_table[p.block_table_indptr[2]] = 1 << 30;  // sequence 2's first block
  dev.table.Upload(bad_table);
  dev.args.block_table = dev.table.get<int32_t>();
  CUDA_ASSERT(dev.Run());
  CUDA_ASSERT(cudaDeviceSynchronize());
  dev.Download(p);
  EXPECT_EQ(dev.ErrorWord(), kLeanErrorBadRange | kLeanErrorBadBlock);
  for (int h = 0; h < 8; ++h) EXPECT_TRUE(std::isnan(p.state_lse[8 + h]));
  // Sequence 0 is untouched by its neighbours' errors.
  p.shape.seq_lens = {300, 0, 0};
  const reference::ReferenceStates ref = reference::DecodeAttentionReference(p.Args());
  std::vector<double> o0(p.state_o.begin(), p.state_o.begin() + 8 * 128);
  std::vector<double> r0(ref.o.begin(), ref.o.begin() + 8 * 128);
  EXPECT_LT(reference::RelativeError(o0, r0), 2e-4);
}

class MergeStatesTest : public LeanDecodeTest {};

TEST_F(MergeStatesTest, MatchesCpuTwin) {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (int num_parts : {0, 1, 3, 17}) {
    const int64_t num_states = 1000;
    const int d = 128;
    std::vector<float> parts_o(size_t(num_parts) * num_states * d), parts_lse(size_t(num_parts) * num_states);
    for (float& x : parts_o) x = normal(rng);
    for (size_t i = 0; i < parts_lse.size(); ++i) {
      // Some identity parts, and states whose every part is the identity.
      const bool empty = (i % 7 == 3) || (i % num_states) < 5;
      parts_lse[i] = empty ? -std::numeric_limits<float>::infinity() : normal(rng);
      if (empty) std::fill_n(parts_o.begin() + i * d, d, 0.0f);
    }
    std::vector<float> cpu_o(num_states * d), cpu_lse(num_states);
    ASSERT_TRUE(MergeStatesCpu(parts_o.data(), parts_lse.data(), num_parts, num_states, d,
                               cpu_o.data(), cpu_lse.data())
                    .ok());
    DeviceBuffer dpo, dpl, doo(num_states * d * 4), dol(num_states * 4);
    dpo.Upload(parts_o.empty() ? std::vector<float>{0} : parts_o);
    dpl.Upload(parts_lse.empty() ? std::vector<float>{0} : parts_lse);
    CUDA_ASSERT(cudaMemset(doo.get(), 0xff, doo.bytes()));
    CUDA_ASSERT(cudaMemset(dol.get(), 0xff, dol.bytes()));
    CUDA_ASSERT(MergeStates(dpo.get<float>(), dpl.get<float>(), num_parts, num_states, d,
                            doo.get<float>(), dol.get<float>(), 0));
    CUDA_ASSERT(cudaDeviceSynchronize());
    std::vector<float> gpu_o, gpu_lse;
    doo.Download(gpu_o);
    dol.Download(gpu_lse);
    double max_err = 0.0;
    for (size_t i = 0; i < gpu_o.size(); ++i) {
      ASSERT_FALSE(std::isnan(gpu_o[i])) << i;
      max_err = std::max(max_err, double(std::abs(gpu_o[i] - cpu_o[i])) /
                                      (1.0 + std::abs(cpu_o[i])));
    }
    for (int64_t s = 0; s < num_states; ++s) {
      if (std::isinf(cpu_lse[s])) {
        EXPECT_EQ(gpu_lse[s], cpu_lse[s]);
      } else {
        EXPECT_NEAR(gpu_lse[s], cpu_lse[s], 1e-5f * (1.0f + std::abs(cpu_lse[s])));
      }
    }
    EXPECT_LT(max_err, 1e-5) << "parts " << num_parts;
  }
  EXPECT_EQ(MergeStates(nullptr, nullptr, 2, 10, 128, nullptr, nullptr, 0),
            cudaErrorInvalidValue);
}

}  // namespace
}  // namespace ferry::kernels
