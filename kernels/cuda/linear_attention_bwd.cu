// Causal linear attention backward on CUDA: dden (a row pre-pass), dq (forward-direction pass),
// the max-norm fix-up of dq, then dk and dv (reverse passes); or, unsplit at d = 64 and 128, the
// three passes in one launch followed by the max-norm fix-ups of dq and dk.
// Contract: ferry/kernels/cuda_linear_attention.h; the kernels: linear_attention_core.cuh.
#include <algorithm>
#include <cstdint>

#include "ferry/kernels/cuda_linear_attention.h"
#include "linear_attention_core.cuh"

namespace ferry::kernels {
namespace {

using linear_cuda::BitsToFloat;
using linear_cuda::FloatToBits;

constexpr size_t kAlign = 256;
size_t AlignUp(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Float arrays of the workspace, in order; gq to state_gk are zeroed per call; then the segment
// table and records (linear_attention_core.cuh), when the passes are split.
struct WorkspaceLayout {
  size_t dden = 0, gq = 0, gk = 0, state_gq = 0, state_gk = 0, total = 0;
};

WorkspaceLayout LayoutWorkspace(const LinearAttentionConfig& c, int64_t total_tokens,
                                int segment_chunks, linear_cuda::SegmentWorkspace* segments) {
  const size_t tokens = static_cast<size_t>(std::max<int64_t>(total_tokens, 0));
  const size_t seqs = static_cast<size_t>(std::max(c.num_seqs, 0));
  const size_t hq = static_cast<size_t>(std::max(c.num_q_heads, 0));
  const size_t hkv = static_cast<size_t>(std::max(c.num_kv_heads, 0));
  WorkspaceLayout w;
  w.dden = 0;
  w.gq = w.dden + AlignUp(sizeof(float) * tokens * hq);
  w.gk = w.gq + AlignUp(sizeof(float) * tokens * hq);
  w.state_gq = w.gk + AlignUp(sizeof(float) * tokens * hkv);
  w.state_gk = w.state_gq + AlignUp(sizeof(float) * seqs * hq);
  w.total = w.state_gk + AlignUp(sizeof(float) * seqs * hkv);
  using linear_cuda::Op;
  using linear_cuda::SegmentHeadFloats;
  const int64_t head_floats =
      std::max({SegmentHeadFloats<Op::kGradQ>(c.head_dim) * static_cast<int64_t>(hq),
                SegmentHeadFloats<Op::kGradK>(c.head_dim) * static_cast<int64_t>(hkv),
                SegmentHeadFloats<Op::kGradV>(c.head_dim) * static_cast<int64_t>(hkv)});
  *segments = linear_cuda::LayoutSegmentWorkspace(c, total_tokens, segment_chunks, head_floats,
                                                  w.total);
  w.total = segments->total;
  return w;
}

// dden_r = -(dout_r . o_r) / den_r with o = out + out_residual (the forward's output to ~16
// mantissa bits: with bf16 o alone the error of dden, times a denominator sum z that grows with
// the position, would cost dq about 2^-9 sqrt(N) relative for elu + 1). One warp per
// (token, q head) row, each lane reading 4 elements (8 bytes) of each array at a time: with one
// element per lane and load, the row's loads, not the bytes, set the kernel's time.
__device__ __forceinline__ float2 UnpackTwo(uint32_t w, bool fp16) {
  return fp16 ? __half22float2(*reinterpret_cast<const __half2*>(&w))
              : make_float2(__uint_as_float(w << 16), __uint_as_float(w & 0xffff0000u));
}

__global__ void __launch_bounds__(256) LinearDdenKernel(const uint16_t* dout, const uint16_t* out,
                                                        const uint16_t* out_residual,
                                                        const float* stats, float* dden,
                                                        int64_t rows, int head_dim, bool fp16) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t row = int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32; row < rows;
       row += warps) {
    // head_dim is a multiple of 4 and the arrays 16-byte aligned (checked by the launcher).
    const uint2* d4 = reinterpret_cast<const uint2*>(dout + row * head_dim);
    const uint2* o4 = reinterpret_cast<const uint2*>(out + row * head_dim);
    const uint2* r4 =
        out_residual != nullptr ? reinterpret_cast<const uint2*>(out_residual + row * head_dim)
                                : nullptr;
    float dot = 0.0f;
    for (int c = lane; c < head_dim / 4; c += 32) {
      const uint2 dv = d4[c];
      const uint2 ov = o4[c];
      float2 o01 = UnpackTwo(ov.x, fp16), o23 = UnpackTwo(ov.y, fp16);
      if (r4 != nullptr) {
        const uint2 rv = r4[c];
        const float2 r01 = UnpackTwo(rv.x, fp16), r23 = UnpackTwo(rv.y, fp16);
        o01.x += r01.x;
        o01.y += r01.y;
        o23.x += r23.x;
        o23.y += r23.y;
      }
      const float2 d01 = UnpackTwo(dv.x, fp16), d23 = UnpackTwo(dv.y, fp16);
      dot += d01.x * o01.x + d01.y * o01.y + d23.x * o23.x + d23.y * o23.y;
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
    if (lane == 0) dden[row] = -dot / stats[row * kLinearRowStats];
  }
}

// The max-norm fix-up: dx_r += (d loss / d m_r) / m_r * x_r at the rows that attain a running
// maximum m of ||x|| (ws_grad holds the summed gradient there, zero elsewhere). x = q: m = a,
// field 1 of the row's stats, one stats row per q row (stats_rows_per_row 1); x = k: m = b,
// field 2, read from the group's first q head (row r of (token, kv head) is stats row r * group).
// One warp per row of x.
__global__ void __launch_bounds__(256) LinearNormFixupKernel(const uint16_t* x,
                                                             const float* stats,
                                                             const float* ws_grad, uint16_t* dx,
                                                             int64_t rows, int stats_rows_per_row,
                                                             int stats_field, int head_dim,
                                                             bool fp16) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t{gridDim.x} * (blockDim.x / 32);
  for (int64_t row = int64_t{blockIdx.x} * (blockDim.x / 32) + threadIdx.x / 32; row < rows;
       row += warps) {
    const float grad = ws_grad[row];
    if (grad == 0.0f) continue;
    const float scale =
        grad / stats[row * stats_rows_per_row * kLinearRowStats + stats_field];
    for (int e = lane; e < head_dim; e += 32) {
      const int64_t i = row * head_dim + e;
      dx[i] = FloatToBits(BitsToFloat(dx[i], fp16) + scale * BitsToFloat(x[i], fp16), fp16);
    }
  }
}

// Grid of a one-warp-per-row kernel over `rows` rows (8 warps per block).
int RowGrid(int64_t rows) { return static_cast<int>(std::min<int64_t>((rows + 7) / 8, 8192)); }

}  // namespace

size_t LinearAttentionBackwardWorkspaceSize(const LinearAttentionConfig& config,
                                            int64_t total_tokens, int segment_chunks) {
  linear_cuda::SegmentWorkspace segments;
  const int chunks_per_segment =
      linear_cuda::CheckConfig(config) == cudaSuccess
          ? linear_cuda::SegmentChunks(config, total_tokens, segment_chunks)
          : 0;
  return LayoutWorkspace(config, total_tokens, chunks_per_segment, &segments).total;
}

cudaError_t LinearAttentionBackwardCuda(const LinearAttentionBackwardCudaArgs& args,
                                        void* workspace, size_t workspace_bytes,
                                        cudaStream_t stream, int segment_chunks) {
  using namespace linear_cuda;
  const LinearAttentionConfig& c = args.config;
  cudaError_t error = CheckConfig(c);
  if (error != cudaSuccess) return error;
  if (args.total_tokens < 0 || args.total_tokens > INT32_MAX) return cudaErrorInvalidValue;
  if (c.num_seqs == 0) return cudaSuccess;
  if (args.cu_seqlens == nullptr) return cudaErrorInvalidValue;
  if (args.total_tokens > 0 &&
      (args.q == nullptr || args.k == nullptr || args.v == nullptr || args.dout == nullptr ||
       args.dq == nullptr || args.dk == nullptr || args.dv == nullptr ||
       args.row_stats == nullptr || (c.normalize && args.out == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (!Aligned16(args.q) || !Aligned16(args.k) || !Aligned16(args.v) || !Aligned16(args.out) ||
      !Aligned16(args.out_residual) || !Aligned16(args.dout) || !Aligned16(args.dq) || !Aligned16(args.dk) ||
      !Aligned16(args.dv) || !Aligned16(args.row_stats)) {
    return cudaErrorInvalidValue;
  }
  const int chunks_per_segment = SegmentChunks(c, args.total_tokens, segment_chunks);
  SegmentWorkspace segments;
  const WorkspaceLayout w = LayoutWorkspace(c, args.total_tokens, chunks_per_segment, &segments);
  if (workspace == nullptr || workspace_bytes < w.total || !Aligned16(workspace)) {
    return cudaErrorInvalidValue;
  }
  uint8_t* base = static_cast<uint8_t*>(workspace);
  // The max-norm gradients are summed with atomics: start from zero.
  if ((error = cudaMemsetAsync(base + w.gq, 0, segments.seg_first - w.gq, stream)) !=
      cudaSuccess) {
    return error;
  }
  CoreParams p = MakeCoreParams(c, args.cu_seqlens, args.total_tokens);
  p.q = static_cast<const uint16_t*>(args.q);
  p.k = static_cast<const uint16_t*>(args.k);
  p.v = static_cast<const uint16_t*>(args.v);
  p.dout = static_cast<const uint16_t*>(args.dout);
  p.stats = const_cast<float*>(args.row_stats);  // read only in the backward passes
  p.initial_state = args.initial_state;
  p.d_initial_state = args.d_initial_state;
  p.ws_dden = reinterpret_cast<float*>(base + w.dden);
  p.ws_gq = reinterpret_cast<float*>(base + w.gq);
  p.ws_gk = reinterpret_cast<float*>(base + w.gk);
  p.ws_state_gq = reinterpret_cast<float*>(base + w.state_gq);
  p.ws_state_gk = reinterpret_cast<float*>(base + w.state_gk);

  error = PrepareSegments(p, segments, base, chunks_per_segment, args.total_tokens, stream);
  if (error != cudaSuccess) return error;

  const int64_t q_rows = args.total_tokens * c.num_q_heads;
  int head_dim = c.head_dim;
  bool fp16 = p.fp16;
  if (c.normalize && q_rows > 0) {
    const uint16_t* dout = p.dout;
    const uint16_t* out = static_cast<const uint16_t*>(args.out);
    const uint16_t* residual = static_cast<const uint16_t*>(args.out_residual);
    const float* stats = p.stats;
    float* dden = p.ws_dden;
    int64_t rows = q_rows;
    void* kernel_args[] = {&dout, &out, &residual, &stats, &dden, &rows, &head_dim, &fp16};
    error = cudaLaunchKernel(reinterpret_cast<const void*>(LinearDdenKernel), dim3(RowGrid(rows)),
                             dim3(256), kernel_args, 0, stream);
    if (error != cudaSuccess) return error;
  }
  const bool lifted = c.feature_map == LinearFeatureMap::kOnePlusXMaxNorm;
  // The max-norm terms the dq pass sums into ws_gq (ws_gk): added to dq (dk) at the rows that
  // set a running maximum, once that pass has run.
  auto norm_fixup = [&](const uint16_t* x, const float* ws_grad, void* dx_out, int64_t rows,
                        int stats_rows_per_row, int stats_field) -> cudaError_t {
    if (!lifted || rows == 0) return cudaSuccess;
    const float* stats = p.stats;
    uint16_t* dx = static_cast<uint16_t*>(dx_out);
    void* kernel_args[] = {&x,    &stats, &ws_grad, &dx, &rows, &stats_rows_per_row, &stats_field,
                           &head_dim, &fp16};
    return cudaLaunchKernel(reinterpret_cast<const void*>(LinearNormFixupKernel),
                            dim3(RowGrid(rows)), dim3(256), kernel_args, 0, stream);
  };
  auto q_norm_fixup = [&] { return norm_fixup(p.q, p.ws_gq, args.dq, q_rows, 1, 1); };
  if (BackwardMerged(c, chunks_per_segment, args.d_initial_state != nullptr)) {
    MergedBackwardParams m{p, p, p};
    m.dq.out = static_cast<uint16_t*>(args.dq);
    m.dq.grid_heads = c.num_q_heads;
    m.dk.out = static_cast<uint16_t*>(args.dk);
    m.dk.grid_heads = c.num_kv_heads;
    m.dk.k_norm_by_fixup = true;
    m.dv.out = static_cast<uint16_t*>(args.dv);
    m.dv.grid_heads = c.num_kv_heads;
    if ((error = RunBackwardMergedForHeadDim(m, c.head_dim, stream)) != cudaSuccess ||
        (error = q_norm_fixup()) != cudaSuccess) {
      return error;
    }
    return norm_fixup(p.k, p.ws_gk, args.dk, args.total_tokens * c.num_kv_heads,
                      c.num_q_heads / c.num_kv_heads, 2);
  }
  p.out = static_cast<uint16_t*>(args.dq);
  p.grid_heads = c.num_q_heads;
  error = RunCoreForHeadDim<Op::kGradQ>(p, c.head_dim, args.total_tokens, stream);
  if (error != cudaSuccess || (error = q_norm_fixup()) != cudaSuccess) return error;
  p.out = static_cast<uint16_t*>(args.dk);
  p.grid_heads = c.num_kv_heads;
  error = RunCoreForHeadDim<Op::kGradK>(p, c.head_dim, args.total_tokens, stream);
  if (error != cudaSuccess) return error;
  p.out = static_cast<uint16_t*>(args.dv);
  return RunCoreForHeadDim<Op::kGradV>(p, c.head_dim, args.total_tokens, stream);
}

}  // namespace ferry::kernels
