// BENCH_CHECK(expr): for benchmark mains only; a CUDA call that does not return cudaSuccess
// prints the call, its place and CUDA's error string to stderr and exits with status 1 (a
// benchmark has nothing to recover). Include from .cu files (needs cuda_runtime.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

#define BENCH_CHECK(expr)                                                          \
  do {                                                                             \
    const cudaError_t err_ = (expr);                                               \
    if (err_ != cudaSuccess) {                                                     \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,            \
                   cudaGetErrorString(err_));                                      \
      std::exit(1);                                                                \
    }                                                                              \
  } while (0)
