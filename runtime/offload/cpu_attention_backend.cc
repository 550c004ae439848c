// The CPU attention backend (attention_backend.h): host pools and kernels/cpu.
#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "ferry/status.h"
#include "runtime/offload/attention_backend.h"

namespace ferry::offload {
namespace {

class CpuAttentionBackend : public AttentionBackend {
 public:
  CpuAttentionBackend(std::unique_ptr<kv::KvCache> cache, int num_threads)
      : cache_(std::move(cache)), threads_(num_threads) {}

  std::string name() const override { return "cpu"; }
  kv::KvCache& cache() override { return *cache_; }

  absl::Status WriteKv(int layer, absl::Span<const kv::KvAppendRun> runs, const uint8_t* k,
                       const uint8_t* v) override {
    const kv::KvCacheConfig& config = cache_->config();
    const int64_t row_bytes =
        int64_t{config.num_kv_heads} * config.head_dim * DTypeSize(config.dtype);
    int64_t row = 0;
    for (const kv::KvAppendRun& run : runs) {
      FERRY_RETURN_IF_ERROR(cache_->WriteHost(run.seq, layer, run.first_position, run.count,
                                              k + row * row_bytes, v + row * row_bytes));
      row += run.count;
    }
    return absl::OkStatus();
  }

  absl::Status Attend(int layer, const kernels::DecodeAttentionArgs& args,
                      const kernels::CpuDecodeOptions& plan) override {
    kernels::DecodeAttentionArgs local = args;
    local.kv = cache_->LayerView(layer);
    return kernels::DecodeAttentionCpu(local, threads_, plan);
  }

  // Each query is one "sequence" of the decode kernel over the same blocks, its range cut
  // causally. Queries go in fixed chunks so the replicated block table stays small for long
  // sequences (and the split of work, hence the bits, depends only on the request).
  absl::Status Prefill(int layer, const std::vector<int32_t>& blocks, int64_t held,
                       int64_t causal_offset, int tokens, int num_q_heads, float softmax_scale,
                       const float* q, float* state_o, float* state_lse,
                       const kernels::CpuDecodeOptions& plan) override {
    constexpr int kQueriesPerCall = 256;
    const int head_dim = cache_->config().head_dim;
    const int chunk = std::min(tokens, kQueriesPerCall);
    indptr_.assign(1, 0);
    table_.clear();
    for (int t = 0; t < chunk; ++t) {
      table_.insert(table_.end(), blocks.begin(), blocks.end());
      indptr_.push_back(static_cast<int32_t>(table_.size()));
    }
    lens_.assign(chunk, static_cast<int32_t>(held));
    begins_.assign(chunk, 0);
    ends_.resize(chunk);
    for (int start = 0; start < tokens; start += chunk) {
      const int count = std::min(chunk, tokens - start);
      for (int t = 0; t < count; ++t) {
        ends_[t] = static_cast<int32_t>(std::clamp<int64_t>(causal_offset + start + t + 1, 0, held));
      }
      kernels::DecodeAttentionArgs args;
      args.num_seqs = count;
      args.num_q_heads = num_q_heads;
      args.q = q + int64_t{start} * num_q_heads * head_dim;
      args.kv = cache_->LayerView(layer);
      args.block_table_indptr = indptr_.data();
      args.block_table = table_.data();
      args.seq_lens = lens_.data();
      args.kv_begin = begins_.data();
      args.kv_end = ends_.data();
      args.softmax_scale = softmax_scale;
      args.state_o = state_o + int64_t{start} * num_q_heads * head_dim;
      args.state_lse = state_lse + int64_t{start} * num_q_heads;
      FERRY_RETURN_IF_ERROR(kernels::DecodeAttentionCpu(args, threads_, plan));
    }
    return absl::OkStatus();
  }

  absl::Status ExportBlocks(absl::Span<const int32_t> blocks, uint8_t* image) override {
    const int64_t bytes = cache_->BlockPoolBytes();
    for (int32_t block : blocks) {
      for (int layer = 0; layer < cache_->config().num_layers; ++layer) {
        for (bool is_v : {false, true}) {
          std::memcpy(image, cache_->BlockData(layer, is_v, block), bytes);
          image += bytes;
        }
      }
    }
    return absl::OkStatus();
  }

  absl::Status ImportBlocks(absl::Span<const int32_t> blocks, const uint8_t* image) override {
    const int64_t bytes = cache_->BlockPoolBytes();
    for (int32_t block : blocks) {
      for (int layer = 0; layer < cache_->config().num_layers; ++layer) {
        for (bool is_v : {false, true}) {
          std::memcpy(cache_->BlockData(layer, is_v, block), image, bytes);
          image += bytes;
        }
      }
    }
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<kv::KvCache> cache_;
  kernels::ThreadPool threads_;
  // Scratch of Prefill's replicated block tables, reused across requests.
  std::vector<int32_t> indptr_, table_, lens_, begins_, ends_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<AttentionBackend>> CreateCpuAttentionBackend(
    const kv::KvCacheConfig& config, int num_threads) {
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<kv::KvCache> cache, kv::KvCache::CreateOnHost(config));
  return std::unique_ptr<AttentionBackend>(new CpuAttentionBackend(std::move(cache), num_threads));
}

}  // namespace ferry::offload
