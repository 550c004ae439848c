// The Llama-family decoder's small ops on CUDA (the GEMMs are cuBLASLt's, in runtime/model/cuda).
// Each mirrors runtime/model/dense_ops.h (the CPU backend) and keeps its numerics: float32
// arithmetic, RMSNorm sums of squares in double, RoPE angles float32(position * inv_freq) with
// cos/sin in double, rotate-half pairing, SwiGLU silu(gate) * up with an accurate exp.
//
// Shapes are row-major, device pointers; `rows` counts token rows. "act" outputs and inputs are
// in `act_dtype`, float32 or bf16 (the GEMM operand type of the backend); the residual stream x
// and GEMM outputs are float32.
//   EmbeddingGather  x (rows, hidden) f32 = table[tokens[r]] (table (vocab, hidden) in
//                    table_dtype f32/bf16); a token outside [0, vocab) gives a NaN row
//   RmsNorm          out (rows, dim) act = x[src_row(r)] * rsqrt(mean(x^2) + eps) * weight, with
//                    src_row(r) = row_index[r] (a gather, e.g. each chunk's last row) or r
//   RopeCosSin       cos_sin (rows, head_dim) f32: head_dim/2 cosines then sines per row's
//                    position
//   RopeSplitQkv     qkv (rows, (nh + 2 nkv) head_dim) f32 (+ bias, optional, per column) ->
//                    q (rows, nh, hd), k (rows, nkv, hd) with RoPE applied, v (rows, nkv, hd); f32
//   SwiGlu           act (rows, inter) = silu(gate) * up from gate_up (rows, 2 inter) f32
//   ConvertFloat     out (n) in out_dtype (f32 copy, bf16 / fp16 round to nearest even) from f32
//   AddBias          x (rows, dim) f32 += bias (dim)
//   ArgmaxRows       out (rows) int32: arg max of each logits row (rows, vocab) f32, lowest index
//                    on ties, NaN never wins (runtime/model/sampler.h's greedy rule)
// Every launch reads only device memory for its per-row data, so it may sit in a CUDA graph.
// Errors: bad sizes or dtypes are cudaErrorInvalidValue before launching; rows == 0 launches
// nothing; launch errors are returned as is.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "ferry/kernels/dtype.h"

namespace ferry::kernels {

cudaError_t EmbeddingGather(const int32_t* tokens, int rows, const void* table, DType table_dtype,
                            int vocab, int hidden, float* x, cudaStream_t stream);

cudaError_t RmsNorm(const float* x, const int32_t* row_index, int rows, int dim,
                    const float* weight, double eps, void* out, DType act_dtype,
                    cudaStream_t stream);

cudaError_t RopeCosSin(const int32_t* positions, int rows, const float* inv_freq, int head_dim,
                       float* cos_sin, cudaStream_t stream);

cudaError_t RopeSplitQkv(const float* qkv, const float* bias, const float* cos_sin, int rows,
                         int num_heads, int num_kv_heads, int head_dim, float* q, float* k,
                         float* v, cudaStream_t stream);

cudaError_t SwiGlu(const float* gate_up, int rows, int inter, void* act, DType act_dtype,
                   cudaStream_t stream);

cudaError_t ConvertFloat(const float* in, int64_t n, void* out, DType out_dtype,
                         cudaStream_t stream);

cudaError_t AddBias(float* x, int rows, int dim, const float* bias, cudaStream_t stream);

cudaError_t ArgmaxRows(const float* logits, int rows, int vocab, int32_t* out,
                       cudaStream_t stream);

}  // namespace ferry::kernels
