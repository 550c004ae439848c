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

// Positions per chunk: one online-softmax update per head per chunk. A multiple of every
// SIMD width (score steps cover up to kWidth positions).
constexpr int kSpanChunkPositions = 64;

// Floats of scratch AttendSpan needs per call: q and o in the decoder's lane order, scores of a
// chunk for up to 4 heads, running max and sum.
constexpr int64_t AttendSpanScratchFloats(int head_dim, int group) {
  return 2 * int64_t{group} * head_dim + 4 * kSpanChunkPositions + 2 * int64_t{group};
}

// Attention of `group` query heads (q_scaled: (group, head_dim), softmax scale already applied)
// over the span. Writes the partial states: o (group, head_dim), lse (group). begin < end.
using AttendSpanFn = void (*)(const KvSpan& span, const float* q_scaled, int group, float* o,
                              float* lse, float* scratch);

namespace avx512 { void AttendSpan(const KvSpan&, const float*, int, float*, float*, float*); }
namespace avx2 { void AttendSpan(const KvSpan&, const float*, int, float*, float*, float*); }
namespace baseline { void AttendSpan(const KvSpan&, const float*, int, float*, float*, float*); }

}  // namespace ferry::kernels::cpu_internal
