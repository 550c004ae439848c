// The decoder's CUDA backend: the same Decoder (decoder.h), model (checkpoint.h), attention
// interface (attention_step.h), sampler and generation loop as the CPU backend; only the math
// runs on a GPU.
//
// Weights: copied to the device once at creation, in options.weight_dtype:
//   kBFloat16  bf16 weights and GEMM operands (activations rounded to bf16 where they enter a
//              GEMM), float32 accumulation (cuBLASLt), float32 residual stream, norms, RoPE,
//              softmax and logits. The production setting.
//   kFloat32   float32 throughout (no TF32): the exactness setting for tests, which compare with
//              the float64 reference and with the CPU backend.
// Ops per step: embedding gather, per layer RMSNorm, one QKV GEMM, RoPE (+bias) split, attention,
// O GEMM accumulating into the residual (+bias), RMSNorm, one gate_up GEMM, SwiGLU, down GEMM
// accumulating into the residual; final RMSNorm of each chunk's last row, LM head GEMM, and the
// greedy arg max on the device (ForwardGreedy copies only the ids to the host).
// Attention: with a step on the same device (CudaAttention; device_stream() != nullptr) the whole
// step stays on the GPU, and a decode step (one row per chunk) whose row count repeats is
// captured into a CUDA graph on its second occurrence and replayed from then on (the token ids,
// positions and the attention tables are device buffers rewritten before each replay). With a
// host step (InProcessAttention, OffloadedAttention) q/k/v go to the host and back each layer,
// per micro-batch when options.micro_batches > 1: a range's attention starts as soon as its q/k/v
// reach the host, while the GPU runs the other ranges' dense work (decoder.h's schedule).
// Limits: at most options.max_rows rows and max_chunks chunks per Forward (INVALID_ARGUMENT
// beyond); scratch is sized by them.
// Errors: FAILED_PRECONDITION when this build has no CUDA or the device does not exist; CUDA and
// cuBLASLt errors are INTERNAL. Threads: one Forward at a time (the Decoder's rule).
// No CUDA types in this header.
#pragma once

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "ferry/kernels/dtype.h"
#include "runtime/model/decoder.h"

namespace ferry::model {

struct CudaDecoderOptions {
  int device = 0;
  DType weight_dtype = DType::kBFloat16;  // kBFloat16 or kFloat32
  int max_rows = 2048;
  int max_chunks = 256;
  bool cuda_graphs = true;
  // > 1: micro-batch pipelining (decoder.h) with a host attention step (workers or the CPU);
  // INVALID_ARGUMENT with attention on the GPU.
  int micro_batches = 1;
};

// UNIMPLEMENTED for linear-attention models (their dense path is the CPU backend).
absl::StatusOr<std::unique_ptr<Decoder>> CreateCudaDecoder(const Model& model,
                                                           AttentionStep& attention,
                                                           const CudaDecoderOptions& options);

// Where the dense layers run, from a --device flag: "cpu" -> -1, "cuda" -> 0, "cuda:N" -> N.
// INVALID_ARGUMENT otherwise. Says nothing about whether the device exists.
absl::StatusOr<int> ParseComputeDevice(std::string_view spec);

}  // namespace ferry::model
