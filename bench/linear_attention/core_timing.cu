// Times the CUDA linear attention forward and backward launchers directly (no PyTorch), B x N
// tokens, H = 16 q and kv heads, bf16, normalised, for d in {64, 128} and both positive feature
// maps: medians of event-timed repetitions (the first 3 dropped), then the mean |x| of out, dq,
// dk, dv as a cheap check that two builds compute the same thing. Built outside CMake, so that
// two versions of the kernels can be timed side by side in one device call:
//   nvcc -O2 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr
//     -DFERRY_LINEAR_HEAD_DIM_64 -DFERRY_LINEAR_HEAD_DIM_128 -Ikernels/include
//     bench/linear_attention/core_timing.cu kernels/cuda/linear_attention_fwd.cu
//     kernels/cuda/linear_attention_fwd_sm90.cu kernels/cuda/linear_attention_bwd.cu
//     -o core_timing      (one command line)
//   [LINEAR_TIMING_B=4] [LINEAR_TIMING_SEGMENTS=0] ./core_timing [N=8192] [d: 0 = both]
//     [map: 1 = 1+x max-norm, 2 = elu+1, 0 = both] [repetitions=23]
// LINEAR_TIMING_SEGMENTS is the launchers' segment_chunks (0 automatic, -1 unsplit).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "ferry/kernels/cuda_linear_attention.h"

namespace {

using namespace ferry::kernels;

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    const cudaError_t e = (x);                                                         \
    if (e != cudaSuccess) {                                                            \
      std::printf("CUDA error %s at line %d\n", cudaGetErrorString(e), __LINE__);      \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

// Uniform values in [-scale / 2, scale / 2) from a hash of the index (never zeros).
__global__ void FillUniform(uint16_t* p, int64_t n, uint32_t seed, float scale) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    const float u = static_cast<float>(h & 0xffffff) / 16777216.0f - 0.5f;
    p[i] = __bfloat16_as_ushort(__float2bfloat16(u * scale));
  }
}

__global__ void SumAbs(const uint16_t* p, int64_t n, double* out) {
  double s = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    s += fabsf(__bfloat162float(__ushort_as_bfloat16(p[i])));
  }
  atomicAdd(out, s);
}

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const char* batch_env = std::getenv("LINEAR_TIMING_B");
  const int batch = batch_env != nullptr ? std::atoi(batch_env) : 4;
  const char* segments_env = std::getenv("LINEAR_TIMING_SEGMENTS");
  const int segments = segments_env != nullptr ? std::atoi(segments_env) : 0;
  constexpr int kHeads = 16;
  const int n_tokens = argc > 1 ? std::atoi(argv[1]) : 8192;
  const int only_d = argc > 2 ? std::atoi(argv[2]) : 0;
  const int only_map = argc > 3 ? std::atoi(argv[3]) : 0;
  const int reps = std::max(argc > 4 ? std::atoi(argv[4]) : 23, 4);
  for (int d : {64, 128}) {
    for (int map = 1; map <= 2; ++map) {
      if ((only_d != 0 && d != only_d) || (only_map != 0 && map != only_map)) continue;
      LinearAttentionConfig c;
      c.num_seqs = batch;
      c.num_q_heads = c.num_kv_heads = kHeads;
      c.head_dim = d;
      c.feature_map = static_cast<LinearFeatureMap>(map);
      c.normalize = true;
      c.dtype = ferry::DType::kBFloat16;
      const int64_t tokens = int64_t{batch} * n_tokens, n = tokens * kHeads * d;
      std::vector<int32_t> cu(batch + 1);
      for (int b = 0; b <= batch; ++b) cu[b] = b * n_tokens;
      int32_t* cu_dev = nullptr;
      CHECK_CUDA(cudaMalloc(&cu_dev, sizeof(int32_t) * (batch + 1)));
      CHECK_CUDA(cudaMemcpy(cu_dev, cu.data(), sizeof(int32_t) * (batch + 1),
                            cudaMemcpyHostToDevice));
      // q, k, v, out, out_residual, dout, dq, dk, dv
      uint16_t* buf[9];
      for (auto& b : buf) CHECK_CUDA(cudaMalloc(&b, n * 2));
      const float qkv_scale = 2.0f / std::sqrt(static_cast<float>(d));
      for (int i = 0; i < 3; ++i) FillUniform<<<1024, 256>>>(buf[i], n, 17 + i, qkv_scale);
      FillUniform<<<1024, 256>>>(buf[5], n, 99, 2.0f);
      float* stats = nullptr;
      CHECK_CUDA(cudaMalloc(&stats, sizeof(float) * kLinearRowStats * tokens * kHeads));
      const size_t ws_bytes =
          std::max<size_t>({LinearAttentionForwardWorkspaceSize(c, tokens, segments),
                            LinearAttentionBackwardWorkspaceSize(c, tokens, segments), 256});
      void* ws = nullptr;
      CHECK_CUDA(cudaMalloc(&ws, ws_bytes));
      LinearAttentionForwardArgs fa;
      fa.config = c;
      fa.cu_seqlens = cu_dev;
      fa.total_tokens = tokens;
      fa.q = buf[0];
      fa.k = buf[1];
      fa.v = buf[2];
      fa.out = buf[3];
      LinearAttentionBackwardCudaArgs ba;
      ba.config = c;
      ba.cu_seqlens = cu_dev;
      ba.total_tokens = tokens;
      ba.q = buf[0];
      ba.k = buf[1];
      ba.v = buf[2];
      ba.out = buf[3];
      ba.out_residual = buf[4];
      ba.row_stats = stats;
      ba.dout = buf[5];
      ba.dq = buf[6];
      ba.dk = buf[7];
      ba.dv = buf[8];
      cudaEvent_t e0, e1, e2;
      CHECK_CUDA(cudaEventCreate(&e0));
      CHECK_CUDA(cudaEventCreate(&e1));
      CHECK_CUDA(cudaEventCreate(&e2));
      std::vector<float> fwd_ms, bwd_ms;
      for (int rep = 0; rep < reps; ++rep) {
        CHECK_CUDA(cudaEventRecord(e0));
        CHECK_CUDA(LinearAttentionForwardCuda(fa, stats, buf[4], ws, ws_bytes, nullptr, segments));
        CHECK_CUDA(cudaEventRecord(e1));
        CHECK_CUDA(LinearAttentionBackwardCuda(ba, ws, ws_bytes, nullptr, segments));
        CHECK_CUDA(cudaEventRecord(e2));
        CHECK_CUDA(cudaEventSynchronize(e2));
        float a = 0, b = 0;
        CHECK_CUDA(cudaEventElapsedTime(&a, e0, e1));
        CHECK_CUDA(cudaEventElapsedTime(&b, e1, e2));
        if (rep >= 3) {
          fwd_ms.push_back(a);
          bwd_ms.push_back(b);
        }
      }
      double* sums = nullptr;
      CHECK_CUDA(cudaMalloc(&sums, 4 * sizeof(double)));
      CHECK_CUDA(cudaMemset(sums, 0, 4 * sizeof(double)));
      for (int i = 0; i < 4; ++i) SumAbs<<<256, 256>>>(buf[i == 0 ? 3 : 5 + i], n, sums + i);
      double host_sums[4];
      CHECK_CUDA(cudaMemcpy(host_sums, sums, sizeof(host_sums), cudaMemcpyDeviceToHost));
      const float f = Median(fwd_ms), b = Median(bwd_ms);
      std::printf("d=%d map=%s N=%d fwd %.3f bwd %.3f total %.3f ms | mean|out| %.6e dq %.6e "
                  "dk %.6e dv %.6e\n",
                  d, map == 1 ? "1+x" : "elu", n_tokens, f, b, f + b, host_sums[0] / n,
                  host_sums[1] / n, host_sums[2] / n, host_sums[3] / n);
      for (auto& p : buf) CHECK_CUDA(cudaFree(p));
      CHECK_CUDA(cudaFree(stats));
      CHECK_CUDA(cudaFree(ws));
      CHECK_CUDA(cudaFree(cu_dev));
      CHECK_CUDA(cudaFree(sums));
    }
  }
  return 0;
}
