// PrefillAttention on a CUDA device against the float64 reference, on fresh random inputs with
// poisoned (NaN) outputs. Skips (SetUp) without a device.
//
// The reference of a chunk: row i of chunk s is one "sequence" of DecodeAttentionReference over
// the chunk's blocks with the range [0, min(kv_len, causal_offset + i + 1)), so the prefill
// kernel is held to the same definition as decode (and the worker's CPU path).
// Tolerances (relative 2-norm error of state_o; lse absolute): q and the softmax weights are
// rounded once to the KV dtype for the tensor cores (bf16 unit roundoff 2^-9 = 2e-3, fp16 2^-12),
// accumulation is float32: bound 1e-2 / lse 2e-2 (bf16), 2e-3 / lse 4e-3 (fp16).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "attention_reference.h"
#include "cuda_device.h"
#include "decode_problem.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/kernels/lean_attention.h"
#include "ferry/kernels/prefill_attention.h"
#include "gtest/gtest.h"

namespace ferry::kernels {
namespace {

using reference::DecodeProblem;
using reference::DecodeProblemShape;

// A device copy of a host vector; freed on scope exit.
class DeviceArray {
 public:
  template <typename T>
  explicit DeviceArray(const std::vector<T>& host) : bytes_(host.size() * sizeof(T)) {
    if (bytes_ > 0 && cudaMalloc(&ptr_, bytes_) == cudaSuccess) {
      cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice);
    }
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  template <typename T>
  std::vector<T> Download() const {
    std::vector<T> host(bytes_ / sizeof(T));
    cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost);
    return host;
  }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct Chunk {
  int q_len;
  int kv_len;
  int causal_offset;
};

struct PrefillCase {
  std::vector<Chunk> chunks;
  int num_q_heads = 8;
  int num_kv_heads = 2;
  int block_size = 16;
  DType dtype = DType::kBFloat16;
};

std::string Describe(const PrefillCase& c) {
  std::string text = std::string(DTypeName(c.dtype)) + " hq=" + std::to_string(c.num_q_heads) +
                     " hkv=" + std::to_string(c.num_kv_heads) + " bs=" +
                     std::to_string(c.block_size) + " chunks=";
  for (const Chunk& k : c.chunks) {
    text += "(" + std::to_string(k.q_len) + "," + std::to_string(k.kv_len) + "," +
            std::to_string(k.causal_offset) + ")";
  }
  return text;
}

class PrefillAttentionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    FERRY_SKIP_WITHOUT_CUDA_DEVICE();
  }

  // Random KV (the decode problem's pools and block tables, one "sequence" per chunk) and q,
  // the kernel with poisoned outputs, then the float64 reference per chunk row.
  void Check(const PrefillCase& c, uint64_t seed) {
    DecodeProblemShape shape;
    for (const Chunk& chunk : c.chunks) shape.seq_lens.push_back(chunk.kv_len);
    shape.num_q_heads = c.num_q_heads;
    shape.num_kv_heads = c.num_kv_heads;
    shape.head_dim = 128;
    shape.block_size = c.block_size;
    shape.dtype = c.dtype;
    DecodeProblem p = reference::MakeRandomDecodeProblem(shape, seed);
    const int num_seqs = static_cast<int>(c.chunks.size());
    std::vector<int32_t> q_indptr = {0}, kv_lens, offsets;
    int max_q_len = 0;
    for (const Chunk& chunk : c.chunks) {
      q_indptr.push_back(q_indptr.back() + chunk.q_len);
      kv_lens.push_back(chunk.kv_len);
      offsets.push_back(chunk.causal_offset);
      max_q_len = std::max(max_q_len, chunk.q_len);
    }
    const int rows = q_indptr.back();
    const int d = shape.head_dim;
    std::mt19937_64 rng(seed * 7 + 1);
    std::normal_distribution<float> normal;
    std::vector<float> q(size_t(rows) * c.num_q_heads * d);
    for (float& x : q) x = normal(rng);
    std::vector<float> poison_o(q.size(), std::nanf("")), poison_lse(size_t(rows) * c.num_q_heads,
                                                                      std::nanf(""));
    DeviceArray k(p.k_pool), v(p.v_pool), indptr(p.block_table_indptr),
        table(p.block_table.empty() ? std::vector<int32_t>{0} : p.block_table),
        q_dev(q), q_ind(q_indptr), lens(kv_lens), offs(offsets), o(poison_o), lse(poison_lse),
        error(std::vector<int32_t>{0});
    PrefillAttentionArgs args;
    args.num_seqs = num_seqs;
    args.num_q_heads = c.num_q_heads;
    args.max_q_len = max_q_len;
    args.q = q_dev.get<float>();
    args.kv = {k.get(), v.get(), c.dtype, p.num_blocks, c.num_kv_heads, c.block_size, d};
    args.q_indptr = q_ind.get<int32_t>();
    args.block_table_indptr = indptr.get<int32_t>();
    args.block_table = table.get<int32_t>();
    args.kv_lens = lens.get<int32_t>();
    args.causal_offset = offs.get<int32_t>();
    args.softmax_scale = p.softmax_scale;
    args.state_o = o.get<float>();
    args.state_lse = lse.get<float>();
    args.error_word = error.get<int32_t>();
    ASSERT_EQ(PrefillAttention(args, nullptr), cudaSuccess);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(error.Download<int32_t>()[0], 0);
    std::vector<float> got_o = o.Download<float>(), got_lse = lse.Download<float>();

    // Reference: each chunk row as a decode "sequence" over the chunk's blocks, cut causally.
    std::vector<int32_t> ref_indptr = {0}, ref_table, ref_lens, ref_begin, ref_end;
    for (int s = 0; s < num_seqs; ++s) {
      for (int i = 0; i < c.chunks[s].q_len; ++i) {
        ref_table.insert(ref_table.end(), p.block_table.begin() + p.block_table_indptr[s],
                         p.block_table.begin() + p.block_table_indptr[s + 1]);
        ref_indptr.push_back(static_cast<int32_t>(ref_table.size()));
        ref_lens.push_back(kv_lens[s]);
        ref_begin.push_back(0);
        ref_end.push_back(std::clamp(offsets[s] + i + 1, 0, kv_lens[s]));
      }
    }
    DecodeAttentionArgs ref_args = p.Args();
    ref_args.num_seqs = rows;
    ref_args.q = q.data();
    ref_args.block_table_indptr = ref_indptr.data();
    ref_args.block_table = ref_table.data();
    ref_args.seq_lens = ref_lens.data();
    ref_args.kv_begin = ref_begin.data();
    ref_args.kv_end = ref_end.data();
    const reference::ReferenceStates ref = reference::DecodeAttentionReference(ref_args);

    int64_t nans = 0;
    std::vector<double> o64(got_o.size());
    for (size_t i = 0; i < got_o.size(); ++i) {
      nans += std::isnan(got_o[i]);
      o64[i] = got_o[i];
    }
    EXPECT_EQ(nans, 0) << Describe(c);
    const double o_err = reference::RelativeError(o64, ref.o);
    double lse_err = 0;
    for (size_t i = 0; i < ref.lse.size(); ++i) {
      if (std::isinf(ref.lse[i])) {  // a row that sees nothing: the identity, exactly
        EXPECT_TRUE(std::isinf(got_lse[i]) && got_lse[i] < 0) << "state " << i;
        for (int e = 0; e < d; ++e) ASSERT_EQ(got_o[i * d + e], 0.0f) << "state " << i;
        continue;
      }
      ASSERT_FALSE(std::isnan(got_lse[i])) << "state " << i << " " << Describe(c);
      lse_err = std::max(lse_err, std::abs(double{got_lse[i]} - ref.lse[i]));
    }
    const bool bf16 = c.dtype == DType::kBFloat16;
    EXPECT_LT(o_err, bf16 ? 1e-2 : 2e-3) << Describe(c);
    EXPECT_LT(lse_err, bf16 ? 2e-2 : 4e-3) << Describe(c);
    std::printf("  %-70s o err %.2e  lse err %.2e\n", Describe(c).c_str(), o_err, lse_err);
  }
};

TEST_F(PrefillAttentionTest, ChunkOverACachedPrefixMatchesTheReference) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    // 100 new rows after 37 cached positions: neither a multiple of the 64-row or 64-position
    // tiles nor of the 16-position blocks.
    Check({{{100, 137, 37}}, 8, 2, 16, dtype}, 1);
    // A whole prompt from position 0, several row tiles, GQA group 8, 64-position blocks.
    Check({{{300, 300, 0}}, 32, 4, 64, dtype}, 2);
  }
}

TEST_F(PrefillAttentionTest, RaggedBatchAndShardsMatchTheReference) {
  for (DType dtype : {DType::kBFloat16, DType::kFloat16}) {
    Check({{{1, 1, 0},        // one row, one position
            {64, 400, 336},   // one full row tile after a long prefix
            {130, 135, 5},    // three row tiles, the last partial
            {40, 50, 200},    // a non-tail shard: every row sees all 50 positions
            {70, 40, -10},    // rows before the shard's range: the first 10 see nothing
            {5, 0, 0}},       // an empty shard: identity states
           4, 4, 7, dtype},   // no GQA; a block size that is not a power of two
          3);
    // GQA group 16.
    Check({{{77, 77, 0}, {20, 300, 280}}, 32, 2, 32, dtype}, 4);
  }
}

TEST_F(PrefillAttentionTest, BadRangesAreNaNAndReported) {
  // kv_len beyond the chunk's blocks: NaN states and the bad-range bit; the other chunk is fine.
  DecodeProblemShape shape;
  shape.seq_lens = {32, 32};
  shape.block_size = 16;
  DecodeProblem p = reference::MakeRandomDecodeProblem(shape, 5);
  std::vector<float> q(size_t(20) * shape.num_q_heads * shape.head_dim, 0.5f);
  std::vector<float> o_init(q.size(), 1.0f), lse_init(size_t(20) * shape.num_q_heads, 1.0f);
  DeviceArray k(p.k_pool), v(p.v_pool), indptr(p.block_table_indptr), table(p.block_table),
      q_dev(q), q_ind(std::vector<int32_t>{0, 10, 20}), lens(std::vector<int32_t>{33, 32}),
      offs(std::vector<int32_t>{0, 22}), o(o_init), lse(lse_init), error(std::vector<int32_t>{0});
  PrefillAttentionArgs args;
  args.num_seqs = 2;
  args.num_q_heads = shape.num_q_heads;
  args.max_q_len = 10;
  args.q = q_dev.get<float>();
  args.kv = {k.get(), v.get(), shape.dtype, p.num_blocks, shape.num_kv_heads, shape.block_size,
             shape.head_dim};
  args.q_indptr = q_ind.get<int32_t>();
  args.block_table_indptr = indptr.get<int32_t>();
  args.block_table = table.get<int32_t>();
  args.kv_lens = lens.get<int32_t>();
  args.causal_offset = offs.get<int32_t>();
  args.softmax_scale = p.softmax_scale;
  args.state_o = o.get<float>();
  args.state_lse = lse.get<float>();
  args.error_word = error.get<int32_t>();
  ASSERT_EQ(PrefillAttention(args, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(error.Download<int32_t>()[0], kLeanErrorBadRange);
  const std::vector<float> got_lse = lse.Download<float>();
  for (int i = 0; i < 10 * shape.num_q_heads; ++i) EXPECT_TRUE(std::isnan(got_lse[i])) << i;
  for (int i = 10 * shape.num_q_heads; i < 20 * shape.num_q_heads; ++i) {
    EXPECT_TRUE(std::isfinite(got_lse[i])) << i;
  }
}

TEST_F(PrefillAttentionTest, BadArgumentsAreRefusedBeforeLaunch) {
  PrefillAttentionArgs args;
  args.num_seqs = 1;
  args.num_q_heads = 8;
  args.max_q_len = 4;
  args.kv = {nullptr, nullptr, DType::kBFloat16, 0, 2, 16, 128};
  args.softmax_scale = 0.1f;
  // Null pointers.
  EXPECT_EQ(PrefillAttention(args, nullptr), cudaErrorInvalidValue);
  // A head count that is not a multiple of the KV heads, a bad head dim, a float32 cache.
  PrefillAttentionArgs bad = args;
  bad.num_q_heads = 7;
  EXPECT_EQ(PrefillAttention(bad, nullptr), cudaErrorInvalidValue);
  bad = args;
  bad.kv.head_dim = 96;
  EXPECT_EQ(PrefillAttention(bad, nullptr), cudaErrorInvalidValue);
  bad = args;
  bad.kv.dtype = DType::kFloat32;
  EXPECT_EQ(PrefillAttention(bad, nullptr), cudaErrorNotSupported);
  bad = args;
  bad.softmax_scale = NAN;
  EXPECT_EQ(PrefillAttention(bad, nullptr), cudaErrorInvalidValue);
  // Nothing to do is fine.
  bad = args;
  bad.num_seqs = 0;
  EXPECT_EQ(PrefillAttention(bad, nullptr), cudaSuccess);
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
}

}  // namespace
}  // namespace ferry::kernels
