// Random decode-attention problems on the host, for tests, demos and benchmarks.
//
// MakeRandomDecodeProblem draws q, K and V from N(0, 1) (K and V rounded to the KV dtype), lays
// each sequence's blocks at random places in the pools (so block tables are not the identity),
// and sizes the outputs. The struct owns every buffer; Args() returns a view of them, valid while
// the problem lives and is not resized. Poison() fills the outputs with NaN so a kernel that
// leaves an element unwritten fails the comparison.
#pragma once

#include <cstdint>
#include <vector>

#include "ferry/kernels/decode_attention.h"

namespace ferry::kernels::reference {

struct DecodeProblemShape {
  std::vector<int32_t> seq_lens;
  int num_q_heads = 8;
  int num_kv_heads = 2;
  int head_dim = 128;
  int block_size = 64;
  DType dtype = DType::kBFloat16;
  int spare_blocks = 3;  // unused blocks in the pool beside the sequences' own
};

struct DecodeProblem {
  DecodeProblemShape shape;
  int num_blocks = 0;
  std::vector<uint8_t> k_pool, v_pool;  // (num_blocks, num_kv_heads, block_size, head_dim)
  std::vector<int32_t> block_table_indptr, block_table;
  std::vector<int32_t> kv_begin, kv_end;  // empty: whole sequences
  std::vector<float> q;                   // (num_seqs, num_q_heads, head_dim)
  float softmax_scale = 1.0f;
  std::vector<float> state_o, state_lse;
  std::vector<uint8_t> out;  // (num_seqs, num_q_heads, head_dim) in dtype

  int num_seqs() const { return static_cast<int>(shape.seq_lens.size()); }
  int64_t kv_bytes_read() const;  // K and V bytes inside the attended ranges
  DecodeAttentionArgs Args();
  void Poison();
};

DecodeProblem MakeRandomDecodeProblem(const DecodeProblemShape& shape, uint64_t seed);

}  // namespace ferry::kernels::reference
