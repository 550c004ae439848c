#include "runtime/model/attention_step.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/kernels/cpu_linear_attention.h"
#include "ferry/status.h"

namespace ferry::model {

absl::StatusOr<std::vector<StepRun>> GroupRuns(std::span<const StepRow> rows) {
  std::vector<StepRun> runs;
  for (int64_t r = 0; r < static_cast<int64_t>(rows.size()); ++r) {
    const StepRow& row = rows[r];
    if (!runs.empty() && runs.back().seq == row.seq) {
      StepRun& run = runs.back();
      if (row.position != run.first_position + run.count) {
        return absl::InvalidArgumentError(absl::StrCat("attention step: sequence ", row.seq,
                                                       " rows are not consecutive positions"));
      }
      ++run.count;
      continue;
    }
    for (const StepRun& run : runs) {
      if (run.seq == row.seq) {
        return absl::InvalidArgumentError(
            absl::StrCat("attention step: rows of sequence ", row.seq, " are not contiguous"));
      }
    }
    runs.push_back(StepRun{row.seq, r, row.position, 1});
  }
  return runs;
}

absl::Status StartedRanges::Finish(int layer, int64_t first_row) {
  auto it = std::find(started_.begin(), started_.end(), std::make_pair(layer, first_row));
  if (it == started_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("attention step: layer ", layer,
                                                      " rows from ", first_row,
                                                      " were not started"));
  }
  started_.erase(it);
  return absl::OkStatus();
}

absl::Status StartedRanges::CheckAllFinished() const {
  if (!started_.empty()) {
    return absl::FailedPreconditionError("attention step: EndStep with attention not finished");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StepRun>> GroupStepRows(
    std::span<const StepRow> rows,
    absl::FunctionRef<absl::StatusOr<int64_t>(kv::SequenceId)> length) {
  FERRY_ASSIGN_OR_RETURN(std::vector<StepRun> runs, GroupRuns(rows));
  for (const StepRun& run : runs) {
    FERRY_ASSIGN_OR_RETURN(const int64_t held, length(run.seq));
    if (run.first_position != held) {
      return absl::InvalidArgumentError(absl::StrCat("attention step: sequence ", run.seq,
                                                     " holds ", held, " positions; a step must "
                                                     "continue at that position, not ",
                                                     run.first_position));
    }
  }
  return runs;
}

absl::StatusOr<std::vector<size_t>> RunsInRange(std::span<const StepRun> runs, int64_t first_row,
                                                int64_t num_rows) {
  std::vector<size_t> indices;
  int64_t covered = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const StepRun& run = runs[i];
    if (run.first_row < first_row || run.first_row >= first_row + num_rows) continue;
    if (run.first_row + run.count > first_row + num_rows) {
      return absl::InvalidArgumentError("attention step: a row range must hold whole sequences");
    }
    covered += run.count;
    indices.push_back(i);
  }
  if (num_rows < 1 || covered != num_rows) {
    return absl::InvalidArgumentError(absl::StrCat("attention step: rows [", first_row, ", ",
                                                   first_row + num_rows,
                                                   ") are not whole runs of this step"));
  }
  return indices;
}

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

absl::Status InProcessAttention::BeginStep(std::span<const StepRow> rows) {
  in_step_ = false;
  started_.Clear();
  runs_.clear();
  FERRY_ASSIGN_OR_RETURN(
      runs_, GroupStepRows(rows, [this](kv::SequenceId seq) { return cache_->Length(seq); }));
  for (const StepRun& run : runs_) {
    FERRY_RETURN_IF_ERROR(cache_->Reserve(run.seq, run.first_position + run.count));
  }
  // One kernel "sequence" per row: the row's block table, its length cut at its own position.
  num_rows_ = static_cast<int64_t>(rows.size());
  indptr_.assign(1, 0);
  block_table_.clear();
  seq_lens_.clear();
  for (const StepRun& run : runs_) {
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
  FERRY_ASSIGN_OR_RETURN(const std::vector<size_t> in_range,
                         RunsInRange(runs_, first_row, num_rows));
  const int64_t row_elems = int64_t{options_.kv.num_kv_heads} * options_.kv.head_dim;
  const DType dtype = options_.kv.dtype;
  const void* k_src = k;
  const void* v_src = v;
  if (dtype != DType::kFloat32) {
    const int64_t n = num_rows * row_elems;
    k_half_.resize(n);
    v_half_.resize(n);
    FloatsToDType(k, n, dtype, k_half_.data());
    FloatsToDType(v, n, dtype, v_half_.data());
    k_src = k_half_.data();
    v_src = v_half_.data();
  }
  const int64_t row_bytes = row_elems * DTypeSize(dtype);
  for (size_t index : in_range) {
    const StepRun& run = runs_[index];
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
  started_.Add(layer, first_row);
  return absl::OkStatus();
}

absl::Status InProcessAttention::FinishAttend(int layer, int64_t first_row) {
  return started_.Finish(layer, first_row);
}

absl::Status InProcessAttention::EndStep() {
  if (!in_step_) return absl::FailedPreconditionError("attention step: EndStep outside a step");
  FERRY_RETURN_IF_ERROR(started_.CheckAllFinished());
  in_step_ = false;
  for (const StepRun& run : runs_) {
    FERRY_RETURN_IF_ERROR(cache_->SetLength(run.seq, run.first_position + run.count));
  }
  return absl::OkStatus();
}

std::vector<kv::SequenceId> InProcessAttention::AbortStep() {
  in_step_ = false;
  started_.Clear();
  for (const StepRun& run : runs_) cache_->ReleaseUnwritten(run.seq);
  runs_.clear();
  return {};  // in-process attention fails only as a whole (or on room, which is not a sequence's)
}

absl::Status InProcessAttention::CheckCapacity(int64_t positions) {
  return cache_->CheckFits(positions);
}

absl::StatusOr<std::unique_ptr<InProcessLinearAttention>> InProcessLinearAttention::Create(
    const InProcessAttentionOptions& options, kernels::LinearFeatureMap feature_map,
    bool normalize) {
  kernels::LinearAttentionConfig kernel;
  kernel.num_seqs = 1;
  kernel.num_q_heads = options.num_heads;
  kernel.num_kv_heads = options.kv.num_kv_heads;
  kernel.head_dim = options.kv.head_dim;
  kernel.feature_map = feature_map;
  kernel.normalize = normalize;
  kernel.dtype = DType::kFloat32;
  FERRY_RETURN_IF_ERROR(kernels::ValidateLinearAttentionConfig(kernel));
  kv::StateCacheConfig config;
  config.num_layers = options.kv.num_layers;
  config.num_kv_heads = options.kv.num_kv_heads;
  config.head_dim = options.kv.head_dim;
  config.group = options.num_heads / options.kv.num_kv_heads;
  config.capacity_bytes = options.kv.capacity_bytes;
  FERRY_ASSIGN_OR_RETURN(auto states, kv::StateCache::Create(config));
  return std::unique_ptr<InProcessLinearAttention>(
      new InProcessLinearAttention(options, kernel, std::move(states)));
}

InProcessLinearAttention::InProcessLinearAttention(const InProcessAttentionOptions& options,
                                                   kernels::LinearAttentionConfig kernel,
                                                   std::unique_ptr<kv::StateCache> states)
    : options_(options),
      kernel_(kernel),
      states_(std::move(states)),
      pool_(std::make_unique<kernels::ThreadPool>(std::max(1, options.num_threads))) {}

absl::Status InProcessLinearAttention::AddSequence(kv::SequenceId seq) {
  FERRY_RETURN_IF_ERROR(states_->AddSequence(seq));
  lengths_[seq] = 0;
  return absl::OkStatus();
}

absl::Status InProcessLinearAttention::FreeSequence(kv::SequenceId seq) {
  FERRY_RETURN_IF_ERROR(states_->FreeSequence(seq));
  lengths_.erase(seq);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> InProcessLinearAttention::Length(kv::SequenceId seq) const {
  auto it = lengths_.find(seq);
  if (it == lengths_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second;
}

absl::Status InProcessLinearAttention::BeginStep(std::span<const StepRow> rows) {
  in_step_ = false;
  started_.Clear();
  saved_.clear();
  runs_.clear();
  FERRY_ASSIGN_OR_RETURN(
      runs_, GroupStepRows(rows, [this](kv::SequenceId seq) { return Length(seq); }));
  in_step_ = true;
  return absl::OkStatus();
}

absl::Status InProcessLinearAttention::StartAttend(int layer, int64_t first_row,
                                                   int64_t num_rows, const float* q,
                                                   const float* k, const float* v, float* out) {
  if (!in_step_) return absl::FailedPreconditionError("attention step: Attend outside a step");
  if (layer < 0 || layer >= options_.kv.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("attention step: layer ", layer));
  }
  FERRY_ASSIGN_OR_RETURN(const std::vector<size_t> in_range,
                         RunsInRange(runs_, first_row, num_rows));
  const int64_t q_row = int64_t{options_.num_heads} * options_.kv.head_dim;
  const int64_t kv_row = int64_t{options_.kv.num_kv_heads} * options_.kv.head_dim;
  // k and v as a worker receives them: rounded to the KV dtype, widened back.
  const DType dtype = options_.kv.dtype;
  k_.resize(num_rows * kv_row);
  v_.resize(num_rows * kv_row);
  rounded_.resize(num_rows * kv_row * DTypeSize(dtype));
  FloatsToDType(k, num_rows * kv_row, dtype, rounded_.data());
  DTypeToFloats(rounded_.data(), num_rows * kv_row, dtype, k_.data());
  FloatsToDType(v, num_rows * kv_row, dtype, rounded_.data());
  DTypeToFloats(rounded_.data(), num_rows * kv_row, dtype, v_.data());

  // Every state this range advances is saved first, so AbortStep can undo the step.
  for (size_t index : in_range) {
    FERRY_RETURN_IF_ERROR(states_->Save(runs_[index].seq, layer));
    saved_.emplace_back(runs_[index].seq, layer);
  }
  // Decode rows (one token) together; each prompt chunk through the forward from its state.
  q_batch_.clear();
  k_batch_.clear();
  v_batch_.clear();
  slots_.clear();
  std::vector<int64_t> decode_rows;
  for (size_t index : in_range) {
    const StepRun& run = runs_[index];
    const int64_t row = run.first_row - first_row;
    if (run.count == 1) {
      FERRY_ASSIGN_OR_RETURN(const int32_t slot, states_->Slot(run.seq));
      slots_.push_back(slot);
      decode_rows.push_back(row);
      q_batch_.insert(q_batch_.end(), q + row * q_row, q + (row + 1) * q_row);
      k_batch_.insert(k_batch_.end(), &k_[row * kv_row], &k_[(row + 1) * kv_row]);
      v_batch_.insert(v_batch_.end(), &v_[row * kv_row], &v_[(row + 1) * kv_row]);
      continue;
    }
    FERRY_ASSIGN_OR_RETURN(float* state, states_->Record(run.seq, layer, /*backup=*/false));
    const int32_t cu_seqlens[2] = {0, static_cast<int32_t>(run.count)};
    kernels::LinearAttentionForwardArgs args;
    args.config = kernel_;
    args.config.num_seqs = 1;
    args.cu_seqlens = cu_seqlens;
    args.total_tokens = run.count;
    args.q = q + row * q_row;
    args.k = &k_[row * kv_row];
    args.v = &v_[row * kv_row];
    args.initial_state = state;
    args.final_state = state;  // advanced in place
    args.out = out + row * q_row;
    FERRY_RETURN_IF_ERROR(kernels::LinearAttentionForwardCpu(args, *pool_));
  }
  if (!slots_.empty()) {
    out_batch_.resize(slots_.size() * q_row);
    kernels::LinearAttentionDecodeArgs args;
    args.config = kernel_;
    args.config.num_seqs = static_cast<int>(slots_.size());
    args.q = q_batch_.data();
    args.k = k_batch_.data();
    args.v = v_batch_.data();
    args.states = states_->States(layer);
    args.state_slots = slots_.data();
    args.num_state_slots = static_cast<int>(states_->total_slots());
    args.out = out_batch_.data();
    FERRY_RETURN_IF_ERROR(kernels::LinearAttentionDecodeCpu(args, *pool_));
    for (size_t i = 0; i < decode_rows.size(); ++i) {
      std::copy(out_batch_.begin() + i * q_row, out_batch_.begin() + (i + 1) * q_row,
                out + decode_rows[i] * q_row);
    }
  }
  started_.Add(layer, first_row);
  return absl::OkStatus();
}

absl::Status InProcessLinearAttention::FinishAttend(int layer, int64_t first_row) {
  return started_.Finish(layer, first_row);
}

absl::Status InProcessLinearAttention::EndStep() {
  if (!in_step_) return absl::FailedPreconditionError("attention step: EndStep outside a step");
  FERRY_RETURN_IF_ERROR(started_.CheckAllFinished());
  in_step_ = false;
  for (const StepRun& run : runs_) lengths_[run.seq] = run.first_position + run.count;
  return absl::OkStatus();
}

std::vector<kv::SequenceId> InProcessLinearAttention::AbortStep() {
  for (const auto& [seq, layer] : saved_) (void)states_->Restore(seq, layer);
  saved_.clear();
  started_.Clear();
  runs_.clear();
  in_step_ = false;
  return {};
}

absl::Status InProcessLinearAttention::CheckCapacity(int64_t /*positions*/) {
  // A sequence's state has the same size at any length: one slot.
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<AttentionStep>> CreateInProcessAttention(
    const ModelConfig& config, const InProcessAttentionOptions& options) {
  if (config.attention_kind == AttentionKind::kLinear) {
    FERRY_ASSIGN_OR_RETURN(auto linear,
                           InProcessLinearAttention::Create(options, config.linear_feature_map,
                                                            config.linear_normalize));
    return std::unique_ptr<AttentionStep>(std::move(linear));
  }
  FERRY_ASSIGN_OR_RETURN(auto softmax, InProcessAttention::Create(options));
  return std::unique_ptr<AttentionStep>(std::move(softmax));
}

}  // namespace ferry::model
