#include "runtime/offload/attention_client.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/attention_state.h"
#include "ferry/kernels/cpu_attention.h"
#include "ferry/status.h"

namespace ferry::offload {

absl::StatusOr<std::unique_ptr<AttentionClient>> AttentionClient::Create(
    const transport::UcxNodeOptions& options) {
  FERRY_ASSIGN_OR_RETURN(std::unique_ptr<transport::UcxNode> node,
                         transport::UcxNode::Create(options));
  return std::unique_ptr<AttentionClient>(new AttentionClient(std::move(node)));
}

absl::StatusOr<int> AttentionClient::AddWorker(const std::string& host, int port) {
  FERRY_ASSIGN_OR_RETURN(transport::PeerId peer, node_->Connect(host, port));
  peers_.push_back(peer);
  shapes_.emplace_back();
  return static_cast<int>(peers_.size()) - 1;
}

absl::Status AttentionClient::CheckWorker(int worker) const {
  if (worker < 0 || worker >= num_workers()) {
    return absl::InvalidArgumentError(absl::StrCat("no worker ", worker));
  }
  if (shapes_[worker].num_layers == 0) {
    return absl::FailedPreconditionError(absl::StrCat("worker ", worker, " not configured"));
  }
  return absl::OkStatus();
}

FrameHeader AttentionClient::NewHeader(FrameType type, int layer, uint64_t payload_bytes) {
  FrameHeader header;
  header.type = static_cast<uint16_t>(type);
  header.request_id = next_request_++;
  header.layer = layer;
  header.payload_bytes = payload_bytes;
  return header;
}

transport::ReplyFuture AttentionClient::Send(int worker, transport::Buffer frame,
                                                        absl::Duration timeout) {
  return node_->Call(peers_[worker], std::move(frame), timeout);
}

absl::StatusOr<ReplyFrame> AttentionClient::Finish(int worker, const FrameHeader& request,
                                                   transport::ReplyFuture& future,
                                                   absl::Duration timeout) {
  transport::CallResult result = node_->Await(future, timeout);
  if (!result.ok()) {
    return absl::Status(result.status().code(),
                        absl::StrCat("worker ", worker, ": ", result.status().message()));
  }
  ReplyFrame reply;
  reply.frame = std::move(*result);
  absl::StatusOr<FrameHeader> header = DecodeFrameHeader(reply.frame.data(), reply.frame.size());
  if (!header.ok()) {
    node_->buffers().Release(std::move(reply.frame));
    return absl::InternalError(absl::StrCat("worker ", worker, ": bad reply frame: ",
                                            header.status().message()));
  }
  reply.header = *header;
  absl::Status status = ReplyStatus(reply.header, reply.payload());
  if (!status.ok()) {
    node_->buffers().Release(std::move(reply.frame));
    return absl::Status(status.code(), absl::StrCat("worker ", worker, ": ", status.message()));
  }
  if (reply.header.type != (request.type | kReplyBit) ||
      reply.header.request_id != request.request_id) {
    node_->buffers().Release(std::move(reply.frame));
    return absl::InternalError(absl::StrCat("worker ", worker, ": reply does not match request ",
                                            request.request_id));
  }
  return reply;
}

absl::StatusOr<ReplyFrame> AttentionClient::Call(int worker, const FrameHeader& request,
                                                 transport::Buffer frame,
                                                 absl::Duration timeout) {
  transport::ReplyFuture future = Send(worker, std::move(frame), timeout);
  return Finish(worker, request, future, timeout);
}

absl::StatusOr<transport::Buffer> AttentionClient::CallRaw(int worker, transport::Buffer frame) {
  if (worker < 0 || worker >= num_workers()) return absl::InvalidArgumentError("no such worker");
  transport::ReplyFuture future = Send(worker, std::move(frame));
  return node_->Await(future);
}

absl::StatusOr<int64_t> AttentionClient::Configure(int worker, const ModelShape& shape) {
  if (worker < 0 || worker >= num_workers()) return absl::InvalidArgumentError("no such worker");
  FrameHeader header = NewHeader(FrameType::kConfigure, 0, 24);
  header.dtype = static_cast<uint8_t>(shape.dtype);
  header.shape[0] = shape.num_layers;
  header.shape[1] = shape.num_kv_heads;
  header.shape[2] = shape.head_dim;
  header.shape[3] = shape.block_size;
  FrameWriter writer(header, node_->buffers());
  writer.F32(shape.softmax_scale);
  writer.I32(shape.plan_workers);
  writer.I32(shape.kv_tile_size);
  writer.I32(shape.model_kv_heads);
  if (shape.linear_attention) {
    writer.I32(1 | static_cast<int32_t>(shape.feature_map) << 8 |
               (shape.linear_normalize ? 1 : 0) << 16);
    writer.I32(shape.q_heads_per_kv_head);
  } else {
    writer.I32(0);
    writer.I32(0);
  }
  // Configure allocates (and the OS zero-fills) the worker's whole KV pool: its own bound.
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply,
                         Call(worker, header, writer.Finish(), kConfigureTimeout));
  int64_t total_blocks = 0;
  if (reply.header.payload_bytes == 16) std::memcpy(&total_blocks, reply.payload(), 8);
  node_->buffers().Release(std::move(reply.frame));
  if (total_blocks <= 0) {
    return absl::InternalError(absl::StrCat("worker ", worker, ": configure reply without blocks"));
  }
  shapes_[worker] = shape;
  return total_blocks;
}

absl::Status AttentionClient::OpenSequences(int worker, absl::Span<const SequenceEntry> sequences,
                                            int first_kv_head) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  FrameHeader header = NewHeader(FrameType::kOpenSequence, 0, 16 * sequences.size());
  header.shape[0] = static_cast<int32_t>(sequences.size());
  header.shape[1] = first_kv_head;
  FrameWriter writer(header, node_->buffers());
  for (const SequenceEntry& entry : sequences) {
    writer.U64(entry.sequence);
    writer.I64(entry.position);
  }
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, writer.Finish()));
  node_->buffers().Release(std::move(reply.frame));
  return absl::OkStatus();
}

absl::Status AttentionClient::AppendKv(int worker, int layer,
                                       absl::Span<const SequenceEntry> entries, const void* k,
                                       const void* v) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  const ModelShape& shape = shapes_[worker];
  const size_t n = entries.size();
  const size_t rows = n * shape.num_kv_heads * shape.head_dim * DTypeSize(shape.dtype);
  FrameHeader header = NewHeader(FrameType::kAppendKv, layer, 16 * n + 2 * rows);
  header.dtype = static_cast<uint8_t>(shape.dtype);
  header.shape[0] = static_cast<int32_t>(n);
  header.shape[1] = shape.num_kv_heads;
  header.shape[2] = shape.head_dim;
  FrameWriter writer(header, node_->buffers());
  for (const SequenceEntry& entry : entries) {
    writer.U64(entry.sequence);
    writer.I64(entry.position);
  }
  writer.Bytes(k, rows);
  writer.Bytes(v, rows);
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, writer.Finish()));
  node_->buffers().Release(std::move(reply.frame));
  return absl::OkStatus();
}

absl::StatusOr<PartialStates> AttentionClient::ReadStates(const ReplyFrame& reply, int n,
                                                          int num_q_heads) const {
  const int head_dim = reply.header.shape[2];
  const size_t states = static_cast<size_t>(n) * num_q_heads;
  if (reply.header.shape[0] != n || reply.header.shape[1] != num_q_heads ||
      reply.header.payload_bytes != states * head_dim * 4 + states * 4) {
    return absl::InternalError("attention reply has the wrong shape");
  }
  PartialStates out;
  out.o.resize(states * head_dim);
  out.lse.resize(states);
  std::memcpy(out.o.data(), reply.payload(), out.o.size() * 4);
  std::memcpy(out.lse.data(), reply.payload() + out.o.size() * 4, out.lse.size() * 4);
  out.worker_seconds = std::max(0, reply.header.shape[3]) * 1e-6;
  return out;
}

absl::StatusOr<PartialStates> AttentionClient::Attend(int worker, int layer,
                                                      absl::Span<const uint64_t> sequences,
                                                      int num_q_heads, const float* q) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  const ModelShape& shape = shapes_[worker];
  const size_t n = sequences.size();
  const size_t q_bytes = n * num_q_heads * shape.head_dim * 4;
  FrameHeader header = NewHeader(FrameType::kAttend, layer, 16 * n + q_bytes);
  header.dtype = static_cast<uint8_t>(shape.dtype);
  header.shape[0] = static_cast<int32_t>(n);
  header.shape[1] = num_q_heads;
  header.shape[2] = shape.head_dim;
  FrameWriter writer(header, node_->buffers());
  for (uint64_t id : sequences) {
    writer.U64(id);
    writer.I64(0);
  }
  writer.Bytes(q, q_bytes);
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, writer.Finish()));
  absl::StatusOr<PartialStates> states = ReadStates(reply, static_cast<int>(n), num_q_heads);
  node_->buffers().Release(std::move(reply.frame));
  return states;
}

absl::StatusOr<PartialStates> AttentionClient::Prefill(int worker, int layer, uint64_t sequence,
                                                       int64_t first, int tokens,
                                                       int num_q_heads, const float* q,
                                                       const void* k, const void* v) {
  FERRY_ASSIGN_OR_RETURN(PendingCall call, StartPrefill(worker, layer, sequence, first, tokens,
                                                        num_q_heads, q, k, v));
  return FinishPrefill(call);
}

absl::StatusOr<AttentionClient::PendingCall> AttentionClient::StartPrefill(
    int worker, int layer, uint64_t sequence, int64_t first, int tokens, int num_q_heads,
    const float* q, const void* k, const void* v) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  const ModelShape& shape = shapes_[worker];
  const bool with_kv = k != nullptr && v != nullptr;
  const size_t q_bytes = size_t{static_cast<size_t>(tokens)} * num_q_heads * shape.head_dim * 4;
  const size_t rows =
      with_kv ? size_t{static_cast<size_t>(tokens)} * shape.num_kv_heads * shape.head_dim *
                    DTypeSize(shape.dtype)
              : 0;
  FrameHeader header = NewHeader(FrameType::kPrefill, layer, 16 + q_bytes + 2 * rows);
  header.dtype = static_cast<uint8_t>(shape.dtype);
  header.flags = (with_kv ? kFlagWithKv : 0) | (shape.linear_attention ? kFlagLinearState : 0);
  header.shape[0] = tokens;
  header.shape[1] = num_q_heads;
  header.shape[2] = shape.head_dim;
  FrameWriter writer(header, node_->buffers());
  writer.U64(sequence);
  writer.I64(first);
  writer.Bytes(q, q_bytes);
  if (with_kv) {
    writer.Bytes(k, rows);
    writer.Bytes(v, rows);
  }
  return PendingCall{worker, header, Send(worker, writer.Finish())};
}

absl::StatusOr<PartialStates> AttentionClient::FinishPrefill(PendingCall& call) {
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Finish(call.worker, call.header, call.future));
  absl::StatusOr<PartialStates> states =
      ReadStates(reply, call.header.shape[0], call.header.shape[1]);
  node_->buffers().Release(std::move(reply.frame));
  return states;
}

absl::StatusOr<int64_t> AttentionClient::FreeSequences(int worker,
                                                       absl::Span<const uint64_t> sequences) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  FrameHeader header = NewHeader(FrameType::kFreeSequence, 0, 8 * sequences.size());
  header.shape[0] = static_cast<int32_t>(sequences.size());
  FrameWriter writer(header, node_->buffers());
  for (uint64_t id : sequences) writer.U64(id);
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, writer.Finish()));
  int64_t freed = 0;
  if (reply.header.payload_bytes == 8) std::memcpy(&freed, reply.payload(), 8);
  node_->buffers().Release(std::move(reply.frame));
  return freed;
}

absl::StatusOr<int64_t> AttentionClient::Truncate(int worker,
                                                  absl::Span<const SequenceEntry> entries) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  FrameHeader header = NewHeader(FrameType::kTruncate, 0, 16 * entries.size());
  header.shape[0] = static_cast<int32_t>(entries.size());
  FrameWriter writer(header, node_->buffers());
  for (const SequenceEntry& entry : entries) {
    writer.U64(entry.sequence);
    writer.I64(entry.position);
  }
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, writer.Finish()));
  int64_t freed = 0;
  if (reply.header.payload_bytes == 8) std::memcpy(&freed, reply.payload(), 8);
  node_->buffers().Release(std::move(reply.frame));
  return freed;
}

absl::Status AttentionClient::Migrate(int from_worker, uint64_t sequence,
                                      const std::string& to_host, int to_port) {
  FERRY_RETURN_IF_ERROR(CheckWorker(from_worker));
  FrameHeader header = NewHeader(FrameType::kMigrate, 0, 16 + to_host.size());
  FrameWriter writer(header, node_->buffers());
  writer.U64(sequence);
  writer.I32(to_port);
  writer.I32(static_cast<int32_t>(to_host.size()));
  writer.Bytes(to_host.data(), to_host.size());
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(from_worker, header, writer.Finish()));
  node_->buffers().Release(std::move(reply.frame));
  return absl::OkStatus();
}

absl::StatusOr<transport::Buffer> AttentionClient::ExportBlocks(int worker, uint64_t sequence) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  FrameHeader header = NewHeader(FrameType::kExportBlocks, 0, 8);
  FrameWriter writer(header, node_->buffers());
  writer.U64(sequence);
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, writer.Finish()));
  // Turn the reply into an ImportBlocks request.
  reply.header.type = static_cast<uint16_t>(FrameType::kImportBlocks);
  EncodeFrameHeader(reply.header, reply.frame.data());
  return std::move(reply.frame);
}

absl::Status AttentionClient::ImportBlocks(int worker, transport::Buffer image) {
  FERRY_RETURN_IF_ERROR(CheckWorker(worker));
  FERRY_ASSIGN_OR_RETURN(FrameHeader header, DecodeFrameHeader(image.data(), image.size()));
  header.request_id = next_request_++;
  EncodeFrameHeader(header, image.data());
  FERRY_ASSIGN_OR_RETURN(ReplyFrame reply, Call(worker, header, std::move(image)));
  node_->buffers().Release(std::move(reply.frame));
  return absl::OkStatus();
}

absl::StatusOr<AttentionClient::LayerResult> AttentionClient::AttendLayer(
    int layer, int batch, int num_q_heads, const float* q, absl::Span<const Shard> shards) {
  FERRY_ASSIGN_OR_RETURN(PendingLayer pending,
                         StartAttendLayer(layer, batch, num_q_heads, q, shards));
  return FinishAttendLayer(pending);
}

absl::StatusOr<AttentionClient::PendingLayer> AttentionClient::StartAttendLayer(
    int layer, int batch, int num_q_heads, const float* q, absl::Span<const Shard> shards) {
  if (batch < 1 || num_q_heads < 1 || shards.empty()) {
    return absl::InvalidArgumentError("attend-layer: empty batch or no shards");
  }
  int head_dim = 0;
  for (const Shard& shard : shards) {
    FERRY_RETURN_IF_ERROR(CheckWorker(shard.worker));
    if (shard.batch_index.size() != shard.sequences.size() || shard.sequences.empty()) {
      return absl::InvalidArgumentError("attend-layer: a shard's indices and sequences differ");
    }
    if ((shard.new_k != nullptr) != (shard.new_v != nullptr) ||
        (shard.new_k != nullptr && shard.positions.size() != shard.sequences.size())) {
      return absl::InvalidArgumentError("attend-layer: new K/V need both tensors and positions");
    }
    for (int index : shard.batch_index) {
      if (index < 0 || index >= batch) return absl::InvalidArgumentError("batch index out of range");
    }
    if (head_dim != 0 && shapes_[shard.worker].head_dim != head_dim) {
      return absl::InvalidArgumentError("attend-layer: workers disagree on head dim");
    }
    head_dim = shapes_[shard.worker].head_dim;
  }
  const size_t row = static_cast<size_t>(num_q_heads) * head_dim;

  // Send every shard's request before waiting for any.
  PendingLayer pending;
  pending.batch = batch;
  pending.num_q_heads = num_q_heads;
  pending.head_dim = head_dim;
  for (const Shard& shard : shards) {
    const ModelShape& shape = shapes_[shard.worker];
    const size_t n = shard.sequences.size();
    const bool with_kv = shard.new_k != nullptr && shard.new_v != nullptr;
    const size_t kv_bytes =
        with_kv ? n * shape.num_kv_heads * shape.head_dim * DTypeSize(shape.dtype) : 0;
    FrameHeader header = NewHeader(FrameType::kAttend, layer, 16 * n + n * row * 4 + 2 * kv_bytes);
    header.dtype = static_cast<uint8_t>(shape.dtype);
    header.flags = (with_kv ? kFlagWithKv : 0) | (shape.linear_attention ? kFlagLinearState : 0);
    header.shape[0] = static_cast<int32_t>(n);
    header.shape[1] = num_q_heads;
    header.shape[2] = head_dim;
    FrameWriter writer(header, node_->buffers());
    for (size_t i = 0; i < n; ++i) {
      writer.U64(shard.sequences[i]);
      writer.I64(with_kv ? shard.positions[i] : 0);
    }
    for (int index : shard.batch_index) writer.Bytes(q + index * row, row * 4);
    if (with_kv) {
      writer.Bytes(shard.new_k, kv_bytes);
      writer.Bytes(shard.new_v, kv_bytes);
    }
    pending.batch_index.push_back(shard.batch_index);
    pending.calls.push_back(PendingCall{shard.worker, header, Send(shard.worker, writer.Finish())});
  }
  return pending;
}

absl::StatusOr<AttentionClient::LayerResult> AttentionClient::FinishAttendLayer(
    PendingLayer& pending) {
  const int batch = pending.batch, num_q_heads = pending.num_q_heads;
  const int head_dim = pending.head_dim;
  const size_t row = static_cast<size_t>(num_q_heads) * head_dim;
  // parts (num_shards, batch * num_q_heads, head_dim): identity where a shard has no part.
  const int64_t num_states = int64_t{batch} * num_q_heads;
  const int num_parts = static_cast<int>(pending.calls.size());
  std::vector<float> parts_o(num_parts * num_states * head_dim, 0.0f);
  std::vector<float> parts_lse(num_parts * num_states, FERRY_EMPTY_LSE);
  LayerResult result;
  result.complete.assign(batch, true);
  for (int p = 0; p < num_parts; ++p) {
    PendingCall& call = pending.calls[p];
    const std::vector<int>& batch_index = pending.batch_index[p];
    absl::StatusOr<ReplyFrame> reply = Finish(call.worker, call.header, call.future);
    absl::Status status = reply.status();
    double seconds = 0;
    if (reply.ok()) {
      seconds = std::max(0, reply->header.shape[3]) * 1e-6;
      const int n = static_cast<int>(batch_index.size());
      if (reply->header.shape[0] != n || reply->header.shape[1] != num_q_heads ||
          reply->header.payload_bytes != static_cast<uint64_t>(n) * row * 4 + n * num_q_heads * 4) {
        status = absl::InternalError(absl::StrCat("worker ", call.worker,
                                                  ": attention reply has the wrong shape"));
      } else {
        const float* o = reinterpret_cast<const float*>(reply->payload());
        const float* lse = o + n * row;
        for (int i = 0; i < n; ++i) {
          const int64_t state = int64_t{batch_index[i]} * num_q_heads;
          std::memcpy(&parts_o[(p * num_states + state) * head_dim], o + i * row, row * 4);
          std::memcpy(&parts_lse[p * num_states + state], lse + i * num_q_heads,
                      num_q_heads * 4);
        }
      }
      node_->buffers().Release(std::move(reply->frame));
    }
    if (!status.ok()) {
      for (int index : batch_index) result.complete[index] = false;
    }
    result.shard_status.push_back(std::move(status));
    result.shard_seconds.push_back(seconds);
  }
  result.merged.o.resize(num_states * head_dim);
  result.merged.lse.resize(num_states);
  FERRY_RETURN_IF_ERROR(kernels::MergeStatesCpu(parts_o.data(), parts_lse.data(), num_parts,
                                                num_states, head_dim, result.merged.o.data(),
                                                result.merged.lse.data()));
  return result;
}

}  // namespace ferry::offload
