// Host-side CUDA plumbing shared by the runtime's CUDA backends (runtime/kv, runtime/model):
// the one conversion of CUDA errors to absl::Status, and owners of device and pinned memory.
//
// No CUDA types here (runtime headers stay free of them): errors travel as int (a cudaError_t),
// streams as void* (a cudaStream_t). Built only when CUDA is (FERRY_HAVE_CUDA).
// DeviceBuffer / PinnedBuffer (one CudaBuffer template) own their memory and free it on
// destruction (the device current then must be the one that allocated it, or any device for
// pinned memory); they move, never copy. Threads: no shared state.
#pragma once

#include <cstddef>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace ferry {

// OK for cudaSuccess, else INTERNAL naming `what` and CUDA's error string (RESOURCE_EXHAUSTED for
// cudaErrorMemoryAllocation, so an oversized cache reads as a capacity problem).
absl::Status CudaStatus(int cuda_error, std::string_view what);

// The CUDA devices the runtime finds (0 when it finds none or no driver is loaded).
int CudaDeviceCount();

// FAILED_PRECONDITION when no device `device` exists (with the count found), else makes it the
// calling thread's current device.
absl::Status UseCudaDevice(int device);

// Where a CudaBuffer's memory lives: device memory (cudaMalloc), or page-locked host memory
// (cudaMallocHost), so async copies from and to it do not stage through the driver.
enum class CudaMemory { kDevice, kPinnedHost };

template <CudaMemory kKind>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  // A zero-byte request gives an empty buffer (get() == nullptr) and no allocation.
  static absl::StatusOr<CudaBuffer> Allocate(size_t bytes, std::string_view what);
  CudaBuffer(CudaBuffer&& other) noexcept { *this = static_cast<CudaBuffer&&>(other); }
  CudaBuffer& operator=(CudaBuffer&& other) noexcept;
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer();

  template <typename T = void>
  T* get() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void Free();

  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

extern template class CudaBuffer<CudaMemory::kDevice>;
extern template class CudaBuffer<CudaMemory::kPinnedHost>;
using DeviceBuffer = CudaBuffer<CudaMemory::kDevice>;
using PinnedBuffer = CudaBuffer<CudaMemory::kPinnedHost>;

}  // namespace ferry
