// Where a new KV shard goes: the choice among attention workers, as a pure function so it can be
// tested with recorded figures.
//
// Each worker is scored by the time its attention would take per step with the new shard,
// divided by the fraction of its capacity still free afterwards:
//   cost = (held_bytes + shard_bytes) * seconds_per_byte / ((free_blocks - shard_blocks + 1) /
//          total_blocks)
// The numerator balances attention time, so a worker twice as fast ends up holding about twice
// the KV and every worker finishes a layer's attention at about the same time (mixed CPU and GPU
// workers are each kept busy); the denominator makes a worker dearer as it fills, so a fast but
// small worker hands new shards to others before it runs out. A worker whose speed is not
// measured yet is taken to be as fast as the mean of the measured ones (1 s/byte when none is),
// so it gets work and so gets measured. Workers without room for the shard's blocks are never
// chosen; `avoid` ones only when nothing else has room (a sequence's other head groups, so they
// spread over workers); ties go to the most free blocks, then the lowest index.
// Speeds: AttentionSpeed keeps an exponentially weighted mean of seconds and of KV bytes per
// observation (one worker's reply to one layer's attention), their ratio the seconds per byte.
// Plain value types and functions; no threads.
#pragma once

#include <cstdint>
#include <span>

namespace ferry::offload {

struct PlacementCandidate {
  int index = 0;               // the caller's name for the worker
  int64_t total_blocks = 0;    // its KV capacity, in blocks of the model's shape
  int64_t used_blocks = 0;     // blocks held there now
  int64_t held_bytes = 0;      // KV bytes its attention reads per step (the positions it holds)
  double seconds_per_byte = 0; // measured attention speed; 0: not measured yet
  bool avoid = false;
};

// The index of the chosen candidate, or -1 when none has room for `shard_blocks`.
int ChoosePlacement(std::span<const PlacementCandidate> candidates, int64_t shard_blocks,
                    int64_t shard_bytes);

class AttentionSpeed {
 public:
  static constexpr double kWeight = 0.2;  // of each new observation
  void Observe(double seconds, double kv_bytes);
  double seconds_per_byte() const { return bytes_ > 0 ? seconds_ / bytes_ : 0; }

 private:
  double seconds_ = 0;
  double bytes_ = 0;
};

}  // namespace ferry::offload
