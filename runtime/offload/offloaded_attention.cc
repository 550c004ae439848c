#include "runtime/offload/offloaded_attention.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"
#include "runtime/common/log.h"

namespace ferry::offload {
namespace {

bool Contains(const std::vector<int>& list, int value) {
  return std::find(list.begin(), list.end(), value) != list.end();
}

// Copies `count` rows of `piece` bytes at byte offset `offset` within rows of `stride` bytes.
void GatherColumns(const void* src, int64_t count, int64_t stride, int64_t offset, int64_t piece,
                   std::vector<uint8_t>* dst) {
  dst->resize(count * piece);
  const uint8_t* in = static_cast<const uint8_t*>(src);
  for (int64_t r = 0; r < count; ++r) {
    std::copy(in + r * stride + offset, in + r * stride + offset + piece, dst->data() + r * piece);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<OffloadedAttention>> OffloadedAttention::Create(
    AttentionClient* client, WorkerDirectory directory, OffloadedAttentionOptions options) {
  const int kv_heads = options.shape.num_kv_heads;
  if (options.num_heads < 1 || kv_heads < 1 || options.num_heads % kv_heads != 0) {
    return absl::InvalidArgumentError("offloaded attention: kv heads must divide heads");
  }
  if (options.num_head_groups < 1 || kv_heads % options.num_head_groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat("offloaded attention: ", options.num_head_groups,
                                                   " head groups do not divide the model's ",
                                                   kv_heads, " kv heads"));
  }
  if (options.shard_positions < 0) {
    return absl::InvalidArgumentError("offloaded attention: negative shard positions");
  }
  if (options.shape.linear_attention && options.shard_positions > 0) {
    return absl::InvalidArgumentError(
        "offloaded attention: a linear-attention state cannot be split by position range "
        "(--shard-positions); shard by head group instead");
  }
  // The state's layout depends on the q heads per kv head; the caller need not set it.
  options.shape.q_heads_per_kv_head = options.num_heads / kv_heads;
  return std::unique_ptr<OffloadedAttention>(
      new OffloadedAttention(client, std::move(directory), std::move(options)));
}

OffloadedAttention::OffloadedAttention(AttentionClient* client, WorkerDirectory directory,
                                       OffloadedAttentionOptions options)
    : client_(client),
      directory_(std::move(directory)),
      options_(std::move(options)),
      group_kv_heads_(options_.shape.num_kv_heads / options_.num_head_groups),
      group_q_heads_(options_.num_heads / options_.num_head_groups) {
  worker_shape_ = options_.shape;
  worker_shape_.num_kv_heads = group_kv_heads_;
  worker_shape_.model_kv_heads = options_.shape.num_kv_heads;
}

absl::Status OffloadedAttention::Refresh() {
  for (auto& [id, known] : workers_) known.listed = false;
  for (const WorkerEndpoint& endpoint : directory_()) {
    Known& known = workers_[endpoint.id];
    if (known.index < 0 || known.host != endpoint.host || known.port != endpoint.port) {
      absl::StatusOr<int> index = client_->AddWorker(endpoint.host, endpoint.port);
      absl::StatusOr<int64_t> total_blocks =
          index.ok() ? client_->Configure(*index, worker_shape_) : index.status();
      if (!total_blocks.ok()) {
        FERRY_LOG_WARN("worker {}: cannot use it yet: {}", endpoint.id,
                       total_blocks.status().ToString());
        continue;
      }
      known.index = *index;
      known.total_blocks = *total_blocks;
      known.speed = AttentionSpeed();
      known.failed = false;
      known.host = endpoint.host;
      known.port = endpoint.port;
      if (static_cast<int>(worker_ids_.size()) <= *index) worker_ids_.resize(*index + 1);
      worker_ids_[*index] = endpoint.id;
      FERRY_LOG_INFO("worker {}: attention connected at {}:{}", endpoint.id, endpoint.host,
                     endpoint.port);
    }
    known.accepting = endpoint.accepting;
    known.listed = true;
  }
  // A failed worker that left the directory is connected afresh if it comes back.
  for (auto& [id, known] : workers_) {
    if (!known.listed && known.failed) known.index = -1;
  }
  return absl::OkStatus();
}

int64_t OffloadedAttention::ShardUnits(int64_t positions) const {
  if (options_.shape.linear_attention) return 1;
  return (positions + options_.shape.block_size - 1) / options_.shape.block_size;
}

int64_t OffloadedAttention::ShardLayerBytes(int64_t positions) const {
  if (options_.shape.linear_attention) {
    const kernels::LinearStateLayout layout = kernels::MakeLinearStateLayout(
        options_.shape.head_dim, worker_shape_.q_heads_per_kv_head);
    return int64_t{group_kv_heads_} * layout.stride * 4;
  }
  return 2 * positions * group_kv_heads_ * options_.shape.head_dim *
         DTypeSize(options_.shape.dtype);
}

std::vector<OffloadedAttention::Load> OffloadedAttention::Loads() const {
  const int64_t layers = options_.shape.num_layers;
  std::vector<Load> loads(worker_ids_.size());
  for (const auto& [seq, sequence] : sequences_) {
    for (const Group& group : sequence.groups) {
      for (size_t i = 0; i < group.shards.size(); ++i) {
        const int64_t end = i + 1 < group.shards.size() ? group.shards[i + 1].first_position
                                                        : sequence.length;
        const int64_t held = end - group.shards[i].first_position;
        Load& load = loads[group.shards[i].worker];
        load.blocks += ShardUnits(held);
        // A shard counts at least one block's positions: one just opened holds nothing yet, but
        // sequences placed in the same step must still spread out.
        load.bytes += layers * ShardLayerBytes(std::max<int64_t>(held, options_.shape.block_size));
      }
    }
  }
  return loads;
}

int OffloadedAttention::PickWorker(const std::vector<int>& exclude, const std::vector<int>& avoid,
                                   int64_t blocks, const std::vector<int64_t>& reserved) const {
  const std::vector<Load> loads = Loads();
  std::vector<PlacementCandidate> candidates;
  for (const auto& [id, known] : workers_) {
    if (!known.listed || !known.accepting || known.failed || known.index < 0) continue;
    if (Contains(exclude, known.index)) continue;
    const Load& load = loads[known.index];
    const int64_t promised =
        known.index < static_cast<int>(reserved.size()) ? reserved[known.index] : 0;
    candidates.push_back({known.index, known.total_blocks, load.blocks + promised, load.bytes,
                          known.speed.seconds_per_byte(), Contains(avoid, known.index)});
  }
  return ChoosePlacement(candidates, blocks,
                         options_.shape.num_layers *
                             ShardLayerBytes(blocks * options_.shape.block_size));
}

absl::StatusOr<int> OffloadedAttention::OpenShard(kv::SequenceId seq, Sequence& sequence,
                                                  int group, int64_t first_position,
                                                  int64_t blocks,
                                                  const std::vector<int64_t>& reserved) {
  std::vector<int> exclude, avoid;
  for (int g = 0; g < static_cast<int>(sequence.groups.size()); ++g) {
    for (const Shard& shard : sequence.groups[g].shards) {
      (g == group ? exclude : avoid).push_back(shard.worker);
    }
  }
  const SequenceEntry entry{WireId(seq, group), first_position};
  while (true) {
    const int worker = PickWorker(exclude, avoid, blocks, reserved);
    if (worker < 0) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "sequence ", seq, " group ", group, ": no attention worker has room for ", blocks,
          " more KV blocks"));
    }
    absl::Status opened = client_->OpenSequences(worker, {&entry, 1}, group * group_kv_heads_);
    if (opened.ok()) {
      sequence.groups[group].shards.push_back({worker, first_position});
      return worker;
    }
    NoteFailure(worker, opened, {});
    // A worker whose peer just failed is out of PickWorker's choice now: the next one takes
    // the shard. Any other error is the call's.
    if (!KnownWorker(worker).failed) return WorkerError(worker, opened);
  }
}

absl::Status OffloadedAttention::AddSequence(kv::SequenceId seq) {
  if (sequences_.count(seq) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", seq, " already exists"));
  }
  FERRY_RETURN_IF_ERROR(Refresh());
  Sequence sequence;
  sequence.groups.resize(options_.num_head_groups);
  for (int g = 0; g < options_.num_head_groups; ++g) {
    absl::Status opened = OpenShard(seq, sequence, g, 0).status();
    if (!opened.ok()) {
      for (int done = 0; done < g; ++done) {
        const uint64_t id = WireId(seq, done);
        (void)client_->FreeSequences(sequence.groups[done].shards[0].worker, {&id, 1});
      }
      return opened;
    }
  }
  sequences_[seq] = std::move(sequence);
  return absl::OkStatus();
}

absl::Status OffloadedAttention::FreeSequence(kv::SequenceId seq) {
  auto it = sequences_.find(seq);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", seq));
  std::map<int, std::vector<uint64_t>> by_worker;
  for (int g = 0; g < static_cast<int>(it->second.groups.size()); ++g) {
    for (const Shard& shard : it->second.groups[g].shards) {
      by_worker[shard.worker].push_back(WireId(seq, g));
    }
  }
  for (const auto& [worker, ids] : by_worker) {
    absl::StatusOr<int64_t> freed = client_->FreeSequences(worker, ids);
    if (!freed.ok()) {
      // A dead worker's KV is gone with it; nothing else holds these blocks.
      FERRY_LOG_WARN("sequence {}: freeing on worker {} failed: {}", seq, worker_ids_[worker],
                     freed.status().ToString());
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

absl::Status OffloadedAttention::MigrateOffDrainingWorkers() {
  for (auto& [seq, sequence] : sequences_) {
    for (int g = 0; g < static_cast<int>(sequence.groups.size()); ++g) {
      std::vector<Shard>& shards = sequence.groups[g].shards;
      for (size_t p = 0; p < shards.size(); ++p) {
        const Known& from = KnownWorker(shards[p].worker);
        if (!from.listed || from.accepting) continue;
        std::vector<int> exclude, avoid;
        for (int other = 0; other < static_cast<int>(sequence.groups.size()); ++other) {
          for (const Shard& s : sequence.groups[other].shards) {
            (other == g ? exclude : avoid).push_back(s.worker);
          }
        }
        const int64_t end = p + 1 < shards.size() ? shards[p + 1].first_position : sequence.length;
        const int target = PickWorker(exclude, avoid, ShardUnits(end - shards[p].first_position));
        if (target < 0) continue;  // nowhere to go yet; it stays until a worker can take it
        const Known& to = KnownWorker(target);
        absl::Status moved = client_->Migrate(shards[p].worker, WireId(seq, g), to.host, to.port);
        if (!moved.ok()) {  // it stays where it is; the next step tries again
          FERRY_LOG_WARN("sequence {} group {}: moving off draining worker {} failed: {}", seq, g,
                         worker_ids_[shards[p].worker], moved.ToString());
          continue;
        }
        FERRY_LOG_INFO("sequence {} group {}: moved from draining worker {} to {}", seq, g,
                       worker_ids_[shards[p].worker], worker_ids_[target]);
        shards[p].worker = target;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status OffloadedAttention::BeginStep(std::span<const model::StepRow> rows) {
  in_step_ = false;  // a failed step ends without EndStep
  pending_.clear();
  failed_.clear();
  FERRY_RETURN_IF_ERROR(Refresh());
  FERRY_RETURN_IF_ERROR(MigrateOffDrainingWorkers());
  runs_.clear();
  FERRY_ASSIGN_OR_RETURN(runs_, model::GroupRuns(rows));
  for (const model::StepRun& run : runs_) {
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
    for (int g = 0; g < static_cast<int>(sequence.groups.size()); ++g) {
      const int64_t tail_held = sequence.length - sequence.groups[g].shards.back().first_position;
      if (options_.shard_positions > 0 && tail_held >= options_.shard_positions) {
        absl::StatusOr<int> opened =
            OpenShard(run.seq, sequence, g, sequence.length, ShardUnits(run.count));
        if (!opened.ok()) {  // no other worker: the tail keeps growing
          FERRY_LOG_DEBUG("sequence {}: {}", run.seq, opened.status().ToString());
        }
      }
    }
  }
  FERRY_RETURN_IF_ERROR(ReserveStepBlocks());
  in_step_ = true;
  return absl::OkStatus();
}

absl::Status OffloadedAttention::ReserveStepBlocks() {
  if (options_.shape.linear_attention) return absl::OkStatus();  // states do not grow
  auto blocks_for = [this](int64_t positions) { return ShardUnits(positions); };
  const std::vector<Load> loads = Loads();
  std::vector<int64_t> reserved(worker_ids_.size(), 0);
  for (const model::StepRun& run : runs_) {
    Sequence& sequence = sequences_.at(run.seq);
    for (int g = 0; g < static_cast<int>(sequence.groups.size()); ++g) {
      // A copy: opening a new shard below grows the shard list.
      const Shard tail = sequence.groups[g].shards.back();
      const int64_t held = sequence.length - tail.first_position;
      const int64_t needed = blocks_for(held + run.count) - blocks_for(held);
      const Known& known = KnownWorker(tail.worker);
      if (needed <= known.total_blocks - loads[tail.worker].blocks - reserved[tail.worker]) {
        reserved[tail.worker] += needed;
        continue;
      }
      // The tail's worker is full: the group continues on a new shard where there is room.
      const int64_t fresh = blocks_for(run.count);
      absl::StatusOr<int> spilled =
          OpenShard(run.seq, sequence, g, sequence.length, fresh, reserved);
      if (spilled.ok()) {
        FERRY_LOG_INFO("sequence {} group {}: worker {} is full; continuing on {}", run.seq, g,
                       worker_ids_[tail.worker], worker_ids_[*spilled]);
        reserved[*spilled] += fresh;
        continue;
      }
      // Not tied to this sequence (the others hold the room it lacks): the caller decides who
      // gives way.
      return absl::ResourceExhaustedError(absl::StrCat(
          "kv cache full: sequence ", run.seq, " needs ", needed, " more blocks on worker ",
          worker_ids_[tail.worker], " and no worker has room for ", fresh));
    }
  }
  return absl::OkStatus();
}

void OffloadedAttention::NoteFailure(int worker, const absl::Status& status,
                                     const std::vector<kv::SequenceId>& sequences) {
  failed_.insert(sequences.begin(), sequences.end());
  Known& known = KnownWorker(worker);
  // A dead peer (reset, unreachable, keepalive timeout) marks the endpoint; an error reply or a
  // slow call does not.
  if (!known.failed && !client_->node().PeerStatus(client_->peer(worker)).ok()) {
    known.failed = true;
    FERRY_LOG_WARN("worker {}: {}; it takes no new shards", worker_ids_[worker],
                   status.ToString());
  }
}

absl::Status OffloadedAttention::WorkerError(int worker, const absl::Status& status) const {
  return absl::Status(status.code(),
                      absl::StrCat("worker ", worker_ids_[worker], ": ", status.message()));
}

absl::Status OffloadedAttention::StartAttend(int layer, int64_t first_row, int64_t num_rows,
                                             const float* q, const float* k, const float* v,
                                             float* out) {
  if (!in_step_) return absl::FailedPreconditionError("attention outside a step");
  if (layer < 0 || layer >= options_.shape.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range"));
  }
  if (pending_.count({layer, first_row}) != 0) {
    return absl::FailedPreconditionError(absl::StrCat("rows from ", first_row, " already sent"));
  }
  PendingRange pending;
  pending.layer = layer;
  pending.first_row = first_row;
  pending.out = out;
  FERRY_ASSIGN_OR_RETURN(const std::vector<size_t> in_range,
                         model::RunsInRange(runs_, first_row, num_rows));
  std::vector<size_t> prefill_runs;
  for (size_t i : in_range) (runs_[i].count == 1 ? pending.decode_runs : prefill_runs).push_back(i);
  const int64_t kv_row = int64_t{options_.shape.num_kv_heads} * options_.shape.head_dim;
  k_staging_.resize(num_rows * kv_row * DTypeSize(options_.shape.dtype));
  v_staging_.resize(k_staging_.size());
  FloatsToDType(k, num_rows * kv_row, options_.shape.dtype, k_staging_.data());
  FloatsToDType(v, num_rows * kv_row, options_.shape.dtype, v_staging_.data());
  FERRY_RETURN_IF_ERROR(StartDecodeRows(pending, q, k_staging_.data(), v_staging_.data()));
  for (size_t run : prefill_runs) {
    FERRY_RETURN_IF_ERROR(StartPrefillRun(pending, run, q, k_staging_.data(), v_staging_.data()));
  }
  pending_.emplace(std::make_pair(layer, first_row), std::move(pending));
  return absl::OkStatus();
}

absl::Status OffloadedAttention::FinishAttend(int layer, int64_t first_row) {
  auto it = pending_.find({layer, first_row});
  if (it == pending_.end()) {
    return absl::FailedPreconditionError(absl::StrCat("no attention sent for rows from ",
                                                      first_row));
  }
  PendingRange pending = std::move(it->second);
  pending_.erase(it);
  // Both halves are always waited for, so nothing is left in flight after an error.
  const absl::Status decoded = FinishDecodeRows(pending);
  const absl::Status prefilled = FinishPrefillRuns(pending);
  return decoded.ok() ? prefilled : decoded;
}

absl::Status OffloadedAttention::StartDecodeRows(PendingRange& pending, const float* q,
                                                 const uint8_t* k, const uint8_t* v) {
  if (pending.decode_runs.empty()) return absl::OkStatus();
  const ModelShape& shape = options_.shape;
  const int num_groups = options_.num_head_groups;
  const int64_t q_row = int64_t{options_.num_heads} * shape.head_dim;
  const int64_t kv_row_bytes = int64_t{shape.num_kv_heads} * shape.head_dim * DTypeSize(shape.dtype);
  const int64_t group_kv_bytes = kv_row_bytes / num_groups;

  // Batch entry i * num_groups + g is group g of the i-th decode row: as (rows, heads, dim) is
  // (rows * groups, group heads, dim) in memory, q needs no reshuffle and the merged states come
  // back in row order. Per worker, one message for the entries whose tail shard it holds (the new
  // token's k and v ride along and are appended before attending) and one for earlier shards.
  const int64_t batch = static_cast<int64_t>(pending.decode_runs.size()) * num_groups;
  std::vector<float> batch_q(pending.decode_runs.size() * q_row);
  std::map<std::pair<int, bool>, AttentionClient::Shard> by_worker;  // (worker, is tail)
  std::map<std::pair<int, bool>, std::pair<std::vector<uint8_t>, std::vector<uint8_t>>> new_kv;
  std::map<std::pair<int, bool>, double> kv_bytes;  // what each message's attention reads
  std::map<std::pair<int, bool>, std::vector<kv::SequenceId>> owners;
  for (size_t i = 0; i < pending.decode_runs.size(); ++i) {
    const model::StepRun& run = runs_[pending.decode_runs[i]];
    const int64_t row = run.first_row - pending.first_row;
    std::copy(q + row * q_row, q + (row + 1) * q_row, batch_q.begin() + i * q_row);
    const Sequence& sequence = sequences_.at(run.seq);
    for (int g = 0; g < num_groups; ++g) {
      const std::vector<Shard>& shards = sequence.groups[g].shards;
      for (size_t p = 0; p < shards.size(); ++p) {
        const bool tail = p + 1 == shards.size();
        AttentionClient::Shard& s = by_worker[{shards[p].worker, tail}];
        s.worker = shards[p].worker;
        const int64_t end = tail ? run.first_position + 1 : shards[p + 1].first_position;
        kv_bytes[{shards[p].worker, tail}] +=
            static_cast<double>(ShardLayerBytes(end - shards[p].first_position));
        s.batch_index.push_back(static_cast<int>(i * num_groups + g));
        s.sequences.push_back(WireId(run.seq, g));
        owners[{shards[p].worker, tail}].push_back(run.seq);
        if (!tail) continue;
        s.positions.push_back(run.first_position);
        auto& [shard_k, shard_v] = new_kv[{shards[p].worker, true}];
        const int64_t at = row * kv_row_bytes + g * group_kv_bytes;
        shard_k.insert(shard_k.end(), k + at, k + at + group_kv_bytes);
        shard_v.insert(shard_v.end(), v + at, v + at + group_kv_bytes);
      }
    }
  }
  for (auto& [key, kv] : new_kv) {
    by_worker[key].new_k = kv.first.data();
    by_worker[key].new_v = kv.second.data();
  }
  std::vector<AttentionClient::Shard> shards;
  for (auto& [key, shard] : by_worker) {
    pending.decode_workers.push_back(shard.worker);
    pending.decode_kv_bytes.push_back(kv_bytes[key]);
    pending.decode_sequences.push_back(std::move(owners[key]));
    shards.push_back(std::move(shard));
  }
  FERRY_ASSIGN_OR_RETURN(AttentionClient::PendingLayer sent,
                         client_->StartAttendLayer(pending.layer, static_cast<int>(batch),
                                                   group_q_heads_, batch_q.data(), shards));
  pending.decode = std::move(sent);
  return absl::OkStatus();
}

absl::Status OffloadedAttention::FinishDecodeRows(PendingRange& pending) {
  if (!pending.decode.has_value()) return absl::OkStatus();
  FERRY_ASSIGN_OR_RETURN(AttentionClient::LayerResult result,
                         client_->FinishAttendLayer(*pending.decode));
  absl::Status first_error;
  for (size_t s = 0; s < result.shard_status.size(); ++s) {
    const int worker = pending.decode_workers[s];
    if (!result.shard_status[s].ok()) {
      NoteFailure(worker, result.shard_status[s], pending.decode_sequences[s]);
      if (first_error.ok()) first_error = WorkerError(worker, result.shard_status[s]);
      continue;
    }
    Known& known = KnownWorker(worker);
    known.speed.Observe(result.shard_seconds[s], pending.decode_kv_bytes[s]);
    known.speed_changed = true;
  }
  FERRY_RETURN_IF_ERROR(first_error);
  // A partial state's o is normalised over its positions: merged over all shards it is the
  // attention output.
  const int64_t q_row = int64_t{options_.num_heads} * options_.shape.head_dim;
  for (size_t i = 0; i < pending.decode_runs.size(); ++i) {
    const int64_t row = runs_[pending.decode_runs[i]].first_row - pending.first_row;
    std::copy(result.merged.o.begin() + i * q_row, result.merged.o.begin() + (i + 1) * q_row,
              pending.out + row * q_row);
  }
  return absl::OkStatus();
}

absl::Status OffloadedAttention::StartPrefillRun(PendingRange& pending, size_t run_index,
                                                 const float* q, const uint8_t* k,
                                                 const uint8_t* v) {
  const ModelShape& shape = options_.shape;
  const model::StepRun& run = runs_[run_index];
  const int num_groups = options_.num_head_groups;
  const int64_t row = run.first_row - pending.first_row;
  const int64_t q_row_bytes = int64_t{options_.num_heads} * shape.head_dim * 4;
  const int64_t kv_row_bytes = int64_t{shape.num_kv_heads} * shape.head_dim * DTypeSize(shape.dtype);
  const int64_t group_q_bytes = q_row_bytes / num_groups;
  const int64_t group_kv_bytes = kv_row_bytes / num_groups;
  const Sequence& sequence = sequences_.at(run.seq);
  std::vector<uint8_t> group_q, group_k, group_v;
  for (int g = 0; g < num_groups; ++g) {
    const uint8_t* run_q = reinterpret_cast<const uint8_t*>(q) + row * q_row_bytes;
    const uint8_t* run_k = k + row * kv_row_bytes;
    const uint8_t* run_v = v + row * kv_row_bytes;
    if (num_groups > 1) {  // the group's heads of every row, packed
      GatherColumns(run_q, run.count, q_row_bytes, g * group_q_bytes, group_q_bytes, &group_q);
      GatherColumns(run_k, run.count, kv_row_bytes, g * group_kv_bytes, group_kv_bytes, &group_k);
      GatherColumns(run_v, run.count, kv_row_bytes, g * group_kv_bytes, group_kv_bytes, &group_v);
      run_q = group_q.data();
      run_k = group_k.data();
      run_v = group_v.data();
    }
    const std::vector<Shard>& shards = sequence.groups[g].shards;
    for (size_t p = 0; p < shards.size(); ++p) {
      const bool tail = p + 1 == shards.size();
      absl::StatusOr<AttentionClient::PendingCall> call = client_->StartPrefill(
          shards[p].worker, pending.layer, WireId(run.seq, g), run.first_position,
          static_cast<int>(run.count), group_q_heads_, reinterpret_cast<const float*>(run_q),
          tail ? run_k : nullptr, tail ? run_v : nullptr);
      if (!call.ok()) {
        NoteFailure(shards[p].worker, call.status(), {run.seq});
        return WorkerError(shards[p].worker, call.status());
      }
      pending.prefill.push_back({run_index, g, static_cast<int>(p), std::move(*call)});
    }
  }
  return absl::OkStatus();
}

absl::Status OffloadedAttention::FinishPrefillRuns(PendingRange& pending) {
  const int head_dim = options_.shape.head_dim;
  const int64_t q_row = int64_t{options_.num_heads} * head_dim;
  absl::Status first_error;
  std::vector<float> parts_o, parts_lse, merged_o, merged_lse;
  // The calls are in (run, group, shard) order: each (run, group) is one merge.
  for (size_t i = 0; i < pending.prefill.size();) {
    size_t end = i;
    while (end < pending.prefill.size() && pending.prefill[end].run == pending.prefill[i].run &&
           pending.prefill[end].group == pending.prefill[i].group) {
      ++end;
    }
    const model::StepRun& run = runs_[pending.prefill[i].run];
    const int group = pending.prefill[i].group;
    const int num_parts = static_cast<int>(end - i);
    const int64_t num_states = run.count * group_q_heads_;
    parts_o.resize(num_parts * num_states * head_dim);
    parts_lse.resize(num_parts * num_states);
    bool complete = true;
    for (size_t c = i; c < end; ++c) {
      PrefillCall& prefill = pending.prefill[c];
      absl::StatusOr<PartialStates> states = client_->FinishPrefill(prefill.call);
      if (!states.ok()) {
        NoteFailure(prefill.call.worker, states.status(), {run.seq});
        if (first_error.ok()) first_error = WorkerError(prefill.call.worker, states.status());
        complete = false;
        continue;
      }
      const int p = static_cast<int>(c - i);
      std::copy(states->o.begin(), states->o.end(), parts_o.begin() + p * num_states * head_dim);
      std::copy(states->lse.begin(), states->lse.end(), parts_lse.begin() + p * num_states);
    }
    i = end;
    if (!complete || !first_error.ok()) continue;
    merged_o.resize(num_states * head_dim);
    merged_lse.resize(num_states);
    FERRY_RETURN_IF_ERROR(kernels::MergeStatesCpu(parts_o.data(), parts_lse.data(), num_parts,
                                                  num_states, head_dim, merged_o.data(),
                                                  merged_lse.data()));
    const int64_t group_q = int64_t{group_q_heads_} * head_dim;
    float* out = pending.out + (run.first_row - pending.first_row) * q_row + group * group_q;
    for (int64_t t = 0; t < run.count; ++t) {
      std::copy(merged_o.begin() + t * group_q, merged_o.begin() + (t + 1) * group_q,
                out + t * q_row);
    }
  }
  return first_error;
}

absl::Status OffloadedAttention::EndStep() {
  if (!in_step_) return absl::FailedPreconditionError("EndStep outside a step");
  if (!pending_.empty()) return absl::FailedPreconditionError("EndStep with attention in flight");
  for (const model::StepRun& run : runs_) sequences_[run.seq].length += run.count;
  in_step_ = false;
  for (auto& [id, known] : workers_) {
    if (!known.speed_changed) continue;
    known.speed_changed = false;
    const double seconds_per_byte = known.speed.seconds_per_byte();
    if (options_.on_worker_speed && seconds_per_byte > 0) {
      options_.on_worker_speed(id, 1.0 / seconds_per_byte);
    }
  }
  return absl::OkStatus();
}

std::vector<kv::SequenceId> OffloadedAttention::AbortStep() {
  // Nothing may still be on its way to a worker when the appends are undone.
  for (auto& [key, pending] : pending_) {
    (void)FinishDecodeRows(pending);
    (void)FinishPrefillRuns(pending);
  }
  pending_.clear();
  // Only tail shards take appends: cut each back to the sequence's length before the step.
  std::map<int, std::vector<SequenceEntry>> entries;
  std::map<int, std::vector<kv::SequenceId>> owners;
  for (const model::StepRun& run : runs_) {
    auto it = sequences_.find(run.seq);
    if (it == sequences_.end()) continue;
    for (int g = 0; g < static_cast<int>(it->second.groups.size()); ++g) {
      const int worker = it->second.groups[g].shards.back().worker;
      entries[worker].push_back({WireId(run.seq, g), it->second.length});
      owners[worker].push_back(run.seq);
    }
  }
  for (const auto& [worker, list] : entries) {
    absl::StatusOr<int64_t> truncated = client_->Truncate(worker, list);
    if (!truncated.ok()) {
      FERRY_LOG_WARN("worker {}: undoing a failed step's appends failed: {}", worker_ids_[worker],
                     truncated.status().ToString());
      NoteFailure(worker, truncated.status(), owners[worker]);
    }
  }
  in_step_ = false;
  runs_.clear();
  std::vector<kv::SequenceId> failed(failed_.begin(), failed_.end());
  failed_.clear();
  return failed;
}

absl::Status OffloadedAttention::CheckCapacity(int64_t positions) {
  FERRY_RETURN_IF_ERROR(Refresh());
  int64_t total_blocks = 0;
  for (const auto& [id, known] : workers_) {
    if (known.listed && known.accepting && !known.failed && known.index >= 0) {
      total_blocks += known.total_blocks;
    }
  }
  const int64_t needed = options_.num_head_groups * ShardUnits(positions);
  if (needed > total_blocks) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "a sequence of ", positions, " positions needs ", needed,
        " KV blocks; the attention workers have ", total_blocks, " in all"));
  }
  return absl::OkStatus();
}

}  // namespace ferry::offload
