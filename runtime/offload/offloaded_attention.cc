#include "runtime/offload/offloaded_attention.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"
#include "runtime/common/log.h"

namespace ferry::offload {
namespace {

// float32 rows to the KV dtype.
void ConvertRows(const float* src, int64_t n, DType dtype, std::vector<uint8_t>* dst) {
  dst->resize(n * DTypeSize(dtype));
  if (dtype == DType::kFloat32) {
    std::copy(src, src + n, reinterpret_cast<float*>(dst->data()));
    return;
  }
  uint16_t* out = reinterpret_cast<uint16_t*>(dst->data());
  for (int64_t i = 0; i < n; ++i) {
    out[i] = dtype == DType::kBFloat16 ? FloatToBFloat16Bits(src[i]) : FloatToFloat16Bits(src[i]);
  }
}

}  // namespace

OffloadedAttention::OffloadedAttention(AttentionClient* client, WorkerDirectory directory,
                                       OffloadedAttentionOptions options)
    : client_(client), directory_(std::move(directory)), options_(std::move(options)) {}

absl::Status OffloadedAttention::Refresh() {
  for (auto& [id, known] : workers_) known.listed = false;
  for (const WorkerEndpoint& endpoint : directory_()) {
    Known& known = workers_[endpoint.id];
    if (known.index < 0 || known.host != endpoint.host || known.port != endpoint.port) {
      absl::StatusOr<int> index = client_->AddWorker(endpoint.host, endpoint.port);
      absl::Status configured =
          index.ok() ? client_->Configure(*index, options_.shape) : index.status();
      if (!configured.ok()) {
        FERRY_LOG_WARN("worker {}: cannot use it yet: {}", endpoint.id, configured.ToString());
        continue;
      }
      known.index = *index;
      known.host = endpoint.host;
      known.port = endpoint.port;
      if (static_cast<int>(worker_ids_.size()) <= *index) worker_ids_.resize(*index + 1);
      worker_ids_[*index] = endpoint.id;
      FERRY_LOG_INFO("worker {}: attention connected at {}:{}", endpoint.id, endpoint.host,
                     endpoint.port);
    }
    known.capacity_bytes = endpoint.capacity_bytes;
    known.accepting = endpoint.accepting;
    known.listed = true;
  }
  return absl::OkStatus();
}

std::vector<int64_t> OffloadedAttention::HeldBytes() const {
  const int64_t bytes_per_position = 2 * int64_t{options_.shape.num_layers} *
                                     options_.shape.num_kv_heads * options_.shape.head_dim *
                                     DTypeSize(options_.shape.dtype);
  std::vector<int64_t> held(worker_ids_.size(), 0);
  for (const auto& [seq, sequence] : sequences_) {
    for (size_t i = 0; i < sequence.shards.size(); ++i) {
      const int64_t end = i + 1 < sequence.shards.size() ? sequence.shards[i + 1].first_position
                                                         : sequence.length;
      held[sequence.shards[i].worker] += (end - sequence.shards[i].first_position) *
                                         bytes_per_position;
    }
  }
  return held;
}

int OffloadedAttention::PickWorker(const std::vector<int>& exclude) const {
  const std::vector<int64_t> held = HeldBytes();
  int best = -1;
  int64_t best_free = 0;
  for (const auto& [id, known] : workers_) {
    if (!known.listed || !known.accepting || known.index < 0) continue;
    if (std::find(exclude.begin(), exclude.end(), known.index) != exclude.end()) continue;
    const int64_t free = known.capacity_bytes - held[known.index];
    if (best < 0 || free > best_free) {
      best = known.index;
      best_free = free;
    }
  }
  return best;
}

absl::Status OffloadedAttention::OpenShard(kv::SequenceId seq, Sequence& sequence,
                                           int64_t first_position) {
  std::vector<int> exclude;
  for (const Shard& shard : sequence.shards) exclude.push_back(shard.worker);
  const int worker = PickWorker(exclude);
  if (worker < 0) {
    return absl::UnavailableError(
        absl::StrCat("sequence ", seq, ": no attention worker can take a new shard"));
  }
  const SequenceEntry entry{seq, first_position};
  FERRY_RETURN_IF_ERROR(client_->OpenSequences(worker, {&entry, 1}));
  sequence.shards.push_back({worker, first_position});
  return absl::OkStatus();
}

absl::Status OffloadedAttention::AddSequence(kv::SequenceId seq) {
  if (sequences_.count(seq) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", seq, " already exists"));
  }
  FERRY_RETURN_IF_ERROR(Refresh());
  Sequence sequence;
  FERRY_RETURN_IF_ERROR(OpenShard(seq, sequence, 0));
  sequences_[seq] = std::move(sequence);
  return absl::OkStatus();
}

absl::Status OffloadedAttention::FreeSequence(kv::SequenceId seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  for (const Shard& shard : it->second.shards) {
    const uint64_t id = seq;
    absl::StatusOr<int64_t> freed = client_->FreeSequences(shard.worker, {&id, 1});
    if (!freed.ok()) {
      // A dead worker's KV is gone with it; nothing else holds these blocks.
      FERRY_LOG_WARN("sequence {}: freeing on worker {} failed: {}", seq,
                     worker_ids_[shard.worker], freed.status().ToString());
    }
  }
  sequences_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> OffloadedAttention::Length(kv::SequenceId seq) const {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  return it->second.length;
}

std::vector<std::pair<std::string, int64_t>> OffloadedAttention::Shards(
    kv::SequenceId seq) const {
  std::vector<std::pair<std::string, int64_t>> out;
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return out;
  for (const Shard& shard : it->second.shards) {
    out.emplace_back(worker_ids_[shard.worker], shard.first_position);
  }
  return out;
}

absl::Status OffloadedAttention::MigrateOffDrainingWorkers() {
  for (auto& [seq, sequence] : sequences_) {
    for (Shard& shard : sequence.shards) {
      const Known& from = workers_[worker_ids_[shard.worker]];
      if (!from.listed || from.accepting) continue;
      std::vector<int> exclude;
      for (const Shard& other : sequence.shards) exclude.push_back(other.worker);
      const int target = PickWorker(exclude);
      if (target < 0) continue;  // nowhere to go yet; it stays until a worker can take it
      const Known& to = workers_[worker_ids_[target]];
      FERRY_RETURN_IF_ERROR(client_->Migrate(shard.worker, seq, to.host, to.port));
      FERRY_LOG_INFO("sequence {}: moved from draining worker {} to {}", seq,
                     worker_ids_[shard.worker], worker_ids_[target]);
      shard.worker = target;
    }
  }
  return absl::OkStatus();
}

absl::Status OffloadedAttention::BeginStep(std::span<const model::StepRow> rows) {
  in_step_ = false;  // a failed step ends without EndStep
  FERRY_RETURN_IF_ERROR(Refresh());
  FERRY_RETURN_IF_ERROR(MigrateOffDrainingWorkers());
  runs_.clear();
  for (size_t r = 0; r < rows.size(); ++r) {
    if (!runs_.empty() && runs_.back().seq == rows[r].seq &&
        rows[r].position == runs_.back().first_position + runs_.back().count) {
      ++runs_.back().count;
      continue;
    }
    runs_.push_back({rows[r].seq, static_cast<int64_t>(r), rows[r].position, 1});
  }
  for (const Run& run : runs_) {
    auto it = sequences_.find(run.seq);
    if (it == sequences_.end()) {
      return absl::NotFoundError(absl::StrCat("unknown sequence ", run.seq));
    }
    Sequence& sequence = it->second;
    if (run.first_position != sequence.length) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", run.seq, ": rows start at ",
                                                     run.first_position, ", its length is ",
                                                     sequence.length));
    }
    const int64_t tail_held = sequence.length - sequence.shards.back().first_position;
    if (options_.shard_positions > 0 && tail_held >= options_.shard_positions) {
      absl::Status opened = OpenShard(run.seq, sequence, sequence.length);
      if (!opened.ok()) {  // no other worker: the tail keeps growing
        FERRY_LOG_DEBUG("sequence {}: {}", run.seq, opened.ToString());
      }
    }
  }
  in_step_ = true;
  return absl::OkStatus();
}

absl::Status OffloadedAttention::Attend(int layer, const float* q, const float* k,
                                        const float* v, float* out) {
  if (!in_step_) return absl::FailedPreconditionError("Attend outside a step");
  const ModelShape& shape = options_.shape;
  const int64_t num_rows = runs_.empty() ? 0 : runs_.back().first_row + runs_.back().count;
  const int64_t kv_row = int64_t{shape.num_kv_heads} * shape.head_dim;
  ConvertRows(k, num_rows * kv_row, shape.dtype, &k_staging_);
  ConvertRows(v, num_rows * kv_row, shape.dtype, &v_staging_);
  FERRY_RETURN_IF_ERROR(AttendDecodeRows(layer, q, k_staging_.data(), v_staging_.data(), out));
  for (const Run& run : runs_) {
    if (run.count > 1) {
      FERRY_RETURN_IF_ERROR(
          AttendPrefillRun(layer, run, q, k_staging_.data(), v_staging_.data(), out));
    }
  }
  return absl::OkStatus();
}

absl::Status OffloadedAttention::AttendDecodeRows(int layer, const float* q, const uint8_t* k,
                                                  const uint8_t* v, float* out) {
  const ModelShape& shape = options_.shape;
  const int64_t q_row = int64_t{options_.num_heads} * shape.head_dim;
  const int64_t kv_row_bytes = int64_t{shape.num_kv_heads} * shape.head_dim * DTypeSize(shape.dtype);
  std::vector<const Run*> decode;
  for (const Run& run : runs_) {
    if (run.count == 1) decode.push_back(&run);
  }
  if (decode.empty()) return absl::OkStatus();

  // Per worker, one message for the sequences whose tail shard it holds (the new token's k and
  // v ride along and are appended before attending) and one for the earlier shards it holds.
  std::vector<float> batch_q(decode.size() * q_row);
  std::map<std::pair<int, bool>, AttentionClient::Shard> by_worker;  // (worker, is tail)
  std::map<std::pair<int, bool>, std::pair<std::vector<uint8_t>, std::vector<uint8_t>>> new_kv;
  for (size_t i = 0; i < decode.size(); ++i) {
    const Run& run = *decode[i];
    std::copy(q + run.first_row * q_row, q + (run.first_row + 1) * q_row,
              batch_q.begin() + i * q_row);
    const std::vector<Shard>& shards = sequences_[run.seq].shards;
    for (size_t p = 0; p < shards.size(); ++p) {
      const bool tail = p + 1 == shards.size();
      AttentionClient::Shard& s = by_worker[{shards[p].worker, tail}];
      s.worker = shards[p].worker;
      s.batch_index.push_back(static_cast<int>(i));
      s.sequences.push_back(run.seq);
      if (!tail) continue;
      s.positions.push_back(run.first_position);
      auto& [shard_k, shard_v] = new_kv[{shards[p].worker, true}];
      shard_k.insert(shard_k.end(), k + run.first_row * kv_row_bytes,
                     k + (run.first_row + 1) * kv_row_bytes);
      shard_v.insert(shard_v.end(), v + run.first_row * kv_row_bytes,
                     v + (run.first_row + 1) * kv_row_bytes);
    }
  }
  for (auto& [key, kv] : new_kv) {
    by_worker[key].new_k = kv.first.data();
    by_worker[key].new_v = kv.second.data();
  }
  std::vector<AttentionClient::Shard> shards;
  for (auto& [worker, shard] : by_worker) shards.push_back(std::move(shard));
  FERRY_ASSIGN_OR_RETURN(
      AttentionClient::LayerResult result,
      client_->AttendLayer(layer, static_cast<int>(decode.size()), options_.num_heads,
                           batch_q.data(), shards));
  for (size_t s = 0; s < shards.size(); ++s) {
    if (!result.shard_status[s].ok()) {
      return absl::Status(result.shard_status[s].code(),
                          absl::StrCat("worker ", worker_ids_[shards[s].worker], ": ",
                                       result.shard_status[s].message()));
    }
  }
  // A partial state's o is normalised over its positions: merged over all shards it is the
  // attention output.
  for (size_t i = 0; i < decode.size(); ++i) {
    std::copy(result.merged.o.begin() + i * q_row, result.merged.o.begin() + (i + 1) * q_row,
              out + decode[i]->first_row * q_row);
  }
  return absl::OkStatus();
}

absl::Status OffloadedAttention::AttendPrefillRun(int layer, const Run& run, const float* q,
                                                  const uint8_t* k, const uint8_t* v,
                                                  float* out) {
  const ModelShape& shape = options_.shape;
  const int64_t q_row = int64_t{options_.num_heads} * shape.head_dim;
  const int64_t kv_row_bytes = int64_t{shape.num_kv_heads} * shape.head_dim * DTypeSize(shape.dtype);
  const Sequence& sequence = sequences_[run.seq];
  const int num_parts = static_cast<int>(sequence.shards.size());
  const int64_t num_states = run.count * options_.num_heads;
  std::vector<float> parts_o(num_parts * num_states * shape.head_dim);
  std::vector<float> parts_lse(num_parts * num_states);
  for (int p = 0; p < num_parts; ++p) {
    const Shard& shard = sequence.shards[p];
    const bool tail = p + 1 == num_parts;
    absl::StatusOr<PartialStates> states = client_->Prefill(
        shard.worker, layer, run.seq, run.first_position, static_cast<int>(run.count),
        options_.num_heads, q + run.first_row * q_row,
        tail ? k + run.first_row * kv_row_bytes : nullptr,
        tail ? v + run.first_row * kv_row_bytes : nullptr);
    if (!states.ok()) {
      return absl::Status(states.status().code(), absl::StrCat("worker ", worker_ids_[shard.worker],
                                                               ": ", states.status().message()));
    }
    std::copy(states->o.begin(), states->o.end(), parts_o.begin() + p * num_states * shape.head_dim);
    std::copy(states->lse.begin(), states->lse.end(), parts_lse.begin() + p * num_states);
  }
  std::vector<float> merged_lse(num_states);
  return kernels::MergeStatesCpu(parts_o.data(), parts_lse.data(), num_parts, num_states,
                                 shape.head_dim, out + run.first_row * q_row, merged_lse.data());
}

absl::Status OffloadedAttention::EndStep() {
  if (!in_step_) return absl::FailedPreconditionError("EndStep outside a step");
  for (const Run& run : runs_) sequences_[run.seq].length += run.count;
  in_step_ = false;
  return absl::OkStatus();
}

}  // namespace ferry::offload
