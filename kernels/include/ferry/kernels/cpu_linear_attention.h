// CPU backend of causal linear attention (the problem and the state: linear_attention.h). It is
// the CPU attention path for linear-attention models and the fast reference for the CUDA kernels.
//
// Contract: all pointers are host memory owned by the caller. fp32, bf16 or fp16 inputs and
// outputs (the backward: fp32), float32 state and accumulation. Work is one task per
// (sequence, kv head), run over the pool; each task runs the recurrence of linear_attention.h
// token by token (O(L d^2) per task, the group's q heads together so S is read once per token),
// so results do not depend on the thread count and are bit-identical from run to run. The hot
// loops also exist as an AVX2 copy, picked at load time on x86-64; both sum in the same order.
// The forward over [0, a) then [a, N) through the state, and decode steps after a prefill, give
// bit-identical outputs to one forward (same recurrence).
// Every function validates first and writes nothing on error; the error names the field.
// Thread safety: calls may run concurrently on distinct outputs with distinct pools.
#pragma once

#include "absl/status/status.h"
#include "ferry/kernels/linear_attention.h"
#include "ferry/kernels/thread_pool.h"

namespace ferry::kernels {

absl::Status ValidateLinearAttentionConfig(const LinearAttentionConfig& config);
absl::Status ValidateLinearAttentionForwardArgs(const LinearAttentionForwardArgs& args);
absl::Status ValidateLinearAttentionBackwardArgs(const LinearAttentionBackwardArgs& args);
absl::Status ValidateLinearAttentionDecodeArgs(const LinearAttentionDecodeArgs& args);

// out and (if set) final_state.
absl::Status LinearAttentionForwardCpu(const LinearAttentionForwardArgs& args, ThreadPool& pool);

// dq, dk, dv (overwritten). Recomputes the forward.
absl::Status LinearAttentionBackwardCpu(const LinearAttentionBackwardArgs& args, ThreadPool& pool);

// Advances each sequence's state by one token and writes out.
absl::Status LinearAttentionDecodeCpu(const LinearAttentionDecodeArgs& args, ThreadPool& pool);

}  // namespace ferry::kernels
