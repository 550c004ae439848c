// The decoder's attention step with the KV cache and attention on attention workers: the
// coordinator's side of DESIGN.md's "per layer, ship q (and the new k, v) to the workers that
// hold each sequence's KV, merge the partial states, continue".
//
// Placement (sharding by sequence range): a new sequence opens one shard, positions [0, ...), on
// the accepting worker with the most KV bytes free (its capacity less the KV this coordinator
// holds there, which is exact and current, unlike a heartbeat's figure). When the tail shard holds shard_positions positions or more, the
// next step opens a new tail shard on another worker at the current position, so one long
// sequence spreads over several workers' memory; every shard answers with partial states that
// are merged (attention_state.h), so attention stays exact.
// Per layer: decode rows (one new token) go to every worker at once (AttentionClient::
// AttendLayer), one round trip: the tail shard's worker appends the new k, v and attends in the
// same message, earlier shards' workers attend over what they hold;
// prompt chunks go by Prefill to the tail (with k, v) and to the earlier shards (without), and
// the per-query states are merged in shard order.
// Draining: before each step, sequences on workers the directory no longer lists as accepting
// are migrated worker to worker onto an accepting worker that holds no shard of them.
// Errors: a worker failure fails the step with that worker's status (lengths stay unchanged, as
// AttentionStep requires); rebuilding a lost worker's KV is the fault-tolerance layer's job.
// Threads: the scheduler thread only (as AttentionStep); the directory function must be
// thread-safe.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "runtime/model/attention_step.h"
#include "runtime/offload/attention_client.h"

namespace ferry::offload {

struct WorkerEndpoint {
  std::string id;
  std::string host;
  int port = 0;
  int64_t capacity_bytes = 0;
  bool accepting = true;  // false while draining: holds KV but takes no new sequence
};

// The workers attention may use now (ready and draining; dead ones left out).
using WorkerDirectory = std::function<std::vector<WorkerEndpoint>()>;

struct OffloadedAttentionOptions {
  int num_heads = 0;
  ModelShape shape;                 // layers, kv heads, head dim, block size, KV dtype
  int64_t shard_positions = 0;      // 0: a sequence stays on one worker
};

class OffloadedAttention : public model::AttentionStep {
 public:
  // `client` must outlive this object.
  OffloadedAttention(AttentionClient* client, WorkerDirectory directory,
                     OffloadedAttentionOptions options);

  absl::Status AddSequence(kv::SequenceId seq) override;
  absl::Status FreeSequence(kv::SequenceId seq) override;
  absl::StatusOr<int64_t> Length(kv::SequenceId seq) const override;
  absl::Status BeginStep(std::span<const model::StepRow> rows) override;
  absl::Status Attend(int layer, const float* q, const float* k, const float* v,
                      float* out) override;
  absl::Status EndStep() override;

  // Shards per sequence, for tests and metrics: (worker id, first position) in order.
  std::vector<std::pair<std::string, int64_t>> Shards(kv::SequenceId seq) const;

 private:
  struct Shard {
    int worker;  // index in the client
    int64_t first_position;
  };
  struct Sequence {
    std::vector<Shard> shards;
    int64_t length = 0;
  };
  struct Run {
    kv::SequenceId seq;
    int64_t first_row;
    int64_t first_position;
    int64_t count;
  };
  struct Known {
    int index = -1;  // in the client
    std::string host;
    int port = 0;
    int64_t capacity_bytes = 0;
    bool accepting = false;
    bool listed = false;
  };

  // Connects and configures workers the directory lists for the first time; updates the rest.
  absl::Status Refresh();
  // KV bytes this coordinator holds on each worker (by client index).
  std::vector<int64_t> HeldBytes() const;
  // The accepting worker with the most free bytes, not in `exclude`; -1 when none.
  int PickWorker(const std::vector<int>& exclude) const;
  absl::Status OpenShard(kv::SequenceId seq, Sequence& sequence, int64_t first_position);
  absl::Status MigrateOffDrainingWorkers();
  absl::Status AttendDecodeRows(int layer, const float* q, const uint8_t* k, const uint8_t* v,
                                float* out);
  absl::Status AttendPrefillRun(int layer, const Run& run, const float* q, const uint8_t* k,
                                const uint8_t* v, float* out);

  AttentionClient* const client_;
  const WorkerDirectory directory_;
  const OffloadedAttentionOptions options_;
  std::map<std::string, Known> workers_;        // by worker id
  std::vector<std::string> worker_ids_;          // by client index
  std::map<kv::SequenceId, Sequence> sequences_;
  std::vector<Run> runs_;
  bool in_step_ = false;
  std::vector<uint8_t> k_staging_, v_staging_;   // k, v in the KV dtype
};

}  // namespace ferry::offload
