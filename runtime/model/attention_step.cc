#include "runtime/model/attention_step.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"

namespace ferry::model {

absl::StatusOr<std::unique_ptr<InProcessAttention>> InProcessAttention::Create(
    const InProcessAttentionOptions& options) {
  if (options.num_heads <= 0 || options.kv.num_kv_heads <= 0 ||
      options.num_heads % options.kv.num_kv_heads != 0) {
    return absl::InvalidArgumentError("in-process attention: kv heads must divide heads");
  }
  if (!kernels::IsSupportedHeadDim(options.kv.head_dim)) {
    return absl::UnimplementedError(absl::StrCat("in-process attention: head_dim ",
                                                 options.kv.head_dim,
                                                 " is not supported by the CPU kernel (64, 128, 256)"));
  }
  FERRY_ASSIGN_OR_RETURN(auto cache, kv::KvCache::CreateOnHost(options.kv));
  return std::unique_ptr<InProcessAttention>(new InProcessAttention(options, std::move(cache)));
}

InProcessAttention::InProcessAttention(const InProcessAttentionOptions& options,
                                       std::unique_ptr<kv::KvCache> cache)
    : options_(options),
      cache_(std::move(cache)),
      pool_(std::make_unique<kernels::ThreadPool>(std::max(1, options.num_threads))) {}

absl::Status InProcessAttention::AddSequence(kv::SequenceId seq) {
  return cache_->AddSequence(seq);
}

absl::Status InProcessAttention::FreeSequence(kv::SequenceId seq) {
  return cache_->FreeSequence(seq);
}

absl::StatusOr<int64_t> InProcessAttention::Length(kv::SequenceId seq) const {
  return cache_->Length(seq);
}

absl::Status GroupStepRows(std::span<const StepRow> rows, const kv::KvCache& cache,
                           std::vector<kv::KvAppendRun>* runs) {
  runs->clear();
  for (const StepRow& row : rows) {
    if (!runs->empty() && runs->back().seq == row.seq) {
      kv::KvAppendRun& run = runs->back();
      if (row.position != run.first_position + run.count) {
        return absl::InvalidArgumentError(absl::StrCat("attention step: sequence ", row.seq,
                                                       " rows are not consecutive positions"));
      }
      ++run.count;
      continue;
    }
    for (const kv::KvAppendRun& run : *runs) {
      if (run.seq == row.seq) {
        return absl::InvalidArgumentError(
            absl::StrCat("attention step: rows of sequence ", row.seq, " are not contiguous"));
      }
    }
    FERRY_ASSIGN_OR_RETURN(int64_t length, cache.Length(row.seq));
    if (row.position != length) {
      return absl::InvalidArgumentError(absl::StrCat("attention step: sequence ", row.seq,
                                                     " holds ", length, " positions; a step must "
                                                     "continue at that position, not ",
                                                     row.position));
    }
    runs->push_back(kv::KvAppendRun{row.seq, row.position, 1});
  }
  return absl::OkStatus();
}

absl::Status InProcessAttention::BeginStep(std::span<const StepRow> rows) {
  in_step_ = false;
  started_.clear();
  runs_.clear();
  FERRY_RETURN_IF_ERROR(GroupStepRows(rows, *cache_, &grouped_));
  int64_t first_row = 0;
  for (const kv::KvAppendRun& run : grouped_) {
    runs_.push_back(Run{run.seq, first_row, run.first_position, run.count});
    first_row += run.count;
  }
  for (const Run& run : runs_) {
    FERRY_RETURN_IF_ERROR(cache_->Reserve(run.seq, run.first_position + run.count));
  }
  // One kernel "sequence" per row: the row's block table, its length cut at its own position.
  num_rows_ = static_cast<int64_t>(rows.size());
  indptr_.assign(1, 0);
  block_table_.clear();
  seq_lens_.clear();
  for (const Run& run : runs_) {
    FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(run.seq));
    for (int64_t i = 0; i < run.count; ++i) {
      const int64_t len = run.first_position + i + 1;
      const int64_t nblocks = (len + options_.kv.block_size - 1) / options_.kv.block_size;
      block_table_.insert(block_table_.end(), blocks->begin(), blocks->begin() + nblocks);
      indptr_.push_back(static_cast<int32_t>(block_table_.size()));
      seq_lens_.push_back(static_cast<int32_t>(len));
    }
  }
  lse_.resize(static_cast<size_t>(num_rows_) * options_.num_heads);
  in_step_ = true;
  return absl::OkStatus();
}

absl::Status InProcessAttention::StartAttend(int layer, int64_t first_row, int64_t num_rows,
                                             const float* q, const float* k, const float* v,
                                             float* out) {
  if (!in_step_) return absl::FailedPreconditionError("attention step: Attend outside a step");
  if (first_row < 0 || num_rows < 1 || first_row + num_rows > num_rows_) {
    return absl::InvalidArgumentError(absl::StrCat("attention step: rows [", first_row, ", ",
                                                   first_row + num_rows, ") outside the step's ",
                                                   num_rows_));
  }
  int64_t covered = 0;
  for (const Run& run : runs_) {
    const bool inside = run.first_row >= first_row && run.first_row < first_row + num_rows;
    if (inside && run.first_row + run.count > first_row + num_rows) covered = -1;
    if (inside && covered >= 0) covered += run.count;
  }
  if (covered != num_rows) {
    return absl::InvalidArgumentError("attention step: a row range must hold whole sequences");
  }
  const int64_t row_elems = int64_t{options_.kv.num_kv_heads} * options_.kv.head_dim;
  const DType dtype = options_.kv.dtype;
  const void* k_src = k;
  const void* v_src = v;
  if (dtype != DType::kFloat32) {
    const int64_t n = num_rows * row_elems;
    k_half_.resize(n);
    v_half_.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      k_half_[i] = dtype == DType::kBFloat16 ? FloatToBFloat16Bits(k[i]) : FloatToFloat16Bits(k[i]);
      v_half_[i] = dtype == DType::kBFloat16 ? FloatToBFloat16Bits(v[i]) : FloatToFloat16Bits(v[i]);
    }
    k_src = k_half_.data();
    v_src = v_half_.data();
  }
  const int64_t row_bytes = row_elems * DTypeSize(dtype);
  for (const Run& run : runs_) {
    if (run.first_row < first_row || run.first_row >= first_row + num_rows) continue;
    const int64_t row = run.first_row - first_row;
    FERRY_RETURN_IF_ERROR(cache_->WriteHost(
        run.seq, layer, run.first_position, run.count,
        static_cast<const uint8_t*>(k_src) + row * row_bytes,
        static_cast<const uint8_t*>(v_src) + row * row_bytes));
  }
  // The range's rows of the step's per-row block tables, indptr rebased to 0.
  range_indptr_.resize(num_rows + 1);
  for (int64_t r = 0; r <= num_rows; ++r) {
    range_indptr_[r] = indptr_[first_row + r] - indptr_[first_row];
  }
  kernels::DecodeAttentionArgs args;
  args.num_seqs = static_cast<int>(num_rows);
  args.num_q_heads = options_.num_heads;
  args.q = q;
  args.kv = cache_->LayerView(layer);
  args.block_table_indptr = range_indptr_.data();
  args.block_table = block_table_.data() + indptr_[first_row];
  args.seq_lens = seq_lens_.data() + first_row;
  args.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(options_.kv.head_dim)));
  args.state_o = out;  // the whole range is covered, so o is the normalised output
  args.state_lse = lse_.data() + first_row * options_.num_heads;
  FERRY_RETURN_IF_ERROR(kernels::DecodeAttentionCpu(args, *pool_));
  started_.emplace_back(layer, first_row);
  return absl::OkStatus();
}

absl::Status InProcessAttention::FinishAttend(int layer, int64_t first_row) {
  auto it = std::find(started_.begin(), started_.end(), std::make_pair(layer, first_row));
  if (it == started_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("attention step: layer ", layer, " rows from ",
                                                      first_row, " were not started"));
  }
  started_.erase(it);
  return absl::OkStatus();
}

absl::Status InProcessAttention::EndStep() {
  if (!in_step_) return absl::FailedPreconditionError("attention step: EndStep outside a step");
  if (!started_.empty()) {
    return absl::FailedPreconditionError("attention step: EndStep with attention not finished");
  }
  in_step_ = false;
  for (const Run& run : runs_) {
    FERRY_RETURN_IF_ERROR(cache_->SetLength(run.seq, run.first_position + run.count));
  }
  return absl::OkStatus();
}

std::vector<kv::SequenceId> InProcessAttention::AbortStep() {
  in_step_ = false;
  started_.clear();
  for (const Run& run : runs_) cache_->ReleaseUnwritten(run.seq);
  runs_.clear();
  return {};  // in-process attention fails only as a whole (or on room, which is not a sequence's)
}

absl::Status InProcessAttention::CheckCapacity(int64_t positions) {
  return cache_->CheckFits(positions);
}

}  // namespace ferry::model
