// Placement of KV shards over workers with recorded capacities and attention speeds.
#include "runtime/offload/placement.h"

#include <vector>

#include "gtest/gtest.h"

namespace ferry::offload {
namespace {

// Places `shards` shards of one block (`bytes` each) one after another, as the coordinator does
// when sequences arrive; returns how many each worker got (-1 entries: nowhere to go).
std::vector<int> PlaceInTurn(std::vector<PlacementCandidate> workers, int shards, int64_t bytes,
                             int* unplaced) {
  std::vector<int> got(workers.size(), 0);
  *unplaced = 0;
  for (int s = 0; s < shards; ++s) {
    const int chosen = ChoosePlacement(workers, 1, bytes);
    if (chosen < 0) {
      ++*unplaced;
      continue;
    }
    ++got[chosen];
    workers[chosen].used_blocks += 1;
    workers[chosen].held_bytes += bytes;
  }
  return got;
}

TEST(PlacementTest, AFourTimesFasterWorkerTakesAboutFourTimesTheKv) {
  std::vector<PlacementCandidate> workers(2);
  workers[0] = {0, 100000, 0, 0, 1e-9};  // fast: 1 GB/s of attention
  workers[1] = {1, 100000, 0, 0, 4e-9};  // slow: 0.25 GB/s, same capacity
  int unplaced = 0;
  const std::vector<int> got = PlaceInTurn(workers, 100, 4096, &unplaced);
  EXPECT_EQ(unplaced, 0);
  EXPECT_GE(got[0], 76);  // 80 would make both take equal time per step
  EXPECT_LE(got[0], 84);
  EXPECT_GT(got[1], 0) << "the slow worker must be kept busy too";
}

TEST(PlacementTest, AFastButSmallWorkerFillsAndTheRestGoesElsewhere) {
  std::vector<PlacementCandidate> workers(2);
  workers[0] = {0, 10, 0, 0, 1e-9};    // fast, room for 10 shards
  workers[1] = {1, 1000, 0, 0, 4e-9};  // slow, large
  int unplaced = 0;
  const std::vector<int> got = PlaceInTurn(workers, 200, 4096, &unplaced);
  EXPECT_EQ(unplaced, 0);
  EXPECT_LE(got[0], 10);
  EXPECT_GE(got[0], 5) << "a fast worker with room still takes work";
  EXPECT_EQ(got[0] + got[1], 200);
}

TEST(PlacementTest, EqualWorkersAlternateAndAnUnmeasuredOneIsTakenAsTheMean) {
  std::vector<PlacementCandidate> workers(3);
  workers[0] = {0, 1000, 0, 0, 2e-9};
  workers[1] = {1, 1000, 0, 0, 2e-9};
  workers[2] = {2, 1000, 0, 0, 0};  // just joined: no measurement yet
  int unplaced = 0;
  const std::vector<int> got = PlaceInTurn(workers, 90, 4096, &unplaced);
  EXPECT_EQ(unplaced, 0);
  for (int count : got) {
    EXPECT_GE(count, 29);
    EXPECT_LE(count, 31);
  }
}

TEST(PlacementTest, RoomAvoidanceAndTies) {
  std::vector<PlacementCandidate> workers(3);
  workers[0] = {10, 8, 8, 0, 1e-9};   // full
  workers[1] = {11, 8, 2, 100, 1e-9};
  workers[2] = {12, 8, 0, 0, 1e-9};
  EXPECT_EQ(ChoosePlacement(workers, 1, 10), 12);  // least loaded
  workers[2].avoid = true;
  EXPECT_EQ(ChoosePlacement(workers, 1, 10), 11);  // avoided while another has room
  EXPECT_EQ(ChoosePlacement(workers, 7, 10), 12);  // only the avoided one has 7 blocks free
  EXPECT_EQ(ChoosePlacement(workers, 9, 10), -1);  // nobody has 9
  // Equal cost: the one with more free blocks.
  std::vector<PlacementCandidate> tied = {{0, 16, 0, 0, 0}, {1, 16, 0, 0, 0}};
  EXPECT_EQ(ChoosePlacement(tied, 1, 10), 0);
  tied[0].total_blocks = 8;
  tied[0].used_blocks = 0;
  EXPECT_EQ(ChoosePlacement(tied, 1, 10), 1);
  EXPECT_EQ(ChoosePlacement({}, 1, 10), -1);
}

TEST(PlacementTest, SpeedIsAWeightedMeanOfSecondsOverBytes) {
  AttentionSpeed speed;
  EXPECT_EQ(speed.seconds_per_byte(), 0);
  speed.Observe(1e-3, 1e6);  // 1 ns per byte
  EXPECT_DOUBLE_EQ(speed.seconds_per_byte(), 1e-9);
  speed.Observe(-1, 1e6);  // ignored
  speed.Observe(1e-3, 0);  // ignored
  EXPECT_DOUBLE_EQ(speed.seconds_per_byte(), 1e-9);
  for (int i = 0; i < 60; ++i) speed.Observe(4e-3, 1e6);  // the worker slowed down 4x
  EXPECT_NEAR(speed.seconds_per_byte(), 4e-9, 1e-12);
}

}  // namespace
}  // namespace ferry::offload
