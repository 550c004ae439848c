// `ferry demo attention`: the CPU attention path end to end, in one process. A ragged batch's KV
// is cut into position ranges, one per simulated attention worker; each worker's CPU kernel
// returns partial states; they are merged with the partial-state algebra and checked against the
// float64 reference. Prints timings. Stands in for the cluster until the daemons exist.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace ferry::cli {

struct AttentionDemoOptions {
  std::vector<int32_t> seq_lens = {1, 17, 640, 4096, 30000};
  int num_workers = 3;
  int threads = 0;  // per simulated worker; 0: all hardware threads
  int num_q_heads = 32;
  int num_kv_heads = 8;
  int head_dim = 128;
  int block_size = 64;
  uint64_t seed = 1;
};

absl::Status RunAttentionDemo(const AttentionDemoOptions& options);

}  // namespace ferry::cli
