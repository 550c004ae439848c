// Causal attention of query rows over a paged KV cache on CUDA, one warp per (row, q head): the
// simple, exact fallback where the tensor-core kernels (PrefillAttention, prefill_attention.h;
// LeanDecode, lean_attention.h) do not serve: float32 KV (float32 arithmetic throughout, which
// the decoder's exactness tests rely on), head dims outside the build's FERRY_HEAD_DIMS.
//
// Contract
//   q          (num_rows, num_q_heads, head_dim) float32, device
//   K, V pools (num_blocks, num_kv_heads, block_size, head_dim) in kv.dtype (fp32, bf16, fp16),
//              device (DESIGN.md's layout; the rows' own new K/V already appended)
//   block_table_indptr (num_runs + 1), block_table: int32, device: CSR block tables of the
//              step's sequences (runtime/kv/cuda_kv_pool.h stages these)
//   row_run, row_pos (num_rows) int32, device: row r attends over positions [0, row_pos[r]] of
//              sequence row_run[r], i.e. causally, its own position included
//   out        (num_rows, num_q_heads, head_dim) float32: the normalised attention output
//   lse        optional (num_rows, num_q_heads) float32, natural log (attention_state.h)
//   Softmax scale `softmax_scale`; GQA maps q head h to KV head h / (num_q_heads / num_kv_heads).
//   head_dim a multiple of 32 up to 256; group (num_q_heads / num_kv_heads) up to 32.
//   Accumulation in float32 with an online softmax (exp in float32, not the exp2 trick), so a
//   float32 cache gives float32-rounding results.
//   Only device metadata is read, so the launch may be captured into a CUDA graph whose tables
//   change between replays. A block id outside the pool reads as zeros.
// Cost: one warp per (row, q head), scores 32 positions at a time: fine for prompts and tests,
//   not a replacement for LeanDecode on long decode batches.
// Errors: bad shapes or pointers are cudaErrorInvalidValue before any launch; launch errors are
// returned as is.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ferry/kernels/decode_attention.h"

namespace ferry::kernels {

struct PagedPrefillAttentionArgs {
  int num_rows = 0;
  int num_q_heads = 0;
  const float* q = nullptr;
  PagedKvView kv;
  const int32_t* block_table_indptr = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* row_run = nullptr;
  const int32_t* row_pos = nullptr;
  float softmax_scale = 1.0f;
  float* out = nullptr;
  float* lse = nullptr;
};

cudaError_t PagedPrefillAttention(const PagedPrefillAttentionArgs& args, cudaStream_t stream);

}  // namespace ferry::kernels
