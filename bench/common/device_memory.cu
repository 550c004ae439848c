#include "bench/common/device_memory.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

namespace ferry::bench {
namespace {

__device__ __forceinline__ uint32_t Hash(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return static_cast<uint32_t>(x);
}

__global__ void FillBf16Kernel(uint16_t* data, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float x = (Hash(seed * 0x9e3779b97f4a7c15ull + i) >> 8) * (4.0f / 16777216.0f) - 2.0f;
    data[i] = static_cast<uint16_t>(__float_as_uint(x) >> 16);
  }
}

// Streams a buffer with 16-byte loads; the guarded store keeps the loads alive.
__global__ void ReadKernel(const uint4* __restrict__ data, int64_t n, uint32_t* sink) {
  uint32_t acc = 0;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const uint4 v = __ldcs(data + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x12345678u) *sink = acc;
}

}  // namespace

bool FillRandomBf16(void* data, int64_t n, uint64_t seed) {
  FillBf16Kernel<<<4096, 256>>>(static_cast<uint16_t*>(data), n, seed);
  return cudaGetLastError() == cudaSuccess && cudaDeviceSynchronize() == cudaSuccess;
}

double MeasureHbmReadBandwidth(int64_t bytes, int iters) {
  void* buffer = nullptr;
  uint32_t* sink = nullptr;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaMalloc(&buffer, bytes) != cudaSuccess || cudaMalloc(&sink, 4) != cudaSuccess ||
      !FillRandomBf16(buffer, bytes / 2, 1)) {
    return -1;
  }
  std::vector<cudaEvent_t> events(iters + 1);
  for (cudaEvent_t& e : events) cudaEventCreate(&e);
  auto launch = [&] {
    ReadKernel<<<sms * 8, 512>>>(static_cast<const uint4*>(buffer), bytes / 16, sink);
  };
  for (int i = 0; i < 5; ++i) launch();  // clocks up, caches cold again (bytes >> L2)
  cudaEventRecord(events[0]);
  for (int i = 0; i < iters; ++i) {
    launch();
    cudaEventRecord(events[i + 1]);
  }
  double gbps = -1;
  if (cudaEventSynchronize(events[iters]) == cudaSuccess) {
    std::vector<float> ms(iters);
    for (int i = 0; i < iters; ++i) cudaEventElapsedTime(&ms[i], events[i], events[i + 1]);
    std::sort(ms.begin(), ms.end());
    gbps = bytes / (ms[iters / 2] * 1e-3) / 1e9;
  }
  for (cudaEvent_t& e : events) cudaEventDestroy(e);
  cudaFree(buffer);
  cudaFree(sink);
  return gbps;
}

}  // namespace ferry::bench
