// MergeStates on CUDA: the coordinator's cross-worker merge of partial states
// (ferry/kernels/lean_attention.h has the contract; attention_state.h the rule).
// One thread per (state, element): each applies ComputeMergeWeights part by part in index
// order, exactly the sequence MergeStatesAt runs on the CPU, so the two differ only by the
// device's expf/logf rounding.
#include <cstdint>

#include "ferry/kernels/attention_state.h"
#include "ferry/kernels/lean_attention.h"

namespace ferry::kernels {
namespace {

__global__ void MergeStatesKernel(const float* __restrict__ parts_o,
                                  const float* __restrict__ parts_lse, int num_parts,
                                  int64_t num_states, int head_dim, float* __restrict__ out_o,
                                  float* __restrict__ out_lse) {
  const int64_t total = num_states * head_dim;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < total;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t state = e / head_dim;
    float o = 0.0f;
    float lse = FERRY_EMPTY_LSE;
    for (int p = 0; p < num_parts; ++p) {
      const MergeWeights w = ComputeMergeWeights(lse, parts_lse[p * num_states + state]);
      o = w.scale_a * o + w.scale_b * parts_o[p * total + e];
      lse = w.lse;
    }
    out_o[e] = o;
    if (e % head_dim == 0) out_lse[state] = lse;
  }
}

}  // namespace

cudaError_t MergeStates(const float* parts_o, const float* parts_lse, int num_parts,
                        int64_t num_states, int head_dim, float* out_o, float* out_lse,
                        cudaStream_t stream) {
  if (num_parts < 0 || num_states < 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (num_states == 0) return cudaSuccess;
  if (out_o == nullptr || out_lse == nullptr ||
      (num_parts > 0 && (parts_o == nullptr || parts_lse == nullptr))) {
    return cudaErrorInvalidValue;
  }
  constexpr int kThreads = 256;
  const int64_t total = num_states * head_dim;
  const int64_t blocks = (total + kThreads - 1) / kThreads;
  const int grid = static_cast<int>(blocks < 65536 ? blocks : 65536);
  MergeStatesKernel<<<grid, kThreads, 0, stream>>>(parts_o, parts_lse, num_parts, num_states,
                                                    head_dim, out_o, out_lse);
  return cudaGetLastError();
}

}  // namespace ferry::kernels
