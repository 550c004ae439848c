// CUDA backend of causal linear attention: the problem, the feature maps and the state layout of
// linear_attention.h (read it first); this header adds only what the GPU path needs on top.
//
// Served: head_dim 64, 128, 256 (those in FERRY_HEAD_DIMS), bf16 and fp16 q/k/v/out (fp32 is
// cudaErrorNotSupported; use the CPU backend), any GQA group, varlen batches, every feature map.
// All pointers are device pointers owned by the caller; q, k, v, out, dout, dq, dk, dv 16-byte
// aligned, row_stats 16-byte aligned. cu_seqlens lives on the device, so the host cannot read it:
// a sequence whose range is not inside [0, total_tokens] is skipped (its rows and state are not
// written).
//
// Numerics (what differs from the CPU backend's float32 recurrence):
//   The work is chunkwise (64 tokens) on the tensor cores (mma.sync bf16 -> fp32; on Hopper the
//   forward's walks at d = 64 and 128 run wgmma on the same operands). The running
//   state S, z, V, n stays float32 on chip; the chunk weights and the state are fed to the tensor
//   cores as hi + lo pairs of bf16 (about 16 mantissa bits), so the inter-chunk sums keep about
//   float32 accuracy. q, k, v enter the tensor cores as bf16: fp16 inputs are rounded to bf16
//   (the chunk weights and the state outgrow fp16's range on long sequences), as are the
//   elementwise feature maps phi(q), phi(k) (kEluPlusOne) and, in the backward, the operands
//   scaled per row (dout / den, c q). Forward accuracy is therefore bf16's for kEluPlusOne and for
//   fp16 inputs (relative error ~1e-3 before the output's own rounding); kOnePlusXMaxNorm and
//   kIdentity with bf16 inputs see only the output rounding. Gradients are bf16-accurate
//   (~2e-3 relative), except dq of normalised kEluPlusOne: 1e-2 to 5e-2, growing with d. Its
//   features 1 + x + ... of small x are rounded to bf16, whose spacing near 1 is 2^-7, and that
//   dq depends on the small part only (the weights are nearly uniform). Known limitation.
//
// Forward: LinearAttentionForwardCuda(args, row_stats, out_residual, workspace, workspace_bytes,
//   stream) computes out and, if set,
//   final_state exactly as defined in linear_attention.h, from initial_state (or the empty
//   state). Unlike the CPU backend, final_state must not overlap initial_state (blocks of one
//   sequence read the initial state while others write the final one): ping-pong two buffers.
//   row_stats (optional, (total_tokens, num_q_heads, kLinearRowStats) float32) receives what the
//   backward needs per (token, q head): {den_i, a_i, b_i, c_i} with a_i, b_i the floored running
//   max norms of kOnePlusXMaxNorm and c_i = (1 / a_i) (1 / b_i) (all three 1 for the other maps),
//   den_i the denominator (written also when unnormalised). out_residual (optional, out's shape
//   and dtype) receives out's rounding error, out_exact - out, rounded: with it the backward
//   forms dout . out to ~16 mantissa bits. (Without it dden = -(dout . out) / den carries out's
//   rounding, which dq of a normalised map with positive features multiplies by z, a sum over
//   all earlier tokens. Measured for elu + 1 at N <= 300, d = 64 / 128 / 256: dq error 2.0 /
//   3.1 / 4.3e-2 without, 1.5 / 2.1 / 2.9e-2 with; the rest is the bf16 rounding of phi, see
//   Numerics.) workspace: device memory of LinearAttentionForwardWorkspaceSize() bytes (may be 0,
//   then workspace may be null), 16-byte aligned, contents ignored.
//
// Sequence segments (both directions): when the batch's sequences x heads leave SMs idle (at most
//   one block per SM), each sequence is split into segments of segment_chunks 64-token chunks
//   (by default as many segments as fill whole waves of resident blocks best, see SegmentChunks)
//   walked in parallel (each segment's own state sum, an exclusive prefix over
//   segments, then the segment's outputs from its prefix state;
//   kernels/cuda/linear_attention_core.cuh). The workspace then holds one
//   float32 state sum per (segment, head): about N d^2 / (64 segment_chunks) floats per head.
//   segment_chunks (last argument of the launchers and the size functions, the same in both):
//   0 = chosen from the current device's SM count and the shape, < 0 = never split, > 0 = that
//   many chunks. Results agree with the unsplit walk to float32 rounding (sums in another order).
//   On Hopper the forward's automatic choice may also be the unsplit wgmma kernel where it is
//   faster (then the workspace is not used).
//
// Backward: LinearAttentionBackwardCuda(args, workspace, workspace_bytes, stream, segment_chunks):
//   dq, dk, dv of sum(dout * out) for a forward with the same config, cu_seqlens, q, k, v and initial_state,
//   given that forward's out, out_residual and row_stats; and, if d_initial_state is set, the gradient with
//   respect to every field of initial_state (S, z, V, n, k_norm, q_norm; padding zero). The
//   final state is treated as unused (no gradient flows from it). The max-norm gradients follow
//   linear_attention.h (to the first position attaining the running maximum; the initial state
//   counts as earlier than every token). Nothing is stored per chunk: chunk states are recomputed,
//   memory is the O(N d) inputs and outputs plus a float32 workspace of
//   LinearAttentionBackwardWorkspaceSize() bytes (a few floats per row, plus the segment sums when
//   split; see "Sequence segments"). Kernels: dden per row,
//   dq (a forward-direction pass), then dk and dv (reverse passes; GQA groups summed on chip, no
//   atomics on dk, dv); unsplit at d = 64 and 128 (unless the max-norm map's initial-state
//   gradient is asked for), the three passes run as one launch.
//
// Decode: LinearAttentionDecodeCuda(args, stream) is LinearAttentionDecodeCpu on the GPU: one
//   token per sequence appended to its state (S, z, V, n and the norms) in place, and the token's
//   output. No host synchronisation and no allocation, so it can be captured in a CUDA graph.
//   state_slots (device, optional) must hold distinct slots; a slot outside [0, num_state_slots)
//   is skipped and its outputs are set to NaN.
//
// Errors: shapes, pointers and alignment are checked on the host before any launch
// (cudaErrorInvalidValue; cudaErrorNotSupported for valid shapes this build does not serve);
// launch errors are returned as is. Calls on one stream are ordered; the first call on a device
// sets the kernels' shared-memory attributes (thread-safe).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "ferry/kernels/linear_attention.h"

namespace ferry::kernels {

// Floats per (token, q head) in row_stats: {den, a, b, c}.
inline constexpr int kLinearRowStats = 4;

// Bytes of device workspace the forward needs on the current device (0 when it is not split).
size_t LinearAttentionForwardWorkspaceSize(const LinearAttentionConfig& config,
                                           int64_t total_tokens, int segment_chunks = 0);

cudaError_t LinearAttentionForwardCuda(const LinearAttentionForwardArgs& args, float* row_stats,
                                       void* out_residual, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream,
                                       int segment_chunks = 0);

struct LinearAttentionBackwardCudaArgs {
  LinearAttentionConfig config;          // the forward's (dtype bf16 or fp16)
  const int32_t* cu_seqlens = nullptr;   // (num_seqs + 1), device
  int64_t total_tokens = 0;
  const void* q = nullptr;               // (total_tokens, num_q_heads, head_dim)
  const void* k = nullptr;               // (total_tokens, num_kv_heads, head_dim)
  const void* v = nullptr;               // (total_tokens, num_kv_heads, head_dim)
  const float* initial_state = nullptr;  // the forward's, or null (empty state)
  const void* out = nullptr;             // the forward's output (read when normalised)
  const void* out_residual = nullptr;    // the forward's out_residual (optional; see above)
  const float* row_stats = nullptr;      // the forward's row_stats
  const void* dout = nullptr;            // (total_tokens, num_q_heads, head_dim)
  void* dq = nullptr;                    // (total_tokens, num_q_heads, head_dim), dtype
  void* dk = nullptr;                    // (total_tokens, num_kv_heads, head_dim), dtype
  void* dv = nullptr;                    // (total_tokens, num_kv_heads, head_dim), dtype
  float* d_initial_state = nullptr;      // optional (num_seqs, num_kv_heads, stride)
};

// Bytes of device workspace the backward needs on the current device (256-byte aligned pieces).
size_t LinearAttentionBackwardWorkspaceSize(const LinearAttentionConfig& config,
                                            int64_t total_tokens, int segment_chunks = 0);

cudaError_t LinearAttentionBackwardCuda(const LinearAttentionBackwardCudaArgs& args,
                                        void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream, int segment_chunks = 0);

cudaError_t LinearAttentionDecodeCuda(const LinearAttentionDecodeArgs& args, cudaStream_t stream);

}  // namespace ferry::kernels
