// cuBLASLt GEMMs of the CUDA decoder (internal to runtime/model/cuda; CUDA types allowed here).
//
// Linear: y (rows, out) = x (rows, in) W^T, or y += x W^T with `accumulate` (the residual adds
// ride in the GEMM's beta = 1), W (out, in) row-major as Hugging Face stores it. In cuBLAS's
// column-major terms y^T = W x^T: A = W transposed ("T"), B = x ("N"), C = D = y^T, the layout
// cuBLASLt serves best. Types:
//   kBFloat16  x, W bf16; y float32; float32 accumulation (CUBLAS_COMPUTE_32F)
//   kFloat32   x, W, y float32; float32 math, no TF32 (exact-weights tests compare with fp64)
// Pointers 256-byte aligned (cuBLASLt's default assumption; every buffer here is its own
// allocation or a 256-aligned slice). Plans (descriptors + the heuristic's first algorithm) are
// cached per (rows, in, out, dtype); the first call of a shape queries the heuristic on the host.
// Launches are stream-ordered and graph-safe (the workspace is ours, fixed).
// Errors: cuBLASLt statuses become INTERNAL naming the shape. Threads: one owner thread.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <memory>
#include <tuple>

#include "absl/status/statusor.h"
#include "ferry/kernels/dtype.h"
#include "runtime/common/cuda_util.h"

namespace ferry::model::cuda {

class LtGemm {
 public:
  static absl::StatusOr<std::unique_ptr<LtGemm>> Create(size_t workspace_bytes);
  ~LtGemm();

  absl::Status Linear(const void* x, int rows, int in, const void* w, int out, DType dtype,
                      float* y, bool accumulate, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo;
  };
  LtGemm() = default;
  absl::StatusOr<const Plan*> FindPlan(int rows, int in, int out, DType dtype);

  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer workspace_;
  std::map<std::tuple<int, int, int, DType>, Plan> plans_;
};

}  // namespace ferry::model::cuda
