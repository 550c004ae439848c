// Decode attention over a paged KV cache: the problem every backend (CPU, CUDA) solves.
//
// One new query token per sequence attends over the KV positions of a ragged batch.
//   q             (num_seqs, num_q_heads, head_dim)       float32
//   K, V pools    (num_blocks, num_kv_heads, block_size, head_dim) in kv.dtype (DESIGN.md's layout)
//   block table   CSR: the blocks of sequence s are block_table[block_table_indptr[s] ..
//                 block_table_indptr[s + 1]); logical position p lives in block p / block_size,
//                 slot p % block_size
//   seq_lens      (num_seqs): positions the sequence holds (its blocks cover at least these)
//   kv_begin/end  optional (num_seqs): attend over positions [kv_begin, kv_end) only, so a worker
//                 can serve a shard; nullptr means [0, seq_len)
// GQA: q head h reads KV head h / (num_q_heads / num_kv_heads).
// Outputs, per (sequence, q head):
//   state_o       (num_seqs, num_q_heads, head_dim)  float32, the partial state's o
//   state_lse     (num_seqs, num_q_heads)            float32, natural log (attention_state.h)
//   out           optional (num_seqs, num_q_heads, head_dim) in kv.dtype: o rounded; equal to the
//                 normalised attention output when the range covers the whole sequence
// An empty range yields the identity state (o = 0, lse = -inf) and out = 0.
//
// Pointers are host pointers for the CPU backend and device pointers for the CUDA backend. The
// struct owns nothing.
#pragma once

#include <cstdint>

#include "ferry/kernels/dtype.h"

namespace ferry::kernels {

struct PagedKvView {
  const void* k_pool = nullptr;
  const void* v_pool = nullptr;
  DType dtype = DType::kBFloat16;
  int num_blocks = 0;
  int num_kv_heads = 0;
  int block_size = 0;
  int head_dim = 0;
};

struct DecodeAttentionArgs {
  int num_seqs = 0;
  int num_q_heads = 0;
  const float* q = nullptr;
  PagedKvView kv;
  const int32_t* block_table_indptr = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* seq_lens = nullptr;
  const int32_t* kv_begin = nullptr;
  const int32_t* kv_end = nullptr;
  float softmax_scale = 1.0f;
  float* state_o = nullptr;
  float* state_lse = nullptr;
  void* out = nullptr;
};

// Head dims every backend serves.
constexpr bool IsSupportedHeadDim(int head_dim) {
  return head_dim == 64 || head_dim == 128 || head_dim == 256;
}

}  // namespace ferry::kernels
