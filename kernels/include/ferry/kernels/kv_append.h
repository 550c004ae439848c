// Appending new K/V rows to a paged KV cache on CUDA (DESIGN.md's layout).
//
// Contract
//   k_pool, v_pool  (num_blocks, num_kv_heads, block_size, head_dim) in `dtype`, device, written
//   k, v            (num_rows, num_kv_heads, head_dim) in `src_dtype`, device: row r's new entries
//   row_slots       (num_rows) int64, device: row r goes to block row_slots[r] / block_size, slot
//                   row_slots[r] % block_size (vLLM calls this the slot mapping). A slot outside
//                   [0, num_blocks * block_size) is skipped (the pools are never written out of
//                   bounds); a negative slot is how a caller masks a row out on purpose.
//   src_dtype is float32 (converted with round-to-nearest-even, as dtype.h's host conversions) or
//   equal to dtype (copied). head_dim a multiple of 8, pools, k and v 16-byte aligned.
//   Only device pointers are read, so the launch may sit in a CUDA graph whose row_slots change
//   between replays.
// Errors: bad shapes, dtypes or alignment are cudaErrorInvalidValue before any launch; launch
// errors are returned as is. num_rows == 0 launches nothing.
// Threads: any host thread; ordering is the stream's.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ferry/kernels/dtype.h"

namespace ferry::kernels {

struct KvAppendArgs {
  void* k_pool = nullptr;
  void* v_pool = nullptr;
  DType dtype = DType::kBFloat16;
  int num_blocks = 0;
  int num_kv_heads = 0;
  int block_size = 0;
  int head_dim = 0;
  int num_rows = 0;
  const int64_t* row_slots = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  DType src_dtype = DType::kFloat32;
};

cudaError_t KvAppend(const KvAppendArgs& args, cudaStream_t stream);

}  // namespace ferry::kernels
