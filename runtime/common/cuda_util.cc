#include "runtime/common/cuda_util.h"

#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"

namespace ferry {

absl::Status CudaStatus(int cuda_error, std::string_view what) {
  const auto error = static_cast<cudaError_t>(cuda_error);
  if (error == cudaSuccess) return absl::OkStatus();
  std::string message = absl::StrCat(std::string(what), ": CUDA error ", cuda_error, " (",
                                     cudaGetErrorName(error), ": ", cudaGetErrorString(error), ")");
  if (error == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
  return absl::InternalError(message);
}

int CudaDeviceCount() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

absl::Status UseCudaDevice(int device) {
  int count = 0;
  const cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return absl::FailedPreconditionError(absl::StrCat(
        "no CUDA device ", device, ": the CUDA runtime finds none (", cudaGetErrorName(error),
        ": ", cudaGetErrorString(error), ")"));
  }
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device ", device, " (this machine has ", count, ")"));
  }
  return CudaStatus(cudaSetDevice(device), absl::StrCat("cudaSetDevice(", device, ")"));
}

template <CudaMemory kKind>
absl::StatusOr<CudaBuffer<kKind>> CudaBuffer<kKind>::Allocate(size_t bytes,
                                                              std::string_view what) {
  constexpr bool kDevice = kKind == CudaMemory::kDevice;
  CudaBuffer buffer;
  if (bytes == 0) return buffer;
  void* ptr = nullptr;
  const cudaError_t error = kDevice ? cudaMalloc(&ptr, bytes) : cudaMallocHost(&ptr, bytes);
  if (error != cudaSuccess) {
    cudaGetLastError();  // an allocation failure is not sticky; clear it for later checks
    return CudaStatus(error, absl::StrCat(kDevice ? "cudaMalloc" : "cudaMallocHost", " of ",
                                          bytes, " bytes for ", std::string(what)));
  }
  buffer.ptr_ = ptr;
  buffer.bytes_ = bytes;
  return buffer;
}

template <CudaMemory kKind>
CudaBuffer<kKind>& CudaBuffer<kKind>::operator=(CudaBuffer&& other) noexcept {
  if (this != &other) {
    Free();
    ptr_ = std::exchange(other.ptr_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

template <CudaMemory kKind>
CudaBuffer<kKind>::~CudaBuffer() {
  Free();
}

template <CudaMemory kKind>
void CudaBuffer<kKind>::Free() {
  if (ptr_ == nullptr) return;
  if constexpr (kKind == CudaMemory::kDevice) {
    cudaFree(ptr_);
  } else {
    cudaFreeHost(ptr_);
  }
  ptr_ = nullptr;
  bytes_ = 0;
}

template class CudaBuffer<CudaMemory::kDevice>;
template class CudaBuffer<CudaMemory::kPinnedHost>;

}  // namespace ferry
