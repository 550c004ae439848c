#include "runtime/offload/worker_service.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "ferry/kernels/cpu_linear_attention.h"
#include "ferry/status.h"

namespace ferry::offload {
namespace {

constexpr int64_t kEntryBytes = 16;  // u64 sequence, i64 position
constexpr uint64_t kConfigureBytes = 24;

absl::Status LengthMismatch(const FrameHeader& header, int64_t expected) {
  return absl::InvalidArgumentError(absl::StrCat(FrameTypeName(header.type),
                                                 ": payload length mismatch: ",
                                                 header.payload_bytes, " bytes, the shape needs ",
                                                 expected));
}

bool ValidDType(uint8_t dtype) { return dtype >= 1 && dtype <= 3; }

// Puts the microseconds since `start` into an attention reply's shape[3] (its handling time,
// which the coordinator turns into this worker's attention speed for placement).
transport::Buffer StampHandlingTime(transport::Buffer reply,
                                    std::chrono::steady_clock::time_point start) {
  const int64_t micros = std::chrono::duration_cast<std::chrono::microseconds>(
                             std::chrono::steady_clock::now() - start)
                             .count();
  absl::StatusOr<FrameHeader> header = DecodeFrameHeader(reply.data(), reply.size());
  if (header.ok()) {
    header->shape[3] = static_cast<int32_t>(std::min<int64_t>(micros, INT32_MAX));
    EncodeFrameHeader(*header, reply.data());
  }
  return reply;
}

}  // namespace

WorkerService::WorkerService(const WorkerServiceOptions& options, transport::BufferPool& pool)
    : options_(options), pool_(pool) {}

WorkerService::~WorkerService() = default;

transport::Buffer WorkerService::Handle(const uint8_t* frame, size_t size) {
  absl::StatusOr<FrameHeader> header = DecodeFrameHeader(frame, size);
  if (!header.ok()) {
    ++errors_answered_;
    // Keep the request id when the frame is long enough to carry one, so the caller can match.
    FrameHeader partial;
    if (size >= 16) std::memcpy(&partial.request_id, frame + 8, sizeof(partial.request_id));
    return MakeErrorReply(&partial, header.status(), pool_);
  }
  absl::StatusOr<transport::Buffer> reply =
      header->is_reply()
          ? absl::InvalidArgumentError("a worker takes requests, not replies")
          : Dispatch(*header, frame + kFrameHeaderBytes);
  if (!reply.ok()) {
    ++errors_answered_;
    return MakeErrorReply(&*header, reply.status(), pool_);
  }
  ++requests_served_;
  return std::move(*reply);
}

absl::StatusOr<transport::Buffer> WorkerService::Dispatch(const FrameHeader& header,
                                                          const uint8_t* payload) {
  PayloadReader reader(payload, header.payload_bytes);
  switch (header.request_type()) {
    case FrameType::kConfigure: return Configure(header, reader);
    case FrameType::kOpenSequence: return OpenSequence(header, reader);
    case FrameType::kAppendKv: return AppendKv(header, reader);
    case FrameType::kAttend: return Attend(header, reader);
    case FrameType::kPrefill: return Prefill(header, reader);
    case FrameType::kFreeSequence: return FreeSequence(header, reader);
    case FrameType::kExportBlocks: return ExportBlocks(header, reader);
    case FrameType::kImportBlocks: return ImportBlocks(header, reader);
    case FrameType::kMigrate: return Migrate(header, reader);
    case FrameType::kTruncate: return Truncate(header, reader);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown frame type ", header.type));
}

FrameWriter WorkerService::StartReply(const FrameHeader& request, uint64_t payload_bytes,
                                      const int32_t* shape, uint8_t dtype) {
  FrameHeader reply;
  reply.type = static_cast<uint16_t>(request.type | kReplyBit);
  reply.request_id = request.request_id;
  reply.layer = request.layer;
  reply.dtype = dtype;
  if (shape != nullptr) std::copy(shape, shape + 4, reply.shape);
  reply.payload_bytes = payload_bytes;
  return FrameWriter(reply, pool_);
}

FrameWriter WorkerService::StartStatesReply(const FrameHeader& request, int rows, int num_q_heads,
                                            float** o, float** lse) {
  const int32_t shape[4] = {rows, num_q_heads, shape_.head_dim, 0};
  const int64_t states = int64_t{rows} * num_q_heads;
  FrameWriter writer = StartReply(request, states * shape_.head_dim * 4 + states * 4, shape,
                                  static_cast<uint8_t>(DType::kFloat32));
  *o = reinterpret_cast<float*>(writer.Reserve(states * shape_.head_dim * 4));
  *lse = reinterpret_cast<float*>(writer.Reserve(states * 4));
  return writer;
}

absl::Status WorkerService::RequireConfigured() const {
  if (cache_ == nullptr && states_ == nullptr) {
    return absl::FailedPreconditionError("worker not configured: send Configure first");
  }
  return absl::OkStatus();
}

absl::Status WorkerService::CheckLayer(const FrameHeader& header) const {
  if (header.layer < 0 || header.layer >= shape_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(FrameTypeName(header.type), ": layer ",
                                                   header.layer, " out of range [0, ",
                                                   shape_.num_layers, ")"));
  }
  return absl::OkStatus();
}

absl::Status WorkerService::CheckKvDtype(const FrameHeader& header) const {
  if (header.dtype != static_cast<uint8_t>(shape_.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat(
        FrameTypeName(header.type), ": dtype ", static_cast<int>(header.dtype),
        " but this worker serves ", std::string(DTypeName(shape_.dtype)), " (",
        static_cast<int>(shape_.dtype), ")"));
  }
  return absl::OkStatus();
}

absl::Status WorkerService::CheckFlags(const FrameHeader& header) const {
  if ((header.flags & ~(kFlagWithKv | kFlagLinearState)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(FrameTypeName(header.type), ": unknown flags ",
                                                   static_cast<int>(header.flags)));
  }
  const bool linear = (header.flags & kFlagLinearState) != 0;
  if (linear != (states_ != nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(
        FrameTypeName(header.type), ": a ", linear ? "linear-attention" : "softmax-attention",
        " request, but this worker holds ", states_ != nullptr ? "linear-attention states" : "KV"));
  }
  if (linear && (header.flags & kFlagWithKv) == 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        FrameTypeName(header.type), ": a linear-attention state advances with each token: "
        "the new K and V are required"));
  }
  return absl::OkStatus();
}

absl::StatusOr<int> WorkerService::CheckBatch(int32_t n) const {
  if (n < 1 || n > options_.max_batch) {
    return absl::InvalidArgumentError(
        absl::StrCat("batch of ", n, " outside [1, ", options_.max_batch, "]"));
  }
  return n;
}

absl::StatusOr<WorkerService::Sequence*> WorkerService::Find(uint64_t sequence) {
  auto it = sequences_.find(sequence);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("unknown sequence ", sequence));
  }
  return &it->second;
}

absl::Status WorkerService::CheckFirstKvHead(int64_t first_kv_head) const {
  const int held = shape_.num_kv_heads;
  if (first_kv_head < 0 || first_kv_head % held != 0 || first_kv_head + held > model_kv_heads_) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv heads from ", first_kv_head, ": a sequence here holds ", held,
        " kv heads from a multiple of ", held, ", within the model's ", model_kv_heads_));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<WorkerService::Entry>> WorkerService::ReadTable(
    PayloadReader& reader, int n, bool want_known) const {
  std::vector<Entry> entries(n);
  std::unordered_set<uint64_t> seen;
  for (int i = 0; i < n; ++i) {
    if (!reader.U64(&entries[i].sequence) || !reader.I64(&entries[i].position)) {
      return absl::InvalidArgumentError("sequence table truncated");
    }
    if (!seen.insert(entries[i].sequence).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", entries[i].sequence, " appears twice in one table"));
    }
    if (want_known && sequences_.count(entries[i].sequence) == 0) {
      return absl::NotFoundError(absl::StrCat("unknown sequence ", entries[i].sequence));
    }
  }
  return entries;
}

absl::StatusOr<transport::Buffer> WorkerService::Configure(const FrameHeader& header,
                                                           PayloadReader& reader) {
  kv::KvCacheConfig config;
  config.num_layers = header.shape[0];
  config.num_kv_heads = header.shape[1];
  config.head_dim = header.shape[2];
  config.block_size = header.shape[3];
  config.capacity_bytes = options_.kv_capacity_bytes;
  if (config.num_layers < 1 || config.num_layers > options_.max_layers) {
    return absl::InvalidArgumentError(absl::StrCat("configure: ", config.num_layers, " layers"));
  }
  if (config.num_kv_heads < 1 || config.num_kv_heads > 256) {
    return absl::InvalidArgumentError(absl::StrCat("configure: ", config.num_kv_heads,
                                                   " kv heads"));
  }
  if (!kernels::IsSupportedHeadDim(config.head_dim)) {
    return absl::InvalidArgumentError(absl::StrCat("configure: head dim ", config.head_dim,
                                                   " not served (64, 128, 256)"));
  }
  if (config.block_size < 1 || config.block_size > 4096) {
    return absl::InvalidArgumentError(absl::StrCat("configure: block size ", config.block_size));
  }
  if (!ValidDType(header.dtype)) {
    return absl::InvalidArgumentError(absl::StrCat("configure: dtype ", static_cast<int>(header.dtype)));
  }
  config.dtype = static_cast<DType>(header.dtype);
  if (header.payload_bytes != kConfigureBytes) return LengthMismatch(header, kConfigureBytes);
  float scale = 0;
  int32_t workers = 0, tile = 0, model_kv_heads = 0, kind = 0, group = 0;
  reader.F32(&scale);
  reader.I32(&workers);
  reader.I32(&tile);
  reader.I32(&model_kv_heads);
  reader.I32(&kind);
  reader.I32(&group);
  if (!std::isfinite(scale) || scale < 0 || workers < 0 || workers > 1024 || tile < 0 ||
      tile > (1 << 20)) {
    return absl::InvalidArgumentError("configure: bad scale or attention plan");
  }
  if (model_kv_heads == 0) model_kv_heads = config.num_kv_heads;
  if (model_kv_heads < config.num_kv_heads || model_kv_heads > 1024 ||
      model_kv_heads % config.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat("configure: the model's ", model_kv_heads,
                                                   " kv heads are not a multiple of the ",
                                                   config.num_kv_heads, " a sequence holds"));
  }
  // Attention kind: byte 0 softmax (0) or linear (1); linear: byte 1 the feature map, byte 2
  // normalised (0 or 1), and `group` q heads per kv head (the state keeps a q norm per q head).
  std::optional<kernels::LinearAttentionConfig> linear;
  const int kind_code = kind & 0xff, feature_map = (kind >> 8) & 0xff;
  const int normalize = (kind >> 16) & 0xff;
  if (kind_code == 0) {
    if (kind != 0 || group != 0) {
      return absl::InvalidArgumentError("configure: softmax attention takes no linear fields");
    }
  } else if (kind_code == 1) {
    kernels::LinearAttentionConfig kernel;
    kernel.num_seqs = 1;
    kernel.num_kv_heads = config.num_kv_heads;
    kernel.num_q_heads = group * config.num_kv_heads;
    kernel.head_dim = config.head_dim;
    kernel.feature_map = static_cast<kernels::LinearFeatureMap>(feature_map);
    kernel.normalize = normalize == 1;
    kernel.dtype = DType::kFloat32;
    if (group < 1 || group > options_.max_q_heads || normalize > 1 || (kind >> 24) != 0 ||
        feature_map < 1 || feature_map > 3 ||
        !kernels::ValidateLinearAttentionConfig(kernel).ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "configure: bad linear attention (feature map ", feature_map, ", normalize ", normalize,
          ", ", group, " q heads per kv head)"));
    }
    linear = kernel;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("configure: attention kind ", kind_code));
  }
  const bool same = (cache_ != nullptr || states_ != nullptr) &&
                    shape_.num_layers == config.num_layers &&
                    shape_.num_kv_heads == config.num_kv_heads &&
                    shape_.head_dim == config.head_dim && shape_.block_size == config.block_size &&
                    shape_.dtype == config.dtype && model_kv_heads_ == model_kv_heads &&
                    linear_.has_value() == linear.has_value() &&
                    (!linear || (linear_->feature_map == linear->feature_map &&
                                 linear_->normalize == linear->normalize &&
                                 linear_->num_q_heads == linear->num_q_heads));
  if (!same && !sequences_.empty()) {
    return absl::FailedPreconditionError(
        "configure: a different model shape while sequences are held");
  }
  if (!same) {
    cache_ = nullptr;
    backend_.reset();
    states_.reset();
    if (linear) {
      // States live in host memory and advance with the CPU kernels, whatever the worker's
      // device: a state is O(d^2) per head and a decode step touches each once.
      kv::StateCacheConfig states;
      states.num_layers = config.num_layers;
      states.num_kv_heads = config.num_kv_heads;
      states.head_dim = config.head_dim;
      states.group = group;
      states.capacity_bytes = options_.kv_capacity_bytes;
      FERRY_ASSIGN_OR_RETURN(states_, kv::StateCache::Create(states));
      linear_threads_ = std::make_unique<kernels::ThreadPool>(options_.num_threads);
    } else if (options_.backend) {
      FERRY_ASSIGN_OR_RETURN(backend_, options_.backend(config));
    } else {
      FERRY_ASSIGN_OR_RETURN(backend_, CreateCpuAttentionBackend(config, options_.num_threads));
    }
    if (backend_ != nullptr) cache_ = &backend_->cache();
  }
  shape_ = config;
  linear_ = linear;
  model_kv_heads_ = model_kv_heads;
  softmax_scale_ = scale > 0 ? scale : 1.0f / std::sqrt(static_cast<float>(config.head_dim));
  plan_.num_workers = workers;
  plan_.kv_tile_size = tile > 0 ? tile : kernels::CpuDecodeOptions{}.kv_tile_size;
  FrameWriter writer = StartReply(header, 16, nullptr, 0);
  writer.I64(states_ != nullptr ? states_->total_slots() : cache_->total_blocks());
  writer.I64(states_ != nullptr ? states_->free_slots() : cache_->free_blocks());
  return writer.Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::OpenSequence(const FrameHeader& header,
                                                              PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  FERRY_ASSIGN_OR_RETURN(const int n, CheckBatch(header.shape[0]));
  FERRY_RETURN_IF_ERROR(CheckFirstKvHead(header.shape[1]));
  if (header.shape[2] != 0 || header.shape[3] != 0) {
    return absl::InvalidArgumentError("open-sequence: shape[2] and shape[3] must be 0");
  }
  if (header.payload_bytes != static_cast<uint64_t>(n * kEntryBytes)) {
    return LengthMismatch(header, n * kEntryBytes);
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<Entry> entries, ReadTable(reader, n, false));
  for (const Entry& entry : entries) {
    if (sequences_.count(entry.sequence) != 0) {
      return absl::AlreadyExistsError(absl::StrCat("sequence ", entry.sequence, " already open"));
    }
    if (entry.position < 0) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", entry.sequence,
                                                     ": negative first position"));
    }
    if (states_ != nullptr && entry.position != 0) {  // a state summarises from position 0
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", entry.sequence, ": a linear-attention state starts at position 0"));
    }
  }
  if (states_ != nullptr && n > states_->free_slots()) {
    return absl::ResourceExhaustedError(absl::StrCat("state cache full: ", n, " sequences, ",
                                                     states_->free_slots(), " of ",
                                                     states_->total_slots(), " slots free"));
  }
  for (const Entry& entry : entries) {
    FERRY_RETURN_IF_ERROR(states_ != nullptr ? states_->AddSequence(entry.sequence)
                                             : cache_->AddSequence(entry.sequence));
    sequences_[entry.sequence] = Sequence{entry.position, header.shape[1],
                                          std::vector<int64_t>(shape_.num_layers, 0),
                                          std::vector<int64_t>(shape_.num_layers, -1)};
    ++sequences_opened_;
  }
  return StartReply(header, 0, nullptr, 0).Finish();
}

absl::Status WorkerService::AppendRows(int layer, const std::vector<Entry>& entries,
                                       const uint8_t* k, const uint8_t* v) {
  const kv::KvCacheConfig& config = shape_;
  // Check every entry and the blocks needed before touching anything: all or nothing.
  int64_t blocks_needed = 0;
  for (const Entry& entry : entries) {
    Sequence& sequence = sequences_.at(entry.sequence);
    const int64_t local = sequence.layer_lengths[layer];
    if (entry.position != sequence.first_position + local) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", entry.sequence, " layer ", layer, ": position ",
                       entry.position, " is not the next one (",
                       sequence.first_position + local, ")"));
    }
    FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(entry.sequence));
    const int64_t want = (local + 1 + config.block_size - 1) / config.block_size;
    blocks_needed += std::max<int64_t>(0, want - static_cast<int64_t>(blocks->size()));
  }
  if (blocks_needed > cache_->free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("kv cache full: ", blocks_needed,
                                                     " blocks needed, ", cache_->free_blocks(),
                                                     " of ", cache_->total_blocks(), " free"));
  }
  runs_.clear();
  for (const Entry& entry : entries) {
    runs_.push_back({entry.sequence, sequences_.at(entry.sequence).layer_lengths[layer], 1});
  }
  return AppendRuns(layer, runs_, k, v);
}

absl::Status WorkerService::AppendRuns(int layer, const std::vector<kv::KvAppendRun>& runs,
                                       const uint8_t* k, const uint8_t* v) {
  for (const kv::KvAppendRun& run : runs) {
    FERRY_RETURN_IF_ERROR(cache_->Reserve(run.seq, run.first_position + run.count));
  }
  FERRY_RETURN_IF_ERROR(backend_->WriteKv(layer, runs, k, v));
  for (const kv::KvAppendRun& run : runs) {
    const int64_t end = run.first_position + run.count;
    sequences_.at(run.seq).layer_lengths[layer] = end;
    FERRY_ASSIGN_OR_RETURN(const int64_t length, cache_->Length(run.seq));
    FERRY_RETURN_IF_ERROR(cache_->SetLength(run.seq, std::max(length, end)));
  }
  return absl::OkStatus();
}

absl::StatusOr<transport::Buffer> WorkerService::AppendKv(const FrameHeader& header,
                                                          PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  if (states_ != nullptr) {
    return absl::InvalidArgumentError(
        "append-kv: linear-attention states advance only through attend and prefill");
  }
  FERRY_RETURN_IF_ERROR(CheckLayer(header));
  FERRY_RETURN_IF_ERROR(CheckKvDtype(header));
  FERRY_ASSIGN_OR_RETURN(const int n, CheckBatch(header.shape[0]));
  const kv::KvCacheConfig& config = shape_;
  if (header.shape[1] != config.num_kv_heads || header.shape[2] != config.head_dim ||
      header.shape[3] != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "append-kv: shape {", header.shape[1], ", ", header.shape[2], "} but this worker serves ",
        config.num_kv_heads, " kv heads of dim ", config.head_dim));
  }
  const int64_t rows = int64_t{n} * config.num_kv_heads * config.head_dim * DTypeSize(config.dtype);
  const int64_t expected = n * kEntryBytes + 2 * rows;
  if (header.payload_bytes != static_cast<uint64_t>(expected)) {
    return LengthMismatch(header, expected);
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<Entry> entries, ReadTable(reader, n, true));
  const uint8_t* k = reader.Take(rows);
  const uint8_t* v = reader.Take(rows);
  FERRY_RETURN_IF_ERROR(AppendRows(header.layer, entries, k, v));
  return StartReply(header, 0, nullptr, 0).Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::Attend(const FrameHeader& header,
                                                        PayloadReader& reader) {
  const auto start = std::chrono::steady_clock::now();
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  FERRY_RETURN_IF_ERROR(CheckLayer(header));
  FERRY_RETURN_IF_ERROR(CheckKvDtype(header));
  FERRY_ASSIGN_OR_RETURN(const int n, CheckBatch(header.shape[0]));
  const kv::KvCacheConfig& config = shape_;
  const int num_q_heads = header.shape[1];
  if (num_q_heads < 1 || num_q_heads > options_.max_q_heads ||
      num_q_heads % config.num_kv_heads != 0 || header.shape[2] != config.head_dim ||
      header.shape[3] != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "attend: shape {", n, ", ", num_q_heads, ", ", header.shape[2], ", ", header.shape[3],
        "} does not fit ", config.num_kv_heads, " kv heads of dim ", config.head_dim));
  }
  FERRY_RETURN_IF_ERROR(CheckFlags(header));
  const bool with_kv = (header.flags & kFlagWithKv) != 0;
  const int64_t q_bytes = int64_t{n} * num_q_heads * config.head_dim * 4;
  const int64_t kv_rows =
      with_kv ? int64_t{n} * config.num_kv_heads * config.head_dim * DTypeSize(config.dtype) : 0;
  const int64_t expected = n * kEntryBytes + q_bytes + 2 * kv_rows;
  if (header.payload_bytes != static_cast<uint64_t>(expected)) {
    return LengthMismatch(header, expected);
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<Entry> entries, ReadTable(reader, n, true));
  const uint8_t* q = reader.Take(q_bytes);
  if (states_ != nullptr) {
    const uint8_t* k = reader.Take(kv_rows);
    const uint8_t* v = reader.Take(kv_rows);
    return AttendLinear(header, entries, reinterpret_cast<const float*>(q), k, v, start);
  }
  if (with_kv) {
    const uint8_t* k = reader.Take(kv_rows);
    const uint8_t* v = reader.Take(kv_rows);
    FERRY_RETURN_IF_ERROR(AppendRows(header.layer, entries, k, v));
  }
  indptr_.assign(1, 0);
  table_.clear();
  lens_.clear();
  for (const Entry& entry : entries) {
    FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(entry.sequence));
    table_.insert(table_.end(), blocks->begin(), blocks->end());
    indptr_.push_back(static_cast<int32_t>(table_.size()));
    lens_.push_back(static_cast<int32_t>(sequences_.at(entry.sequence).layer_lengths[header.layer]));
  }
  kernels::DecodeAttentionArgs args;
  FrameWriter writer = StartStatesReply(header, n, num_q_heads, &args.state_o, &args.state_lse);
  args.num_seqs = n;
  args.num_q_heads = num_q_heads;
  args.q = reinterpret_cast<const float*>(q);
  args.kv = cache_->LayerView(header.layer);
  args.block_table_indptr = indptr_.data();
  args.block_table = table_.data();
  args.seq_lens = lens_.data();
  args.softmax_scale = softmax_scale_;
  FERRY_RETURN_IF_ERROR(backend_->Attend(header.layer, args, plan_));
  return StampHandlingTime(writer.Finish(), start);
}

absl::StatusOr<transport::Buffer> WorkerService::Prefill(const FrameHeader& header,
                                                         PayloadReader& reader) {
  const auto start = std::chrono::steady_clock::now();
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  FERRY_RETURN_IF_ERROR(CheckLayer(header));
  FERRY_RETURN_IF_ERROR(CheckKvDtype(header));
  const kv::KvCacheConfig& config = shape_;
  const int tokens = header.shape[0];
  const int num_q_heads = header.shape[1];
  if (tokens < 1 || tokens > options_.max_prefill_tokens || num_q_heads < 1 ||
      num_q_heads > options_.max_q_heads || num_q_heads % config.num_kv_heads != 0 ||
      header.shape[2] != config.head_dim || header.shape[3] != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prefill: shape {", tokens, ", ", num_q_heads, ", ", header.shape[2], ", ",
        header.shape[3], "} outside limits or not fitting ", config.num_kv_heads,
        " kv heads of dim ", config.head_dim));
  }
  FERRY_RETURN_IF_ERROR(CheckFlags(header));
  const bool with_kv = (header.flags & kFlagWithKv) != 0;
  const int64_t q_bytes = int64_t{tokens} * num_q_heads * config.head_dim * 4;
  const int64_t kv_rows = with_kv ? int64_t{tokens} * config.num_kv_heads * config.head_dim *
                                        DTypeSize(config.dtype)
                                  : 0;
  const int64_t expected = kEntryBytes + q_bytes + 2 * kv_rows;
  if (header.payload_bytes != static_cast<uint64_t>(expected)) {
    return LengthMismatch(header, expected);
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<Entry> entries, ReadTable(reader, 1, true));
  const uint64_t id = entries[0].sequence;
  const int64_t first = entries[0].position;
  Sequence& sequence = sequences_.at(id);
  const uint8_t* q = reader.Take(q_bytes);
  if (states_ != nullptr) {
    const uint8_t* k = reader.Take(kv_rows);
    const uint8_t* v = reader.Take(kv_rows);
    return PrefillLinear(header, entries[0], reinterpret_cast<const float*>(q), k, v, start);
  }
  if (with_kv) {
    const int64_t local = sequence.layer_lengths[header.layer];
    if (first != sequence.first_position + local) {
      return absl::InvalidArgumentError(absl::StrCat("prefill: sequence ", id, " layer ",
                                                     header.layer, ": chunk starts at ", first,
                                                     ", the next position is ",
                                                     sequence.first_position + local));
    }
    FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(id));
    const int64_t want = (local + tokens + config.block_size - 1) / config.block_size;
    const int64_t needed = std::max<int64_t>(0, want - static_cast<int64_t>(blocks->size()));
    if (needed > cache_->free_blocks()) {
      return absl::ResourceExhaustedError(absl::StrCat("kv cache full: prefill needs ", needed,
                                                       " blocks, ", cache_->free_blocks(),
                                                       " free"));
    }
    const uint8_t* k = reader.Take(kv_rows);
    const uint8_t* v = reader.Take(kv_rows);
    runs_.assign(1, kv::KvAppendRun{id, local, tokens});
    FERRY_RETURN_IF_ERROR(AppendRuns(header.layer, runs_, k, v));
  } else if (first < 0) {
    return absl::InvalidArgumentError("prefill: negative first position");
  }
  const int64_t held = sequence.layer_lengths[header.layer];
  FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(id));
  float *state_o = nullptr, *state_lse = nullptr;
  FrameWriter writer = StartStatesReply(header, tokens, num_q_heads, &state_o, &state_lse);
  FERRY_RETURN_IF_ERROR(backend_->Prefill(header.layer, *blocks, held,
                                          first - sequence.first_position, tokens, num_q_heads,
                                          softmax_scale_, reinterpret_cast<const float*>(q),
                                          state_o, state_lse, plan_));
  return StampHandlingTime(writer.Finish(), start);
}

absl::StatusOr<transport::Buffer> WorkerService::FreeSequence(const FrameHeader& header,
                                                              PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  FERRY_ASSIGN_OR_RETURN(const int n, CheckBatch(header.shape[0]));
  if (header.payload_bytes != static_cast<uint64_t>(n) * 8) return LengthMismatch(header, n * 8);
  std::vector<uint64_t> ids(n);
  for (int i = 0; i < n; ++i) {
    reader.U64(&ids[i]);
    if (sequences_.count(ids[i]) == 0) {
      return absl::NotFoundError(absl::StrCat("unknown sequence ", ids[i]));
    }
    if (std::find(ids.begin(), ids.begin() + i, ids[i]) != ids.begin() + i) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", ids[i], " listed twice"));
    }
  }
  const int64_t free_before = FreeUnits();
  for (uint64_t id : ids) {
    FERRY_RETURN_IF_ERROR(DropSequence(id));
  }
  FrameWriter writer = StartReply(header, 8, nullptr, 0);
  writer.I64(FreeUnits() - free_before);
  return writer.Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::ExportImage(uint64_t id, uint64_t request_id) {
  FERRY_ASSIGN_OR_RETURN(Sequence * sequence, Find(id));
  if (states_ != nullptr) return ExportStateImage(id, *sequence, request_id);
  FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(id));
  const kv::KvCacheConfig& config = shape_;
  const int64_t num_blocks = static_cast<int64_t>(blocks->size());
  FrameHeader header;
  header.type = static_cast<uint16_t>(FrameType::kImportBlocks);
  header.request_id = request_id;
  header.dtype = static_cast<uint8_t>(config.dtype);
  header.shape[0] = config.num_layers;
  header.shape[1] = config.num_kv_heads;
  header.shape[2] = config.block_size;
  header.shape[3] = config.head_dim;
  header.payload_bytes = 8 + 8 + 4 + 4 + 4 + 4 + 8 * config.num_layers +
                         num_blocks * config.num_layers * 2 * cache_->BlockPoolBytes();
  FrameWriter writer(header, pool_);
  writer.U64(id);
  writer.I64(sequence->first_position);
  writer.I32(config.num_layers);
  writer.I32(static_cast<int32_t>(num_blocks));
  writer.I32(sequence->first_kv_head);
  writer.I32(0);
  for (int64_t length : sequence->layer_lengths) writer.I64(length);
  FERRY_RETURN_IF_ERROR(backend_->ExportBlocks(
      *blocks, writer.Reserve(num_blocks * config.num_layers * 2 * cache_->BlockPoolBytes())));
  return writer.Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::ExportBlocks(const FrameHeader& header,
                                                              PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  if (header.payload_bytes != 8) return LengthMismatch(header, 8);
  uint64_t id = 0;
  reader.U64(&id);
  FERRY_ASSIGN_OR_RETURN(transport::Buffer image, ExportImage(id, header.request_id));
  // The image is an ImportBlocks request; as a reply it is the export's answer.
  FrameHeader reply = *DecodeFrameHeader(image.data(), image.size());
  reply.type = static_cast<uint16_t>(header.type | kReplyBit);
  EncodeFrameHeader(reply, image.data());
  return image;
}

absl::StatusOr<WorkerService::ImageHeader> WorkerService::ReadImageHeader(
    PayloadReader& reader) const {
  ImageHeader image;
  int32_t zero = 0;
  if (!reader.U64(&image.id) || !reader.I64(&image.first_position) ||
      !reader.I32(&image.layers) || !reader.I32(&image.units) ||
      !reader.I32(&image.first_kv_head) || !reader.I32(&zero)) {
    return absl::InvalidArgumentError("import-blocks: image header truncated");
  }
  if (image.layers != shape_.num_layers || zero != 0) {
    return absl::InvalidArgumentError(absl::StrCat("import-blocks: ", image.layers,
                                                   " layers in the image; this worker has ",
                                                   shape_.num_layers));
  }
  FERRY_RETURN_IF_ERROR(CheckFirstKvHead(image.first_kv_head));
  if (sequences_.count(image.id) != 0) {
    return absl::AlreadyExistsError(absl::StrCat("import-blocks: sequence ", image.id,
                                                 " already held"));
  }
  return image;
}

absl::StatusOr<transport::Buffer> WorkerService::ImportBlocks(const FrameHeader& header,
                                                              PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  if (((header.flags & kFlagLinearState) != 0) != (states_ != nullptr) ||
      (header.flags & ~kFlagLinearState) != 0) {
    return absl::InvalidArgumentError(
        "import-blocks: the image's kind (KV or linear-attention state) is not this worker's");
  }
  if (states_ != nullptr) return ImportStates(header, reader);
  FERRY_RETURN_IF_ERROR(CheckKvDtype(header));
  const kv::KvCacheConfig& config = shape_;
  if (header.shape[0] != config.num_layers || header.shape[1] != config.num_kv_heads ||
      header.shape[2] != config.block_size || header.shape[3] != config.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "import-blocks: image shape {", header.shape[0], ", ", header.shape[1], ", ",
        header.shape[2], ", ", header.shape[3], "} differs from this worker's {",
        config.num_layers, ", ", config.num_kv_heads, ", ", config.block_size, ", ",
        config.head_dim, "}"));
  }
  FERRY_ASSIGN_OR_RETURN(const ImageHeader image, ReadImageHeader(reader));
  const uint64_t id = image.id;
  const int64_t first = image.first_position;
  const int32_t layers = image.layers, num_blocks = image.units;
  const int32_t first_kv_head = image.first_kv_head;
  if (num_blocks < 0 || first < 0) {
    return absl::InvalidArgumentError("import-blocks: bad block count or position");
  }
  std::vector<int64_t> lengths(layers);
  int64_t longest = 0;
  for (int64_t& length : lengths) {
    if (!reader.I64(&length)) return absl::InvalidArgumentError("import-blocks: lengths truncated");
    if (length < 0 || length > int64_t{num_blocks} * config.block_size) {
      return absl::InvalidArgumentError(absl::StrCat("import-blocks: length ", length, " for ",
                                                     num_blocks, " blocks"));
    }
    longest = std::max(longest, length);
  }
  if ((longest + config.block_size - 1) / config.block_size != num_blocks) {
    return absl::InvalidArgumentError("import-blocks: block count does not match the lengths");
  }
  const int64_t body = int64_t{num_blocks} * layers * 2 * cache_->BlockPoolBytes();
  if (reader.remaining() != static_cast<uint64_t>(body)) {
    return LengthMismatch(header, header.payload_bytes - reader.remaining() + body);
  }
  if (num_blocks > cache_->free_blocks()) {
    return absl::ResourceExhaustedError(absl::StrCat("kv cache full: import needs ", num_blocks,
                                                     " blocks, ", cache_->free_blocks(),
                                                     " free"));
  }
  FERRY_RETURN_IF_ERROR(cache_->AddSequence(id));
  FERRY_RETURN_IF_ERROR(cache_->Reserve(id, longest));
  FERRY_ASSIGN_OR_RETURN(const std::vector<int32_t>* blocks, cache_->BlockTable(id));
  absl::Status copied = backend_->ImportBlocks(*blocks, reader.Take(body));
  if (!copied.ok()) {
    cache_->FreeSequence(id).IgnoreError();  // all or nothing
    return copied;
  }
  FERRY_RETURN_IF_ERROR(cache_->SetLength(id, longest));
  sequences_[id] = Sequence{first, first_kv_head, std::move(lengths), {}};
  ++sequences_opened_;
  return StartReply(header, 0, nullptr, 0).Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::Migrate(const FrameHeader& header,
                                                         PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  uint64_t id = 0;
  int32_t port = 0, host_length = 0;
  if (!reader.U64(&id) || !reader.I32(&port) || !reader.I32(&host_length)) {
    return absl::InvalidArgumentError("migrate: payload truncated");
  }
  if (host_length < 1 || host_length > 255 || static_cast<uint64_t>(host_length) !=
                                                  reader.remaining() || port < 1 || port > 65535) {
    return absl::InvalidArgumentError("migrate: bad destination address");
  }
  const std::string host(reinterpret_cast<const char*>(reader.Take(host_length)), host_length);
  if (!forward_) return absl::UnimplementedError("migrate: this worker cannot reach others");
  FERRY_RETURN_IF_ERROR(Find(id).status());
  FERRY_ASSIGN_OR_RETURN(transport::Buffer image, ExportImage(id, header.request_id));
  FERRY_ASSIGN_OR_RETURN(transport::Buffer reply, forward_(host, port, std::move(image)));
  FERRY_ASSIGN_OR_RETURN(FrameHeader reply_header, DecodeFrameHeader(reply.data(), reply.size()));
  absl::Status imported = ReplyStatus(reply_header, reply.data() + kFrameHeaderBytes);
  pool_.Release(std::move(reply));
  if (!imported.ok()) {
    return absl::Status(imported.code(), absl::StrCat("migrate: destination ", host, ":", port,
                                                      " refused: ", imported.message()));
  }
  // The destination holds it now; only then free it here.
  FERRY_RETURN_IF_ERROR(DropSequence(id));
  return StartReply(header, 0, nullptr, 0).Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::Truncate(const FrameHeader& header,
                                                          PayloadReader& reader) {
  FERRY_RETURN_IF_ERROR(RequireConfigured());
  FERRY_ASSIGN_OR_RETURN(const int n, CheckBatch(header.shape[0]));
  if (header.payload_bytes != static_cast<uint64_t>(n * kEntryBytes)) {
    return LengthMismatch(header, n * kEntryBytes);
  }
  FERRY_ASSIGN_OR_RETURN(std::vector<Entry> entries, ReadTable(reader, n, true));
  for (const Entry& entry : entries) {
    if (entry.position < 0) {
      return absl::InvalidArgumentError(absl::StrCat("truncate: sequence ", entry.sequence,
                                                     ": negative position"));
    }
  }
  if (states_ != nullptr) return RewindStates(header, entries);
  int64_t freed = 0;
  for (const Entry& entry : entries) {
    Sequence& sequence = sequences_.at(entry.sequence);
    const int64_t keep = std::max<int64_t>(0, entry.position - sequence.first_position);
    for (int64_t& length : sequence.layer_lengths) length = std::min(length, keep);
    FERRY_ASSIGN_OR_RETURN(const int64_t blocks, cache_->Truncate(entry.sequence, keep));
    freed += blocks;
  }
  FrameWriter writer = StartReply(header, 8, nullptr, 0);
  writer.I64(freed);
  return writer.Finish();
}

int64_t WorkerService::FreeUnits() const {
  return states_ != nullptr ? states_->free_slots() : cache_->free_blocks();
}

absl::Status WorkerService::DropSequence(uint64_t id) {
  FERRY_RETURN_IF_ERROR(states_ != nullptr ? states_->FreeSequence(id) : cache_->FreeSequence(id));
  sequences_.erase(id);
  return absl::OkStatus();
}

int64_t WorkerService::used_bytes() const {
  if (states_ != nullptr) return states_->used_bytes();
  return cache_ != nullptr ? cache_->used_bytes() : 0;
}

size_t WorkerService::sequences_held() const { return sequences_.size(); }

absl::Status WorkerService::WidenKv(const uint8_t* k, const uint8_t* v, int64_t rows) {
  const int64_t elements = rows * shape_.num_kv_heads * shape_.head_dim;
  linear_k_.resize(elements);
  linear_v_.resize(elements);
  DTypeToFloats(k, elements, shape_.dtype, linear_k_.data());
  DTypeToFloats(v, elements, shape_.dtype, linear_v_.data());
  return absl::OkStatus();
}

absl::StatusOr<transport::Buffer> WorkerService::AttendLinear(
    const FrameHeader& header, const std::vector<Entry>& entries, const float* q,
    const uint8_t* k, const uint8_t* v, std::chrono::steady_clock::time_point start) {
  const int n = static_cast<int>(entries.size());
  const int layer = header.layer;
  const int num_q_heads = header.shape[1];
  if (num_q_heads != linear_->num_q_heads) {
    return absl::InvalidArgumentError(absl::StrCat("attend: ", num_q_heads, " q heads, but this "
                                                   "worker's states keep ",
                                                   linear_->num_q_heads));
  }
  slots_.clear();
  for (const Entry& entry : entries) {
    const Sequence& sequence = sequences_.at(entry.sequence);
    if (entry.position != sequence.layer_lengths[layer]) {
      return absl::InvalidArgumentError(absl::StrCat(
          "sequence ", entry.sequence, " layer ", layer, ": position ", entry.position,
          " is not the next one (", sequence.layer_lengths[layer], ")"));
    }
    FERRY_ASSIGN_OR_RETURN(const int32_t slot, states_->Slot(entry.sequence));
    slots_.push_back(slot);
  }
  FERRY_RETURN_IF_ERROR(WidenKv(k, v, n));
  const int64_t states = int64_t{n} * num_q_heads;
  float *out = nullptr, *lse = nullptr;
  FrameWriter writer = StartStatesReply(header, n, num_q_heads, &out, &lse);
  // The state before this token is kept, so the step can be undone (Truncate).
  for (const Entry& entry : entries) {
    FERRY_RETURN_IF_ERROR(states_->Save(entry.sequence, layer));
    Sequence& sequence = sequences_.at(entry.sequence);
    sequence.backup_lengths[layer] = sequence.layer_lengths[layer];
  }
  kernels::LinearAttentionDecodeArgs args;
  args.config = *linear_;
  args.config.num_seqs = n;
  args.q = q;
  args.k = linear_k_.data();
  args.v = linear_v_.data();
  args.states = states_->States(layer);
  args.state_slots = slots_.data();
  args.num_state_slots = static_cast<int>(states_->total_slots());
  args.out = out;
  FERRY_RETURN_IF_ERROR(kernels::LinearAttentionDecodeCpu(args, *linear_threads_));
  // o is the whole output: a complete partial state (lse 0 merges as weight 1 with nothing).
  std::fill(lse, lse + states, 0.0f);
  for (const Entry& entry : entries) ++sequences_.at(entry.sequence).layer_lengths[layer];
  return StampHandlingTime(writer.Finish(), start);
}

absl::StatusOr<transport::Buffer> WorkerService::PrefillLinear(
    const FrameHeader& header, const Entry& entry, const float* q, const uint8_t* k,
    const uint8_t* v, std::chrono::steady_clock::time_point start) {
  const int tokens = header.shape[0];
  const int layer = header.layer;
  const int num_q_heads = header.shape[1];
  if (num_q_heads != linear_->num_q_heads) {
    return absl::InvalidArgumentError(absl::StrCat("prefill: ", num_q_heads, " q heads, but this "
                                                   "worker's states keep ",
                                                   linear_->num_q_heads));
  }
  Sequence& sequence = sequences_.at(entry.sequence);
  if (entry.position != sequence.layer_lengths[layer]) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prefill: sequence ", entry.sequence, " layer ", layer, ": chunk starts at ",
        entry.position, ", the next position is ", sequence.layer_lengths[layer]));
  }
  FERRY_RETURN_IF_ERROR(WidenKv(k, v, tokens));
  const int64_t states = int64_t{tokens} * num_q_heads;
  float *out = nullptr, *lse = nullptr;
  FrameWriter writer = StartStatesReply(header, tokens, num_q_heads, &out, &lse);
  FERRY_RETURN_IF_ERROR(states_->Save(entry.sequence, layer));
  sequence.backup_lengths[layer] = sequence.layer_lengths[layer];
  FERRY_ASSIGN_OR_RETURN(float* state, states_->Record(entry.sequence, layer, /*backup=*/false));
  const int32_t cu_seqlens[2] = {0, tokens};
  kernels::LinearAttentionForwardArgs args;
  args.config = *linear_;
  args.config.num_seqs = 1;
  args.cu_seqlens = cu_seqlens;
  args.total_tokens = tokens;
  args.q = q;
  args.k = linear_k_.data();
  args.v = linear_v_.data();
  args.initial_state = state;
  args.final_state = state;  // advanced in place
  args.out = out;
  FERRY_RETURN_IF_ERROR(kernels::LinearAttentionForwardCpu(args, *linear_threads_));
  std::fill(lse, lse + states, 0.0f);
  sequence.layer_lengths[layer] += tokens;
  return StampHandlingTime(writer.Finish(), start);
}

absl::StatusOr<transport::Buffer> WorkerService::RewindStates(const FrameHeader& header,
                                                              const std::vector<Entry>& entries) {
  // A state cannot be cut; it can go back one update, to its backup. Check all, then change.
  for (const Entry& entry : entries) {
    const Sequence& sequence = sequences_.at(entry.sequence);
    for (int layer = 0; layer < shape_.num_layers; ++layer) {
      if (sequence.layer_lengths[layer] > entry.position &&
          sequence.backup_lengths[layer] != entry.position) {
        return absl::FailedPreconditionError(absl::StrCat(
            "truncate: sequence ", entry.sequence, " layer ", layer, ": its state summarises ",
            sequence.layer_lengths[layer], " positions and can go back only to ",
            sequence.backup_lengths[layer], ", not ", entry.position));
      }
    }
  }
  for (const Entry& entry : entries) {
    Sequence& sequence = sequences_.at(entry.sequence);
    for (int layer = 0; layer < shape_.num_layers; ++layer) {
      if (sequence.layer_lengths[layer] <= entry.position) continue;
      FERRY_RETURN_IF_ERROR(states_->Restore(entry.sequence, layer));
      sequence.layer_lengths[layer] = entry.position;
      sequence.backup_lengths[layer] = -1;
    }
  }
  FrameWriter writer = StartReply(header, 8, nullptr, 0);
  writer.I64(0);  // states hold no blocks
  return writer.Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::ExportStateImage(uint64_t id,
                                                                  const Sequence& sequence,
                                                                  uint64_t request_id) {
  const int64_t record_bytes = int64_t{shape_.num_kv_heads} * StateStride() * 4;
  FrameHeader header;
  header.type = static_cast<uint16_t>(FrameType::kImportBlocks);
  header.request_id = request_id;
  header.dtype = static_cast<uint8_t>(DType::kFloat32);
  header.flags = kFlagLinearState;
  header.shape[0] = shape_.num_layers;
  header.shape[1] = shape_.num_kv_heads;
  header.shape[2] = static_cast<int32_t>(StateStride());
  header.shape[3] = shape_.head_dim;
  header.payload_bytes = 8 + 8 + 4 + 4 + 4 + 4 + 8 * shape_.num_layers +
                         shape_.num_layers * record_bytes;
  FrameWriter writer(header, pool_);
  writer.U64(id);
  writer.I64(0);
  writer.I32(shape_.num_layers);
  writer.I32(1);  // one state slot
  writer.I32(sequence.first_kv_head);
  writer.I32(0);
  for (int64_t length : sequence.layer_lengths) writer.I64(length);
  for (int layer = 0; layer < shape_.num_layers; ++layer) {
    FERRY_ASSIGN_OR_RETURN(const float* record, states_->Record(id, layer, /*backup=*/false));
    writer.Bytes(record, record_bytes);
  }
  return writer.Finish();
}

absl::StatusOr<transport::Buffer> WorkerService::ImportStates(const FrameHeader& header,
                                                              PayloadReader& reader) {
  if (header.dtype != static_cast<uint8_t>(DType::kFloat32) ||
      header.shape[0] != shape_.num_layers || header.shape[1] != shape_.num_kv_heads ||
      header.shape[2] != StateStride() || header.shape[3] != shape_.head_dim) {
    return absl::InvalidArgumentError(absl::StrCat(
        "import-blocks: state image {", header.shape[0], ", ", header.shape[1], ", ",
        header.shape[2], ", ", header.shape[3], "} differs from this worker's {",
        shape_.num_layers, ", ", shape_.num_kv_heads, ", ", StateStride(), ", ",
        shape_.head_dim, "} float32"));
  }
  FERRY_ASSIGN_OR_RETURN(const ImageHeader image, ReadImageHeader(reader));
  const uint64_t id = image.id;
  const int32_t layers = image.layers, first_kv_head = image.first_kv_head;
  if (image.units != 1 || image.first_position != 0) {
    return absl::InvalidArgumentError("import-blocks: a state image is one slot from position 0");
  }
  std::vector<int64_t> lengths(layers);
  for (int64_t& length : lengths) {
    if (!reader.I64(&length) || length < 0) {
      return absl::InvalidArgumentError("import-blocks: bad or truncated lengths");
    }
  }
  const int64_t record_bytes = int64_t{shape_.num_kv_heads} * StateStride() * 4;
  if (reader.remaining() != static_cast<uint64_t>(layers * record_bytes)) {
    return LengthMismatch(header,
                          header.payload_bytes - reader.remaining() + layers * record_bytes);
  }
  FERRY_RETURN_IF_ERROR(states_->AddSequence(id));
  for (int layer = 0; layer < layers; ++layer) {
    FERRY_ASSIGN_OR_RETURN(float* record, states_->Record(id, layer, /*backup=*/false));
    std::memcpy(record, reader.Take(record_bytes), record_bytes);
  }
  sequences_[id] = Sequence{0, first_kv_head, std::move(lengths),
                            std::vector<int64_t>(layers, -1)};
  ++sequences_opened_;
  return StartReply(header, 0, nullptr, 0).Finish();
}

int64_t WorkerService::StateStride() const { return kv::StateStride(states_->config()); }

}  // namespace ferry::offload
