#include "decode_problem.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>

namespace ferry::kernels::reference {
namespace {

void FillRandom(std::vector<uint8_t>& bytes, DType dtype, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const size_t n = bytes.size() / DTypeSize(dtype);
  if (dtype == DType::kFloat32) {
    float* values = reinterpret_cast<float*>(bytes.data());
    for (size_t i = 0; i < n; ++i) values[i] = normal(rng);
    return;
  }
  uint16_t* values = reinterpret_cast<uint16_t*>(bytes.data());
  for (size_t i = 0; i < n; ++i) {
    const float x = normal(rng);
    values[i] = dtype == DType::kBFloat16 ? FloatToBFloat16Bits(x) : FloatToFloat16Bits(x);
  }
}

}  // namespace

int64_t DecodeProblem::kv_bytes_read() const {
  int64_t positions = 0;
  for (int s = 0; s < num_seqs(); ++s) {
    positions += kv_begin.empty() ? shape.seq_lens[s] : kv_end[s] - kv_begin[s];
  }
  return 2 * positions * shape.num_kv_heads * shape.head_dim * DTypeSize(shape.dtype);
}

DecodeAttentionArgs DecodeProblem::Args() {
  DecodeAttentionArgs args;
  args.num_seqs = num_seqs();
  args.num_q_heads = shape.num_q_heads;
  args.q = q.data();
  args.kv = {k_pool.data(), v_pool.data(), shape.dtype, num_blocks, shape.num_kv_heads,
             shape.block_size, shape.head_dim};
  args.block_table_indptr = block_table_indptr.data();
  args.block_table = block_table.data();
  args.seq_lens = shape.seq_lens.data();
  args.kv_begin = kv_begin.empty() ? nullptr : kv_begin.data();
  args.kv_end = kv_end.empty() ? nullptr : kv_end.data();
  args.softmax_scale = softmax_scale;
  args.state_o = state_o.data();
  args.state_lse = state_lse.data();
  args.out = out.data();
  return args;
}

void DecodeProblem::Poison() {
  std::fill(state_o.begin(), state_o.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(state_lse.begin(), state_lse.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(out.begin(), out.end(), 0xff);  // all-ones bits: NaN in fp32, fp16 and bf16
}

DecodeProblem MakeRandomDecodeProblem(const DecodeProblemShape& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  DecodeProblem problem;
  problem.shape = shape;
  const int num_seqs = problem.num_seqs();
  problem.block_table_indptr.assign(num_seqs + 1, 0);
  for (int s = 0; s < num_seqs; ++s) {
    const int blocks = (shape.seq_lens[s] + shape.block_size - 1) / shape.block_size;
    problem.block_table_indptr[s + 1] = problem.block_table_indptr[s] + blocks;
  }
  const int used_blocks = problem.block_table_indptr[num_seqs];
  problem.num_blocks = used_blocks + shape.spare_blocks;
  std::vector<int32_t> placement(problem.num_blocks);
  std::iota(placement.begin(), placement.end(), 0);
  std::shuffle(placement.begin(), placement.end(), rng);
  problem.block_table.assign(placement.begin(), placement.begin() + used_blocks);

  const size_t pool_bytes = size_t(problem.num_blocks) * shape.num_kv_heads * shape.block_size *
                            shape.head_dim * DTypeSize(shape.dtype);
  problem.k_pool.resize(pool_bytes);
  problem.v_pool.resize(pool_bytes);
  FillRandom(problem.k_pool, shape.dtype, rng);
  FillRandom(problem.v_pool, shape.dtype, rng);

  const size_t q_elems = size_t(num_seqs) * shape.num_q_heads * shape.head_dim;
  problem.q.resize(q_elems);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& x : problem.q) x = normal(rng);
  problem.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));

  problem.state_o.resize(q_elems);
  problem.state_lse.resize(size_t(num_seqs) * shape.num_q_heads);
  problem.out.resize(q_elems * DTypeSize(shape.dtype));
  problem.Poison();
  return problem;
}

}  // namespace ferry::kernels::reference
