// The attention worker's service: the KV cache of the sequences it holds and the operations of
// the data plane, one frame in, one reply frame out. Transport-independent (WorkerServer binds it
// to UCX; the fuzzer and unit tests call Handle directly).
//
// Operations (frame.h's header; `n` = shape[0]; table entries are {u64 sequence, i64 position}):
//   Configure     shape {layers, kv heads, head dim, block size}, dtype; payload {f32 softmax
//                 scale (0: 1/sqrt(head dim)), i32 cpu workers of the attention plan (0: pool
//                 size), i32 kv tile, i32 model kv heads, u8 attention kind (0 softmax, 1
//                 linear), u8 feature map (linear_attention.h's numbering), u8 normalised,
//                 u8 0, i32 q heads per kv head (linear; 0 for softmax)}. `kv heads` is what one
//                 sequence here holds (the pools' head count); `model kv heads` (0: the same) is
//                 the model's, a multiple of it when the coordinator shards by KV-head group.
//                 Before any sequence; repeating the same config is fine, a different one while
//                 sequences live is FAILED_PRECONDITION. Reply payload {i64 total, i64 free}
//                 units of capacity: KV blocks, or (linear) sequence state slots.
// Linear attention (kind 1): each sequence holds a recurrent state per layer (kv/state_cache.h:
// its bytes, with a backup, count against --kv-capacity) instead of KV blocks, in host memory and
// advanced by the CPU kernels on any worker (a CUDA worker's too). Its frames carry
// kFlagLinearState and always the new K and V (kFlagWithKv); Attend advances each state by one
// token (LinearAttentionDecodeCpu), Prefill by the chunk (LinearAttentionForwardCpu), both in
// float32 with K and V widened from the KV dtype, and the reply's o is the attention output with
// lse 0. Sequences start at position 0 (no range shards); AppendKv is refused; Truncate can undo
// only a state's latest update (FAILED_PRECONDITION otherwise); images (Export/Import) carry the
// states, flag kFlagLinearState, dtype float32 and shape {layers, kv heads, stride, head dim}.
//   OpenSequence  shape {n, first kv head, 0, 0}; payload n x {sequence, first position}: the
//                 worker holds the sequences' positions from `first position` on, all layers,
//                 KV heads [first kv head, + kv heads) of the model (a multiple of kv heads).
//   AppendKv      layer; shape {n, kv heads, head dim}; table, then K and V (n, kv heads,
//                 head dim) in the KV dtype. Each position must be the next one of that layer.
//   Attend        layer; shape {n, q heads, head dim}; table, q (n, q heads, head dim) float32,
//                 and with kFlagWithKv the new token's K and V as in AppendKv (appended first).
//                 Reply shape {n, q heads, head dim, microseconds the worker spent on the
//                 request}: o (n, q heads, head dim) then lse (n, q heads), float32 partial
//                 states over the positions this worker holds.
//   Prefill       layer; shape {T, q heads, head dim}; payload {sequence, first position P},
//                 q (T, q heads, head dim) float32, with kFlagWithKv K and V (T, kv heads,
//                 head dim) appended at P.. first. Query t (position P + t) attends causally
//                 over the held positions <= P + t (CPU backend: the decode kernel, one query
//                 per row, 256 queries per call; CUDA: PrefillAttention). Reply as Attend,
//                 with T states (and the time).
//   FreeSequence  payload n x {sequence}: returns every block. Reply {i64 blocks freed}.
//   ExportBlocks  payload {sequence}. Reply shape {layers, kv heads, block size, head dim},
//                 dtype: the sequence image {sequence, first position, i32 layers, i32 blocks,
//                 i32 first kv head, i32 0, i64 length per layer, then per block, per layer,
//                 K block then V block}.
//   ImportBlocks  the image as the payload (shape and dtype as in the export reply); creates the
//                 sequence here.
//   Migrate       payload {sequence, i32 port, i32 host length, host bytes}: this worker sends
//                 the sequence to the worker at host:port (ImportBlocks) and frees it here once
//                 that worker accepted it.
//   Truncate      payload n x {sequence, position}: each sequence keeps only the positions
//                 before `position` in every layer (at least its first position; nothing is
//                 added) and returns the blocks beyond them: undoes the appends of a step that
//                 failed part way, so it can be retried. Reply {i64 blocks freed}.
// Every field is checked against this worker's state (configured, known sequence, layer in
// range, dtype and head dim served, lengths that add up, positions in order, sizes within the
// limits); a bad frame gets an error reply for that request alone and changes nothing. KV that
// does not fit is RESOURCE_EXHAUSTED.
// Backends (attention_backend.h): the KV pools and kernels sit behind an AttentionBackend made at
// Configure. The CPU backend (the default) runs DecodeAttentionCpu with the configured plan (cpu
// workers, kv tile), so the coordinator can reproduce the states bit for bit; the CUDA backend
// (cuda_attention_backend.h) holds the pools on a GPU and runs LeanDecode and PrefillAttention,
// within those kernels' tolerances. Migration images are the same bytes on both.
//
// Threads: not thread-safe; one thread calls Handle (WorkerServer's request thread).
#pragma once

#include <cstdint>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/kernels/linear_attention.h"
#include "ferry/kernels/thread_pool.h"
#include "runtime/kv/kv_cache.h"
#include "runtime/kv/state_cache.h"
#include "runtime/offload/attention_backend.h"
#include "runtime/offload/frame.h"
#include "runtime/transport/buffer_pool.h"

namespace ferry::offload {

struct WorkerServiceOptions {
  int64_t kv_capacity_bytes = int64_t{1} << 30;
  int num_threads = 0;         // CPU backend's attention thread pool (0: hardware threads)
  AttentionBackendFactory backend;  // empty: the CPU backend
  int max_batch = 4096;        // sequences per Attend / AppendKv / table
  int max_prefill_tokens = 16384;
  int max_q_heads = 1024;
  int max_layers = 1024;
};

// Sends a frame to another worker and returns its reply frame (used by Migrate).
using ForwardFn = std::function<absl::StatusOr<transport::Buffer>(
    const std::string& host, int port, transport::Buffer frame)>;

class WorkerService {
 public:
  WorkerService(const WorkerServiceOptions& options, transport::BufferPool& pool);
  ~WorkerService();

  // Handles one frame (header and payload) and returns the reply frame, an error reply if the
  // frame is bad or the operation fails.
  transport::Buffer Handle(const uint8_t* frame, size_t size);

  void SetForwarder(ForwardFn forward) { forward_ = std::move(forward); }

  // For tests and metrics: the KV cache (softmax attention) or the state cache (linear), and the
  // bytes and sequences held in whichever is in use.
  const kv::KvCache* cache() const { return cache_; }
  const kv::StateCache* states() const { return states_.get(); }
  int64_t used_bytes() const;
  size_t sequences_held() const;
  // Sequences added here since start (new, or moved in from another worker); never decreases,
  // so a watcher that polls now and then still sees that a short-lived sequence was here.
  int64_t sequences_opened() const { return sequences_opened_; }
  int64_t requests_served() const { return requests_served_; }
  int64_t errors_answered() const { return errors_answered_; }

 private:
  struct Sequence {
    int64_t first_position = 0;
    int first_kv_head = 0;               // of the model's KV heads
    std::vector<int64_t> layer_lengths;  // positions held (or summarised) per layer
    // Linear attention: per layer, the length the state's backup holds (-1: none).
    std::vector<int64_t> backup_lengths;
  };
  struct Entry {
    uint64_t sequence;
    int64_t position;
  };

  absl::StatusOr<transport::Buffer> Dispatch(const FrameHeader& header, const uint8_t* payload);
  absl::StatusOr<transport::Buffer> Configure(const FrameHeader& header, PayloadReader& reader);
  absl::StatusOr<transport::Buffer> OpenSequence(const FrameHeader& header,
                                                 PayloadReader& reader);
  absl::StatusOr<transport::Buffer> AppendKv(const FrameHeader& header, PayloadReader& reader);
  absl::StatusOr<transport::Buffer> Attend(const FrameHeader& header, PayloadReader& reader);
  absl::StatusOr<transport::Buffer> Prefill(const FrameHeader& header, PayloadReader& reader);
  absl::StatusOr<transport::Buffer> FreeSequence(const FrameHeader& header,
                                                 PayloadReader& reader);
  absl::StatusOr<transport::Buffer> ExportBlocks(const FrameHeader& header,
                                                 PayloadReader& reader);
  // The fixed part of a sequence image (ExportBlocks' layout), checked against this worker: the
  // layer count, the KV-head offset and that the sequence is not held here yet.
  struct ImageHeader {
    uint64_t id = 0;
    int64_t first_position = 0;
    int32_t layers = 0;
    int32_t units = 0;  // KV blocks, or state slots
    int32_t first_kv_head = 0;
  };
  absl::StatusOr<ImageHeader> ReadImageHeader(PayloadReader& reader) const;
  absl::StatusOr<transport::Buffer> ImportBlocks(const FrameHeader& header,
                                                 PayloadReader& reader);
  absl::StatusOr<transport::Buffer> Migrate(const FrameHeader& header, PayloadReader& reader);
  absl::StatusOr<transport::Buffer> Truncate(const FrameHeader& header, PayloadReader& reader);

  // Linear attention (states_ set): the same operations on per-sequence states.
  absl::StatusOr<transport::Buffer> AttendLinear(const FrameHeader& header,
                                                 const std::vector<Entry>& entries,
                                                 const float* q, const uint8_t* k,
                                                 const uint8_t* v,
                                                 std::chrono::steady_clock::time_point start);
  absl::StatusOr<transport::Buffer> PrefillLinear(const FrameHeader& header, const Entry& entry,
                                                  const float* q, const uint8_t* k,
                                                  const uint8_t* v,
                                                  std::chrono::steady_clock::time_point start);
  absl::StatusOr<transport::Buffer> RewindStates(const FrameHeader& header,
                                                 const std::vector<Entry>& entries);
  absl::StatusOr<transport::Buffer> ExportStateImage(uint64_t id, const Sequence& sequence,
                                                     uint64_t request_id);
  absl::StatusOr<transport::Buffer> ImportStates(const FrameHeader& header,
                                                 PayloadReader& reader);
  // k, v (rows, kv heads, head dim) in the KV dtype, widened into linear_k_, linear_v_.
  absl::Status WidenKv(const uint8_t* k, const uint8_t* v, int64_t rows);
  int64_t StateStride() const;
  // Free blocks (KV) or slots (states); a sequence dropped from whichever holds it.
  int64_t FreeUnits() const;
  absl::Status DropSequence(uint64_t id);

  absl::Status RequireConfigured() const;
  absl::Status CheckFlags(const FrameHeader& header) const;
  absl::Status CheckLayer(const FrameHeader& header) const;
  absl::Status CheckKvDtype(const FrameHeader& header) const;
  absl::StatusOr<int> CheckBatch(int32_t n) const;
  absl::Status CheckFirstKvHead(int64_t first_kv_head) const;
  absl::StatusOr<std::vector<Entry>> ReadTable(PayloadReader& reader, int n,
                                               bool want_known) const;
  absl::StatusOr<Sequence*> Find(uint64_t sequence);
  // Appends one position per entry of one layer (K and V (n, kv heads, head dim)); checks all
  // entries before changing anything.
  absl::Status AppendRows(int layer, const std::vector<Entry>& entries, const uint8_t* k,
                          const uint8_t* v);
  // Reserves, writes and records runs of local positions of one layer (checked by the caller).
  absl::Status AppendRuns(int layer, const std::vector<kv::KvAppendRun>& runs, const uint8_t* k,
                          const uint8_t* v);
  absl::StatusOr<transport::Buffer> ExportImage(uint64_t sequence, uint64_t request_id);
  // A success reply with `payload_bytes` to fill; the writer is positioned after the header.
  FrameWriter StartReply(const FrameHeader& request, uint64_t payload_bytes, const int32_t* shape,
                         uint8_t dtype);
  // An Attend / Prefill reply: shape {rows, q heads, head dim, 0}, float32 o (rows, q heads,
  // head dim) then lse (rows, q heads), reserved in the frame for the kernel to write.
  FrameWriter StartStatesReply(const FrameHeader& request, int rows, int num_q_heads, float** o,
                               float** lse);

  WorkerServiceOptions options_;
  transport::BufferPool& pool_;
  std::unique_ptr<AttentionBackend> backend_;  // softmax attention: its KV cache and kernels
  kv::KvCache* cache_ = nullptr;                // backend_'s
  kv::KvCacheConfig shape_;  // what the worker serves (Configure's shape); capacity unused
  std::unique_ptr<kv::StateCache> states_;                // linear attention
  std::optional<kernels::LinearAttentionConfig> linear_;  // with states_; num_seqs per call
  std::unique_ptr<kernels::ThreadPool> linear_threads_;   // with states_: the CPU kernels' pool
  int model_kv_heads_ = 0;
  float softmax_scale_ = 1.0f;
  kernels::CpuDecodeOptions plan_;
  std::unordered_map<uint64_t, Sequence> sequences_;
  int64_t sequences_opened_ = 0;
  ForwardFn forward_;
  int64_t requests_served_ = 0;
  int64_t errors_answered_ = 0;
  // Scratch reused across requests (block tables of a batch, append runs, widened K/V).
  std::vector<int32_t> indptr_, table_, lens_, begins_, ends_, slots_;
  std::vector<kv::KvAppendRun> runs_;
  std::vector<float> linear_k_, linear_v_;
};

}  // namespace ferry::offload
