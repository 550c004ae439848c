// The Hopper forward of causal linear attention (private to kernels/cuda; public contract:
// ferry/kernels/cuda_linear_attention.h, whose forward launcher calls these).
//
// Serves every forward the mma.sync core (linear_attention_core.cuh) serves at head dims 64 and
// 128 (those of the build), on devices that run its sm_90a code: every feature map, normalised or
// not, bf16 and fp16, any GQA group, varlen batches, an initial and a final state, row_stats and
// out_residual; unsplit (one block per 64 value columns, q head and sequence) or in sequence
// segments (the core's passes A and B sum the segments, this kernel walks them: pass C). Both
// kernels compute the same function to float32 rounding (the same bf16 operands, hi + lo pairs
// for the state and the scores).
#pragma once

#include <cuda_runtime.h>

#include "linear_attention_core.cuh"

namespace ferry::kernels::linear_cuda {

// Whether RunSm90Forward serves (and outruns the core on) a forward of `c`, split into segments
// or not, on the current device. Host only; the first call per device reads the kernel's
// attributes.
bool Sm90ForwardServes(const LinearAttentionConfig& c, bool segmented);

// Whether an automatic call (segment_chunks 0) that the core would split into sequence segments
// runs faster here unsplit. Host only.
bool Sm90ForwardOutrunsSegments(const LinearAttentionConfig& c, int64_t total_tokens);

// The forward over every sequence (grid: slices of 64 value columns, q heads, sequences), or,
// when p.seg_first is set, pass C over every segment: the caller ran passes A and B
// (RunSegmentSumsForHeadDim; from linear_attention_fwd.cu, the one file that instantiates the
// core's forward kernels: a second instantiation would be a second registered copy, and the
// shared-memory attribute set on one would not cover launches of the other).
cudaError_t RunSm90Forward(const CoreParams& p, int head_dim, cudaStream_t stream);

}  // namespace ferry::kernels::linear_cuda
