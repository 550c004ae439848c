// Test helpers for the kernel GPU tests: an owning device buffer and an assertion on cudaError_t.
// Kernel tests link only kernels/ (they must not depend on runtime/), so this is not
// runtime/common/cuda_util.h's DeviceBuffer; tests of runtime/ code use that one.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "gtest/gtest.h"

// Asserts that a CUDA call returned cudaSuccess, naming the call.
#define CUDA_ASSERT(expr)                                                   \
  do {                                                                      \
    const cudaError_t err_ = (expr);                                        \
    ASSERT_EQ(err_, cudaSuccess) << #expr << ": " << cudaGetErrorString(err_); \
  } while (0)

namespace ferry::kernels {

// A device buffer; freed on scope exit.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t bytes) { Resize(bytes); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  void Resize(size_t bytes) {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = bytes;
    if (bytes > 0 && cudaMalloc(&ptr_, bytes) != cudaSuccess) ptr_ = nullptr;
  }
  template <typename T>
  void Upload(const std::vector<T>& host) {
    Resize(host.size() * sizeof(T));
    if (!host.empty()) cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice);
  }
  template <typename T>
  void Download(std::vector<T>& host) const {
    host.resize(bytes_ / sizeof(T));
    if (!host.empty()) cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost);
  }
  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ferry::kernels
