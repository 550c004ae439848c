// The linear-attention state cache: slots bought by capacity, zeroed states, backups that undo
// one update, exact freeing.
#include "runtime/kv/state_cache.h"

#include <vector>

#include "gtest/gtest.h"

namespace ferry::kv {
namespace {

StateCacheConfig SmallConfig(int64_t slots) {
  StateCacheConfig config{2, 2, 16, 4, 0};  // 2 layers, 2 kv heads of 16, 4 q heads per kv head
  config.capacity_bytes = slots * StateSlotBytes(config);
  return config;
}

TEST(StateCacheTest, CapacityBuysWholeSlotsThatCountStatesAndBackups) {
  StateCacheConfig config = SmallConfig(3);
  // 16*16 + 3*16 + 2 + 4 floats, padded to 32: 320 per kv head; states and backups.
  EXPECT_EQ(StateStride(config), 320);
  EXPECT_EQ(StateSlotBytes(config), 2 * 2 * 2 * 320 * 4);
  config.capacity_bytes += StateSlotBytes(config) - 1;
  auto cache = StateCache::Create(config);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ((*cache)->total_slots(), 3);
  config.capacity_bytes = StateSlotBytes(config) - 1;
  EXPECT_EQ(StateCache::Create(config).status().code(), absl::StatusCode::kInvalidArgument);
  config = SmallConfig(1);
  config.head_dim = 512;
  EXPECT_EQ(StateCache::Create(config).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(StateCacheTest, SlotsAreZeroedTakenAndReturnedExactly) {
  auto cache = *StateCache::Create(SmallConfig(2));
  ASSERT_TRUE(cache->AddSequence(7).ok());
  const int64_t floats = 2 * StateStride(cache->config());
  float* state = *cache->Record(7, 1, false);
  for (int64_t i = 0; i < floats; ++i) state[i] = 1.5f;  // used, then freed
  ASSERT_TRUE(cache->FreeSequence(7).ok());
  ASSERT_TRUE(cache->AddSequence(8).ok());
  ASSERT_TRUE(cache->AddSequence(9).ok());
  EXPECT_EQ(cache->AddSequence(10).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(cache->AddSequence(8).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(cache->free_slots(), 0);
  EXPECT_EQ(cache->used_bytes(), 2 * StateSlotBytes(cache->config()));
  for (uint64_t id : {8, 9}) {  // whichever got the old slot, it starts empty
    const float* fresh = *cache->Record(id, 1, false);
    for (int64_t i = 0; i < floats; ++i) ASSERT_EQ(fresh[i], 0.0f) << id << " " << i;
  }
  // The layer pool is indexed by slot.
  const int32_t slot = *cache->Slot(9);
  EXPECT_EQ(*cache->Record(9, 0, false), cache->States(0) + slot * floats);
  ASSERT_TRUE(cache->FreeSequence(8).ok());
  ASSERT_TRUE(cache->FreeSequence(9).ok());
  EXPECT_EQ(cache->free_slots(), 2);
  EXPECT_EQ(cache->used_bytes(), 0);
  EXPECT_EQ(cache->FreeSequence(9).code(), absl::StatusCode::kNotFound);
}

TEST(StateCacheTest, RestoreUndoesTheUpdateAfterSave) {
  auto cache = *StateCache::Create(SmallConfig(1));
  ASSERT_TRUE(cache->AddSequence(1).ok());
  const int64_t floats = 2 * StateStride(cache->config());
  float* state = *cache->Record(1, 0, false);
  for (int64_t i = 0; i < floats; ++i) state[i] = static_cast<float>(i);
  ASSERT_TRUE(cache->Save(1, 0).ok());
  for (int64_t i = 0; i < floats; ++i) state[i] += 100.0f;  // the step's update
  ASSERT_TRUE(cache->Restore(1, 0).ok());
  for (int64_t i = 0; i < floats; ++i) ASSERT_EQ(state[i], static_cast<float>(i));
  EXPECT_EQ((*cache->Record(1, 1, false))[0], 0.0f);  // other layers untouched
  EXPECT_EQ(cache->Save(1, 2).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->Restore(2, 0).code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ferry::kv
