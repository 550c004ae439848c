// The Hopper forward of causal linear attention (private to kernels/cuda; public contract:
// ferry/kernels/cuda_linear_attention.h, whose forward launcher calls these).
//
// Serves the forward of the feature maps kEluPlusOne and kIdentity (normalised or not), bf16 and
// fp16, head dims 64 and 128 (those of the build), any GQA group, varlen batches, an initial and
// a final state, row_stats and out_residual, for unsplit walks (one block per value-column slice,
// q head and sequence; segments stay on the mma.sync core), on devices running the sm_90a code.
// Otherwise (kOnePlusXMaxNorm, d = 256, other GPUs, builds without 90a) the caller runs the
// mma.sync core (linear_attention_core.cuh). Both compute the same function to float32 rounding.
#pragma once

#include <cuda_runtime.h>

#include "linear_attention_core.cuh"

namespace ferry::kernels::linear_cuda {

// Whether RunSm90Forward serves an unsplit forward of `p` with head dim `head_dim` on the
// current device. Host only; the first call per device reads the kernel's attributes.
bool Sm90ForwardServes(const CoreParams& p, int head_dim);

// The forward over every sequence (grid: slices of 64 value columns, q heads, sequences).
cudaError_t RunSm90Forward(const CoreParams& p, int head_dim, cudaStream_t stream);

}  // namespace ferry::kernels::linear_cuda
