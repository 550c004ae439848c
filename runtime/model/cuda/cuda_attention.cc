#include "runtime/model/cuda_attention.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/lean_attention.h"
#include "ferry/kernels/paged_prefill_attention.h"
#include "ferry/kernels/prefill_attention.h"
#include "ferry/status.h"
#include "runtime/common/cuda_util.h"
#include "runtime/kv/cuda_kv_pool.h"

namespace ferry::model {

absl::StatusOr<std::unique_ptr<AttentionStep>> CreateCudaAttention(
    const CudaAttentionOptions& options) {
  FERRY_ASSIGN_OR_RETURN(auto attention, CudaAttention::Create(options));
  return std::unique_ptr<AttentionStep>(std::move(attention));
}

absl::StatusOr<std::unique_ptr<CudaAttention>> CudaAttention::Create(
    const CudaAttentionOptions& options) {
  const kv::KvCacheConfig& c = options.kv;
  if (options.num_heads <= 0 || c.num_kv_heads <= 0 || options.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError("cuda attention: kv heads must divide heads");
  }
  if (c.head_dim % 32 != 0 || c.head_dim > 256 || options.num_heads / c.num_kv_heads > 32) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda attention: head_dim ", c.head_dim, " with groups of ",
        options.num_heads / c.num_kv_heads,
        " is not served (head_dim a multiple of 32 up to 256, groups up to 32)"));
  }
  if (options.max_step_rows <= 0 || options.max_step_seqs <= 0) {
    return absl::InvalidArgumentError(
        "cuda attention: max_step_rows and max_step_seqs must be > 0");
  }
  FERRY_RETURN_IF_ERROR(UseCudaDevice(options.device));
  std::unique_ptr<CudaAttention> attention(new CudaAttention(options));
  cudaStream_t stream = nullptr;
  FERRY_RETURN_IF_ERROR(CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                                   "cudaStreamCreate"));
  attention->stream_ = stream;
  kv::CudaKvPoolOptions pool_options;
  pool_options.cache = c;
  pool_options.device = options.device;
  pool_options.max_step_rows = options.max_step_rows;
  pool_options.max_step_runs = options.max_step_seqs;
  FERRY_ASSIGN_OR_RETURN(attention->pool_, kv::CudaKvPool::Create(pool_options));
  FERRY_ASSIGN_OR_RETURN(
      attention->lse_,
      DeviceBuffer::Allocate(
          sizeof(float) * static_cast<size_t>(options.max_step_rows) * options.num_heads,
          "the attention lse"));
  attention->prefill_tensor_cores_ = kernels::PrefillAttentionServes(c.head_dim, c.dtype);
  // LeanDecode where this build and device serve the shape; a decode step has one row per
  // sequence, so max_step_rows bounds its sequences too.
  cudaError_t served = cudaSuccess;
  const size_t bytes = kernels::LeanDecodeWorkspaceSize(
      options.max_step_rows, options.num_heads, c.num_kv_heads, c.head_dim, c.dtype,
      options.device, &served);
  if (served == cudaSuccess && bytes > 0) {
    FERRY_ASSIGN_OR_RETURN(attention->lean_workspace_,
                           DeviceBuffer::Allocate(bytes, "the LeanDecode workspace"));
    // LeanDecode's counters start at zero and every launch leaves them so.
    FERRY_RETURN_IF_ERROR(
        CudaStatus(cudaMemset(attention->lean_workspace_.get(), 0, bytes), "cudaMemset"));
    // The memset ran on the legacy stream, which the step's non-blocking stream does not wait for.
    FERRY_RETURN_IF_ERROR(CudaStatus(cudaDeviceSynchronize(), "LeanDecode workspace"));
  } else {
    cudaGetLastError();  // "not served" is an answer here, not an error
  }
  return attention;
}

CudaAttention::CudaAttention(const CudaAttentionOptions& options) : options_(options) {}

CudaAttention::~CudaAttention() {
  if (stream_ != nullptr) {
    cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
    cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
  }
}

absl::Status CudaAttention::AddSequence(kv::SequenceId seq) {
  return pool_->cache().AddSequence(seq);
}

absl::Status CudaAttention::FreeSequence(kv::SequenceId seq) {
  return pool_->cache().FreeSequence(seq);
}

absl::StatusOr<int64_t> CudaAttention::Length(kv::SequenceId seq) const {
  return pool_->cache().Length(seq);
}

absl::Status CudaAttention::BeginStep(std::span<const StepRow> rows) {
  in_step_ = false;
  FERRY_ASSIGN_OR_RETURN(
      const std::vector<StepRun> grouped,
      GroupStepRows(rows, [this](kv::SequenceId seq) { return pool_->cache().Length(seq); }));
  runs_.clear();
  for (const StepRun& run : grouped) {
    runs_.push_back(kv::KvAppendRun{run.seq, run.first_position, run.count});
  }
  for (const kv::KvAppendRun& run : runs_) {
    FERRY_RETURN_IF_ERROR(pool_->cache().Reserve(run.seq, run.first_position + run.count));
  }
  FERRY_RETURN_IF_ERROR(pool_->StageStep(runs_, stream_));
  decode_only_ = runs_.size() == rows.size();
  in_step_ = true;
  return absl::OkStatus();
}

absl::Status CudaAttention::StartAttend(int layer, int64_t first_row, int64_t num_rows,
                                        const float* q, const float* k, const float* v,
                                        float* out) {
  if (!in_step_) return absl::FailedPreconditionError("attention step: Attend outside a step");
  if (first_row != 0 || num_rows != pool_->step().num_rows) {
    return absl::InvalidArgumentError(absl::StrCat(
        "CUDA attention: one range of all ", pool_->step().num_rows, " rows per layer, not [",
        first_row, ", ", first_row + num_rows, ")"));
  }
  auto stream = static_cast<cudaStream_t>(stream_);
  FERRY_RETURN_IF_ERROR(pool_->Append(layer, k, v, DType::kFloat32, stream_));
  const kv::CudaStepTables& t = pool_->step();
  const float scale =
      static_cast<float>(1.0 / std::sqrt(static_cast<double>(options_.kv.head_dim)));
  if (decode_only_ && uses_lean_decode()) {
    kernels::DecodeAttentionArgs args;
    args.num_seqs = t.num_rows;  // one row per sequence, in run order
    args.num_q_heads = options_.num_heads;
    args.q = q;
    args.kv = pool_->LayerView(layer);
    args.block_table_indptr = t.indptr;
    args.block_table = t.table;
    args.seq_lens = t.seq_lens;
    args.softmax_scale = scale;
    args.state_o = out;  // the whole range is covered, so o is the normalised output
    args.state_lse = lse_.get<float>();
    return CudaStatus(kernels::LeanDecode(args, lean_workspace_.get(), lean_workspace_.bytes(),
                                          stream),
                      "LeanDecode");
  }
  // PrefillAttention's 16-byte q loads and 8-byte o stores; the decoder's buffers are aligned,
  // anything else takes the fallback rather than an error.
  const bool aligned = reinterpret_cast<uintptr_t>(q) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(out) % 8 == 0;
  if (prefill_tensor_cores_ && aligned) {
    kernels::PrefillAttentionArgs args;
    args.num_seqs = t.num_runs;  // a run is a chunk: its rows attend causally over its prefix
    args.num_q_heads = options_.num_heads;
    args.max_q_len = t.max_run_rows;
    args.q = q;
    args.kv = pool_->LayerView(layer);
    args.q_indptr = t.q_indptr;
    args.block_table_indptr = t.indptr;
    args.block_table = t.table;
    args.kv_lens = t.seq_lens;
    args.causal_offset = t.causal_offset;
    args.softmax_scale = scale;
    args.state_o = out;  // every row sees its whole prefix, so o is the normalised output
    args.state_lse = lse_.get<float>();
    return CudaStatus(kernels::PrefillAttention(args, stream), "PrefillAttention");
  }
  kernels::PagedPrefillAttentionArgs args;
  args.num_rows = t.num_rows;
  args.num_q_heads = options_.num_heads;
  args.q = q;
  args.kv = pool_->LayerView(layer);
  args.block_table_indptr = t.indptr;
  args.block_table = t.table;
  args.row_run = t.row_run;
  args.row_pos = t.row_pos;
  args.softmax_scale = scale;
  args.out = out;
  args.lse = lse_.get<float>();
  return CudaStatus(kernels::PagedPrefillAttention(args, stream), "PagedPrefillAttention");
}

absl::Status CudaAttention::FinishAttend(int /*layer*/, int64_t first_row) {
  if (!in_step_) return absl::FailedPreconditionError("attention step: Attend outside a step");
  if (first_row != 0) return absl::InvalidArgumentError("CUDA attention: no range starts there");
  return absl::OkStatus();
}

std::vector<kv::SequenceId> CudaAttention::AbortStep() {
  in_step_ = false;
  for (const kv::KvAppendRun& run : runs_) pool_->cache().ReleaseUnwritten(run.seq);
  runs_.clear();
  return {};
}

absl::Status CudaAttention::CheckCapacity(int64_t positions) {
  return pool_->cache().CheckFits(positions);
}

absl::Status CudaAttention::EndStep() {
  if (!in_step_) return absl::FailedPreconditionError("attention step: EndStep outside a step");
  in_step_ = false;
  for (const kv::KvAppendRun& run : runs_) {
    FERRY_RETURN_IF_ERROR(pool_->cache().SetLength(run.seq, run.first_position + run.count));
  }
  return absl::OkStatus();
}

}  // namespace ferry::model
