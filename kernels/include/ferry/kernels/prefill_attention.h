// Causal prefill attention over a paged KV cache on CUDA tensor cores: the query rows of prompt
// chunks attend to the KV positions a worker holds (the cached prefix and the chunk's own,
// already appended), and every (row, q head) yields a partial state (o, lse) of
// attention_state.h, so chunks split over workers merge exactly like decode partials.
//
// Contract
//   A batch of num_seqs chunks. Chunk s has q_len[s] = q_indptr[s + 1] - q_indptr[s] query rows
//   and its sequence holds kv_lens[s] positions (local indices 0 .. kv_lens[s] - 1, the blocks
//   block_table[block_table_indptr[s] ..] in order). Row i of chunk s sees the positions
//     j <= min(kv_lens[s] - 1, causal_offset[s] + i)
//   (causal_offset = the first row's own local index: its position minus the first position the
//   worker holds); a row that sees none gets the identity state (0, -inf).
//     q          (q_indptr[num_seqs], num_q_heads, head_dim)    float32, device, 16-byte aligned
//     K, V pools (num_blocks, num_kv_heads, block_size, head_dim) bf16 or fp16, device, 16-byte
//                aligned (DESIGN.md's layout)
//     q_indptr, block_table_indptr (num_seqs + 1); block_table; kv_lens, causal_offset
//                (num_seqs): int32, device. Only read by the kernel (graph-safe).
//     max_q_len  host: at least every q_len[s]; sizes the grid (rows past q_len[s] idle)
//     state_o    (q_indptr[num_seqs], num_q_heads, head_dim)    float32
//     state_lse  (q_indptr[num_seqs], num_q_heads)              float32, natural log
//     error_word optional int32, device: bits of lean_attention.h's kLeanErrorBadRange (a
//                chunk whose lengths do not fit its blocks or rows: its states are NaN) and
//                kLeanErrorBadBlock (a block id outside the pool: read as zeros) are ORed in.
//   GQA: q head h reads KV head h / (num_q_heads / num_kv_heads). Head dims 64/128/256 (those in
//   FERRY_HEAD_DIMS), bf16/fp16 KV, any block_size >= 1.
// Numerics: q (pre-scaled by softmax_scale) and the softmax weights are rounded to the KV dtype
//   for the tensor cores (one rounding each, as FlashAttention does); scores, the online softmax
//   (base 2) and the accumulators are float32. Expect a relative error of a few 1e-3 for bf16.
// Schedule: one block of 4 warps per (64-row tile, q head, chunk), each warp 16 rows; K/V tiles
//   of 64 positions (32 for head dim 256) stream through a two-stage cp.async ring; tiles past a
//   block's last visible position are skipped and only the diagonal tiles are masked.
// Errors: bad scalars, pointers or alignment are cudaErrorInvalidValue, shapes this build does
//   not serve cudaErrorNotSupported, before any launch; launch errors are returned as is.
// Thread safety: may be called from any thread; a device's first call sets the kernel's
//   shared-memory attribute.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ferry/kernels/decode_attention.h"

namespace ferry::kernels {

struct PrefillAttentionArgs {
  int num_seqs = 0;
  int num_q_heads = 0;
  int max_q_len = 0;
  const float* q = nullptr;
  PagedKvView kv;
  const int32_t* q_indptr = nullptr;
  const int32_t* block_table_indptr = nullptr;
  const int32_t* block_table = nullptr;
  const int32_t* kv_lens = nullptr;
  const int32_t* causal_offset = nullptr;
  float softmax_scale = 1.0f;
  float* state_o = nullptr;
  float* state_lse = nullptr;
  int32_t* error_word = nullptr;
};

cudaError_t PrefillAttention(const PrefillAttentionArgs& args, cudaStream_t stream);

// Whether this build serves head_dim with a `dtype` cache (bf16/fp16, head dims in
// FERRY_HEAD_DIMS): callers pick a fallback (paged_prefill_attention.h) once, up front.
bool PrefillAttentionServes(int head_dim, DType dtype);

}  // namespace ferry::kernels
