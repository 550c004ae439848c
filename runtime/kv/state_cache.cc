#include "runtime/kv/state_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/linear_attention.h"
#include "ferry/status.h"

namespace ferry::kv {

int64_t StateStride(const StateCacheConfig& config) {
  return kernels::MakeLinearStateLayout(config.head_dim, config.group).stride;
}

int64_t StateSlotBytes(const StateCacheConfig& config) {
  return 2 * int64_t{config.num_layers} * config.num_kv_heads * StateStride(config) * 4;
}

absl::StatusOr<std::unique_ptr<StateCache>> StateCache::Create(const StateCacheConfig& config) {
  if (config.num_layers <= 0 || config.num_kv_heads <= 0 || config.head_dim <= 0 ||
      config.head_dim > kernels::kMaxLinearHeadDim || config.group <= 0) {
    return absl::InvalidArgumentError(
        "state cache: layers, kv heads, head dim (up to 256) and group must be > 0");
  }
  const int64_t total_slots = config.capacity_bytes / StateSlotBytes(config);
  if (total_slots < 1) {
    return absl::InvalidArgumentError(absl::StrCat("state cache: capacity ",
                                                   config.capacity_bytes,
                                                   " bytes holds no sequence's state of ",
                                                   StateSlotBytes(config), " bytes"));
  }
  if (total_slots > INT32_MAX) return absl::InvalidArgumentError("state cache: too many slots");
  return std::unique_ptr<StateCache>(new StateCache(config, total_slots));
}

StateCache::StateCache(const StateCacheConfig& config, int64_t total_slots)
    : config_(config), total_slots_(total_slots) {
  pool_.reset(new float[2 * config.num_layers * total_slots * SlotFloats()]);
  free_list_.reserve(total_slots);
  for (int64_t s = total_slots - 1; s >= 0; --s) free_list_.push_back(static_cast<int32_t>(s));
}

absl::Status StateCache::AddSequence(SequenceId id) {
  if (slots_.count(id) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " already exists"));
  }
  if (free_list_.empty()) {
    return absl::ResourceExhaustedError(absl::StrCat("state cache full: all ", total_slots_,
                                                     " sequence slots are taken"));
  }
  const int32_t slot = free_list_.back();
  free_list_.pop_back();
  slots_[id] = slot;
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    std::fill_n(pool_.get() + Offset(layer, false, slot), SlotFloats(), 0.0f);
  }
  return absl::OkStatus();
}

absl::Status StateCache::FreeSequence(SequenceId id) {
  auto it = slots_.find(id);
  if (it == slots_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  free_list_.push_back(it->second);
  slots_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int32_t> StateCache::Slot(SequenceId id) const {
  auto it = slots_.find(id);
  if (it == slots_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  return it->second;
}

absl::StatusOr<int32_t> StateCache::CheckedSlot(SequenceId id, int layer) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range [0, ",
                                                   config_.num_layers, ")"));
  }
  return Slot(id);
}

absl::Status StateCache::Save(SequenceId id, int layer) {
  FERRY_ASSIGN_OR_RETURN(const int32_t slot, CheckedSlot(id, layer));
  std::memcpy(pool_.get() + Offset(layer, true, slot), pool_.get() + Offset(layer, false, slot),
              SlotFloats() * sizeof(float));
  return absl::OkStatus();
}

absl::Status StateCache::Restore(SequenceId id, int layer) {
  FERRY_ASSIGN_OR_RETURN(const int32_t slot, CheckedSlot(id, layer));
  std::memcpy(pool_.get() + Offset(layer, false, slot), pool_.get() + Offset(layer, true, slot),
              SlotFloats() * sizeof(float));
  return absl::OkStatus();
}

absl::StatusOr<float*> StateCache::Record(SequenceId id, int layer, bool backup) {
  FERRY_ASSIGN_OR_RETURN(const int32_t slot, CheckedSlot(id, layer));
  return pool_.get() + Offset(layer, backup, slot);
}

}  // namespace ferry::kv
