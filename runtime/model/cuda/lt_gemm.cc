#include "runtime/model/cuda/lt_gemm.h"

#include "absl/strings/str_cat.h"
#include "ferry/status.h"

namespace ferry::model::cuda {
namespace {

absl::Status LtStatus(cublasStatus_t status, const std::string& what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLASLt status ", static_cast<int>(status),
                                          " (", cublasLtGetStatusName(status), ": ",
                                          cublasLtGetStatusString(status), ")"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<LtGemm>> LtGemm::Create(size_t workspace_bytes) {
  std::unique_ptr<LtGemm> gemm(new LtGemm());
  FERRY_RETURN_IF_ERROR(LtStatus(cublasLtCreate(&gemm->handle_), "cublasLtCreate"));
  FERRY_ASSIGN_OR_RETURN(gemm->workspace_,
                         DeviceBuffer::Allocate(workspace_bytes, "the cuBLASLt workspace"));
  return gemm;
}

LtGemm::~LtGemm() {
  for (auto& [key, plan] : plans_) {
    cublasLtMatrixLayoutDestroy(plan.a);
    cublasLtMatrixLayoutDestroy(plan.b);
    cublasLtMatrixLayoutDestroy(plan.c);
    cublasLtMatmulDescDestroy(plan.desc);
  }
  if (handle_ != nullptr) cublasLtDestroy(handle_);
}

absl::StatusOr<const LtGemm::Plan*> LtGemm::FindPlan(int rows, int in, int out, DType dtype) {
  const auto key = std::make_tuple(rows, in, out, dtype);
  if (auto it = plans_.find(key); it != plans_.end()) return &it->second;
  const std::string shape = absl::StrCat("gemm rows ", rows, " in ", in, " out ", out, " ",
                                         std::string(DTypeName(dtype)));
  const cudaDataType_t operand = dtype == DType::kBFloat16 ? CUDA_R_16BF : CUDA_R_32F;
  Plan plan;
  // Registered before any descriptor exists so that a failure below still frees what was made.
  auto destroy = [&plan] {
    if (plan.a != nullptr) cublasLtMatrixLayoutDestroy(plan.a);
    if (plan.b != nullptr) cublasLtMatrixLayoutDestroy(plan.b);
    if (plan.c != nullptr) cublasLtMatrixLayoutDestroy(plan.c);
    if (plan.desc != nullptr) cublasLtMatmulDescDestroy(plan.desc);
  };
  cublasLtMatmulPreference_t preference = nullptr;
  absl::Status status = [&]() -> absl::Status {
    FERRY_RETURN_IF_ERROR(LtStatus(
        cublasLtMatmulDescCreate(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F), shape));
    const cublasOperation_t transpose = CUBLAS_OP_T, plain = CUBLAS_OP_N;
    FERRY_RETURN_IF_ERROR(LtStatus(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose,
                                       sizeof(transpose)),
        shape));
    FERRY_RETURN_IF_ERROR(LtStatus(
        cublasLtMatmulDescSetAttribute(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &plain,
                                       sizeof(plain)),
        shape));
    // Column-major: A is W^T stored (in, out), B is x^T stored (in, rows), C is y^T (out, rows).
    FERRY_RETURN_IF_ERROR(
        LtStatus(cublasLtMatrixLayoutCreate(&plan.a, operand, in, out, in), shape));
    FERRY_RETURN_IF_ERROR(
        LtStatus(cublasLtMatrixLayoutCreate(&plan.b, operand, in, rows, in), shape));
    FERRY_RETURN_IF_ERROR(
        LtStatus(cublasLtMatrixLayoutCreate(&plan.c, CUDA_R_32F, out, rows, out), shape));
    FERRY_RETURN_IF_ERROR(LtStatus(cublasLtMatmulPreferenceCreate(&preference), shape));
    const uint64_t workspace = workspace_.bytes();
    FERRY_RETURN_IF_ERROR(LtStatus(
        cublasLtMatmulPreferenceSetAttribute(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                             &workspace, sizeof(workspace)),
        shape));
    cublasLtMatmulHeuristicResult_t result = {};
    int found = 0;
    FERRY_RETURN_IF_ERROR(LtStatus(
        cublasLtMatmulAlgoGetHeuristic(handle_, plan.desc, plan.a, plan.b, plan.c, plan.c,
                                       preference, 1, &result, &found),
        shape));
    if (found == 0) {
      return absl::UnimplementedError(absl::StrCat(shape, ": cuBLASLt has no algorithm"));
    }
    plan.algo = result.algo;
    return absl::OkStatus();
  }();
  if (preference != nullptr) cublasLtMatmulPreferenceDestroy(preference);
  if (!status.ok()) {
    destroy();
    return status;
  }
  return &plans_.emplace(key, plan).first->second;
}

absl::Status LtGemm::Linear(const void* x, int rows, int in, const void* w, int out, DType dtype,
                            float* y, bool accumulate, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  if (rows < 0 || in <= 0 || out <= 0 ||
      (dtype != DType::kBFloat16 && dtype != DType::kFloat32)) {
    return absl::InvalidArgumentError(
        absl::StrCat("gemm: bad shape rows ", rows, " in ", in, " out ", out));
  }
  FERRY_ASSIGN_OR_RETURN(const Plan* plan, FindPlan(rows, in, out, dtype));
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  const cublasStatus_t status =
      cublasLtMatmul(handle_, plan->desc, &alpha, w, plan->a, x, plan->b, &beta, y, plan->c, y,
                     plan->c, &plan->algo, workspace_.get(), workspace_.bytes(), stream);
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return LtStatus(status, absl::StrCat("gemm rows ", rows, " in ", in, " out ", out));
}

}  // namespace ferry::model::cuda
