// The dynamic-tail schedule of lean_schedule.h: units partition the tiles, chunks are handed
// out once each, and the two-level merge plan of every head segment, played out over units run
// in random orders, publishes each partial into its own slot and completes every head once.
#include "ferry/kernels/lean_schedule.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "gtest/gtest.h"

namespace ferry::kernels {
namespace {

TEST(TailScheduleTest, UnitsPartitionTheTilesAndChunksHalve) {
  for (int64_t total : {1, 15, 100, 4095, 16384, 32768, 131072, 1000003}) {
    for (int64_t all_workers : {1, 7, 132, 264}) {
      const int64_t workers = std::min(all_workers, total);  // as the kernels clamp
      for (int percent : {0, 10, 25, 50}) {
        for (int chunks : {1, 2, 4, kMaxTailChunks}) {
          const TailSchedule s = MakeTailSchedule(total, workers, percent, chunks);
          SCOPED_TRACE(testing::Message() << total << " " << workers << " " << percent << " "
                                          << chunks);
          ASSERT_LE(s.num_chunks, chunks);
          if (total / workers < kMinTailRange || percent == 0) {
            ASSERT_EQ(s.num_chunks, 0);
          }
          int64_t previous = 1 << 30;
          for (int c = 0; c < s.num_chunks; ++c) {
            const int64_t size = s.chunk_end[c] - (c == 0 ? 0 : s.chunk_end[c - 1]);
            EXPECT_GE(size, kMinTailChunk);
            if (c + 1 < s.num_chunks) {
              EXPECT_LE(size, previous);
            }
            previous = size;
          }
          if (s.num_chunks > 0) {
            EXPECT_EQ(s.chunk_end[s.num_chunks - 1], s.tail_tiles);
          }
          int64_t next = 0;
          for (int64_t u = 0; u < s.NumUnits(); ++u) {
            ASSERT_EQ(s.UnitBegin(u), next) << "unit " << u;
            ASSERT_GT(s.UnitEnd(u), s.UnitBegin(u)) << "unit " << u;
            if (u % s.UnitsPerWorker() == 0 && s.num_chunks > 0) {
              EXPECT_GE(s.UnitEnd(u) - s.UnitBegin(u), 8);  // longer than the copy ring
            }
            next = s.UnitEnd(u);
            if (total < 200000) {
              for (int64_t t = s.UnitBegin(u); t < s.UnitEnd(u); ++t) {
                ASSERT_EQ(s.UnitOfTile(t), u) << "tile " << t;
              }
            }
          }
          EXPECT_EQ(next, total);
          std::set<int64_t> claimed;
          for (int64_t c = 0; c < s.NumChunks(); ++c) {
            const int64_t u = s.UnitOfClaim(c);
            ASSERT_NE(u % s.UnitsPerWorker(), 0);
            // Chunk-major order: every range's chunk c before any range's chunk c + 1.
            EXPECT_EQ(u % s.UnitsPerWorker() - 1, c / workers);
            EXPECT_TRUE(claimed.insert(u).second);
          }
          EXPECT_EQ(s.UnitOfClaim(s.NumChunks()), -1);
        }
      }
    }
  }
}

// Plays the kernel's protocol: every unit publishes its head segments, arrivals counted per
// merge node, the last arrival merges (checking that every part it reads was written) and
// passes the result up or writes the head's state.
void PlayOut(const std::vector<int64_t>& head_tiles, const TailSchedule& s, uint64_t seed) {
  std::vector<int64_t> head_first;
  int64_t total = 0;
  for (int64_t n : head_tiles) {
    head_first.push_back(total);
    total += n;
  }
  ASSERT_EQ(total, s.total_tiles);
  std::vector<int64_t> order(s.NumUnits());
  for (int64_t u = 0; u < s.NumUnits(); ++u) order[u] = u;
  std::mt19937_64 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);

  std::set<int64_t> unit_slots, range_slots;  // written this launch
  std::map<std::pair<int, int64_t>, int64_t> arrivals;  // (level-1 range node or head, key)
  std::map<std::pair<int, int64_t>, int64_t> node_head;
  std::vector<int> finals(head_tiles.size(), 0);

  auto arrive = [&](int kind, int64_t key, int64_t head, int64_t expected) {
    const auto node = std::make_pair(kind, key);
    auto [it, fresh] = node_head.emplace(node, head);
    EXPECT_EQ(it->second, head) << "merge node shared by two heads";
    (void)fresh;
    const int64_t n = ++arrivals[node];
    EXPECT_LE(n, expected);
    if (n == expected) arrivals.erase(node);  // the last arrival resets the counter
    return n == expected;
  };
  auto level2 = [&](const SegmentMerge& m, int64_t head) {
    EXPECT_TRUE(range_slots.insert(m.range_slot).second) << "range slot written twice";
    if (!arrive(1, head, head, m.range_count)) return;
    for (int64_t i = 0; i < m.range_count; ++i) {
      EXPECT_TRUE(range_slots.count(MergePartSlot(m.range_first, i))) << "head " << head;
    }
    ++finals[head];
  };

  for (int64_t u : order) {
    const int64_t end = s.UnitEnd(u);
    for (int64_t t = s.UnitBegin(u); t < end;) {
      const int64_t h = std::upper_bound(head_first.begin(), head_first.end(), t) -
                        head_first.begin() - 1;
      const int64_t first = head_first[h];
      const int64_t last = first + head_tiles[h] - 1;
      const SegmentMerge m = PlanSegmentMerge(s, first, last, u);
      if (m.unit_count == 1) {
        if (m.range_count == 1) {
          ++finals[h];
        } else {
          level2(m, h);
        }
      } else {
        EXPECT_TRUE(unit_slots.insert(m.unit_slot).second) << "unit slot written twice";
        const bool last_arrival = m.range_count == 1 ? arrive(1, h, h, m.unit_count)
                                                     : arrive(0, m.range_slot, h, m.unit_count);
        if (last_arrival) {
          for (int64_t i = 0; i < m.unit_count; ++i) {
            EXPECT_TRUE(unit_slots.count(MergePartSlot(m.unit_first, i))) << "head " << h;
          }
          if (m.range_count == 1) {
            ++finals[h];
          } else {
            level2(m, h);
          }
        }
      }
      t = std::min(end, last + 1);
    }
  }
  for (size_t h = 0; h < finals.size(); ++h) EXPECT_EQ(finals[h], 1) << "head " << h;
  EXPECT_TRUE(arrivals.empty());
}

TEST(TailScheduleTest, TwoLevelMergeCompletesEveryHeadOnce) {
  std::mt19937_64 rng(5);
  const std::vector<std::vector<int64_t>> layouts = {
      std::vector<int64_t>(8, 2048),     // b1 hkv8 131k
      std::vector<int64_t>(64, 512),     // b8 hkv8 32k
      std::vector<int64_t>(2048, 16),    // b256 hkv8 1k
      std::vector<int64_t>(32, 4096),    // b1 hkv32 262k
  };
  for (const auto& heads : layouts) {
    int64_t total = 0;
    for (int64_t n : heads) total += n;
    for (int64_t workers : {132, 264}) {
      for (int percent : {0, 25, 50}) {
        PlayOut(heads, MakeTailSchedule(total, workers, percent, kMaxTailChunks), rng());
      }
    }
  }
  // Ragged: heads of 1 .. 3000 tiles, long ones beside many short ones.
  for (int trial = 0; trial < 30; ++trial) {
    std::vector<int64_t> heads;
    int64_t total = 0;
    const int n = 1 + static_cast<int>(rng() % 300);
    for (int i = 0; i < n; ++i) {
      const int64_t len = rng() % 10 == 0 ? 1 + rng() % 3000 : 1 + rng() % 40;
      heads.push_back(len);
      total += len;
    }
    const int64_t workers = std::min<int64_t>(total, 1 + rng() % 300);
    const int percent = static_cast<int>(rng() % 51);
    const int chunks = 1 + static_cast<int>(rng() % kMaxTailChunks);
    SCOPED_TRACE(testing::Message() << "trial " << trial << " heads " << n << " total " << total
                                    << " workers " << workers << " percent " << percent);
    PlayOut(heads, MakeTailSchedule(total, workers, percent, chunks), rng());
  }
}

}  // namespace
}  // namespace ferry::kernels
