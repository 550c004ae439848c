// The paged KV cache: capacity accounting, exact freeing, writes landing where kernels read.
#include "runtime/kv/kv_cache.h"

#include <vector>

#include "gtest/gtest.h"

namespace ferry::kv {
namespace {

KvCacheConfig SmallConfig(int64_t blocks) {
  KvCacheConfig config{2, 2, 64, DType::kFloat32, 16, 0};
  config.capacity_bytes = blocks * KvBlockBytes(config);
  return config;
}

TEST(KvCacheTest, CapacityBuysWholeBlocks) {
  KvCacheConfig config = SmallConfig(10);
  config.capacity_bytes += KvBlockBytes(config) - 1;
  auto cache = KvCache::CreateOnHost(config);
  ASSERT_TRUE(cache.ok()) << cache.status();
  EXPECT_EQ((*cache)->total_blocks(), 10);
  config.capacity_bytes = KvBlockBytes(config) - 1;
  EXPECT_EQ(KvCache::CreateOnHost(config).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvCacheTest, ReserveIsAllOrNothingAndFreeIsExact) {
  auto cache = *KvCache::CreateOnHost(SmallConfig(5));
  ASSERT_TRUE(cache->AddSequence(1).ok());
  ASSERT_TRUE(cache->AddSequence(2).ok());
  EXPECT_EQ(cache->AddSequence(1).code(), absl::StatusCode::kAlreadyExists);
  ASSERT_TRUE(cache->Reserve(1, 33).ok());  // 3 blocks of 16
  EXPECT_EQ(cache->free_blocks(), 2);
  const absl::Status full = cache->Reserve(2, 48);  // needs 3, 2 free
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_EQ(cache->free_blocks(), 2);
  EXPECT_EQ((*cache->BlockTable(2))->size(), 0u);
  ASSERT_TRUE(cache->Reserve(2, 32).ok());
  EXPECT_EQ(cache->free_blocks(), 0);
  ASSERT_TRUE(cache->FreeSequence(1).ok());
  EXPECT_EQ(cache->free_blocks(), 3);
  ASSERT_TRUE(cache->FreeSequence(2).ok());
  EXPECT_EQ(cache->free_blocks(), 5);
  EXPECT_EQ(cache->used_bytes(), 0);
  EXPECT_EQ(cache->FreeSequence(2).code(), absl::StatusCode::kNotFound);
}

TEST(KvCacheTest, TruncateReturnsTheBlocksPastTheKeptPositions) {
  auto cache = *KvCache::CreateOnHost(SmallConfig(6));
  ASSERT_TRUE(cache->AddSequence(1).ok());
  ASSERT_TRUE(cache->Reserve(1, 70).ok());  // 5 blocks of 16
  ASSERT_TRUE(cache->SetLength(1, 70).ok());
  auto freed = cache->Truncate(1, 33);  // keeps 3 blocks
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, 2);
  EXPECT_EQ(cache->free_blocks(), 3);
  EXPECT_EQ(*cache->Length(1), 33);
  EXPECT_EQ(*cache->Truncate(1, 40), 0);  // nothing past 40 is held: no change
  EXPECT_EQ(*cache->Length(1), 33);
  EXPECT_EQ(*cache->Truncate(1, 0), 3);
  EXPECT_EQ(cache->free_blocks(), 6);
  ASSERT_TRUE(cache->Reserve(1, 16).ok());  // usable again
  EXPECT_EQ(cache->Truncate(1, -1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->Truncate(9, 0).status().code(), absl::StatusCode::kNotFound);
}

TEST(KvCacheTest, WritesLandInTheLayoutKernelsRead) {
  auto cache = *KvCache::CreateOnHost(SmallConfig(4));
  ASSERT_TRUE(cache->AddSequence(7).ok());
  ASSERT_TRUE(cache->Reserve(7, 20).ok());
  const KvCacheConfig& c = cache->config();
  std::vector<float> k(3 * c.num_kv_heads * c.head_dim), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) { k[i] = float(i); v[i] = -float(i); }
  ASSERT_TRUE(cache->WriteHost(7, 1, 15, 3, k.data(), v.data()).ok());  // crosses a block edge
  const auto view = cache->LayerView(1);
  const std::vector<int32_t>& blocks = **cache->BlockTable(7);
  for (int i = 0; i < 3; ++i) {
    const int pos = 15 + i;
    for (int h = 0; h < c.num_kv_heads; ++h) {
      const int64_t row = (int64_t{blocks[pos / 16]} * c.num_kv_heads + h) * 16 + pos % 16;
      for (int e = 0; e < c.head_dim; ++e) {
        const float expected = float((i * c.num_kv_heads + h) * c.head_dim + e);
        EXPECT_EQ(static_cast<const float*>(view.k_pool)[row * c.head_dim + e], expected);
        EXPECT_EQ(static_cast<const float*>(view.v_pool)[row * c.head_dim + e], -expected);
      }
    }
  }
  EXPECT_EQ(cache->WriteHost(7, 2, 0, 1, k.data(), v.data()).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(cache->WriteHost(7, 0, 30, 3, k.data(), v.data()).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(cache->WriteHost(8, 0, 0, 1, k.data(), v.data()).code(),
            absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace ferry::kv
