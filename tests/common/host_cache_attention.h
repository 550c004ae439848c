// The in-process reference of the attention-worker tests (tests/integration/offload_test,
// tests/gpu/cuda_worker_test): DecodeAttentionCpu over sequences of a host kv::KvCache, the
// states a worker holding the same positions must reply with.
//
// AttendHostCache: one layer; sequence sequences[i] attends over its first lens[i] positions
//   (each within the sequence's reserved blocks) with q (num_seqs, num_q_heads, head_dim) float32,
//   softmax scale 1/sqrt(head_dim), on a pool of 2 threads with `plan`. Returns the partial
//   states (attention_client.h) or the kernel's error.
#pragma once

#include <cstdint>
#include <span>

#include "absl/status/statusor.h"
#include "ferry/kernels/cpu_attention.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/offload/attention_client.h"

namespace ferry::offload::test {

absl::StatusOr<PartialStates> AttendHostCache(const kv::KvCache& cache, int layer,
                                              std::span<const uint64_t> sequences,
                                              std::span<const int32_t> lens, const float* q,
                                              int num_q_heads,
                                              const kernels::CpuDecodeOptions& plan = {});

}  // namespace ferry::offload::test
