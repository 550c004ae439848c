// Causal linear attention forward on CUDA: the launcher of the chunkwise core's forward pass.
// Contract: ferry/kernels/cuda_linear_attention.h; the kernel: linear_attention_core.cuh.
#include <algorithm>
#include <cstdint>

#include "ferry/kernels/cuda_linear_attention.h"
#include "linear_attention_core.cuh"
#include "linear_attention_sm90.h"

namespace ferry::kernels {

namespace {

linear_cuda::SegmentWorkspace ForwardWorkspace(const LinearAttentionConfig& c, int64_t total_tokens,
                                               int segment_chunks) {
  using namespace linear_cuda;
  return LayoutSegmentWorkspace(
      c, total_tokens, segment_chunks,
      SegmentHeadFloats<Op::kForward>(c.head_dim) * std::max(c.num_q_heads, 0), 0);
}

}  // namespace

size_t LinearAttentionForwardWorkspaceSize(const LinearAttentionConfig& config,
                                           int64_t total_tokens, int segment_chunks) {
  if (linear_cuda::CheckConfig(config) != cudaSuccess) return 0;
  return ForwardWorkspace(config, total_tokens,
                          linear_cuda::SegmentChunks(config, total_tokens, segment_chunks))
      .total;
}

cudaError_t LinearAttentionForwardCuda(const LinearAttentionForwardArgs& args, float* row_stats,
                                       void* out_residual, void* workspace,
                                       size_t workspace_bytes, cudaStream_t stream,
                                       int segment_chunks) {
  using namespace linear_cuda;
  const LinearAttentionConfig& c = args.config;
  cudaError_t error = CheckConfig(c);
  if (error != cudaSuccess) return error;
  if (args.total_tokens < 0 || args.total_tokens > INT32_MAX) return cudaErrorInvalidValue;
  if (c.num_seqs == 0) return cudaSuccess;
  if (args.cu_seqlens == nullptr) return cudaErrorInvalidValue;
  if (args.total_tokens > 0 &&
      (args.q == nullptr || args.k == nullptr || args.v == nullptr || args.out == nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned16(args.q) || !Aligned16(args.k) || !Aligned16(args.v) || !Aligned16(args.out) ||
      !Aligned16(row_stats) || !Aligned16(out_residual)) {
    return cudaErrorInvalidValue;
  }
  const int group = c.num_q_heads / c.num_kv_heads;
  const int64_t state_floats =
      int64_t{c.num_seqs} * c.num_kv_heads * MakeLinearStateLayout(c.head_dim, group).stride;
  if (args.initial_state != nullptr && args.final_state != nullptr &&
      args.initial_state < args.final_state + state_floats &&
      args.final_state < args.initial_state + state_floats) {
    return cudaErrorInvalidValue;  // in place is not served: see the header
  }
  const int chunks_per_segment = SegmentChunks(c, args.total_tokens, segment_chunks);
  const SegmentWorkspace w = ForwardWorkspace(c, args.total_tokens, chunks_per_segment);
  if (w.total > 0 && (workspace == nullptr || workspace_bytes < w.total || !Aligned16(workspace))) {
    return cudaErrorInvalidValue;
  }
  CoreParams p = MakeCoreParams(c, args.cu_seqlens, args.total_tokens);
  p.q = static_cast<const uint16_t*>(args.q);
  p.k = static_cast<const uint16_t*>(args.k);
  p.v = static_cast<const uint16_t*>(args.v);
  p.out = static_cast<uint16_t*>(args.out);
  p.out_residual = static_cast<uint16_t*>(out_residual);
  p.stats = row_stats;
  p.initial_state = args.initial_state;
  p.final_state = args.final_state;
  p.grid_heads = c.num_q_heads;
  // On Hopper the walks (unsplit, or pass C of segments) run the wgmma kernel
  // (linear_attention_sm90.h); automatic calls it runs faster unsplit are not split.
  if (chunks_per_segment > 0 && segment_chunks == 0 && Sm90ForwardServes(c, false) &&
      Sm90ForwardOutrunsSegments(c, args.total_tokens)) {
    return RunSm90Forward(p, c.head_dim, stream);
  }
  error = PrepareSegments(p, w, static_cast<uint8_t*>(workspace), chunks_per_segment,
                          args.total_tokens, stream);
  if (error != cudaSuccess) return error;
  if (Sm90ForwardServes(c, chunks_per_segment > 0)) {
    if (chunks_per_segment > 0) {  // passes A and B on the core, pass C on Hopper
      error = RunSegmentSumsForHeadDim<Op::kForward>(p, c.head_dim, args.total_tokens, stream);
      if (error != cudaSuccess) return error;
    }
    return RunSm90Forward(p, c.head_dim, stream);
  }
  return RunCoreForHeadDim<Op::kForward>(p, c.head_dim, args.total_tokens, stream);
}

}  // namespace ferry::kernels
