// The decoder's attention step with the KV cache and attention on attention workers: the
// coordinator's side of DESIGN.md's "per layer, ship q (and the new k, v) to the workers that
// hold each sequence's KV, merge the partial states, continue".
//
// Placement. A sequence's KV is cut two ways:
//  - by KV-head group (num_head_groups > 1, `--shard heads`): group g holds KV heads
//    [g * w, (g + 1) * w), w = model KV heads / num_head_groups, and the q heads that read them.
//    Groups are placed on distinct workers where there are enough (so workers beyond the number
//    of groups take other sequences' groups); their outputs are disjoint heads, so no merge.
//    Every worker is configured with w KV heads per sequence, and a group travels under its own
//    wire id, sequence * num_head_groups + g (two groups of one sequence may then share a worker
//    when the workers are fewer than the groups).
//  - by position range (shard_positions > 0): when a group's tail shard holds shard_positions
//    positions or more, the next step opens a new tail shard for that group on another worker at
//    the current position, so one long sequence spreads over several workers' memory; the
//    shards' partial states are merged (attention_state.h), so attention stays exact.
// A new shard goes where placement.h's ChoosePlacement puts it: it weighs each accepting
// worker's free KV blocks (its capacity, which the worker reports when configured, less what
// this coordinator holds there: exact and current, unlike a heartbeat's figure) and its measured
// attention speed (the time workers report in their attention replies, per KV byte read), so
// mixed slow and fast workers each get the share of KV they can attend in the same time.
// Per layer and micro-batch (a range of the step's rows, AttentionStep): StartAttend sends and
// returns, FinishAttend gathers. Decode rows (one new token) go to every worker at once
// (AttentionClient::StartAttendLayer), one round trip: a tail shard's worker appends the new k,
// v and attends in the same message, earlier shards' workers attend over what they hold; prompt
// chunks go by Prefill to the tail (with k, v) and to the earlier shards (without), and the
// per-query states are merged in shard order.
// Linear attention (shape.linear_attention): a group's state lives on one worker (no range
// shards); it takes one state slot and never grows, so only placement checks room.
// KV room: BeginStep checks, in blocks, that every tail shard's worker has room for the step's
// new positions (the coordinator's count is exact: it is the workers' only client). A tail whose
// worker is full continues on a new shard on a worker with room; when none has, the step fails
// with RESOURCE_EXHAUSTED before anything is sent (not tied to a sequence: the scheduler picks
// the request that gives way).
// Draining: before each step, shards on workers the directory no longer lists as accepting are
// migrated worker to worker onto an accepting worker that holds no shard of the same group.
// Errors: a worker failure fails the step with that worker's status; the sequences it concerns
// (those in the failed message) are the step's failed sequences. AbortStep waits for every reply
// still due and sends Truncate to the tail shards of the step's sequences, so appends of layers
// that did go through are undone on every worker, and the others can retry the step. A worker
// whose peer failed takes no new shards until the directory lists it at a new address or after
// it was unlisted. The scheduler rebuilds a lost worker's sequences from their tokens
// (batch_scheduler.h): FreeSequence then AddSequence, and the tokens read again.
// Threads: the scheduler thread only (as AttentionStep); the directory function must be
// thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "runtime/model/attention_step.h"
#include "runtime/offload/attention_client.h"
#include "runtime/offload/placement.h"

namespace ferry::offload {

struct WorkerEndpoint {
  std::string id;
  std::string host;
  int port = 0;
  bool accepting = true;  // false while draining: holds KV but takes no new sequence
};

// The workers attention may use now (ready and draining; dead ones left out).
using WorkerDirectory = std::function<std::vector<WorkerEndpoint>()>;

struct OffloadedAttentionOptions {
  int num_heads = 0;
  ModelShape shape;              // the model's: layers, KV heads, head dim, block size, KV dtype
  int num_head_groups = 1;       // KV-head groups per sequence; divides shape.num_kv_heads
  int64_t shard_positions = 0;   // 0: a group stays on one worker
  // Called at the end of a step for each worker whose measured speed changed (scheduler thread).
  std::function<void(const std::string& worker_id, double kv_bytes_per_second)> on_worker_speed;
};

class OffloadedAttention : public model::AttentionStep {
 public:
  // `client` must outlive the object. Checks the options (head groups divide the KV heads).
  static absl::StatusOr<std::unique_ptr<OffloadedAttention>> Create(
      AttentionClient* client, WorkerDirectory directory, OffloadedAttentionOptions options);

  absl::Status AddSequence(kv::SequenceId seq) override;
  absl::Status FreeSequence(kv::SequenceId seq) override;
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override;
  absl::Status BeginStep(std::span<const model::StepRow> rows) override;
  absl::Status StartAttend(int layer, int64_t first_row, int64_t num_rows, const float* q,
                           const float* k, const float* v, float* out) override;
  absl::Status FinishAttend(int layer, int64_t first_row) override;
  absl::Status EndStep() override;
  std::vector<kv::SequenceId> AbortStep() override;
  absl::Status CheckCapacity(int64_t positions) override;

 private:
  struct Shard {
    int worker;  // index in the client
    int64_t first_position;
  };
  struct Group {
    std::vector<Shard> shards;  // in position order; the last one is the tail
  };
  struct Sequence {
    std::vector<Group> groups;
    int64_t length = 0;
  };
  struct Known {
    int index = -1;  // in the client
    std::string host;
    int port = 0;
    int64_t total_blocks = 0;  // as the worker reported when configured
    bool accepting = false;
    bool listed = false;
    AttentionSpeed speed;
    bool speed_changed = false;
    bool failed = false;  // its peer failed: no new shards
  };
  // What this coordinator holds on one worker.
  struct Load {
    int64_t blocks = 0;
    int64_t bytes = 0;  // bytes read per step (all layers; a block's worth at least per shard)
  };
  // A prompt chunk's call to one shard of one group.
  struct PrefillCall {
    size_t run;  // index in runs_
    int group;
    int part;    // shard index in the group
    AttentionClient::PendingCall call;
  };
  // Attention sent for a range of the step's rows and not yet gathered.
  struct PendingRange {
    int layer = 0;
    int64_t first_row = 0;
    float* out = nullptr;                 // the range's first row
    std::vector<size_t> decode_runs;      // indices in runs_, in batch order
    std::vector<int> decode_workers;      // per shard of `decode`, the worker
    std::vector<double> decode_kv_bytes;  // per shard of `decode`, the KV bytes it reads
    std::vector<std::vector<kv::SequenceId>> decode_sequences;  // per shard of `decode`
    std::optional<AttentionClient::PendingLayer> decode;
    std::vector<PrefillCall> prefill;
  };

  OffloadedAttention(AttentionClient* client, WorkerDirectory directory,
                     OffloadedAttentionOptions options);

  uint64_t WireId(kv::SequenceId seq, int group) const {
    return seq * static_cast<uint64_t>(options_.num_head_groups) + static_cast<uint64_t>(group);
  }
  // Connects and configures workers the directory lists for the first time; updates the rest.
  absl::Status Refresh();
  // What one shard of `positions` positions (of one group) costs its worker: capacity units
  // (KV blocks, or one state slot for linear attention) and the bytes its attention reads in one
  // layer (KV, or the state). Loads() sums them over what this coordinator holds per worker.
  int64_t ShardUnits(int64_t positions) const;
  int64_t ShardLayerBytes(int64_t positions) const;
  std::vector<Load> Loads() const;
  Known& KnownWorker(int index) { return workers_.at(worker_ids_[index]); }
  // The accepting worker placement chooses for a new shard of `blocks` blocks, not in `exclude`
  // (and, while another has room, not in `avoid`); -1 when none has room. `reserved`: blocks
  // already promised this step, per worker (may be empty).
  int PickWorker(const std::vector<int>& exclude, const std::vector<int>& avoid, int64_t blocks,
                 const std::vector<int64_t>& reserved = {}) const;
  // Opens a new tail shard of `group` at `first_position` on a worker with room for `blocks`
  // (passing over workers whose peer fails meanwhile); returns the worker.
  absl::StatusOr<int> OpenShard(kv::SequenceId seq, Sequence& sequence, int group,
                                int64_t first_position, int64_t blocks = 1,
                                const std::vector<int64_t>& reserved = {});
  // Checks that every run's tail shards have room for its new positions, opening new tails where
  // a worker is full; RESOURCE_EXHAUSTED when a run fits nowhere.
  absl::Status ReserveStepBlocks();
  // Records a worker's failed call: the sequences it concerns fail, and a dead peer takes no
  // new shards.
  void NoteFailure(int worker, const absl::Status& status,
                   const std::vector<kv::SequenceId>& sequences);
  absl::Status MigrateOffDrainingWorkers();
  absl::Status StartDecodeRows(PendingRange& pending, const float* q, const uint8_t* k,
                               const uint8_t* v);
  absl::Status StartPrefillRun(PendingRange& pending, size_t run, const float* q,
                               const uint8_t* k, const uint8_t* v);
  absl::Status FinishDecodeRows(PendingRange& pending);
  absl::Status FinishPrefillRuns(PendingRange& pending);
  absl::Status WorkerError(int worker, const absl::Status& status) const;

  AttentionClient* const client_;
  const WorkerDirectory directory_;
  const OffloadedAttentionOptions options_;
  const int group_kv_heads_;       // KV heads per group
  const int group_q_heads_;        // q heads per group
  ModelShape worker_shape_;        // what every worker is configured with
  std::map<std::string, Known> workers_;        // by worker id
  std::vector<std::string> worker_ids_;          // by client index
  std::map<kv::SequenceId, Sequence> sequences_;
  std::vector<model::StepRun> runs_;
  bool in_step_ = false;
  std::set<kv::SequenceId> failed_;  // of the current step
  std::map<std::pair<int, int64_t>, PendingRange> pending_;  // by (layer, first row)
  std::vector<uint8_t> k_staging_, v_staging_;   // k, v in the KV dtype
};

}  // namespace ferry::offload
