// CPU backends of Ferry's attention math: decode attention over a paged KV cache and the merge of
// partial states. Used by CPU attention workers (memory-rich hosts), by the coordinator's
// in-process attention, and as the fast reference for the CUDA kernels.
//
// Contract: see decode_attention.h for the problem and attention_state.h for the states. All
// pointers are host memory owned by the caller. Work is split as the CUDA kernel splits it
// (lean_schedule.h): the batch's (sequence, KV head, KV tile) work is dealt in contiguous ranges
// to `num_workers` workers and the partial states of a split head are merged in worker order, so
// the result is bit-identical from run to run for a given num_workers and instruction set.
// Inner loops are vectorised for AVX-512, AVX2+FMA+F16C or SSE2, picked at run time.
// Thread safety: calls may run concurrently on distinct outputs with distinct pools.
#pragma once

#include <cstdint>
#include <string_view>

#include "absl/status/status.h"
#include "ferry/kernels/decode_attention.h"
#include "ferry/kernels/thread_pool.h"

namespace ferry::kernels {

struct CpuDecodeOptions {
  int num_workers = 0;     // 0: the pool's thread count
  int kv_tile_size = 256;  // positions per unit of scheduled work
};

// Checks shapes, pointers, block tables and ranges; the error names the offending field.
absl::Status ValidateDecodeAttentionArgs(const DecodeAttentionArgs& args);

// Validates, then computes. On error nothing is written.
absl::Status DecodeAttentionCpu(const DecodeAttentionArgs& args, ThreadPool& pool,
                                const CpuDecodeOptions& options = {});

// Merges num_parts arrays of partial states into one (the coordinator's cross-worker merge).
//   parts_o (num_parts, num_states, head_dim), parts_lse (num_parts, num_states)
//   out_o (num_states, head_dim), out_lse (num_states); parts merged in index order.
absl::Status MergeStatesCpu(const float* parts_o, const float* parts_lse, int num_parts,
                            int64_t num_states, int head_dim, float* out_o, float* out_lse,
                            ThreadPool* pool = nullptr);

// The instruction set the CPU kernels use: "avx512", "avx2" or "baseline" (by default the best
// this CPU runs).
const char* CpuKernelIsa();

// For tests and benchmarks: makes the CPU kernels use `isa` ("avx512", "avx2", "baseline", or
// "best" for the default) from now on, process-wide. Returns false, changing nothing, if the name
// is unknown or this CPU cannot run that set. Not for use while kernels run.
bool SetCpuKernelIsa(std::string_view isa);

}  // namespace ferry::kernels
