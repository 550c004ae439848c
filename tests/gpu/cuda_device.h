// FERRY_SKIP_WITHOUT_CUDA_DEVICE(): in a gtest SetUp() or test body, skips the test when the CUDA
// runtime finds no device, so every gpu-labelled binary builds and passes (skipped) on CPU-only
// CI. Header-only (cuda_runtime.h and gtest); kernel and runtime GPU tests both use it.
#pragma once

#include <cuda_runtime.h>

#include "gtest/gtest.h"

#define FERRY_SKIP_WITHOUT_CUDA_DEVICE()                                     \
  do {                                                                       \
    int cuda_device_count_ = 0;                                              \
    if (cudaGetDeviceCount(&cuda_device_count_) != cudaSuccess ||           \
        cuda_device_count_ == 0) {                                           \
      GTEST_SKIP() << "No CUDA-capable GPU";                                 \
    }                                                                        \
  } while (0)
