// LeanAttention decode on CUDA: stream-K paged decode attention and the merge of partial states.
//
// Contract
//   LeanDecode solves the problem of decode_attention.h (read it first) on the GPU:
//     q          (num_seqs, num_q_heads, head_dim)         float32, device
//     K, V pools (num_blocks, num_kv_heads, block_size, head_dim) bf16 or fp16, device, 16-byte
//                aligned (DESIGN.md's layout)
//     block_table_indptr (num_seqs + 1), block_table, seq_lens, kv_begin/kv_end (optional):
//                int32, device. Only read by the kernel, so they may change between launches of a
//                captured CUDA graph (lengths grow each decode step) without re-capture.
//     state_o    (num_seqs, num_q_heads, head_dim)         float32, device
//     state_lse  (num_seqs, num_q_heads)                   float32, natural log
//     out        optional (num_seqs, num_q_heads, head_dim) in the KV dtype
//   Supported: head_dim 64/128/256 (those in FERRY_HEAD_DIMS), bf16/fp16 KV, any block_size >= 1
//   (16..256 tested), GQA group (num_q_heads / num_kv_heads) 1..16. Accumulation is float32; for
//   groups of at most 8 the query and the softmax weights are fed to the tensor cores as a
//   hi + lo pair of 16-bit numbers, so scores and outputs keep about float32 accuracy.
//
// Schedule (LeanAttention, lean_schedule.h): the batch's (sequence, KV head, 64-position
//   tile) order is dealt in equal contiguous ranges to a persistent grid of
//   (multiprocessors x resident blocks per multiprocessor) blocks, the count the driver reports
//   for this kernel. Every block derives the plan itself from seq_lens / kv ranges on the GPU
//   (no host synchronisation, graph-safe). A head split across blocks writes one partial state
//   per block into the workspace; the last block to finish the head (atomic counter) merges the
//   partials in block order (deterministic for a given device) and resets the counter. No block
//   ever waits for another, so any residency is deadlock-free. A block walks its range starting
//   with the head that holds its last tile, so the heads it shares end early in its walk.
//   K and V are read with an L2 evict-first hint; state_o, state_lse, out and the partials are
//   stored evict-last: callers that reuse their output buffers launch after launch (as the
//   runtime does) keep those writes in L2. Leaving out `out` saves its bytes (the runtime does).
//
// Workspace: device memory of LeanDecodeWorkspaceSize() bytes, owned by the caller, zero-filled
//   once before the first launch (cudaMemset); every launch leaves its counters at zero again
//   (the partial states in it are scratch). Launches that share a workspace must be ordered
//   (one stream or graph). The first int32 of the workspace is an error word the kernel ORs
//   bits into and never clears:
//   kLeanErrorBadRange (a sequence's range or length does not fit its blocks: its state is NaN)
//   and kLeanErrorBadBlock (a block id outside the pool: the block is read as zeros).
//   Block tables live on the device, so the host cannot check them without a synchronisation;
//   the kernel never reads outside the pools and reports instead.
//
// Errors: every scalar field, pointer and alignment is checked on the host before launch and
//   reported as cudaErrorInvalidValue (cudaErrorNotSupported for valid shapes this build or
//   device does not serve); nothing is launched then. Launch errors are returned as is.
// Thread safety: the host functions may be called from any thread; a device's first call sets
//   the kernels' shared-memory attributes.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ferry/kernels/decode_attention.h"

namespace ferry::kernels {

inline constexpr int32_t kLeanErrorBadRange = 1;
inline constexpr int32_t kLeanErrorBadBlock = 2;

// Bytes of workspace LeanDecode needs on `device` for batches of up to max_num_seqs sequences
// of this shape. Returns 0 and sets *error when the shape is not served.
size_t LeanDecodeWorkspaceSize(int max_num_seqs, int num_q_heads, int num_kv_heads, int head_dim,
                               DType dtype, int device, cudaError_t* error = nullptr);

// Decode attention (see the contract above). `workspace_bytes` must be at least
// LeanDecodeWorkspaceSize(n, ...) for some n >= args.num_seqs on the stream's device.
cudaError_t LeanDecode(const DecodeAttentionArgs& args, void* workspace, size_t workspace_bytes,
                       cudaStream_t stream);

// Grid size (blocks) LeanDecode launches on `device` for this shape; 0 when not served.
// For benchmarks and tests: the schedule, and so the bits of a split head's result, depend on it.
int LeanDecodeGridSize(int num_q_heads, int num_kv_heads, int head_dim, DType dtype, int device);

// Merges num_parts arrays of partial states (attention_state.h's rule, parts in index order):
//   parts_o (num_parts, num_states, head_dim), parts_lse (num_parts, num_states)
//   out_o (num_states, head_dim), out_lse (num_states); float32, device; out may not alias parts.
// num_parts == 0 gives the identity.
cudaError_t MergeStates(const float* parts_o, const float* parts_lse, int num_parts,
                        int64_t num_states, int head_dim, float* out_o, float* out_lse,
                        cudaStream_t stream);

}  // namespace ferry::kernels
