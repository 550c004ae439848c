#include "runtime/kv/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"

namespace ferry::kv {

int64_t KvBlockBytes(const KvCacheConfig& config) {
  return 2 * int64_t{config.num_layers} * config.num_kv_heads * config.block_size *
         config.head_dim * DTypeSize(config.dtype);
}

absl::StatusOr<int64_t> KvCacheTotalBlocks(const KvCacheConfig& config) {
  if (config.num_layers <= 0 || config.num_kv_heads <= 0 || config.head_dim <= 0 ||
      config.block_size <= 0) {
    return absl::InvalidArgumentError(
        "kv cache: layers, kv heads, head dim and block size must be > 0");
  }
  const int64_t total_blocks = config.capacity_bytes / KvBlockBytes(config);
  if (total_blocks < 1) {
    return absl::InvalidArgumentError(absl::StrCat("kv cache: capacity ", config.capacity_bytes,
                                                   " bytes holds no block of ",
                                                   KvBlockBytes(config), " bytes"));
  }
  if (total_blocks > INT32_MAX) {
    return absl::InvalidArgumentError("kv cache: more than 2^31 blocks; use larger blocks");
  }
  return total_blocks;
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::CreateOnHost(const KvCacheConfig& config) {
  FERRY_ASSIGN_OR_RETURN(const int64_t total_blocks, KvCacheTotalBlocks(config));
  return std::unique_ptr<KvCache>(new KvCache(config, total_blocks, nullptr));
}

absl::StatusOr<std::unique_ptr<KvCache>> KvCache::CreateOverPools(const KvCacheConfig& config,
                                                                  void* pools) {
  FERRY_ASSIGN_OR_RETURN(const int64_t total_blocks, KvCacheTotalBlocks(config));
  if (pools == nullptr) return absl::InvalidArgumentError("kv cache: null pools");
  return std::unique_ptr<KvCache>(
      new KvCache(config, total_blocks, static_cast<uint8_t*>(pools)));
}

KvCache::KvCache(const KvCacheConfig& config, int64_t total_blocks, uint8_t* external_pools)
    : config_(config), total_blocks_(total_blocks) {
  if (external_pools == nullptr) {
    pools_.reset(new uint8_t[2 * config.num_layers * PoolBytes()]);
    base_ = pools_.get();
  } else {
    base_ = external_pools;
  }
  free_list_.reserve(total_blocks);
  // Lowest ids are handed out first (popped from the back).
  for (int64_t b = total_blocks - 1; b >= 0; --b) free_list_.push_back(static_cast<int32_t>(b));
}

int64_t KvCache::PoolBytes() const {
  return total_blocks_ * config_.num_kv_heads * config_.block_size * config_.head_dim *
         DTypeSize(config_.dtype);
}

absl::StatusOr<KvCache::Sequence*> KvCache::Find(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  return &it->second;
}

absl::Status KvCache::AddSequence(SequenceId id) {
  if (!sequences_.emplace(id, Sequence{}).second) {
    return absl::AlreadyExistsError(absl::StrCat("sequence ", id, " already exists"));
  }
  return absl::OkStatus();
}

absl::Status KvCache::Reserve(SequenceId id, int64_t num_positions) {
  FERRY_ASSIGN_OR_RETURN(Sequence * sequence, Find(id));
  if (num_positions < 0) return absl::InvalidArgumentError("negative reservation");
  const int64_t needed = (num_positions + config_.block_size - 1) / config_.block_size;
  const int64_t extra = needed - static_cast<int64_t>(sequence->blocks.size());
  if (extra <= 0) return absl::OkStatus();
  if (extra > free_blocks()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("kv cache full: sequence ", id, " needs ", extra, " more blocks, ",
                     free_blocks(), " of ", total_blocks_, " free"));
  }
  for (int64_t i = 0; i < extra; ++i) {
    sequence->blocks.push_back(free_list_.back());
    free_list_.pop_back();
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> KvCache::Length(SequenceId id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  return it->second.length;
}

absl::Status KvCache::SetLength(SequenceId id, int64_t length) {
  FERRY_ASSIGN_OR_RETURN(Sequence * sequence, Find(id));
  if (length < 0 ||
      length > static_cast<int64_t>(sequence->blocks.size()) * config_.block_size) {
    return absl::OutOfRangeError(
        absl::StrCat("sequence ", id, ": length ", length, " exceeds its reserved blocks"));
  }
  sequence->length = length;
  return absl::OkStatus();
}

absl::Status KvCache::FreeSequence(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  free_list_.insert(free_list_.end(), it->second.blocks.rbegin(), it->second.blocks.rend());
  sequences_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<int64_t> KvCache::Truncate(SequenceId id, int64_t num_positions) {
  FERRY_ASSIGN_OR_RETURN(Sequence * sequence, Find(id));
  if (num_positions < 0) return absl::InvalidArgumentError("negative truncation");
  const int64_t keep = (num_positions + config_.block_size - 1) / config_.block_size;
  int64_t freed = 0;
  while (static_cast<int64_t>(sequence->blocks.size()) > keep) {
    free_list_.push_back(sequence->blocks.back());
    sequence->blocks.pop_back();
    ++freed;
  }
  sequence->length = std::min(sequence->length, num_positions);
  return freed;
}

void KvCache::ReleaseUnwritten(SequenceId id) {
  absl::StatusOr<int64_t> length = Length(id);
  if (length.ok()) (void)Truncate(id, *length);
}

absl::Status KvCache::CheckFits(int64_t positions) const {
  const int64_t blocks = (positions + config_.block_size - 1) / config_.block_size;
  if (blocks > total_blocks_) {
    return absl::ResourceExhaustedError(absl::StrCat("a sequence of ", positions,
                                                     " positions needs ", blocks,
                                                     " KV blocks; the cache has ", total_blocks_));
  }
  return absl::OkStatus();
}

absl::StatusOr<const std::vector<int32_t>*> KvCache::BlockTable(SequenceId id) const {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) return absl::NotFoundError(absl::StrCat("unknown sequence ", id));
  return &it->second.blocks;
}

absl::Status KvCache::WriteHost(SequenceId id, int layer, int64_t first, int64_t count,
                                const void* k, const void* v) {
  if (!host_memory()) {
    return absl::FailedPreconditionError("kv cache: WriteHost on pools that are not host memory");
  }
  FERRY_ASSIGN_OR_RETURN(Sequence * sequence, Find(id));
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " out of range [0, ",
                                                   config_.num_layers, ")"));
  }
  if (first < 0 || count < 0 ||
      first + count > static_cast<int64_t>(sequence->blocks.size()) * config_.block_size) {
    return absl::OutOfRangeError(absl::StrCat("sequence ", id, ": positions [", first, ", ",
                                              first + count, ") are not reserved"));
  }
  const int64_t row_bytes = int64_t{config_.head_dim} * DTypeSize(config_.dtype);
  uint8_t* pools[2] = {static_cast<uint8_t*>(k_pool(layer)), static_cast<uint8_t*>(v_pool(layer))};
  const uint8_t* sources[2] = {static_cast<const uint8_t*>(k), static_cast<const uint8_t*>(v)};
  for (int64_t i = 0; i < count; ++i) {
    const int64_t pos = first + i;
    const int64_t block = sequence->blocks[pos / config_.block_size];
    const int64_t slot = pos % config_.block_size;
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      const int64_t dst_row = (block * config_.num_kv_heads + h) * config_.block_size + slot;
      const int64_t src_row = i * config_.num_kv_heads + h;
      for (int which = 0; which < 2; ++which) {
        std::memcpy(pools[which] + dst_row * row_bytes, sources[which] + src_row * row_bytes,
                    row_bytes);
      }
    }
  }
  return absl::OkStatus();
}

kernels::PagedKvView KvCache::LayerView(int layer) const {
  KvCache* self = const_cast<KvCache*>(this);
  return {self->k_pool(layer), self->v_pool(layer), config_.dtype,
          static_cast<int>(total_blocks_), config_.num_kv_heads, config_.block_size,
          config_.head_dim};
}

}  // namespace ferry::kv
