// Host-side CUDA plumbing shared by the runtime's CUDA backends (runtime/kv, runtime/model):
// the one conversion of CUDA errors to absl::Status, and owners of device and pinned memory.
//
// No CUDA types here (runtime headers stay free of them): errors travel as int (a cudaError_t),
// streams as void* (a cudaStream_t). Built only when CUDA is (FERRY_HAVE_CUDA).
// DeviceBuffer / PinnedBuffer own their memory and free it on destruction (the device current
// then must be the one that allocated it, or any device for pinned memory); they move, never
// copy. Threads: no shared state.
#pragma once

#include <cstddef>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ferry {

// OK for cudaSuccess, else INTERNAL naming `what` and CUDA's error string (RESOURCE_EXHAUSTED for
// cudaErrorMemoryAllocation, so an oversized cache reads as a capacity problem).
absl::Status CudaStatus(int cuda_error, std::string_view what);

// FAILED_PRECONDITION when no device `device` exists (with the count found), else makes it the
// calling thread's current device.
absl::Status UseCudaDevice(int device);

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  static absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, std::string_view what);
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = static_cast<DeviceBuffer&&>(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

// Page-locked host memory, so async copies from and to it do not stage through the driver.
class PinnedBuffer {
 public:
  PinnedBuffer() = default;
  static absl::StatusOr<PinnedBuffer> Allocate(size_t bytes, std::string_view what);
  PinnedBuffer(PinnedBuffer&& other) noexcept { *this = static_cast<PinnedBuffer&&>(other); }
  PinnedBuffer& operator=(PinnedBuffer&& other) noexcept;
  PinnedBuffer(const PinnedBuffer&) = delete;
  PinnedBuffer& operator=(const PinnedBuffer&) = delete;
  ~PinnedBuffer();

  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace ferry
