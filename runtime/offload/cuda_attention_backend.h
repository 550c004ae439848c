// The CUDA attention backend (attention_backend.h) of a `ferry-worker --device cuda:N`, and the
// pinned-memory allocator for that worker's frames. Built only with CUDA (FERRY_HAVE_CUDA).
//
// Memory: the KV pools are a kv::CudaKvPool on device N (DESIGN.md's layout: the same bytes as
// the CPU backend's host pools, so migration images move between CPU and CUDA workers as they
// are). Frames arrive and leave in host memory: Debian's UCX 1.13 reports no CUDA memory type
// (UcxNode::SupportsCudaMemory), so nothing here hands device pointers to UCX; instead the
// worker's BufferPool takes page-locked memory from PinnedFrameAllocator(N) (each buffer
// registered once and then reused by the pool), q and new K/V are copied from the request frame
// to the device with cudaMemcpyAsync on the backend's stream, and the partial states straight
// back into the reply frame. A frame whose pinned allocation failed (heap fallback) is copied
// the same way, only slower.
// Device scratch (q, rows, block tables, states) and LeanDecode's workspace grow to the largest
// request seen and are reused; small host tables go through one pinned staging buffer.
// Kernels: appends through CudaKvPool::StageStep + Append (KvAppend); Attend is LeanDecode over
// the layer's pools; Prefill is PrefillAttention (tensor cores). Accuracy is those kernels':
// decode ~1e-5 relative for GQA groups <= 8, prefill a few 1e-3 (bf16).
// Waits: every call ends by waiting for its stream, bounded by kDeviceTimeout: a device that does
// not finish is DEADLINE_EXCEEDED, not a hang. Kernel-reported errors (bad block, bad range) are
// INTERNAL.
// Threads: the worker's request thread; each call makes device N current on it. The allocator
// may run on any thread (it makes device N current there).
#pragma once

#include <memory>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "runtime/offload/attention_backend.h"
#include "runtime/transport/buffer_pool.h"

namespace ferry::offload {

struct CudaBackendOptions {
  int device = 0;
  int max_batch = 4096;           // sequences per Attend / append
  int max_prefill_tokens = 16384;  // rows per Prefill chunk
};

inline constexpr absl::Duration kDeviceTimeout = absl::Seconds(60);

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCudaAttentionBackend(
    const kv::KvCacheConfig& config, const CudaBackendOptions& options);

// Page-locked host memory on `device` (portable), for the worker's BufferPool; static storage.
// nullptr for a device number outside [0, 64).
const transport::BufferAllocator* PinnedFrameAllocator(int device);

}  // namespace ferry::offload
