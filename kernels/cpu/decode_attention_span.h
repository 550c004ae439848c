// Internal to kernels/cpu: the per-instruction-set inner loop of CPU decode attention.
// decode_attention_span.inc is compiled once per instruction set (see kernels/CMakeLists.txt);
// decode_attention_cpu.cc picks one at run time.
#pragma once

#include <cstdint>

#include "ferry/kernels/dtype.h"

namespace ferry::kernels::cpu_internal {

// Positions [begin, end) of one (sequence, KV head) in the paged pools.
struct KvSpan {
  const void* k_pool;
  const void* v_pool;
  DType dtype;
  int num_kv_heads;
  int block_size;
  int head_dim;
  int kv_head;
  const int32_t* blocks;  // the sequence's block table
  int64_t begin;
  int64_t end;
};

// Floats of K (and of V) converted to float32 per chunk: 8 KiB each, so both stay in L1.
constexpr int kSpanChunkFloats = 2048;

// Floats of scratch AttendSpan needs per call: K and V chunks, scores (rows padded by up to one
// vector of 16), running max and sum.
constexpr int64_t AttendSpanScratchFloats(int head_dim, int group) {
  return 2 * kSpanChunkFloats + int64_t{group} * (kSpanChunkFloats / head_dim + 16 + 2);
}

// Attention of `group` query heads (q_scaled: (group, head_dim), softmax scale already applied)
// over the span. Writes the partial states: o (group, head_dim), lse (group). begin < end.
using AttendSpanFn = void (*)(const KvSpan& span, const float* q_scaled, int group, float* o,
                              float* lse, float* scratch);

namespace avx512 { void AttendSpan(const KvSpan&, const float*, int, float*, float*, float*); }
namespace avx2 { void AttendSpan(const KvSpan&, const float*, int, float*, float*, float*); }
namespace baseline { void AttendSpan(const KvSpan&, const float*, int, float*, float*, float*); }

}  // namespace ferry::kernels::cpu_internal
