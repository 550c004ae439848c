// The recurrent states of linear-attention sequences (kernels/.../linear_attention.h): what a
// linear-attention model keeps per sequence instead of KV blocks. Used by attention workers and
// by the coordinator's in-process linear attention.
//
// Layout: one slot per sequence. Per layer, a state pool of (num_slots, num_kv_heads, stride)
// float32, stride = MakeLinearStateLayout(head_dim, group).stride, group = q heads per KV head:
// the `states` argument of the kernels, with a sequence's slot as its index. Beside each state
// a backup of the same size holds the state before its latest update (Save before updating,
// Restore to undo it), so a step that failed part way can be undone. A slot therefore costs
// 2 * num_layers * num_kv_heads * stride * 4 bytes, and capacity_bytes buys
// floor(capacity_bytes / that) slots. A new sequence's states are zero (the empty state).
// Errors: no free slot is RESOURCE_EXHAUSTED and changes nothing; unknown sequences are
// NOT_FOUND; layers out of range INVALID_ARGUMENT.
// Memory: host memory this class allocates, untouched (so uncommitted) until slots are used.
// Threads: not thread-safe; the owner serialises calls.
#pragma once

#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/kv/kv_cache.h"

namespace ferry::kv {

struct StateCacheConfig {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int group = 1;  // q heads per KV head (the state keeps a running q norm per q head)
  int64_t capacity_bytes = 0;
};

// Floats of one (sequence, KV head) state record.
int64_t StateStride(const StateCacheConfig& config);
// Bytes one slot takes over all layers, states and backups.
int64_t StateSlotBytes(const StateCacheConfig& config);

class StateCache {
 public:
  static absl::StatusOr<std::unique_ptr<StateCache>> Create(const StateCacheConfig& config);

  const StateCacheConfig& config() const { return config_; }
  int64_t total_slots() const { return total_slots_; }
  int64_t free_slots() const { return static_cast<int64_t>(free_list_.size()); }
  int64_t used_bytes() const { return (total_slots_ - free_slots()) * StateSlotBytes(config_); }
  size_t num_sequences() const { return slots_.size(); }

  // Takes a slot and zeroes its states.
  absl::Status AddSequence(SequenceId id);
  bool HasSequence(SequenceId id) const { return slots_.count(id) != 0; }
  absl::Status FreeSequence(SequenceId id);
  absl::StatusOr<int32_t> Slot(SequenceId id) const;

  // The layer's state pool, (total_slots, num_kv_heads, stride) float32.
  float* States(int layer) { return pool_.get() + Offset(layer, /*backup=*/false, 0); }
  // Copies the sequence's state of `layer` into its backup, or back.
  absl::Status Save(SequenceId id, int layer);
  absl::Status Restore(SequenceId id, int layer);

  // The sequence's state (or backup) of one layer: num_kv_heads * stride floats, for migration.
  absl::StatusOr<float*> Record(SequenceId id, int layer, bool backup);

 private:
  StateCache(const StateCacheConfig& config, int64_t total_slots);
  int64_t SlotFloats() const { return int64_t{config_.num_kv_heads} * StateStride(config_); }
  int64_t Offset(int layer, bool backup, int64_t slot) const {
    return ((2 * int64_t{layer} + (backup ? 1 : 0)) * total_slots_ + slot) * SlotFloats();
  }
  absl::StatusOr<int32_t> CheckedSlot(SequenceId id, int layer) const;

  StateCacheConfig config_;
  int64_t total_slots_;
  std::unique_ptr<float[]> pool_;  // per layer: states, then backups
  std::vector<int32_t> free_list_;
  std::unordered_map<SequenceId, int32_t> slots_;
};

}  // namespace ferry::kv
