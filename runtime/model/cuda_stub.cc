// The CUDA backend's entry points in builds without CUDA: each says so, so `--device cuda:N`
// fails with a clear message instead of a link error or a crash.
#include "absl/strings/str_cat.h"
#include "runtime/model/cuda_attention.h"
#include "runtime/model/cuda_decoder.h"

namespace ferry::model {
namespace {

absl::Status NotBuilt(int device) {
  return absl::FailedPreconditionError(absl::StrCat(
      "cuda:", device, " requested, but this build of Ferry has no CUDA backend (configure with "
      "-DFERRY_ENABLE_CUDA=ON on a machine with nvcc)"));
}

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> CreateCudaDecoder(const Model&, AttentionStep&,
                                                           const CudaDecoderOptions& options) {
  return NotBuilt(options.device);
}

absl::StatusOr<std::unique_ptr<AttentionStep>> CreateCudaAttention(
    const CudaAttentionOptions& options) {
  return NotBuilt(options.device);
}

}  // namespace ferry::model
