#include "runtime/offload/placement.h"

namespace ferry::offload {

int ChoosePlacement(std::span<const PlacementCandidate> candidates, int64_t shard_blocks,
                    int64_t shard_bytes) {
  double measured_sum = 0;
  int measured = 0;
  for (const PlacementCandidate& c : candidates) {
    if (c.seconds_per_byte > 0) {
      measured_sum += c.seconds_per_byte;
      ++measured;
    }
  }
  const double unmeasured = measured > 0 ? measured_sum / measured : 1.0;
  int best = -1;
  bool best_avoided = false;
  double best_cost = 0;
  int64_t best_free = 0;
  for (const PlacementCandidate& c : candidates) {
    const int64_t free_after = c.total_blocks - c.used_blocks - shard_blocks;
    if (free_after < 0 || c.total_blocks <= 0) continue;
    const double speed = c.seconds_per_byte > 0 ? c.seconds_per_byte : unmeasured;
    const double free_fraction =
        static_cast<double>(free_after + 1) / static_cast<double>(c.total_blocks);
    // +1 byte keeps an empty shard's cost ordered by speed rather than all zero.
    const double cost = static_cast<double>(c.held_bytes + shard_bytes + 1) * speed / free_fraction;
    const int64_t free = free_after + shard_blocks;
    bool better = best < 0;
    if (!better && c.avoid != best_avoided) {
      better = best_avoided;
    } else if (!better) {
      better = cost < best_cost || (cost == best_cost && free > best_free);
    }
    if (better) {
      best = c.index;
      best_avoided = c.avoid;
      best_cost = cost;
      best_free = free;
    }
  }
  return best;
}

void AttentionSpeed::Observe(double seconds, double kv_bytes) {
  if (!(seconds >= 0) || !(kv_bytes > 0)) return;
  if (bytes_ == 0) {
    seconds_ = seconds;
    bytes_ = kv_bytes;
    return;
  }
  seconds_ += kWeight * (seconds - seconds_);
  bytes_ += kWeight * (kv_bytes - bytes_);
}

}  // namespace ferry::offload
