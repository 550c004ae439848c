// The compute side of the data plane: connections to attention workers, the typed operations of
// worker_service.h, and one layer's attention over a batch whose KV is spread over workers.
//
// AttendLayer sends every shard's request at once (one frame per worker), waits for all of them
// (each bounded by the call timeout), and merges the partial states with MergeStatesCpu in shard
// order, so the result is deterministic and equal bit for bit to the same merges done in process.
// A worker that fails (error reply, dead peer, timeout) is reported in that shard's status; the
// other shards' states are still merged, and `complete` says which batch entries got every part.
//
// Ownership: owns its UcxNode. Threads: one caller at a time (the coordinator's layer loop); the
// caller's thread sends and, while it waits, progresses the node itself (ucx_node.h). Shapes are
// as in worker_service.h.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "ferry/kernels/dtype.h"
#include "ferry/kernels/linear_attention.h"
#include "runtime/offload/frame.h"
#include "runtime/transport/ucx_node.h"

namespace ferry::offload {

// What a worker serves. With sharding by KV-head group, num_kv_heads is one group's heads (what a
// sequence on the worker holds) and model_kv_heads the model's; q and the new K/V sent for a
// sequence are its group's heads only.
struct ModelShape {
  int num_layers = 0;
  int num_kv_heads = 0;
  int model_kv_heads = 0;  // 0: num_kv_heads
  int head_dim = 0;
  int block_size = 64;
  DType dtype = DType::kBFloat16;
  float softmax_scale = 0.0f;  // 0: 1/sqrt(head_dim)
  int plan_workers = 0;        // the CPU attention plan (cpu_attention.h); fix it for bit-exactness
  int kv_tile_size = 0;
  // Linear attention (worker_service.h): sequences hold recurrent states, not KV; q heads per KV
  // head fixes the state's layout.
  bool linear_attention = false;
  kernels::LinearFeatureMap feature_map = kernels::LinearFeatureMap::kOnePlusXMaxNorm;
  bool linear_normalize = true;
  int q_heads_per_kv_head = 1;
};

struct SequenceEntry {
  uint64_t sequence = 0;
  int64_t position = 0;  // OpenSequence: first position held; AppendKv: the position appended
};

// Partial states: o (n, num_q_heads, head_dim) and lse (n, num_q_heads), float32, and the time
// the worker reported spending on them.
struct PartialStates {
  std::vector<float> o;
  std::vector<float> lse;
  double worker_seconds = 0;
};

// A reply frame whose header was checked and whose status was OK.
struct ReplyFrame {
  FrameHeader header;
  transport::Buffer frame;
  const uint8_t* payload() const { return frame.data() + kFrameHeaderBytes; }
};

class AttentionClient {
 public:
  // Bound for Configure, which allocates the worker's KV pool; every other call uses the node's
  // call timeout.
  static constexpr absl::Duration kConfigureTimeout = absl::Seconds(60);

  static absl::StatusOr<std::unique_ptr<AttentionClient>> Create(
      const transport::UcxNodeOptions& options);

  // Connects to a worker; returns its index for the calls below.
  absl::StatusOr<int> AddWorker(const std::string& host, int port);
  int num_workers() const { return static_cast<int>(peers_.size()); }

  // Returns the worker's KV blocks in all (its capacity in blocks of this shape).
  absl::StatusOr<int64_t> Configure(int worker, const ModelShape& shape);
  // The sequences hold KV heads [first_kv_head, + shape.num_kv_heads) of the model.
  absl::Status OpenSequences(int worker, absl::Span<const SequenceEntry> sequences,
                             int first_kv_head = 0);
  // k, v: (n, num_kv_heads, head_dim) in the model's dtype, one row per entry.
  absl::Status AppendKv(int worker, int layer, absl::Span<const SequenceEntry> entries,
                        const void* k, const void* v);
  // q (n, num_q_heads, head_dim) float32 for the listed sequences; states over what it holds.
  absl::StatusOr<PartialStates> Attend(int worker, int layer, absl::Span<const uint64_t> sequences,
                                       int num_q_heads, const float* q);
  // A request sent and not yet answered (the Start*/Finish* pairs below). Move-only.
  struct PendingCall {
    int worker = 0;
    FrameHeader header;
    transport::ReplyFuture future;
  };

  // A prompt chunk at positions [first, first + tokens): q (tokens, num_q_heads, head_dim);
  // k and v (tokens, num_kv_heads, head_dim) are appended first unless null.
  absl::StatusOr<PartialStates> Prefill(int worker, int layer, uint64_t sequence, int64_t first,
                                        int tokens, int num_q_heads, const float* q,
                                        const void* k, const void* v);
  // Prefill in two halves: Start sends (q, k, v are copied into the frame), Finish waits.
  absl::StatusOr<PendingCall> StartPrefill(int worker, int layer, uint64_t sequence,
                                           int64_t first, int tokens, int num_q_heads,
                                           const float* q, const void* k, const void* v);
  absl::StatusOr<PartialStates> FinishPrefill(PendingCall& call);
  // Returns the number of blocks freed.
  absl::StatusOr<int64_t> FreeSequences(int worker, absl::Span<const uint64_t> sequences);
  // Cuts each sequence back to the positions before entry.position (worker_service.h); returns
  // the number of blocks freed.
  absl::StatusOr<int64_t> Truncate(int worker, absl::Span<const SequenceEntry> entries);
  // Moves a sequence's KV from one worker to another, worker to worker.
  absl::Status Migrate(int from_worker, uint64_t sequence, const std::string& to_host,
                       int to_port);
  // The sequence image (an ImportBlocks frame) and its import elsewhere.
  absl::StatusOr<transport::Buffer> ExportBlocks(int worker, uint64_t sequence);
  absl::Status ImportBlocks(int worker, transport::Buffer image);

  // One worker's part of a layer's batch: which batch entries (indices into q) and their
  // sequence ids on that worker. With new_k/new_v set, the worker first appends the new token's
  // K and V ((n, num_kv_heads, head_dim) in the model's dtype, shard order) at `positions`, in
  // the same message (one round trip per layer instead of two).
  struct Shard {
    int worker = 0;
    std::vector<int> batch_index;
    std::vector<uint64_t> sequences;
    std::vector<int64_t> positions;  // with new_k/new_v: the position appended per sequence
    const void* new_k = nullptr;
    const void* new_v = nullptr;
  };
  struct LayerResult {
    PartialStates merged;                    // (batch, num_q_heads, ...) merged over shards
    std::vector<absl::Status> shard_status;  // one per shard
    std::vector<double> shard_seconds;       // per shard: the worker's reported time (0: failed)
    std::vector<bool> complete;              // per batch entry: every shard holding it answered
  };
  // q (batch, num_q_heads, head_dim) float32. Fails only on bad arguments; worker failures are
  // in shard_status.
  absl::StatusOr<LayerResult> AttendLayer(int layer, int batch, int num_q_heads, const float* q,
                                          absl::Span<const Shard> shards);
  // AttendLayer in two halves, so the caller can work while the workers attend: Start checks
  // and sends every shard's frame (q and the new K/V are copied into them, so the caller's
  // buffers are free again on return); Finish waits for the replies and merges.
  struct PendingLayer {
    int batch = 0;
    int num_q_heads = 0;
    int head_dim = 0;
    std::vector<std::vector<int>> batch_index;  // per shard
    std::vector<PendingCall> calls;             // per shard
  };
  absl::StatusOr<PendingLayer> StartAttendLayer(int layer, int batch, int num_q_heads,
                                                const float* q, absl::Span<const Shard> shards);
  absl::StatusOr<LayerResult> FinishAttendLayer(PendingLayer& pending);

  // Sends a raw frame (tests: malformed frames) and returns the reply frame unchecked.
  absl::StatusOr<transport::Buffer> CallRaw(int worker, transport::Buffer frame);

  transport::UcxNode& node() { return *node_; }
  transport::PeerId peer(int worker) const { return peers_[worker]; }

 private:
  explicit AttentionClient(std::unique_ptr<transport::UcxNode> node) : node_(std::move(node)) {}
  absl::Status CheckWorker(int worker) const;
  FrameHeader NewHeader(FrameType type, int layer, uint64_t payload_bytes);
  // timeout zero: the node's call timeout.
  transport::ReplyFuture Send(int worker, transport::Buffer frame,
                                          absl::Duration timeout = {});
  absl::StatusOr<ReplyFrame> Finish(int worker, const FrameHeader& request,
                                    transport::ReplyFuture& future,
                                    absl::Duration timeout = {});
  absl::StatusOr<ReplyFrame> Call(int worker, const FrameHeader& request, transport::Buffer frame,
                                  absl::Duration timeout = {});
  absl::StatusOr<PartialStates> ReadStates(const ReplyFrame& reply, int n, int num_q_heads) const;

  std::unique_ptr<transport::UcxNode> node_;
  std::vector<transport::PeerId> peers_;
  std::vector<ModelShape> shapes_;  // per worker, once configured
  uint64_t next_request_ = 1;
};

}  // namespace ferry::offload
