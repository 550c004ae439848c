// The memory and kernels behind an attention worker's KV cache: the CPU backend (host pools,
// kernels/cpu) and the CUDA backend (device pools, LeanDecode and PrefillAttention;
// cuda_attention_backend.h). WorkerService keeps the bookkeeping (sequences, per-layer lengths,
// every check of a frame) on the backend's KvCache and calls the backend only to move data and
// to attend. Inputs and outputs are host memory (frame payloads), so the service is the same
// code for every device; a backend with device memory copies them in and out.
//
// Calls (the caller has checked everything beforehand):
//   WriteKv    one layer's new rows: runs (sequence, first position, count), each reserved in
//              cache(); k and v (rows, kv heads, head dim) in the KV dtype, rows in run order.
//   Attend     a decode batch of one layer: `args` as decode_attention.h with host pointers for
//              q, the block tables, lengths, ranges and the output states (args.kv is ignored:
//              the layer's pools are used); `plan` is the CPU kernel's plan (the CUDA backend
//              has its own schedule).
//   Prefill    a prompt chunk of one sequence and layer: q (tokens, q heads, head dim) float32;
//              query t sees the held positions [0, min(held, causal_offset + t + 1)) (none when
//              that is <= 0: the identity state); states (tokens, q heads, head dim) and
//              (tokens, q heads) float32, as Attend.
//   ExportBlocks / ImportBlocks  the body of a migration image: for each block of `blocks`, for
//              each layer, the block's K bytes then its V bytes (KvCache::BlockPoolBytes each).
//              The bytes are the same on every backend (DESIGN.md's layout), so a sequence moves
//              between CPU and CUDA workers unchanged.
// Completion: when a call returns, its outputs are written and its inputs no longer read.
// Errors: absl::Status (a device error is INTERNAL; the backend stays usable where the device
// does). Threads: one thread at a time (the worker's request thread).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/kernels/decode_attention.h"
#include "runtime/kv/kv_cache.h"

namespace ferry::offload {

class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;

  // "cpu" or "cuda:N", for logs and errors.
  virtual std::string name() const = 0;
  virtual kv::KvCache& cache() = 0;

  virtual absl::Status WriteKv(int layer, absl::Span<const kv::KvAppendRun> runs,
                               const uint8_t* k, const uint8_t* v) = 0;
  virtual absl::Status Attend(int layer, const kernels::DecodeAttentionArgs& args,
                              const kernels::CpuDecodeOptions& plan) = 0;
  virtual absl::Status Prefill(int layer, const std::vector<int32_t>& blocks, int64_t held,
                               int64_t causal_offset, int tokens, int num_q_heads,
                               float softmax_scale, const float* q, float* state_o,
                               float* state_lse, const kernels::CpuDecodeOptions& plan) = 0;
  virtual absl::Status ExportBlocks(absl::Span<const int32_t> blocks, uint8_t* image) = 0;
  virtual absl::Status ImportBlocks(absl::Span<const int32_t> blocks, const uint8_t* image) = 0;
};

// Makes a worker's backend for a KV config (capacity_bytes: the pools' bytes on its device).
using AttentionBackendFactory =
    std::function<absl::StatusOr<std::unique_ptr<AttentionBackend>>(const kv::KvCacheConfig&)>;

// Host pools and the CPU kernels on a pool of `num_threads` threads (0: hardware threads).
absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuAttentionBackend(
    const kv::KvCacheConfig& config, int num_threads);

}  // namespace ferry::offload
