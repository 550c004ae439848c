// Device-memory helpers for the GPU benchmarks (no CUDA types, so C++20 benchmark mains can use
// them): the HBM read bandwidth every roofline fraction divides by, and random fills.
//
// MeasureHbmReadBandwidth: a streaming read of `bytes` of device memory with 16-byte loads
//   (one launch of sms * 8 blocks of 512 threads), after warm-up; the median of `iters` launches
//   timed back to back with CUDA events. Returns GB/s (1e9 bytes/s), or a negative value on a
//   CUDA error. Allocates and frees its own buffer on the current device.
// FillRandomBf16: n bf16 values in about [-2, 2), a hash of (seed, index): never zeros, so
//   timings do not see the cheap paths zeros can take. Device pointer; synchronous.
#pragma once

#include <cstdint>

namespace ferry::bench {

double MeasureHbmReadBandwidth(int64_t bytes, int iters);
bool FillRandomBf16(void* data, int64_t n, uint64_t seed);

}  // namespace ferry::bench
