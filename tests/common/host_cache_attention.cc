#include "tests/common/host_cache_attention.h"

#include <cmath>
#include <vector>

#include "absl/status/status.h"
#include "ferry/kernels/decode_attention.h"
#include "ferry/kernels/thread_pool.h"
#include "ferry/status.h"

namespace ferry::offload::test {

absl::StatusOr<PartialStates> AttendHostCache(const kv::KvCache& cache, int layer,
                                              std::span<const uint64_t> sequences,
                                              std::span<const int32_t> lens, const float* q,
                                              int num_q_heads,
                                              const kernels::CpuDecodeOptions& plan) {
  if (sequences.size() != lens.size()) {
    return absl::InvalidArgumentError("AttendHostCache: one length per sequence");
  }
  std::vector<int32_t> indptr = {0}, table;
  for (uint64_t id : sequences) {
    FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache.BlockTable(id));
    table.insert(table.end(), blocks->begin(), blocks->end());
    indptr.push_back(static_cast<int32_t>(table.size()));
  }
  const kernels::PagedKvView view = cache.LayerView(layer);
  PartialStates states;
  states.o.resize(sequences.size() * num_q_heads * view.head_dim);
  states.lse.resize(sequences.size() * num_q_heads);
  kernels::DecodeAttentionArgs args;
  args.num_seqs = static_cast<int>(sequences.size());
  args.num_q_heads = num_q_heads;
  args.q = q;
  args.kv = view;
  args.block_table_indptr = indptr.data();
  args.block_table = table.data();
  args.seq_lens = lens.data();
  args.softmax_scale = 1.0f / std::sqrt(static_cast<float>(view.head_dim));
  args.state_o = states.o.data();
  args.state_lse = states.lse.data();
  kernels::ThreadPool pool(2);
  FERRY_RETURN_IF_ERROR(kernels::DecodeAttentionCpu(args, pool, plan));
  return states;
}

}  // namespace ferry::offload::test
